#!/usr/bin/python3
"""One decode step of every form, against its floors and against llama.cpp's ggml, in one run (issue 25).

Alternates --rounds rounds of bench/bench_step (every form: layers, packed forms, a plain-Eigen baseline;
float and 16-bit; one sequence and B = 8, 32; 1 and 2 threads) with rounds of ggml_attention's decode cases
(bench/ggml_setup.sh builds it; skipped without --ggml-dir), and writes results/decode_steps.md and .json. A
cell is the median over rounds of each round's figure. Python 3, standard library only.

  /usr/bin/python3 bench/step_compare.py --bench build/bench/bench_step --ggml-dir /tmp/ggml --rounds 3
  /usr/bin/python3 bench/step_compare.py --bench build/bench/bench_step --quick      # smoke: n = 128, 1 round
  /usr/bin/python3 bench/step_compare.py --from-json bench/results/decode_steps.json  # redo the .md only
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
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from ggml_compare import lib_dir, versions  # noqa: E402
from torch_compare import cpu_pressure, git_head, lscpu_summary, machine_busy  # noqa: E402

NAME = re.compile(r"^step/(?P<form>[a-z_0-9]+)/w:(?P<w>\w+)/kv:(?P<kv>\w+)/B:(?P<B>\d+)/n:(?P<n>\d+)/"
                  r"threads:(?P<t>\d+)")

FORMS = {
    "head": "`HeadAttention::forward_cached`",
    "head_packed": "`PackedHeadAttention::forward_cached`",
    "mha": "`MultiHeadAttention::forward_cached_into`",
    "mha_packed": "`PackedMultiHeadAttention::forward_cached_into`",
    "mha_packed16": "`PackedMultiHeadAttention`, float layer packed to bf16 weights",
    "mha_eigen": "plain Eigen matrix-vector products (same step)",
}


def log(msg):
    print(f"[step_compare] {msg}", file=sys.stderr, flush=True)


def run_ours(args, r):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [args.bench, f"--benchmark_out={path}", "--benchmark_out_format=json",
           f"--benchmark_min_time={args.min_time}"]
    if args.quick:
        cmd.append("--benchmark_filter=/n:128/")
    elif args.filter:
        cmd.append(f"--benchmark_filter={args.filter}")
    log(f"round {r + 1}: " + " ".join(map(shlex.quote, cmd)))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(path) as f:
        data = json.load(f)
    os.unlink(path)
    results = {}
    for b in data["benchmarks"]:
        m = NAME.match(b["name"])
        if not m or b.get("error_occurred"):
            continue
        key = f"{m['form']}|{m['w']}|{m['kv']}|{m['B']}|{m['n']}|{m['t']}"
        results[key] = {k: b[k] for k in ("real_time", "bytes", "floor_us", "x_floor", "flops", "x_peak",
                                          "tokens_per_s") if k in b}
    return {"context": data["context"], "results": results, "command": " ".join(map(shlex.quote, cmd))}


def run_ggml(args, r):
    binary = os.path.join(args.ggml_dir, "ggml_attention")
    cmd = [binary, "--lib-dir", lib_dir(args.ggml_dir), "--rounds", "1", "--first-round", str(r), "--only",
           "^decode/h[18]/n(128|512|2048)$" if args.quick is False else "^decode/h[18]/n128$",
           "--threads", "1,2", "--no-limits"]
    log(f"round {r + 1}: " + " ".join(map(shlex.quote, cmd)))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        sys.exit(f"[step_compare] ggml_attention failed ({proc.returncode})")
    data = json.loads(proc.stdout)
    results = {}
    for c in data["results"]:
        key = f"{c['impl']}|{c['kv']}|{c['heads']}|{c['n']}|{c['threads']}"
        results[key] = c["median_us"]
    return {"results": results, "parity": data["parity"], "library": data["ggml_cpu_library"],
            "command": " ".join(map(shlex.quote, cmd))}


def measure(args):
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rounds = []
    for r in range(args.rounds):
        busy = machine_busy(1.0)
        entry = {"round": r, "busy_before": busy, "ours": run_ours(args, r)}
        if args.ggml_dir:
            entry["ggml"] = run_ggml(args, r)
        entry["loadavg"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
        entry["cpu_pressure"] = cpu_pressure()
        rounds.append(entry)
    return {"run_info": {"date": date, "cpu": lscpu_summary(), "library": git_head(),
                         "ggml": versions(args.ggml_dir) if args.ggml_dir else None,
                         "command": " ".join(map(shlex.quote, [sys.executable] + sys.argv))},
            "rounds": rounds}


def median_of(rounds, side, key, field=None):
    vals = []
    for r in rounds:
        res = r.get(side, {}).get("results", {}).get(key)
        if res is None:
            continue
        vals.append(res[field] if field else res)
    return statistics.median(vals) if vals else None


def fmt_us(v):
    if v is None:
        return "—"
    return f"{v:.3g} µs" if v < 1000 else f"{v / 1000:.3g} ms"


def write_md(saved, path):
    rounds = saved["rounds"]
    info = saved["run_info"]
    ctx = rounds[0]["ours"]["context"]
    ours = lambda form, w, kv, b, n, t, f="real_time": median_of(rounds, "ours", f"{form}|{w}|{kv}|{b}|{n}|{t}", f)
    ggml = lambda impl, kv, h, n, t: median_of(rounds, "ggml", f"{impl}|{kv}|{h}|{n}|{t}")
    lines = ["# One decode step: every form against its floors and against llama.cpp's ggml\n",
             f"Measured {info['date']} by `bench/step_compare.py` ({len(rounds)} rounds alternating "
             "`bench_step` and `ggml_attention`; a cell is the median over rounds of each round's figure).\n",
             f"- Command: `{info['command']}`; first round's commands: `{rounds[0]['ours']['command']}`" +
             (", `" + re.sub(r"--lib-dir \S+", "--lib-dir LIBDIR", rounds[0]["ggml"]["command"]) +
              "` (LIBDIR: the folder of ggml's libraries that `bench/ggml_setup.sh` installs)"
              if "ggml" in rounds[0] else "") + ".",
             f"- Machine: {info['cpu']}. Library: {info['library']}.",
             f"- Limits, same run: one core's float FMA peak {float(ctx['fma_peak_gflops']):.1f} GFLOP/s; read "
             "bandwidth (vectorised streaming sum, best of 7) " + ", ".join(
                 f"{float(ctx[k]):.0f} GB/s over {k.split('_')[3]} on {k.split('_')[4]}" for k in sorted(ctx)
                 if k.startswith("read_bandwidth_gbps_")) + ".",
             "- Load: " + "; ".join(f"round {r['round'] + 1}: {r['busy_before']:.0%} busy before, load "
                                    f"{r['loadavg']}" for r in rounds) + ".",
             "- Each step: emb 512, head 64 (multi-head: 8 heads of 64 and the output projection), one new row "
             "per sequence against n cached positions, the cache truncated back after each step. Floor: the "
             "bytes the step must read (weights in their stored precision, every K and V row in the cache's) "
             "at the read bandwidth measured for a buffer of that size and thread count; peak: its useful "
             "flops at the FMA peak (x threads).\n"]
    if "ggml" in rounds[0]:
        info_g = info.get("ggml") or {}
        lines.append(f"- ggml: node-llama-cpp {info_g.get('node_llama_cpp', '?')}, "
                     f"{os.path.basename(rounds[0]['ggml']['library'])}, its own decode graph "
                     "(projection, cache append, `flash_attn_ext` (fa) or `mul_mat` + `soft_max` (mm), "
                     "8 heads: output projection); F32 weights, K/V F32 or F16. Parity: " +
                     ", ".join(f"{p['case']} {'ok' if p['ok'] else 'FAIL'}" for p in rounds[0]["ggml"]["parity"]
                               if p["case"].startswith("decode")) + ".\n")

    def cell(t, floor=None):
        if t is None:
            return "—"
        return fmt_us(t) + (f" ({t / floor:.2f})" if floor else "")

    for threads in (1, 2):
        lines.append(f"## One sequence, {threads} thread{'s' if threads > 1 else ''}: time per step "
                     "(its time over the bytes floor)\n")
        lines.append("| step | n = 128 | 512 | 1024 | 2048 | 4096 |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        rows = [("head", "f32", "f32"), ("head_packed", "f32", "f32"), ("head_packed", "bf16", "bf16"),
                ("ggml:1:f32", None, None), ("ggml:1:f16", None, None),
                ("mha", "f32", "f32"), ("mha_packed", "f32", "f32"), ("mha_eigen", "f32", "f32"),
                ("mha_packed", "f32", "bf16"), ("mha", "bf16", "bf16"), ("mha_packed", "bf16", "bf16"),
                ("mha_packed16", "bf16", "bf16"), ("ggml:8:f32", None, None), ("ggml:8:f16", None, None)]
        for form, w, kv in rows:
            cells = []
            if form.startswith("ggml"):
                _, h, gkv = form.split(":")
                for n in (128, 512, 1024, 2048, 4096):
                    best = [v for v in (ggml("ggml_fa", gkv, h, n, threads), ggml("ggml_mm", gkv, h, n, threads))
                            if v is not None]
                    cells.append(fmt_us(min(best)) if best else "—")
                label = f"llama.cpp ggml, {'1 head' if h == '1' else '8 heads'}, K/V {gkv.upper()} (best of fa, mm)"
            else:
                for n in (128, 512, 1024, 2048, 4096):
                    cells.append(cell(ours(form, w, kv, 1, n, threads), ours(form, w, kv, 1, n, threads, "floor_us")))
                label = FORMS[form] + ("" if w == "f32" and kv == "f32" else f", weights {w}, cache {kv}")
            if all(c == "—" for c in cells):
                continue
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")

    lines.append("## Two threads against one (time with 1 thread / time with 2)\n")
    lines.append("| step | n = 128 | 512 | 2048 |")
    lines.append("|---|---:|---:|---:|")
    for form, w, kv, b in [("head_packed", "f32", "f32", 1), ("head", "f32", "f32", 1),
                           ("mha_packed", "f32", "f32", 1), ("mha", "f32", "f32", 1),
                           ("mha_packed", "bf16", "bf16", 1), ("mha_packed", "f32", "f32", 8),
                           ("mha_packed", "f32", "f32", 32), ("head_packed", "f32", "f32", 8),
                           ("head_packed", "f32", "f32", 32)]:
        cells = []
        for n in (128, 512, 2048):
            t1, t2 = ours(form, w, kv, b, n, 1), ours(form, w, kv, b, n, 2)
            cells.append(f"{t1 / t2:.2f}x" if t1 and t2 else "—")
        if all(c == "—" for c in cells):
            continue
        lines.append(f"| {FORMS[form]}, weights {w}, cache {kv}, B = {b} | " + " | ".join(cells) + " |")
    lines.append("")

    lines.append("## 16 bits against float (time of the float step / time of the 16-bit step, same form, 1 thread)\n")
    lines.append("| step, weights and cache | n = 128 | 512 | 1024 | 2048 |")
    lines.append("|---|---:|---:|---:|---:|")
    for form, w, float_form in [("mha", "bf16", "mha"), ("mha_packed", "bf16", "mha_packed"),
                                ("mha_packed16", "bf16", "mha_packed"), ("mha_packed", "f32", "mha_packed")]:
        cells = []
        for n in (128, 512, 1024, 2048):
            t16, t32 = ours(form, w, "bf16", 1, n, 1), ours(float_form, "f32", "f32", 1, n, 1)
            cells.append(f"{t32 / t16:.2f}x" if t16 and t32 else "—")
        lines.append(f"| {FORMS[form]}, weights {w}, cache bf16 | " + " | ".join(cells) + " |")
    lines.append("")

    lines.append("## Many sequences at once\n")
    lines.append("Tokens per second of B sequences decoded together (one cache of B), against B = 1; each "
                 "step's time over its bytes floor and over its flops at the FMA peak.\n")
    lines.append("| step | threads | n | B | time | tokens/s | vs B = 1 | x floor | x peak |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for form, w, kv in [("mha_packed", "f32", "f32"), ("mha_packed", "bf16", "bf16"), ("head_packed", "f32", "f32")]:
        for threads in (1, 2):
            for n in (128, 512):
                base = ours(form, w, kv, 1, n, threads, "tokens_per_s")
                for b in (1, 8, 32):
                    t = ours(form, w, kv, b, n, threads)
                    if t is None:
                        continue
                    tok = ours(form, w, kv, b, n, threads, "tokens_per_s")
                    lines.append(f"| {FORMS[form]}, weights {w}, cache {kv} | {threads} | {n} | {b} | {fmt_us(t)} | "
                                 f"{tok:,.0f} | {tok / base:.2f}x | {ours(form, w, kv, b, n, threads, 'x_floor'):.2f} | "
                                 f"{ours(form, w, kv, b, n, threads, 'x_peak'):.2f} |" if base else "")
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(l for l in lines if l is not None) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", help="the bench_step binary")
    p.add_argument("--ggml-dir", help="the folder bench/ggml_setup.sh set up (optional)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-time", type=float, default=0.2)
    p.add_argument("--filter", help="a --benchmark_filter for bench_step")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--from-json")
    p.add_argument("--out", default=os.path.join(HERE, "results", "decode_steps"))
    args = p.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
    else:
        if not args.bench:
            p.error("--bench is required (or --from-json)")
        saved = measure(args)
        with open(args.out + ".json", "w") as f:
            json.dump(saved, f, indent=1)
    write_md(saved, args.out + ".md")
    log(f"wrote {args.out}.md")


if __name__ == "__main__":
    main()
