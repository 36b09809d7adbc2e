#!/usr/bin/python3
"""What users who do not pass -march=native get: the fast path built four ways, timed side by side.

Builds bench_attention four times from one snapshot of the source tree:

  native            HEAD_ATTENTION_BENCH_ARCH=native   -O3 -march=native (AVX-512 where the CPU has it)
  avx2              HEAD_ATTENTION_BENCH_ARCH=avx2     -O3 -mavx2 -mfma
  default           HEAD_ATTENTION_BENCH_ARCH=default  -O3 alone: the x86-64 baseline, SSE2
  native-fallback   native + -DHEAD_ATTENTION_GEMM_FALLBACK (Eigen's public product API instead of its GEMM kernel)

then runs the `attention/fast/...` benchmarks of all four in interleaved rounds: in each round, shape by shape,
the four binaries one after the other, the order rotated by one each round, so that whatever else the machine
does hits all four alike. Each invocation reports the median of its repetitions; the table shows the median of
those over the rounds. Writes bench/results/arch_comparison.md and arch_comparison.json (raw per-round medians,
machine, compilers, flags, noise measurements).

Noise: before the runs it waits (up to --wait-quiet seconds, polling every --poll seconds) until no other
heavy process (compilers, ctest, other benchmarks, anything above 15% of a core) is running, and records
whether it got there. During the runs it measures, for every invocation, how many cores' worth of CPU time
everything other than the benchmark consumed (from /proc/stat minus the child's own rusage).

Usage (stdlib only):
  /usr/bin/python3 bench/arch_compare.py                 # full: ~25 minutes on 2 cores, builds included
  /usr/bin/python3 bench/arch_compare.py --quick         # smoke run: 2 shapes, float, 2 rounds, ~3 min + builds
  /usr/bin/python3 bench/arch_compare.py --from-json bench/results/arch_comparison.json   # redo the .md only
"""

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, os.pardir))
TARGET = "head_attention_bench_attention"

# name -> (HEAD_ATTENTION_BENCH_ARCH, extra CMAKE_CXX_FLAGS, description)
CONFIGS = {
    "native": ("native", "", "-O3 -march=native"),
    "avx2": ("avx2", "", "-O3 -mavx2 -mfma"),
    "default": ("default", "", "-O3 (x86-64 baseline: SSE2)"),
    "native-fallback": ("native", "-DHEAD_ATTENTION_GEMM_FALLBACK", "-O3 -march=native -DHEAD_ATTENTION_GEMM_FALLBACK"),
}
CONFIG_ORDER = ["native", "avx2", "default", "native-fallback"]

# The README's float table.
FLOAT_SHAPES = [(2, 10), (8, 1024), (1, 4096), (1, 16384)]
QUICK_SHAPES = [(2, 10), (8, 1024)]
THREADS = [1, 2]

# Processes that mean somebody else is compiling, testing or benchmarking.
HEAVY_NAMES = {"cc1plus", "cc1", "ld", "ld.bfd", "ld.gold", "collect2", "lto1", "ctest", "make", "ninja",
               "bench_attention", "peak_memory", "clang", "clang++"}
BUSY_PCT = 15.0  # any other process using more than this share of one core counts as load
BUSY_CORES = 0.25  # and so does the whole machine (all but this script) busier than this many cores

NAME_RE = re.compile(r"^attention/fast/(float|double)/B:(\d+)/T:(\d+)/threads:(\d+)")


def log(msg):
    print(f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ machine
def read_first(path, prefix):
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info():
    flags = (read_first("/proc/cpuinfo", "flags") or "").split()
    info = {
        "cpu_model": read_first("/proc/cpuinfo", "model name") or "unknown",
        "cpu_family": read_first("/proc/cpuinfo", "cpu family"),
        "cpu_model_number": read_first("/proc/cpuinfo", "model\t"),
        "logical_cpus": os.cpu_count(),
        "flags": {f: f in flags for f in ("sse2", "avx", "avx2", "fma", "avx512f", "avx512dq", "avx512bw",
                                          "avx512vl", "avx512_bf16", "avx512_vnni")},
        "hypervisor": "hypervisor" in flags,
        "mem_total_kib": None,
    }
    mem = read_first("/proc/meminfo", "MemTotal")
    if mem:
        info["mem_total_kib"] = int(mem.split()[0])
    try:
        out = subprocess.run(["c++", "-march=native", "-Q", "--help=target"], capture_output=True, text=True,
                             timeout=30).stdout
        m = re.search(r"^\s*-march=\s+(\S+)", out, re.M)
        info["gcc_march_native"] = m.group(1) if m else None
    except (OSError, subprocess.SubprocessError):
        info["gcc_march_native"] = None
    try:
        info["benchmark_library"] = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "libbenchmark-dev"], capture_output=True, text=True,
            timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["benchmark_library"] = None
    return info


def cpu_jiffies():
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])
    return total - idle, total


def proc_times():
    """pid -> (comm, utime + stime in jiffies, ppid) for every process."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                data = f.read()
        except OSError:
            continue
        rpar = data.rfind(")")
        comm = data[data.find("(") + 1:rpar]
        rest = data[rpar + 2:].split()
        out[int(pid)] = (comm, int(rest[11]) + int(rest[12]), int(rest[1]))
    return out


def own_tree(procs):
    """Our pid and all our descendants."""
    mine = {os.getpid()}
    grew = True
    while grew:
        grew = False
        for pid, (_, _, ppid) in procs.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                grew = True
    return mine


def other_load(seconds=2.0):
    """Processes other than ours that are heavy by name or used > BUSY_PCT of a core over `seconds`."""
    hz = os.sysconf("SC_CLK_TCK")
    a = proc_times()
    busy0, total0 = cpu_jiffies()
    time.sleep(seconds)
    b = proc_times()
    busy1, total1 = cpu_jiffies()
    mine = own_tree(b) | own_tree(a)
    heavy = []
    ours = 0
    for pid, (comm, t1, _) in b.items():
        if pid in mine:
            ours += t1 - a[pid][1] if pid in a else t1
            continue
        pct = 100.0 * (t1 - a[pid][1]) / hz / seconds if pid in a else 0.0
        if comm in HEAVY_NAMES or pct > BUSY_PCT:
            heavy.append({"pid": pid, "comm": comm, "cpu_pct": round(pct, 1)})
    ncpu = os.cpu_count() or 1
    busy_cores = ncpu * (busy1 - busy0) / max(1, total1 - total0) - ours / hz / seconds
    # short-lived processes (a test suite, a compiler per file) can come and go between the two samples:
    # the machine-wide figure catches them
    if busy_cores > BUSY_CORES:
        heavy.append({"pid": None, "comm": f"machine {busy_cores:.2f} cores busy", "cpu_pct": round(100 * busy_cores)})
    return heavy, busy_cores


def wait_quiet(limit_s, poll_s):
    """Waits until other_load() finds nothing, up to limit_s. Returns a record of what it saw."""
    start = time.time()
    polls = []
    while True:
        heavy, busy = other_load()
        polls.append({"t": round(time.time() - start), "busy_cores": round(busy, 2),
                      "heavy": sorted({h["comm"] for h in heavy})})
        if not heavy:
            log(f"machine quiet (busy {busy:.2f} cores) after {time.time() - start:.0f} s")
            return {"quiet": True, "waited_s": round(time.time() - start), "polls": polls}
        if time.time() - start + poll_s > limit_s:
            log(f"machine still busy after {time.time() - start:.0f} s: {heavy}; going ahead anyway")
            return {"quiet": False, "waited_s": round(time.time() - start), "polls": polls, "last_heavy": heavy}
        log(f"machine busy ({busy:.2f} cores; {', '.join(sorted({h['comm'] for h in heavy}))}); "
            f"waiting {poll_s} s")
        time.sleep(poll_s)


# ------------------------------------------------------------------------------------------------- builds
def snapshot_source(src, dest):
    """Copies the working tree (without .git and build directories) so all four builds see the same source."""
    if os.path.isdir(dest):
        shutil.rmtree(dest)

    def ignore(d, names):
        skip = {".git", "__pycache__", "results"}
        return [n for n in names if n in skip or n.startswith("build") and os.path.isdir(os.path.join(d, n))]

    shutil.copytree(src, dest, ignore=ignore)


def git_state(src):
    def git(*a):
        try:
            return subprocess.run(["git", "-C", src, *a], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line]
    # what the benchmark binary is built from: the headers, the CMake files of the top level and bench/
    relevant = [p for p in dirty if p.startswith(("include/", "bench/", "cmake/")) or p == "CMakeLists.txt"]
    return {"head": git("rev-parse", "--short", "HEAD").strip(), "dirty": dirty, "dirty_relevant": relevant}


def build(name, src, build_root, jobs):
    arch, cxx_flags, _ = CONFIGS[name]
    bdir = os.path.join(build_root, name)
    cmd = ["cmake", "-S", src, "-B", bdir, "-DCMAKE_BUILD_TYPE=Release",
           f"-DHEAD_ATTENTION_BENCH_ARCH={arch}", "-DHEAD_ATTENTION_BUILD_TESTS=OFF",
           "-DHEAD_ATTENTION_BUILD_EXAMPLES=OFF", "-DHEAD_ATTENTION_INSTALL=OFF",
           f"-DCMAKE_CXX_FLAGS={cxx_flags}"]
    rec = {"name": name, "arch": arch, "cmake_cxx_flags": cxx_flags, "build_dir": bdir, "ok": False,
           "configure_cmd": cmd}
    t0 = time.time()
    log(f"configure + build {name} in {bdir}")
    with open(os.path.join(build_root, f"{name}.build.log"), "w") as logf:
        r = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT)
        if r.returncode == 0:
            r = subprocess.run(["cmake", "--build", bdir, "--target", TARGET, f"-j{jobs}"], stdout=logf,
                               stderr=subprocess.STDOUT)
    rec["build_seconds"] = round(time.time() - t0, 1)
    binary = os.path.join(bdir, "bench", "bench_attention")
    if r.returncode != 0 or not os.path.exists(binary):
        log(f"BUILD FAILED: {name} (see {build_root}/{name}.build.log)")
        return rec
    rec["ok"] = True
    rec["binary"] = binary
    flags_make = os.path.join(bdir, "bench", "CMakeFiles", f"{TARGET}.dir", "flags.make")
    try:
        with open(flags_make) as f:
            rec["compile_flags"] = " ".join(l.split("=", 1)[1].strip() for l in f
                                            if l.startswith(("CXX_FLAGS", "CXX_DEFINES")))
    except OSError:
        rec["compile_flags"] = None
    try:
        with open(os.path.join(bdir, "CMakeCache.txt")) as f:
            cxx = next(l.split("=", 1)[1].strip() for l in f if l.startswith("CMAKE_CXX_COMPILER:"))
        rec["compiler"] = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, StopIteration, IndexError):
        rec["compiler"] = None
    rec["vector_registers"] = count_vector_registers(binary)
    return rec


def count_vector_registers(binary):
    """How many instructions of the binary name a zmm / ymm / xmm register: which ISA the build really uses."""
    try:
        out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", binary], capture_output=True, text=True,
                             timeout=300).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {r: len(re.findall(rf"%{r}\d", out)) for r in ("zmm", "ymm", "xmm")}


# ------------------------------------------------------------------------------------------------- runs
def shape_filter(dtypes, shape):
    b, t = shape
    return rf"^attention/fast/({'|'.join(dtypes)})/B:{b}/T:{t}/threads:({'|'.join(map(str, THREADS))})/"


def run_one(binary, regex, out_json, reps, min_time):
    cmd = [binary, f"--benchmark_filter={regex}", f"--benchmark_repetitions={reps}",
           f"--benchmark_min_time={min_time}", "--benchmark_display_aggregates_only=true",
           f"--benchmark_out={out_json}", "--benchmark_out_format=json"]
    hz = os.sysconf("SC_CLK_TCK")
    busy0, _ = cpu_jiffies()
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate()
    except BaseException:  # Ctrl-C, SIGTERM: take the benchmark down with us
        proc.kill()
        proc.wait()
        raise
    wall = time.time() - t0
    busy1, _ = cpu_jiffies()
    busy_s = (busy1 - busy0) / hz  # CPU-seconds the whole machine spent busy meanwhile (the caller subtracts ours)
    return proc.returncode, wall, busy_s, err, cmd


def parse_run(path):
    with open(path) as f:
        data = json.load(f)
    ctx = data.get("context", {})
    per = {}
    for bm in data.get("benchmarks", []):
        if bm.get("run_type") != "iteration":
            continue
        m = NAME_RE.match(bm["run_name"] if "run_name" in bm else bm["name"])
        if not m:
            continue
        key = (m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)))
        scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[bm.get("time_unit", "ns")]
        d = per.setdefault(key, {"real_ms": [], "cpu_ms": [], "frac_gemm": []})
        d["real_ms"].append(bm["real_time"] * scale)
        d["cpu_ms"].append(bm["cpu_time"] * scale)
        if "frac_gemm" in bm:
            d["frac_gemm"].append(bm["frac_gemm"])
    out = {}
    for key, d in per.items():
        real = statistics.median(d["real_ms"])
        out[key] = {"median_ms": real, "reps_ms": d["real_ms"],
                    "cpu_over_wall": statistics.median(d["cpu_ms"]) / real if real > 0 else None,
                    "frac_gemm": statistics.median(d["frac_gemm"]) if d["frac_gemm"] else None}
    gemm = {}
    for k in ("sgemm_gflops_1thread", "sgemm_gflops_2threads", "dgemm_gflops_1thread", "dgemm_gflops_2threads"):
        if k in ctx:
            gemm[k] = float(ctx[k])
    return out, gemm, ctx


def run_all(args, configs, groups):
    """groups: list of (dtypes, shape). Returns the invocation records."""
    invocations = []
    res_dir = os.path.join(args.build_root, "runs")
    os.makedirs(res_dir, exist_ok=True)
    n_total = args.rounds * len(groups) * len(configs)
    n = 0
    for rnd in range(args.rounds):
        order = configs[rnd % len(configs):] + configs[:rnd % len(configs)]
        if args.wait_quiet_round > 0 and rnd > 0:  # round 1 follows the big wait in main()
            w = wait_quiet(args.wait_quiet_round, min(args.poll, args.wait_quiet_round))
            args.round_waits.append({"round": rnd + 1, "quiet": w["quiet"], "waited_s": w["waited_s"]})
        log(f"round {rnd + 1}/{args.rounds}: {', '.join(order)}")
        for dtypes, shape in groups:
            regex = shape_filter(dtypes, shape)
            for cfg in order:
                n += 1
                out_json = os.path.join(res_dir, f"r{rnd + 1}_{cfg}_B{shape[0]}_T{shape[1]}.json")
                ch0 = os.times()
                rc, wall, busy_s, err, cmd = run_one(args.binaries[cfg], regex, out_json, args.reps, args.min_time)
                ch1 = os.times()
                child_cpu = (ch1.children_user - ch0.children_user) + (ch1.children_system - ch0.children_system)
                others = max(0.0, busy_s - child_cpu) / wall if wall > 0 else None
                rec = {"round": rnd + 1, "config": cfg, "B": shape[0], "T": shape[1], "dtypes": dtypes,
                       "returncode": rc, "wall_s": round(wall, 2), "child_cpu_s": round(child_cpu, 2),
                       "other_load_cores": round(others, 3) if others is not None else None,
                       "command": cmd}
                if rc != 0:
                    rec["stderr"] = err[-2000:]
                    log(f"  FAILED {cfg} B={shape[0]} T={shape[1]}: rc {rc}")
                else:
                    results, gemm, ctx = parse_run(out_json)
                    rec["results"] = [{"dtype": k[0], "B": k[1], "T": k[2], "threads": k[3], **v}
                                      for k, v in sorted(results.items())]
                    rec["gemm"] = gemm
                    rec["eigen_version"] = ctx.get("eigen_version")
                    rec["warned_busy"] = "WARNING: two-thread SGEMM" in err
                invocations.append(rec)
                log(f"  [{n}/{n_total}] {cfg:<15} B={shape[0]} T={shape[1]} {wall:6.1f} s, "
                    f"other load {others if others is not None else float('nan'):.2f} cores")
    return invocations


# ------------------------------------------------------------------------------------------------ summary
def summarise(invocations, configs):
    """Median over rounds of each invocation's median, per (config, dtype, B, T, threads)."""
    acc = {}
    for inv in invocations:
        for r in inv.get("results", []):
            key = (inv["config"], r["dtype"], r["B"], r["T"], r["threads"])
            d = acc.setdefault(key, {"rounds_ms": [], "frac_gemm": [], "cpu_over_wall": [], "rounds_cpu_ms": []})
            d["rounds_ms"].append(r["median_ms"])
            if r.get("cpu_over_wall") is not None:
                # the median CPU time of the calling thread (cpu_over_wall is median cpu / median real)
                d["rounds_cpu_ms"].append(r["median_ms"] * r["cpu_over_wall"])
            if r.get("frac_gemm") is not None:
                d["frac_gemm"].append(r["frac_gemm"])
            if r.get("cpu_over_wall") is not None:
                d["cpu_over_wall"].append(r["cpu_over_wall"])
    rows = []
    for (cfg, dtype, b, t, th), d in sorted(acc.items()):
        rows.append({"config": cfg, "dtype": dtype, "B": b, "T": t, "threads": th,
                     "median_ms": statistics.median(d["rounds_ms"]), "rounds_ms": d["rounds_ms"],
                     "min_ms": min(d["rounds_ms"]), "max_ms": max(d["rounds_ms"]),
                     "frac_gemm": statistics.median(d["frac_gemm"]) if d["frac_gemm"] else None,
                     "cpu_over_wall": statistics.median(d["cpu_over_wall"]) if d["cpu_over_wall"] else None,
                     "cpu_ms": statistics.median(d["rounds_cpu_ms"]) if d["rounds_cpu_ms"] else None,
                     "rounds_cpu_ms": d["rounds_cpu_ms"]})
    gemm = {}
    for cfg in configs:
        vals = {}
        for inv in invocations:
            if inv["config"] == cfg:
                for k, v in inv.get("gemm", {}).items():
                    vals.setdefault(k, []).append(v)
        gemm[cfg] = {k: statistics.median(v) for k, v in vals.items()}
        gemm[cfg]["invocations"] = len([i for i in invocations if i["config"] == cfg])
    return rows, gemm


def fmt_ms(v):
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def amd_zen(m):
    """The Zen generation of an AMD family 25 (0x19) CPU from its model number, None otherwise."""
    try:
        fam, model = int(m.get("cpu_family")), int(m.get("cpu_model_number"))
    except (TypeError, ValueError):
        return None
    if fam == 23:
        return "Zen 2" if model >= 0x30 else "Zen / Zen+"
    if fam == 25:
        return "Zen 4" if 0x10 <= model <= 0x1f or 0x60 <= model <= 0x7f or 0xa0 <= model <= 0xaf else "Zen 3"
    if fam == 26:
        return "Zen 5"
    return None


def noise_warning(doc):
    """A warning paragraph when the run was disturbed, or None."""
    rows = [r for r in doc["results"] if r["config"] == "native" and r["threads"] == 1 and r.get("cpu_over_wall")]
    cw = statistics.median(r["cpu_over_wall"] for r in rows) if rows else None
    ratios = [i["gemm"]["sgemm_gflops_2threads"] / i["gemm"]["sgemm_gflops_1thread"]
              for i in doc["invocations"] if i.get("gemm", {}).get("sgemm_gflops_1thread")]
    r2 = statistics.median(ratios) if ratios else None
    if (cw is None or cw > 0.9) and (r2 is None or r2 > 1.5):
        return None
    return (f"**Warning: this run was disturbed.** One-thread runs got {cw:.2f} of a core (CPU time / wall time, "
            f"median; 1.00 on an idle machine) and Eigen's two-thread SGEMM ran at {r2:.2f}x its one-thread rate "
            f"(median over invocations; about 1.9 with a free second core). The wall-clock tables, above all "
            f"their two-thread rows, measure the other load as much as the builds; compare builds with the "
            f"one-thread CPU-time table at the end, and redo the run on a quiet machine for two-thread figures.\n")


def write_md(doc, path):
    configs = doc["configs_run"]
    rows = doc["results"]
    m = doc["machine"]
    by = {(r["config"], r["dtype"], r["B"], r["T"], r["threads"]): r for r in rows}
    flags = ", ".join(f for f, on in m["flags"].items() if on and f in ("avx2", "fma", "avx512f", "avx512bw",
                                                                       "avx512vl", "avx512_bf16"))
    no_flags = ", ".join(f for f in ("avx2", "avx512f") if not m["flags"].get(f))
    compilers = sorted({c.get("compiler") or "?" for c in doc["builds"].values()})
    machine_line = (f"Machine: {m['cpu_model']} (family {m['cpu_family']}, model {m['cpu_model_number']}; "
                    f"GCC's -march=native = {m.get('gcc_march_native')}), {m['logical_cpus']} logical CPUs"
                    f"{' under a hypervisor' if m.get('hypervisor') else ''}, "
                    f"{(m['mem_total_kib'] or 0) / 1048576:.0f} GiB; CPU flags: {flags}"
                    f"{' (no ' + no_flags + ')' if no_flags else ''}; {'; '.join(compilers)}; "
                    f"Eigen {doc.get('eigen_version')}, Google Benchmark {m.get('benchmark_library')}.")
    zen = amd_zen(m)
    if zen:
        machine_line = machine_line.replace(f"model {m['cpu_model_number']};", f"model {m['cpu_model_number']}: {zen};")
    q = doc["quiet"]
    if q.get("skipped"):
        quiet_line = "Quiet check before the runs: skipped (--wait-quiet 0)."
    elif q["quiet"]:
        quiet_line = (f"Quiet check before the runs: **quiet** (no compiler, ctest or benchmark of anyone else, "
                      f"no other process above {BUSY_PCT:.0f}% of a core, the rest of the machine under {BUSY_CORES} cores busy) after waiting {q['waited_s']} s.")
    else:
        quiet_line = (f"Quiet check before the runs: **not quiet** after waiting {q['waited_s']} s "
                      f"(still running: {', '.join(sorted({h['comm'] for h in q.get('last_heavy', [])}))}); "
                      f"ran anyway.")
    rw = doc.get("round_waits", [])
    if rw:
        quiet_line += (" Before rounds 2–{}: quiet in {} of {} checks, {} s of waiting in all.".format(
            len(rw) + 1, sum(1 for w in rw if w["quiet"]), len(rw), sum(w["waited_s"] for w in rw)))
    loads = [i["other_load_cores"] for i in doc["invocations"] if i.get("other_load_cores") is not None]
    busy_inv = [i for i in doc["invocations"] if (i.get("other_load_cores") or 0) > 0.2]
    s = doc["settings"]
    out = []
    out.append("# Instruction set and GEMM path: the fast path built four ways\n")
    out.append(f"Generated by `bench/arch_compare.py` on {doc['date']} (total {doc['total_minutes']:.1f} min: builds "
               f"{doc['build_minutes']:.1f}, waiting for a quiet machine {doc['quiet_wait_minutes']:.1f}, runs "
               f"{doc['run_minutes']:.1f} including the waits between rounds), source {doc['source']['head']}"
               f"{' + uncommitted changes to ' + ', '.join(doc['source']['dirty_relevant']) if doc['source'].get('dirty_relevant') else ''}"
               + (" at the time of the run; the binaries were reused (--skip-build), built from whatever source "
                  "their build directories last saw.\n" if doc["source"].get("reused_binaries") else
                  " (working tree copied once at the start, all four builds from that copy).\n"))
    out.append(machine_line + "\n")
    out.append(quiet_line + f" During the runs, everything other than the benchmark used on average "
               f"{statistics.mean(loads) if loads else float('nan'):.2f} cores (max "
               f"{max(loads) if loads else float('nan'):.2f}); {len(busy_inv)} of {len(doc['invocations'])} "
               f"invocations saw more than 0.2 cores of other load.\n")
    warning = noise_warning(doc)
    if warning:
        out.append(warning)
    out.append(f"Method: `attention/fast/...` of `bench_attention`, emb = 512, head = 64. {s['rounds']} interleaved "
               f"rounds; in each, shape by shape, the four binaries one after another, the order rotated by one "
               f"per round. Each invocation: {s['reps']} repetitions of at least {s['min_time']} s, their median; "
               f"the table shows the median over the rounds (wall-clock, ms per forward call). In parentheses: "
               f"that build's time over native's, i.e. how many times faster native is (below 1.00x: native is "
               f"slower).\n")
    out.append("| build | flags | SGEMM 1 thread | SGEMM 2 threads | DGEMM 1 thread | vector registers in the binary (zmm / ymm / xmm) |")
    out.append("|---|---|---:|---:|---:|---|")
    for cfg in configs:
        b = doc["builds"][cfg]
        g = doc["gemm"].get(cfg, {})
        vr = b.get("vector_registers") or {}

        def gf(k):
            return f"{g[k]:.1f} GFLOP/s" if k in g else "—"
        out.append(f"| {cfg} | `{CONFIGS[cfg][2]}` | {gf('sgemm_gflops_1thread')} | {gf('sgemm_gflops_2threads')} | "
                   f"{gf('dgemm_gflops_1thread')} | {vr.get('zmm', '?')} / {vr.get('ymm', '?')} / {vr.get('xmm', '?')} |")
    out.append("")
    out.append("SGEMM / DGEMM: Eigen's own 1024³ product, best of 7, as `bench_attention` measures it at startup "
               "(medians over its invocations). It goes through Eigen's public API in every build, so it is the "
               "same in native and native-fallback.\n")
    for dtype in ("float", "double"):
        shapes = sorted({(r["B"], r["T"]) for r in rows if r["dtype"] == dtype}, key=lambda x: (x[1] * x[0], x))
        if not shapes:
            continue
        out.append(f"## {dtype}\n")
        out.append("| shape | threads | native | avx2 | default (SSE2) | native-fallback | native of SGEMM |"
                   if dtype == "float" else
                   "| shape | threads | native | avx2 | default (SSE2) | native-fallback | native of DGEMM |")
        out.append("|---|---:|---:|---:|---:|---:|---:|")
        for b, t in sorted(shapes, key=lambda x: (x[0] != 2, x[0] == 1, x[1])):
            for th in THREADS:
                nat = by.get(("native", dtype, b, t, th))
                cells = []
                for cfg in ("native", "avx2", "default", "native-fallback"):
                    r = by.get((cfg, dtype, b, t, th))
                    if cfg not in configs or r is None:
                        cells.append("—")
                    elif cfg == "native" or nat is None:
                        cells.append(f"{fmt_ms(r['median_ms'])} ms")
                    else:
                        cells.append(f"{fmt_ms(r['median_ms'])} ms ({r['median_ms'] / nat['median_ms']:.2f}x)")
                frac = f"{nat['frac_gemm']:.2f}" if nat and nat.get("frac_gemm") is not None else "—"
                out.append(f"| B = {b}, T = {t} | {th} | " + " | ".join(cells) + f" | {frac} |")
        out.append("")
    out.append("\"native of SGEMM/DGEMM\": the native build's useful flop rate over n × its own single-thread "
               "GEMM rate (`frac_gemm`).\n")
    # One thread: the CPU time of the calling thread, which does all the work, is what other processes disturb
    # least (they take the core away, which wall time counts and CPU time does not).
    cpu_rows = [r for r in rows if r["threads"] == 1 and r.get("cpu_ms")]
    if cpu_rows:
        out.append("## One thread, CPU time\n")
        out.append("The same one-thread runs, as the median CPU time of the calling thread (Google Benchmark's "
                   "`cpu_time`; with one thread it does all the work). Other processes taking the core away "
                   "lengthen wall time but not this, so on a busy machine these ratios are the ones to trust; "
                   "\"CPU/wall\" is native's (1.00 = it had the core to itself).\n")
        out.append("| dtype | shape | native | avx2 | default (SSE2) | native-fallback | CPU/wall |")
        out.append("|---|---|---:|---:|---:|---:|---:|")
        for dtype in ("float", "double"):
            shapes = sorted({(r["B"], r["T"]) for r in cpu_rows if r["dtype"] == dtype},
                            key=lambda x: (x[0] != 2, x[0] == 1, x[1]))
            for b, t in shapes:
                nat = by.get(("native", dtype, b, t, 1))
                cells = []
                for cfg in ("native", "avx2", "default", "native-fallback"):
                    r = by.get((cfg, dtype, b, t, 1))
                    if cfg not in configs or r is None or not r.get("cpu_ms"):
                        cells.append("—")
                    elif cfg == "native" or nat is None or not nat.get("cpu_ms"):
                        cells.append(f"{fmt_ms(r['cpu_ms'])} ms")
                    else:
                        cells.append(f"{fmt_ms(r['cpu_ms'])} ms ({r['cpu_ms'] / nat['cpu_ms']:.2f}x)")
                cw = f"{nat['cpu_over_wall']:.2f}" if nat and nat.get("cpu_over_wall") else "—"
                out.append(f"| {dtype} | B = {b}, T = {t} | " + " | ".join(cells) + f" | {cw} |")
        out.append("")
    # spread, so that a reader can judge the noise
    spreads = []
    for r in rows:
        if r["median_ms"] > 0 and len(r["rounds_ms"]) > 1:
            spreads.append(((r["max_ms"] - r["min_ms"]) / r["median_ms"], r))
    spreads.sort(key=lambda x: -x[0])
    if spreads:
        worst = ", ".join(f"{r['config']} {r['dtype']} B={r['B']} T={r['T']} {r['threads']}t "
                          f"({100 * s_:.0f}%)" for s_, r in spreads[:4])
        med_spread = statistics.median(s_ for s_, _ in spreads)
        out.append(f"Noise: the (max − min) / median of the per-round medians is {100 * med_spread:.1f}% for the "
                   f"median row; the widest: {worst}. Every per-round figure is in `arch_comparison.json`.\n")
    with open(path, "w") as f:
        f.write("\n".join(out))


# --------------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=REPO, help="source tree (default: this repository's working tree)")
    ap.add_argument("--no-snapshot", action="store_true",
                    help="build straight from --source instead of a copy taken at start")
    ap.add_argument("--build-root", default="/tmp/ha-arch")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--skip-build", action="store_true", help="reuse the binaries already in --build-root")
    ap.add_argument("--configs", nargs="+", default=CONFIG_ORDER, choices=CONFIG_ORDER)
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, --quick 2)")
    ap.add_argument("--reps", type=int, default=None, help="--benchmark_repetitions (default 3, --quick 2)")
    ap.add_argument("--min-time", type=float, default=None, help="--benchmark_min_time (default 0.2, --quick 0.05)")
    ap.add_argument("--double-shapes", default="all", choices=["all", "mid", "none"],
                    help="double: the whole table (all), B=8,T=1024 and B=1,T=4096 (mid), or none")
    ap.add_argument("--wait-quiet", type=float, default=1200, help="seconds to wait for a quiet machine (0: no check)")
    ap.add_argument("--wait-quiet-round", type=float, default=None,
                    help="also wait up to this long for a quiet machine before each round (default 120, --quick 0)")
    ap.add_argument("--poll", type=float, default=30)
    ap.add_argument("--quick", action="store_true", help="smoke run: B=2,T=10 and B=8,T=1024, float, 2 rounds")
    ap.add_argument("--out-dir", default=None,
                    help="where the .md/.json go (default bench/results, with --quick BUILD_ROOT/quick)")
    ap.add_argument("--from-json", default=None, help="only rewrite the .md next to this arch_comparison.json")
    args = ap.parse_args()

    if args.from_json:
        with open(args.from_json) as f:
            doc = json.load(f)
        doc["results"], doc["gemm"] = summarise(doc["invocations"], doc["configs_run"])
        with open(args.from_json, "w") as f:
            json.dump(doc, f, indent=1)
        write_md(doc, os.path.join(os.path.dirname(args.from_json), "arch_comparison.md"))
        return 0

    args.rounds = args.rounds or (2 if args.quick else 5)
    args.reps = args.reps or (2 if args.quick else 3)
    if args.wait_quiet_round is None:
        args.wait_quiet_round = 0 if args.quick else 120
    args.min_time = args.min_time if args.min_time is not None else (0.05 if args.quick else 0.2)
    out_dir = args.out_dir or (os.path.join(args.build_root, "quick") if args.quick else os.path.join(HERE, "results"))
    os.makedirs(args.build_root, exist_ok=True)
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.time()
    configs = [c for c in CONFIG_ORDER if c in args.configs]

    source = {"path": os.path.abspath(args.source), **git_state(args.source), "reused_binaries": args.skip_build}
    src = args.source
    if not args.no_snapshot and not args.skip_build:
        src = os.path.join(args.build_root, "src")
        snapshot_source(args.source, src)
        log(f"source snapshot in {src} (HEAD {source['head']}, uncommitted: {', '.join(source['dirty']) or 'none'})")

    builds = {}
    for cfg in configs:
        if args.skip_build:
            binary = os.path.join(args.build_root, cfg, "bench", "bench_attention")
            builds[cfg] = {"name": cfg, "ok": os.path.exists(binary), "binary": binary, "reused": True,
                           "vector_registers": count_vector_registers(binary)}
            try:
                with open(os.path.join(args.build_root, cfg, "CMakeCache.txt")) as f:
                    cxx = next(l.split("=", 1)[1].strip() for l in f if l.startswith("CMAKE_CXX_COMPILER:"))
                builds[cfg]["compiler"] = subprocess.run([cxx, "--version"], capture_output=True,
                                                         text=True).stdout.splitlines()[0]
            except (OSError, StopIteration, IndexError):
                pass
        else:
            builds[cfg] = build(cfg, src, args.build_root, args.jobs)
    failed = [c for c in configs if not builds[c]["ok"]]
    configs = [c for c in configs if builds[c]["ok"]]
    if not configs:
        log("no build succeeded")
        return 1
    args.binaries = {c: builds[c]["binary"] for c in configs}
    t_built = time.time()

    if args.quick:
        groups = [(["float"], s) for s in QUICK_SHAPES]
    else:
        double = {"all": FLOAT_SHAPES, "mid": [(8, 1024), (1, 4096)], "none": []}[args.double_shapes]
        groups = [((["float", "double"] if s in double else ["float"]), s) for s in FLOAT_SHAPES]

    quiet = {"skipped": True, "quiet": None}
    if args.wait_quiet > 0:
        quiet = wait_quiet(args.wait_quiet, args.poll)
    t_run = time.time()
    args.round_waits = []
    invocations = run_all(args, configs, groups)
    rows, gemm = summarise(invocations, configs)
    t_end = time.time()

    eigen = next((i.get("eigen_version") for i in invocations if i.get("eigen_version")), None)
    doc = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "eigen_version": eigen,
        "source": source,
        "settings": {"rounds": args.rounds, "reps": args.reps, "min_time": args.min_time, "threads": THREADS,
                     "groups": [{"dtypes": d, "B": s[0], "T": s[1]} for d, s in groups], "quick": args.quick,
                     "wait_quiet_s": args.wait_quiet, "wait_quiet_round_s": args.wait_quiet_round,
                     "build_root": args.build_root},
        "configs_run": configs,
        "failed_builds": failed,
        "builds": builds,
        "quiet": quiet,
        "round_waits": args.round_waits,
        "total_minutes": (t_end - t_start) / 60,
        "build_minutes": (t_built - t_start) / 60,
        "quiet_wait_minutes": (t_run - t_built) / 60,
        "run_minutes": (t_end - t_run) / 60,
        "gemm": gemm,
        "results": rows,
        "invocations": invocations,
    }
    jpath = os.path.join(out_dir, "arch_comparison.json")
    with open(jpath, "w") as f:
        json.dump(doc, f, indent=1)
    write_md(doc, os.path.join(out_dir, "arch_comparison.md"))
    log(f"done in {doc['total_minutes']:.1f} min (builds {doc['build_minutes']:.1f}, waiting "
        f"{doc['quiet_wait_minutes']:.1f}, runs {doc['run_minutes']:.1f}): {jpath}, arch_comparison.md")
    return 0 if not failed else 2


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(main())
