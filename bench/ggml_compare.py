#!/usr/bin/python3
"""head-attention against llama.cpp's CPU backend (ggml), prefill and decode steps (issue 25).

Runs bench/ggml_attention (built by bench/ggml_setup.sh against the npm package @node-llama-cpp/linux-x64's
ggml libraries and the llama.cpp source node-llama-cpp ships) in --rounds separate processes, each timing every
case once in an order rotated by its round number, and writes results/ggml_comparison.md and .json. A cell is
the median over rounds of each round's median. Python 3, standard library only.

  sh bench/ggml_setup.sh /tmp/ggml                                    # npm install + clone + compile
  /usr/bin/python3 bench/ggml_compare.py --ggml-dir /tmp/ggml          # ~6 minutes (5 rounds)
  /usr/bin/python3 bench/ggml_compare.py --ggml-dir /tmp/ggml --quick  # smoke: B=2 T=10 and n=128, 1 round
  /usr/bin/python3 bench/ggml_compare.py --from-json bench/results/ggml_comparison.json   # redo the .md only
"""

import argparse
import datetime
import json
import os
import re
import shlex
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from torch_compare import cpu_pressure, git_head, lscpu_summary, machine_busy, wait_quiet  # noqa: E402

EMB, HEAD = 512, 64
GGML_COLS = [("ggml_fa", "f32"), ("ggml_fa", "f16"), ("ggml_mm", "f32"), ("ggml_mm", "f16")]


def log(msg):
    print(f"[ggml_compare] {msg}", file=sys.stderr, flush=True)


def lib_dir(ggml_dir):
    return os.path.join(ggml_dir, "node_modules", "@node-llama-cpp", "linux-x64", "bins", "linux-x64")


def versions(ggml_dir):
    v = {}
    for pkg, key in (("node-llama-cpp", "node_llama_cpp"), ("@node-llama-cpp/linux-x64", "node_llama_cpp_linux_x64")):
        try:
            with open(os.path.join(ggml_dir, "node_modules", pkg, "package.json")) as f:
                v[key] = json.load(f)["version"]
        except OSError:
            pass
    try:
        with open(os.path.join(ggml_dir, "node_modules", "node-llama-cpp", "llama", "llama.cpp.info.json")) as f:
            v["llama_cpp_release"] = json.load(f)
        with open(os.path.join(lib_dir(ggml_dir), "_nlcBuildMetadata.json")) as f:
            v["binaries_build"] = json.load(f)
    except OSError:
        pass
    src = os.path.join(ggml_dir, "llama.cpp")
    try:
        v["llama_cpp_bundle_commit"] = subprocess.run(["git", "-C", src, "log", "-1", "--format=%H %cI"],
                                                      stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
        with open(os.path.join(src, "ggml", "CMakeLists.txt")) as f:
            txt = f.read()
        v["ggml_version"] = ".".join(re.search(rf"set\(GGML_VERSION_{p} (\d+)\)", txt).group(1)
                                     for p in ("MAJOR", "MINOR", "PATCH"))
    except (OSError, subprocess.CalledProcessError, AttributeError):
        pass
    try:
        v["cxx"] = subprocess.run([os.environ.get("CXX", "g++"), "--version"], stdout=subprocess.PIPE, text=True,
                                  check=True).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError):
        pass
    return v


def cpu_info():
    info = {}
    try:
        out = subprocess.run(["lscpu"], stdout=subprocess.PIPE, text=True, check=True).stdout
        for line in out.splitlines():
            k, _, val = line.partition(":")
            info[k.strip()] = val.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    flags = info.get("Flags", "").split()
    return {"model": info.get("Model name", "?"), "family": info.get("CPU family"), "model_number": info.get("Model"),
            "cpus": info.get("CPU(s)"), "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "avx512_vnni": "avx512_vnni" in flags, "summary": lscpu_summary()}


# ---------------------------------------------------------------------------------------------------- run
def run(args):
    binary = os.path.join(args.ggml_dir, "ggml_attention")
    if not os.path.exists(binary) or args.setup:
        cmd = ["sh", os.path.join(HERE, "ggml_setup.sh"), args.ggml_dir]
        log("setup: " + " ".join(cmd))
        subprocess.run(cmd, check=True, stdout=sys.stderr)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rounds, out = [], None
    commands = []
    for r in range(args.rounds):
        if args.wait_quiet > 0:
            wait_quiet(args.wait_quiet)
        busy_before = machine_busy(1.0)
        cmd = [binary, "--lib-dir", lib_dir(args.ggml_dir), "--rounds", "1", "--first-round", str(r),
               "--min-time", str(args.min_time), "--threads", ",".join(map(str, args.threads))]
        if args.quick:
            cmd.append("--quick")
        if args.only:
            cmd += ["--only", args.only]
        if r not in (0, args.rounds - 1):
            cmd.append("--no-limits")
        commands.append(" ".join(map(shlex.quote, cmd)))
        log(f"round {r + 1}/{args.rounds} (machine {busy_before:.0%} busy before): {commands[-1]}")
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            sys.exit(f"[ggml_compare] ggml_attention failed ({proc.returncode})")
        data = json.loads(proc.stdout)
        if out is None:
            out = {k: v for k, v in data.items() if k not in ("results", "limits")}
            out["limits"] = []
            out["stderr_first_round"] = proc.stderr
        out["limits"] += [dict(l, round=r) for l in data["limits"]]
        rounds.append({"round": r, "busy_before": busy_before, "busy_after": machine_busy(1.0),
                       "loadavg": " ".join(f"{v:.2f}" for v in os.getloadavg()), "cpu_pressure": cpu_pressure(),
                       "results": data["results"]})
    run_info = {"date": date, "cpu": cpu_info(), "library": git_head(), "versions": versions(args.ggml_dir),
                "commands": ["sh bench/ggml_setup.sh " + args.ggml_dir,
                             " ".join(map(shlex.quote, [sys.executable] + sys.argv))] + commands[:1] + ["..."],
                "settings": {"rounds": args.rounds, "min_time": args.min_time, "threads": args.threads,
                             "quick": args.quick, "only": args.only}}
    return {"run_info": run_info, "harness": out, "rounds": rounds}


# ---------------------------------------------------------------------------------------------------- table
def summarise(saved):
    cells = {}
    for rnd in saved["rounds"]:
        for r in rnd["results"]:
            key = (r["step"], r["heads"], r["B"], r["T"], r["n"], r["impl"], r["kv"], r["threads"])
            cells.setdefault(key, {"median_us": [], "cpu_median_us": [], "min_us": []})
            cells[key]["median_us"].append(r["median_us"])
            cells[key]["min_us"].append(r["min_us"])
            cells[key]["cpu_median_us"].append(r["cpu_median_us"])
    return {k: {"us": statistics.median(v["median_us"]), "cpu_us": statistics.median(v["cpu_median_us"]),
                "lo": min(v["median_us"]), "hi": max(v["median_us"]), "rounds": len(v["median_us"]),
                "fastest": min(v["min_us"])}
            for k, v in cells.items()}


def fmt_t(us, step):
    if us is None:
        return "—"
    if step == "prefill" and us >= 1000:
        v = us / 1000
        return f"{v:.3g} ms" if v < 100 else f"{v:.0f} ms"
    return f"{us:.3g} µs" if us < 1000 else f"{us / 1000:.3g} ms"


def rows_of(summary):
    shapes = sorted({(k[0], k[1], k[2], k[3], k[4]) for k in summary},
                    key=lambda s: (s[0] != "prefill", s[1], -s[2] * s[3], s[4]))
    return shapes


def shape_label(s):
    step, h, b, t, n = s
    heads = "1 head" if h == 1 else f"{h} heads"
    return f"prefill {heads}, B={b} T={t}" if step == "prefill" else f"decode {heads}, n={n}"


def floor_bytes(h, n, kv_bytes):
    w = 3 * h * HEAD * EMB * 4 + (EMB * h * HEAD * 4 if h > 1 else 0)
    return w, 2 * h * n * HEAD * kv_bytes


def write_md(saved, path):
    s = summarise(saved)
    ri, hz = saved["run_info"], saved["harness"]
    threads = ri["settings"]["threads"]
    lim = hz.get("limits", [])
    lines = ["# head-attention vs llama.cpp's CPU backend (ggml): prefill and decode steps\n"]
    lines.append(f"Measured {ri['date']} by `bench/ggml_compare.py` ({len(saved['rounds'])} rounds, each a separate "
                 "process timing every case once, order rotated per round; a cell is the median over rounds of each "
                 "round's median per-call wall time).\n")
    if ri.get("note"):
        lines.append(f"**Note:** {ri['note']}\n")
    c = ri["cpu"]
    lines.append(f"- Machine: {c['summary']}; lscpu family {c['family']} model {c['model_number']}; "
                 f"AVX2 {'yes' if c['avx2'] else 'no'}, AVX-512F {'yes' if c['avx512f'] else 'no'} "
                 f"(VNNI {'yes' if c['avx512_vnni'] else 'no'}, BF16 {'yes' if c['avx512_bf16'] else 'no'}). "
                 "Shared with other engineers' jobs: compare within this run only.")
    v = ri["versions"]
    lines.append(f"- ggml: npm `node-llama-cpp@{v.get('node_llama_cpp')}` + `@node-llama-cpp/linux-x64@"
                 f"{v.get('node_llama_cpp_linux_x64')}` (llama.cpp release {v.get('llama_cpp_release', {}).get('tag')} "
                 f"as node-llama-cpp names it; bundle commit {v.get('llama_cpp_bundle_commit')}, ggml "
                 f"{v.get('ggml_version')}; binaries built on {v.get('binaries_build', {}).get('buildOptions', {}).get('platformInfo')}). "
                 f"CPU variant loaded: `{os.path.basename(hz['ggml_cpu_library'])}` (best `ggml_backend_score` "
                 f"{hz['ggml_cpu_score']}; others: " +
                 ", ".join(f"{k.replace('libggml-cpu-', '').replace('.so', '')} {val}"
                           for k, val in sorted(hz["ggml_cpu_scores"].items(), key=lambda kv: -kv[1])
                           if k != os.path.basename(hz["ggml_cpu_library"])) + ").")
    lines.append(f"- Ours: {ri['library']}, compiled into the same harness (`g++ -O3 -march=native -fopenmp`, "
                 f"{v.get('cxx')}, Eigen {hz['eigen_version']}, float packets of {hz['simd_float_width']}).")
    if lim:
        fma = [l["peak_fma_gflops_1core"] for l in lim]
        bs = [l["read_gbps_4_5MiB"] for l in lim]
        bb = [l["read_gbps_64MiB"] for l in lim]
        lines.append(f"- Machine limits, same run (before the first and after the last round): one core's float FMA "
                     f"peak {min(fma):.0f}–{max(fma):.0f} GFLOP/s; one core's read bandwidth (vectorised streaming "
                     f"sum, best of 7) {min(bs):.0f}–{max(bs):.0f} GB/s over 4.5 MiB, {min(bb):.0f}–{max(bb):.0f} GB/s "
                     "over 64 MiB.")
    busy = [r["busy_before"] for r in saved["rounds"] if r["busy_before"] is not None]
    ratios = sorted(v2["cpu_us"] / v2["us"] for k, v2 in s.items() if k[7] == 1 and v2["us"] > 0)
    if busy:
        lines.append(f"- Noise: machine {min(busy):.0%}–{max(busy):.0%} busy just before each round (all cores, "
                     "other processes included); "
                     + (f"one-thread CPU/wall medians {ratios[0]:.2f}–{ratios[-1]:.2f} (1.00: the core was ours); "
                        if ratios else "") + "load averages after rounds: "
                     + "; ".join(r["loadavg"] for r in saved["rounds"]) + ".")
    lines.append("")
    lines.append("What both sides compute (emb 512, head 64, float input and weights; see bench/ggml_attention.cpp):")
    lines.append("")
    lines.append("- **prefill**, x [B, T, 512]: Q|K|V projections with bias, causal softmax(Q Kᵀ/8) V; 1 head -> "
                 "[B, T, 64]; 8 heads -> concatenation + output projection [512, 512] with bias -> [B, T, 512]. "
                 "Ours: `PackedHeadAttention` / `PackedMultiHeadAttention::forward_into` with a `Workspace`. ggml: one "
                 "F32 `mul_mat` [512, 3·H·64] + `add`, then `ggml_flash_attn_ext` (fa; F16 causal mask) or `mul_mat` + "
                 "`ggml_soft_max_ext` (F16 causal mask, scale 1/8) + `mul_mat` with Vᵀ (mm), 8 heads: + output "
                 "`mul_mat` + `add`. F16 K/V: K and V converted by `ggml_cpy` into F16 tensors first (llama.cpp's "
                 "cache write), part of the timed graph; ours is float throughout (its column is the same in both).")
    lines.append("- **decode**, one new row against a cache of n positions: its Q|K|V projections, K and V appended "
                 "at position n, attention over n + 1 keys, (8 heads: output projection); timed repeatedly, position n "
                 "overwritten. Ours: `forward_cached_into` with a `Workspace` over a `reserve()`d `KVCache` stored in "
                 "float32 (vs ggml F32) or float16 (vs ggml F16), `truncate(n)` after each step (included). ggml: the "
                 "K cache [64, n+1, H], the V cache [64, n+1, H] (fa) or transposed [n+1, 64, H] (mm, llama.cpp's "
                 "non-flash layout), appended by `ggml_cpy` into views; mask of zeros.")
    lines.append("- ggml runs each graph with `ggml_graph_compute` and a `ggml_threadpool` of n threads (default "
                 "polling, as llama.cpp), created before the case's timing and freed after; ours with "
                 "`set_num_threads(n)` (OpenMP).")
    lines.append("")
    def table(metric, t, title, note):
        lines.append(f"## {title}\n")
        lines.append(note + " Ratio = ggml / ours (> 1: ours faster); decode: ggml F32 against ours with a float32 "
                     "cache, ggml F16 against ours with a float16 cache."
                     + (" `—`: over 10x the case's one-thread best round, i.e. disturbed in the rounds that count "
                        "(not a measurement of the code)." if t > 1 else "") + "\n")
        lines.append("| step | ours (f32 cache) | ours (f16 cache) | ggml fa F32 | ggml fa F16 | ggml mm F32 | "
                     "ggml mm F16 | best ggml / ours |")
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        def get(key):
            """The cell, or None when it is over 10x the one-thread figure (a lost round: see below)."""
            v = s.get(key, {}).get(metric)
            one = s.get(key[:-1] + (1,), {}).get("lo")
            return None if v is not None and one and t > 1 and v > 10 * one else v

        for sh in rows_of(s):
            step = sh[0]
            ours32 = get(sh + ("ours", "f32", t))
            ours16 = get(sh + ("ours", "f16", t)) if step == "decode" else ours32
            cells = [fmt_t(ours32, step), fmt_t(ours16, step) if step == "decode" else "(same)"]
            best = None
            for impl, kv in GGML_COLS:
                g = get(sh + (impl, kv, t))
                ref = ours32 if kv == "f32" else ours16
                cells.append(f"{fmt_t(g, step)} ({g / ref:.2f}x)" if g and ref else fmt_t(g, step))
                if g and ref:
                    best = min(best, g / ref) if best is not None else g / ref
            cells.append(f"**{best:.2f}x**" if best is not None else "—")
            lines.append(f"| {shape_label(sh)} | " + " | ".join(cells) + " |")
        lines.append("")

    for t in threads:
        table("us", t, f"{t} thread{'s' if t > 1 else ''}: median wall time per call",
              "Median over rounds of each round's median per-call wall time.")
    if 1 in threads:
        table("cpu_us", 1, "1 thread: median CPU time of the calling thread per call",
              "The same calls' thread CPU time (`CLOCK_THREAD_CPUTIME_ID`): what other processes on the machine "
              "take away from the wall time does not count here. The least disturbed one-thread view.")
    for t in threads:
        table("lo", t, f"{t} thread{'s' if t > 1 else ''}: best round",
              "The lowest of the rounds' medians: on a busy machine, the round in which the case was least "
              "disturbed. With two threads a whole round can be lost: when another process holds the second core, "
              "every call waits for a scheduler time slice and takes milliseconds instead of microseconds; a case "
              "still in milliseconds here was disturbed in every round.")
    if lim and any(k[7] == 1 for k in s):
        bw = max(l["read_gbps_4_5MiB"] for l in lim)
        lines.append("## Decode against the memory floor\n")
        lines.append(f"Floor = bytes a step must read (weights F32 + the K/V cache in its storage) / {bw:.0f} GB/s "
                     "(the best 4.5 MiB read bandwidth above: everything a step reads stays in L2/L3 between steps). "
                     "One thread, each side's best round (the medians carry the machine's load).\n")
        lines.append("| step | weights | K/V f32 | floor f32 | ours f32 / floor | best ggml F32 / floor | "
                     "K/V f16 | floor f16 | ours f16 / floor | best ggml F16 / floor |")
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for sh in rows_of(s):
            if sh[0] != "decode":
                continue
            cells = []
            for kvb, kv in ((4, "f32"), (2, "f16")):
                w, kvbytes = floor_bytes(sh[1], sh[4], kvb)
                floor = (w + kvbytes) / (bw * 1e9) * 1e6
                ours = s.get(sh + ("ours", kv, 1), {}).get("lo")
                gg = [s.get(sh + (impl, kv, 1), {}).get("lo") for impl in ("ggml_fa", "ggml_mm")]
                gg = min(x for x in gg if x) if any(gg) else None
                if kv == "f32":
                    cells.append(f"{w / 2**20:.2f} MiB")
                cells += [f"{kvbytes / 2**20:.2f} MiB", f"{floor:.3g} µs",
                          f"{ours / floor:.2f}" if ours else "—", f"{gg / floor:.2f}" if gg else "—"]
            lines.append(f"| {shape_label(sh)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("## Parity (same weights, same input; ggml against ours)\n")
    lines.append("max |ggml − ours| over the output, with max |ours|; tolerance relative to max |ours|: 1e-4 for F32 "
                 "K/V, 1e-2 for F16 (ggml's F16 paths round Q, and for fa the softmax weights, to F16 as well). "
                 "Decode F16: against ours with a float16 cache.\n")
    lines.append("| case | max abs diff | max abs ours | ok |")
    lines.append("| --- | ---: | ---: | --- |")
    for p in hz["parity"]:
        lines.append(f"| {p['case']} | {p['max_abs_diff']:.2e} | {p['max_abs_ours']:.3g} | {'yes' if p['ok'] else '**NO**'} |")
    lines.append("")
    lines.append("## Spread over rounds\n")
    lines.append("min–max of the rounds' medians; the fastest single call of all rounds (a preempted thread cannot "
                 "make a call faster, so under load this is the better view of what the code can do, especially on "
                 "two threads); the median thread CPU time of the calling thread (one thread).\n")
    lines.append("| case | threads | median | min–max over rounds | fastest call | thread CPU time (1 thread) |")
    lines.append("| --- | ---: | ---: | --- | ---: | ---: |")
    for k in sorted(s, key=lambda k: (k[0] != "prefill", k[1], -k[2] * k[3], k[4], k[5], k[6], k[7])):
        v2 = s[k]
        name = f"{shape_label(k[:5])}, {k[5]} {k[6]}"
        lines.append(f"| {name} | {k[7]} | {fmt_t(v2['us'], k[0])} | {fmt_t(v2['lo'], k[0])} – {fmt_t(v2['hi'], k[0])} | "
                     f"{fmt_t(v2['fastest'], k[0])} | " + (fmt_t(v2['cpu_us'], k[0]) if k[7] == 1 else "") + " |")
    lines.append("")
    lines.append("## Commands\n")
    lines.append("```sh")
    lines += ri["commands"]
    lines.append("```")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ggml-dir", default="/tmp/ggml", help="bench/ggml_setup.sh's folder (set up if missing)")
    p.add_argument("--setup", action="store_true", help="run bench/ggml_setup.sh even if the harness exists")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of timed calls per case and round")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--only", help="regex on case prefixes, e.g. '^decode/h1/'")
    p.add_argument("--quick", action="store_true", help="B=2 T=10 and n=128 only, one round, results/quick/")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before each round wait up to this long for the machine to be under 10%% busy")
    p.add_argument("--out-dir")
    p.add_argument("--from-json", help="rewrite the .md from this saved JSON")
    p.add_argument("--note", help="a remark printed at the top of the .md (kept in the JSON's run_info)")
    args = p.parse_args()
    if args.quick and "--rounds" not in sys.argv:
        args.rounds = 1
    out_dir = args.out_dir or os.path.join(HERE, "results", "quick" if args.quick else "")
    os.makedirs(out_dir, exist_ok=True)
    md, js = os.path.join(out_dir, "ggml_comparison.md"), os.path.join(out_dir, "ggml_comparison.json")
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        if args.note is not None:
            saved["run_info"]["note"] = args.note
            with open(js if os.path.abspath(args.from_json) == os.path.abspath(js) else args.from_json, "w") as f:
                json.dump(saved, f, indent=1)
        write_md(saved, md)
        print(open(md).read())
        return
    saved = run(args)
    if args.note:
        saved["run_info"]["note"] = args.note
    with open(js, "w") as f:
        json.dump(saved, f, indent=1)
    write_md(saved, md)
    log(f"wrote {md} and {js}")
    print(open(md).read())


if __name__ == "__main__":
    main()
