#!/usr/bin/python3
"""Compare head-attention's fast path and reference path with simple_llm's PyTorch HeadAttention.

Runs bench_attention (Google Benchmark, JSON output), times the seed's PyTorch module on the same shapes and
thread counts in PyTorch on the CPU, and writes into bench/results/:

  comparison.md       the table: shape, dtype, threads, ours / reference / PyTorch (ms), speedups, GFLOP/s,
                      fraction of Eigen's single-thread GEMM rate
  time_vs_T.png       time against T (log-log) at B = 1, float32 and float64
  bench_attention.json, torch.json    the raw measurements behind them

PyTorch is timed in child processes of this script (one per BLAS): with the BLAS the system gives it and, with
--openblas-dir DIR, once more with DIR first on LD_LIBRARY_PATH, DIR holding an OpenBLAS libblas.so.3 (see
bench/README.md). Debian's python3-torch calls whatever libblas.so.3 the system has, which is the slow netlib
reference BLAS unless an optimised one is installed.

With --multihead BUILD/bench/bench_multihead it compares the multi-head layer instead (issue 8): our
MultiHeadAttention<float> (fused, and as 8 separate HeadAttention calls plus one GEMM) against simple_llm's
PyTorch MultiHeadAttention (8 heads of 64, emb 512), B = 8 T = 1024 and B = 1 T = 4096, in interleaved rounds,
and writes multihead_comparison.md and multihead_comparison.json.

Usage (always /usr/bin/python3, which has torch):
  /usr/bin/python3 bench/torch_compare.py BUILD/bench/bench_attention [--quick] [--openblas-dir DIR]
  /usr/bin/python3 bench/torch_compare.py --multihead BUILD/bench/bench_multihead [--openblas-dir DIR] [--rounds N]
"""

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
EMB, HEAD = 512, 64
# The same shapes as bench_attention.cpp: the seed example, a batch, then the B = 1 sweep over T.
SHAPES = [(2, 10), (8, 1024)] + [(1, t) for t in (128, 256, 512, 1024, 2048, 4096, 8192, 16384)]
QUICK_SHAPES = [(2, 10), (8, 1024), (1, 4096)]
DTYPES = {"float": "float32", "double": "float64"}  # C++ name -> torch name
NAME_RE = re.compile(r"^attention/(fast|fast_ws|packed|packed_ws|reference)/(float|double)/B:(\d+)/T:(\d+)/threads:(\d+)")
# The multi-head comparison: simple_llm's sizes, 8 heads of 64 over emb 512, the shapes of issue 8.
MH_HEADS = 8
MH_SHAPES = [(8, 1024), (1, 4096)]
MH_NAME_RE = re.compile(r"^multihead/(fused|fused_workspace|packed|packed_workspace|separate)/(float)/B:(\d+)/T:(\d+)/threads:(\d+)")


def useful_flops(b, t):
    return b * (2.0 * t * EMB * 3 * HEAD + 2.0 * (2.0 * HEAD * t * (t + 1) / 2.0))


# --------------------------------------------------------------------------------------------- PyTorch side
def torch_worker(args):
    """Child process: time the seed module, print one JSON object on stdout."""
    import torch

    sys.path.insert(0, os.path.join(HERE, os.pardir, "tests"))
    from simple_llm_head import HeadAttention, MultiHeadAttention  # the modules the parity fixtures come from

    def make_module(t, dtype):
        if args.module == "multihead":  # .eval(): its dropout is the identity, as at inference
            return MultiHeadAttention(MH_HEADS, EMB, HEAD, t, dtype=dtype).eval()
        return HeadAttention(EMB, HEAD, t, dtype=dtype).eval()

    blas = sorted({line.split()[-1] for line in open("/proc/self/maps") if "blas" in line and ".so" in line})
    results = []
    torch.manual_seed(0)
    for b, t in args.shapes:
        if t > args.torch_max_t:
            continue
        for dtype_name in args.dtypes:
            dtype = getattr(torch, DTYPES[dtype_name])
            module = make_module(t, dtype)
            x = torch.rand(b, t, EMB, dtype=dtype) * 2 - 1
            for threads in args.threads:
                torch.set_num_threads(threads)
                with torch.no_grad():
                    start = time.perf_counter()
                    module(x)  # warm-up
                    first = time.perf_counter() - start
                    # At least --torch-min-reps timed calls, at most --torch-reps, within --torch-budget seconds.
                    reps = max(args.torch_min_reps, min(args.torch_reps, int(args.torch_budget / max(first, 1e-9))))
                    inner = max(1, int(0.01 / max(first, 1e-9)))  # tiny shapes: time batches of calls
                    times, cpu_times = [], []
                    for _ in range(reps):
                        start, cpu_start = time.perf_counter(), time.thread_time()
                        for _ in range(inner):
                            module(x)
                        times.append((time.perf_counter() - start) / inner)
                        cpu_times.append((time.thread_time() - cpu_start) / inner)
                results.append(
                    {
                        "B": b,
                        "T": t,
                        "dtype": dtype_name,
                        "threads": threads,
                        "median_ms": statistics.median(times) * 1e3,
                        "median_thread_cpu_ms": statistics.median(cpu_times) * 1e3,
                        "reps": reps,
                        "calls_per_rep": inner,
                        "times_ms": [s * 1e3 for s in times],
                    }
                )
                print(
                    f"  torch[{args.label}] {dtype_name} B={b} T={t} threads={threads}: "
                    f"{results[-1]['median_ms']:.3f} ms (median of {reps})",
                    file=sys.stderr,
                    flush=True,
                )
            del module, x
    json.dump(
        {"label": args.label, "module": args.module, "torch_version": torch.__version__, "blas_libraries": blas,
         "results": results},
        sys.stdout,
    )


def run_torch(args, label, max_t, openblas_dir=None):
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet)
    env = dict(os.environ)
    if openblas_dir:
        env["LD_LIBRARY_PATH"] = openblas_dir + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(var, None)  # torch.set_num_threads decides
    cmd = [sys.executable, os.path.abspath(__file__), "--torch-worker", "--label", label]
    cmd += ["--shapes", ",".join(f"{b}x{t}" for b, t in args.shapes)]
    cmd += ["--dtypes", *args.dtypes, "--threads", *map(str, args.threads)]
    cmd += ["--torch-reps", str(args.torch_reps), "--torch-min-reps", str(args.torch_min_reps)]
    cmd += ["--torch-budget", str(args.torch_budget), "--torch-max-t", str(max_t)]
    cmd += ["--module", args.module]
    print(f"[torch_compare] PyTorch ({label}): {' '.join(map(shlex.quote, cmd))}", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out)


def machine_busy(seconds=2.0):
    """Share of all CPUs' time spent busy over the next `seconds`, from /proc/stat (None if unreadable)."""

    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except OSError:
        return None
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_quiet(limit_s):
    """Wait (at most limit_s seconds) until the machine has been under 10% busy for two samples in a row."""
    deadline, calm = time.time() + limit_s, 0
    while time.time() < deadline:
        busy = machine_busy()
        if busy is None:
            return
        calm = calm + 1 if busy < 0.10 else 0
        print(f"[torch_compare] machine {busy:.0%} busy", file=sys.stderr, flush=True)
        if calm >= 2:
            return
    print("[torch_compare] the machine stayed busy; measuring anyway", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- our benchmark
def run_bench(args, json_path):
    cmd = [os.path.abspath(args.bench_binary), f"--benchmark_out={json_path}", "--benchmark_out_format=json"]
    if args.quick:
        cmd.append("--benchmark_filter=" + quick_filter(args))
    cmd += args.bench_args
    print(f"[torch_compare] ours: {' '.join(map(shlex.quote, cmd))}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    return cmd


def quick_filter(args):
    dtypes = "|".join(args.dtypes)
    shapes = "|".join(f"B:{b}/T:{t}" for b, t in QUICK_SHAPES)
    return f"^attention/(fast|reference)/({dtypes})/({shapes})/"


def parse_bench(path):
    """{(path, dtype, B, T, threads): {"ms": median ms, "FLOP": ..., "frac_gemm": ...}} and the context."""
    with open(path) as f:
        data = json.load(f)
    unit = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
    medians, runs = {}, {}
    for entry in data["benchmarks"]:
        m = NAME_RE.match(entry.get("run_name", entry["name"]))
        if not m:
            continue
        key = (m.group(1), m.group(2), int(m.group(3)), int(m.group(4)), int(m.group(5)))
        scale = unit[entry.get("time_unit", "ns")]
        row = {"ms": entry["real_time"] * scale, "cpu_ms": entry["cpu_time"] * scale}
        for counter in ("FLOP", "frac_gemm", "x_ref"):
            if counter in entry:
                row[counter] = entry[counter]
        if entry.get("run_type") == "aggregate":
            if entry.get("aggregate_name") == "median":
                medians[key] = row
        else:
            runs.setdefault(key, []).append(row)
    for key, rows in runs.items():  # a run without repetitions has no aggregates: take the median ourselves
        if key not in medians:
            medians[key] = {k: statistics.median(r[k] for r in rows) for k in rows[0] if all(k in r for r in rows)}
    return medians, data.get("context", {})


# --------------------------------------------------------------------------------------------------- output
def fmt_ms(v):
    if v is None:
        return "—"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def fmt_x(num, den):
    if num is None or den is None or den == 0:
        return "—"
    r = num / den
    return f"{r:.3g}x" if r < 100 else f"{r:.0f}x"


def lscpu_summary():
    info = {}
    try:
        out = subprocess.run(["lscpu"], stdout=subprocess.PIPE, text=True, check=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            info[k.strip()] = v.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    flags = info.get("Flags", "").split()
    simd = [f for f in ("avx2", "fma", "avx512f") if f in flags]
    return (
        f"{info.get('Model name', platform.processor() or 'unknown')}, {info.get('CPU(s)', os.cpu_count())} CPUs "
        f"({info.get('Thread(s) per core', '?')} thread(s) per core), {', '.join(simd) or 'no AVX2'}, "
        f"L2 {info.get('L2 cache', '?')}, L3 {info.get('L3 cache', '?')}"
    )


def cpu_pressure():
    """The 'some' line of /proc/pressure/cpu (share of time some task waited for a CPU), or None."""
    try:
        with open("/proc/pressure/cpu") as f:
            return f.readline().strip()
    except OSError:
        return None


def write_table(args, ours, context, torch_runs, run_info, path):
    torch_ms, torch_cpu_ms = {}, {}
    for run in torch_runs:
        for r in run["results"]:
            torch_ms[(run["label"], r["dtype"], r["B"], r["T"], r["threads"])] = r["median_ms"]
            if "median_thread_cpu_ms" in r:
                torch_cpu_ms[(run["label"], r["dtype"], r["B"], r["T"], r["threads"])] = r["median_thread_cpu_ms"]
    labels = [run["label"] for run in torch_runs]

    lines = []
    lines.append("# head-attention: fast path vs reference path vs PyTorch\n")
    lines.append(f"Measured {run_info.get('date', context.get('date', '?'))} by `bench/torch_compare.py`"
                 + (f", table written {datetime.datetime.now().isoformat(timespec='seconds')}" if run_info.get("reused") else "")
                 + ".\n")
    lines.append(f"- Machine: {lscpu_summary()}. A shared machine: compare rows within this one run only.")
    ratios = sorted(r["cpu_ms"] / r["ms"] for k, r in ours.items() if k[4] == 1 and r.get("ms") and "cpu_ms" in r)
    if ratios:
        lines.append(f"- Contention check: one-thread benchmarks got CPU time / wall time = {statistics.median(ratios):.2f} "
                     f"(median; lowest {ratios[0]:.2f}); near 1 means no other process took the core away. "
                     f"Load average after the run {run_info.get('loadavg', '?')}; CPU pressure after the run: "
                     f"{run_info.get('cpu_pressure') or 'n/a'}.")
    sg1, sg2 = float(context.get("sgemm_gflops_1thread", 0)), float(context.get("sgemm_gflops_2threads", 0))
    if sg1 > 0 and sg2 > 0:
        lines.append(f"- Two-thread check: Eigen SGEMM on 2 threads ran {sg2 / sg1:.2f}x its 1-thread rate at the start "
                     "(about 1.9 when the second core is free; much less means another process held it, and the "
                     "threads = 2 rows of this run are unreliable).")
    lines.append(f"- emb = {EMB}, head = {HEAD}. Times are medians over repetitions, in milliseconds per forward call "
                 "of the whole [B, T, emb] batch.")
    sg, dg = context.get("sgemm_gflops_1thread"), context.get("dgemm_gflops_1thread")
    if sg and dg:
        lines.append(f"- Eigen 1024³ GEMM in the same bench process, one thread, best of 7: SGEMM {float(sg):.1f} "
                     f"GFLOP/s, DGEMM {float(dg):.1f} GFLOP/s (two threads: {float(context.get('sgemm_gflops_2threads', 0)):.1f} "
                     f"and {float(context.get('dgemm_gflops_2threads', 0)):.1f}).")
    lines.append("- ours = `BatchedHeadAttention::forward` with `head().set_num_threads(threads)`; reference = "
                 "`head_attention::reference::forward` per sequence with `Eigen::setNbThreads(threads)` (Eigen's "
                 f"GEMMs are its only parallel part); reference runs stop at T = {context.get('reference_max_T', 8192)}.")
    for run in torch_runs:
        libs = ", ".join(os.path.basename(p) + f" ({os.path.dirname(p)})" for p in run["blas_libraries"]) or "none"
        lines.append(f"- PyTorch [{run['label']}]: torch {run['torch_version']}, CPU, `torch.no_grad()`, "
                     f"`torch.set_num_threads(threads)`, simple_llm's module; BLAS loaded: {libs}.")
    lines.append("- GFLOP/s counts useful work: B (2 T emb 3 head + 2 · 2 head T (T+1)/2), the projections and the "
                 "causal halves of QKᵀ and PV. frac GEMM = GFLOP/s / (threads × one-thread GEMM GFLOP/s of that dtype).")
    lines.append("- Commands: " + "; ".join(f"`{c}`" for c in run_info.get("commands", [])) + ".")
    if run_info.get("reused"):
        lines.append(f"- Table regenerated from the saved JSON with `{' '.join(map(shlex.quote, [sys.executable] + sys.argv))}`.")
    lines.append("")

    head = ["shape (B, T)", "dtype", "threads", "ours (ms)", "reference (ms)"]
    head += [f"PyTorch {lab} (ms)" for lab in labels]
    head += [f"ours vs PyTorch {lab}" for lab in labels]
    head += ["ours vs reference", "GFLOP/s", "frac GEMM"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|")
    for b, t in args.shapes:
        for dtype in args.dtypes:
            for threads in args.threads:
                fast = ours.get(("fast", dtype, b, t, threads))
                ref = ours.get(("reference", dtype, b, t, threads))
                if fast is None and ref is None:
                    continue
                fast_ms = fast["ms"] if fast else None
                ref_ms = ref["ms"] if ref else None
                pt = [torch_ms.get((lab, dtype, b, t, threads)) for lab in labels]
                row = [f"{b}, {t}", dtype, str(threads), fmt_ms(fast_ms), fmt_ms(ref_ms)]
                row += [fmt_ms(v) for v in pt]
                row += [fmt_x(v, fast_ms) for v in pt]
                row += [fmt_x(ref_ms, fast_ms)]
                row += [f"{fast['FLOP'] * 1e-9:.1f}" if fast and "FLOP" in fast else "—"]
                row += [f"{fast['frac_gemm']:.2f}" if fast and "frac_gemm" in fast else "—"]
                lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Speedups are ratios of the medians above (> 1: ours is faster). `—`: not run (reference above "
                 f"T = {context.get('reference_max_T', 8192)}, PyTorch with the system BLAS above T = "
                 f"{min(args.torch_max_t, args.torch_system_max_t)}, any PyTorch above T = {args.torch_max_t}, "
                 "or filtered out).")

    if 1 in args.threads:
        lines.append("")
        lines.append("## One thread, CPU time\n")
        lines.append("The same runs, one thread, timed by the CPU time of the calling thread (Google Benchmark's "
                     "`cpu_time`, Python's `time.thread_time()`) instead of the wall clock: the time other "
                     "processes on a shared machine take the core away does not count, so these ratios are the "
                     "steadier ones. GFLOP/s and frac GEMM here use the CPU time.\n")
        head = ["shape (B, T)", "dtype", "ours CPU (ms)", "reference CPU (ms)"]
        head += [f"PyTorch {lab} CPU (ms)" for lab in labels]
        head += [f"ours vs PyTorch {lab}" for lab in labels]
        head += ["ours vs reference", "GFLOP/s (CPU)", "frac GEMM (CPU)"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
        gemm = {d: float(context.get(f"{'s' if d == 'float' else 'd'}gemm_gflops_1thread", 0)) for d in ("float", "double")}
        for b, t in args.shapes:
            for dtype in args.dtypes:
                fast = ours.get(("fast", dtype, b, t, 1))
                ref = ours.get(("reference", dtype, b, t, 1))
                if fast is None and ref is None:
                    continue
                fast_ms = fast.get("cpu_ms") if fast else None
                ref_ms = ref.get("cpu_ms") if ref else None
                pt = [torch_cpu_ms.get((lab, dtype, b, t, 1)) for lab in labels]
                row = [f"{b}, {t}", dtype, fmt_ms(fast_ms), fmt_ms(ref_ms)]
                row += [fmt_ms(v) for v in pt]
                row += [fmt_x(v, fast_ms) for v in pt]
                row += [fmt_x(ref_ms, fast_ms)]
                rate = useful_flops(b, t) / (fast_ms * 1e-3) * 1e-9 if fast_ms else None
                row += [f"{rate:.1f}" if rate else "—"]
                row += [f"{rate / gemm[dtype]:.2f}" if rate and gemm[dtype] else "—"]
                lines.append("| " + " | ".join(row) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(args, ours, torch_runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = sorted(t for b, t in args.shapes if b == 1)
    fig, axes = plt.subplots(1, len(args.dtypes), figsize=(6.5 * len(args.dtypes), 5.2), squeeze=False)
    styles = {1: "-", 2: "--"}
    for ax, dtype in zip(axes[0], args.dtypes):
        series = [("ours (fused)", "tab:blue", "o", lambda th, t: (ours.get(("fast", dtype, 1, t, th)) or {}).get("ms")),
                  ("reference (materialising)", "tab:orange", "s",
                   lambda th, t: (ours.get(("reference", dtype, 1, t, th)) or {}).get("ms"))]
        colours = ["tab:green", "tab:red", "tab:purple"]
        for i, run in enumerate(torch_runs):
            table = {(r["T"], r["threads"]): r["median_ms"] for r in run["results"] if r["dtype"] == dtype and r["B"] == 1}
            series.append((f"PyTorch {run['label']}", colours[i % len(colours)], "^",
                           lambda th, t, table=table: table.get((t, th))))
        for label, colour, marker, get in series:
            for th in args.threads:
                pts = [(t, get(th, t)) for t in sweep]
                pts = [(t, v) for t, v in pts if v is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(th, ":"), color=colour, marker=marker,
                            markersize=4, label=f"{label}, {th} thread{'s' if th > 1 else ''}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (sequence length), B = 1")
        ax.set_ylabel("time per forward call (ms)")
        ax.set_title(f"causal single-head attention, emb {EMB}, head {HEAD}, {DTYPES[dtype]}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------- multi-head comparison mode
def multihead_filter(shapes, threads):
    shape_re = "|".join(f"B:{b}/T:{t}" for b, t in shapes)
    threads_re = "|".join(str(n) for n in threads)
    return f"^multihead/(fused|fused_workspace|separate)/float/({shape_re})/threads:({threads_re})/"


def parse_multihead(path):
    """{(path, B, T, threads): {"ms": median wall ms, "cpu_ms": median CPU ms, "reps_ms": [...]}} of one run."""
    with open(path) as f:
        data = json.load(f)
    unit = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
    runs = {}
    for entry in data["benchmarks"]:
        m = MH_NAME_RE.match(entry.get("run_name", entry["name"]))
        if not m or entry.get("run_type") == "aggregate":
            continue
        key = (m.group(1), int(m.group(3)), int(m.group(4)), int(m.group(5)))
        scale = unit[entry.get("time_unit", "ns")]
        runs.setdefault(key, []).append((entry["real_time"] * scale, entry["cpu_time"] * scale))
    out = {}
    for key, reps in runs.items():
        out[key] = {"ms": statistics.median(r[0] for r in reps), "cpu_ms": statistics.median(r[1] for r in reps),
                    "reps_ms": [r[0] for r in reps], "reps_cpu_ms": [r[1] for r in reps]}
    return out, data.get("context", {})


def run_multihead_rounds(args):
    """Interleaved rounds: each round runs bench_multihead once and each PyTorch child once, in an order rotated
    by one every round. Returns the list of rounds, each {"order", "ours": {...}, "torch": {label: run}}."""
    steps = [("ours", None)]
    if not args.no_system_torch:
        steps.append(("system BLAS", None))
    if args.openblas_dir:
        steps.append(("OpenBLAS", args.openblas_dir))
    rounds = []
    for i in range(args.rounds):
        order = steps[i % len(steps):] + steps[:i % len(steps)]
        print(f"[torch_compare] round {i + 1}/{args.rounds}: {', '.join(label for label, _ in order)}",
              file=sys.stderr, flush=True)
        rnd = {"order": [label for label, _ in order], "torch": {}}
        for label, openblas_dir in order:
            if label == "ours":
                if args.wait_quiet > 0:
                    wait_quiet(args.wait_quiet)
                json_path = os.path.join(args.out_dir, f"multihead_bench_round{i + 1}.json")
                cmd = [os.path.abspath(args.multihead), f"--benchmark_out={json_path}",
                       "--benchmark_out_format=json",
                       "--benchmark_filter=" + multihead_filter(args.shapes, args.threads),
                       f"--benchmark_repetitions={args.mh_reps}", f"--benchmark_min_time={args.mh_min_time}",
                       "--benchmark_display_aggregates_only=true"] + args.bench_args
                print(f"[torch_compare] ours: {' '.join(map(shlex.quote, cmd))}", file=sys.stderr, flush=True)
                subprocess.run(cmd, check=True)
                ours, context = parse_multihead(json_path)
                os.remove(json_path)  # everything it held is kept in multihead_comparison.json
                rnd["ours"] = {"/".join(map(str, k)): v for k, v in ours.items()}
                rnd["ours_cmd"] = " ".join(map(shlex.quote, cmd))
                rnd["bench_context"] = context
            else:
                max_t = args.torch_max_t if openblas_dir else min(args.torch_max_t, args.torch_system_max_t)
                rnd["torch"][label] = run_torch(args, label, max_t, openblas_dir)
        rnd["busy_after"] = machine_busy(1.0)
        rounds.append(rnd)
    return rounds


def summarise_multihead(args, rounds):
    """Median over the rounds of each round's median: {("fused"|"separate"|label, B, T, threads): {...}}."""
    series = {}
    for rnd in rounds:
        for key, row in rnd["ours"].items():
            path, b, t, threads = key.split("/")
            series.setdefault((path, int(b), int(t), int(threads)), []).append((row["ms"], row["cpu_ms"]))
        for label, run in rnd["torch"].items():
            for r in run["results"]:
                series.setdefault((label, r["B"], r["T"], r["threads"]), []).append(
                    (r["median_ms"], r.get("median_thread_cpu_ms")))
    summary = {}
    for key, vals in series.items():
        walls = [v[0] for v in vals]
        cpus = [v[1] for v in vals if v[1] is not None]
        summary[key] = {"ms": statistics.median(walls), "cpu_ms": statistics.median(cpus) if cpus else None,
                        "min_ms": min(walls), "max_ms": max(walls), "rounds": len(vals)}
    return summary


def write_multihead_table(args, rounds, summary, run_info, path):
    labels = [lab for lab in ("system BLAS", "OpenBLAS") if any(lab in r["torch"] for r in rounds)]
    lines = ["# head-attention: MultiHeadAttention vs simple_llm's PyTorch MultiHeadAttention\n"]
    lines.append(f"Measured {run_info.get('date', '?')} by `bench/torch_compare.py --multihead`"
                 + (f", table written {datetime.datetime.now().isoformat(timespec='seconds')}"
                    if run_info.get("reused") else "") + ".\n")
    lines.append(f"- Machine: {lscpu_summary()}. A shared machine: compare rows within this one run only.")
    lines.append(f"- Layer: {MH_HEADS} heads of {HEAD}, emb {EMB}, causal, float32; times in milliseconds per "
                 "forward call of the whole [B, T, emb] batch.")
    lines.append(f"- {len(rounds)} interleaved rounds: each round runs our benchmark once "
                 f"({args.mh_reps} repetitions, `--benchmark_min_time={args.mh_min_time}`) and each PyTorch child "
                 "once, in an order rotated by one every round. Each cell is the median over the rounds of each "
                 "round's median; the JSON keeps every round.")
    lines.append("- ours fused = `MultiHeadAttention<float>::forward_into` (`set_num_threads(threads)`: all heads' "
                 "projections, attention blocks and the output projection in one parallel region); ours fused + "
                 "Workspace = the same call given one `Workspace<float>` kept across calls (its buffers are "
                 "neither allocated nor page-faulted again); ours separate = "
                 f"{MH_HEADS} `HeadAttention<float>::forward_into` calls (each on `threads` threads) into the "
                 "columns of a preallocated concatenation, then one Eigen GEMM with `Eigen::setNbThreads(threads)` "
                 "plus the bias (bench/bench_multihead.cpp).")
    for label in labels:
        run = next(r["torch"][label] for r in rounds if label in r["torch"])
        libs = ", ".join(os.path.basename(p) + f" ({os.path.dirname(p)})" for p in run["blas_libraries"]) or "none"
        lines.append(f"- PyTorch [{label}]: torch {run['torch_version']}, CPU, `torch.no_grad()`, "
                     "`torch.set_num_threads(threads)`, simple_llm's `MultiHeadAttention` from "
                     f"tests/simple_llm_head.py in `eval()` (dropout = identity); BLAS loaded: {libs}. At most "
                     f"{args.torch_reps} timed calls after one warm-up, within about {args.torch_budget:g} s.")
    ratios = sorted(r["cpu_ms"] / r["ms"] for rnd in rounds for k, r in rnd["ours"].items()
                    if k.endswith("/1") and r.get("ms"))
    if ratios:
        lines.append(f"- Contention check: our one-thread benchmarks got CPU time / wall time = "
                     f"{statistics.median(ratios):.2f} (median over rounds; lowest {ratios[0]:.2f}); near 1 means no "
                     f"other process took the core away. Machine busy share after each round: "
                     + ", ".join(f"{r['busy_after']:.0%}" if r.get("busy_after") is not None else "?" for r in rounds)
                     + f"; load average after the run {run_info.get('loadavg', '?')}.")
    busy = [r["busy_after"] for r in rounds if r.get("busy_after") is not None]
    if 2 in args.threads and busy and max(busy) > 0.25:
        lines.append(f"- **Other processes kept the machine up to {max(busy):.0%} busy during this run: the threads = 2 "
                     "rows (ours and PyTorch's alike) are unreliable.** Compare the one-thread rows, and above all "
                     "the CPU-time table.")
    if run_info.get("library_commit"):
        lines.append(f"- Library: {run_info['library_commit']}.")
    lines.append("- Commands: " + "; ".join(f"`{c}`" for c in run_info.get("commands", [])) + ".")
    lines.append("")

    def cell(key, field="ms"):
        row = summary.get(key)
        return row.get(field) if row else None

    head = ["shape (B, T)", "threads", "ours fused (ms)", "ours fused + Workspace (ms)", "ours separate (ms)",
            "fused vs separate", "fused + Workspace vs separate"]
    head += [f"PyTorch {lab} (ms)" for lab in labels]
    head += [f"fused vs PyTorch {lab}" for lab in labels]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
    for b, t in args.shapes:
        for threads in args.threads:
            fused, sep = cell(("fused", b, t, threads)), cell(("separate", b, t, threads))
            ws = cell(("fused_workspace", b, t, threads))
            pt = [cell((lab, b, t, threads)) for lab in labels]
            row = [f"{b}, {t}", str(threads), fmt_ms(fused), fmt_ms(ws), fmt_ms(sep), fmt_x(sep, fused),
                   fmt_x(sep, ws)]
            row += [fmt_ms(v) for v in pt] + [fmt_x(v, fused) for v in pt]
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Ratios are of the medians above: > 1 means the fused layer is faster (fused vs separate = "
                 "separate / fused; fused vs PyTorch = PyTorch / fused).")
    if 1 in args.threads:
        lines.append("")
        lines.append("## One thread, CPU time\n")
        lines.append("The same runs, one thread, timed by the CPU time of the calling thread (Google Benchmark's "
                     "`cpu_time`, Python's `time.thread_time()`): time other processes take the core away does not "
                     "count, so these are the steadier ratios.\n")
        head = ["shape (B, T)", "ours fused CPU (ms)", "ours fused + Workspace CPU (ms)", "ours separate CPU (ms)",
                "fused vs separate", "fused + Workspace vs separate"]
        head += [f"PyTorch {lab} CPU (ms)" for lab in labels]
        head += [f"fused vs PyTorch {lab}" for lab in labels]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|---|" + "|".join(["---:"] * (len(head) - 1)) + "|")
        for b, t in args.shapes:
            fused, sep = cell(("fused", b, t, 1), "cpu_ms"), cell(("separate", b, t, 1), "cpu_ms")
            ws = cell(("fused_workspace", b, t, 1), "cpu_ms")
            pt = [cell((lab, b, t, 1), "cpu_ms") for lab in labels]
            row = [f"{b}, {t}", fmt_ms(fused), fmt_ms(ws), fmt_ms(sep), fmt_x(sep, fused), fmt_x(sep, ws)]
            row += [fmt_ms(v) for v in pt] + [fmt_x(v, fused) for v in pt]
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("## Spread over the rounds (wall clock, min – max of the per-round medians)\n")
    names = ["fused", "fused_workspace", "separate"] + labels
    lines.append("| shape (B, T) | threads | " + " | ".join(names) + " |")
    lines.append("|---|---|" + "|".join(["---:"] * len(names)) + "|")
    for b, t in args.shapes:
        for threads in args.threads:
            cells = []
            for name in names:
                row = summary.get((name, b, t, threads))
                cells.append(f"{fmt_ms(row['min_ms'])} – {fmt_ms(row['max_ms'])} ({row['rounds']})" if row else "—")
            lines.append(f"| {b}, {t} | {threads} | " + " | ".join(cells) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def git_head():
    """The commit of the checkout this script lives in, marked when include/ has uncommitted changes (the
    benchmark binary is only known to match it when it was built from this checkout)."""
    try:
        root = os.path.join(HERE, os.pardir)
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "include"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.strip()
        return f"commit {head} of this checkout" + (", include/ modified" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def multihead_main(args):
    args.module = "multihead"
    if args.out_dir is None:
        args.out_dir = os.path.join(HERE, "results", "quick") if args.quick else os.path.join(HERE, "results")
    os.makedirs(args.out_dir, exist_ok=True)
    json_path = os.path.join(args.out_dir, "multihead_comparison.json")
    md_path = os.path.join(args.out_dir, "multihead_comparison.md")
    if args.mh_json:
        with open(args.mh_json) as f:
            saved = json.load(f)
        rounds, run_info = saved["rounds"], saved["run_info"]
        args.shapes = [tuple(s) for s in saved["shapes"]]
        args.threads = saved["threads"]
        for name in ("rounds", "mh_reps", "mh_min_time", "torch_reps", "torch_budget"):
            setattr(args, name, saved["settings"][name])
        run_info["reused"] = True
    else:
        run_info = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "commands": [" ".join(map(shlex.quote, [sys.executable] + sys.argv))],
                    "library_commit": git_head()}
        rounds = run_multihead_rounds(args)
        run_info["commands"].insert(0, rounds[0]["ours_cmd"])
        run_info["loadavg"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
        run_info["cpu_pressure"] = cpu_pressure()
    summary = summarise_multihead(args, rounds)
    if not args.mh_json:
        with open(json_path, "w") as f:
            json.dump({"run_info": run_info, "shapes": args.shapes, "threads": args.threads,
                       "settings": {"rounds": args.rounds, "mh_reps": args.mh_reps, "mh_min_time": args.mh_min_time,
                                    "torch_reps": args.torch_reps, "torch_budget": args.torch_budget},
                       "summary": [{"name": k[0], "B": k[1], "T": k[2], "threads": k[3], **v}
                                   for k, v in sorted(summary.items(), key=lambda kv: str(kv[0]))],
                       "rounds": rounds}, f, indent=1)
    write_multihead_table(args, rounds, summary, run_info, md_path)
    print(f"[torch_compare] wrote {md_path}" + ("" if args.mh_json else f" and {json_path}"), file=sys.stderr)
    with open(md_path) as f:
        print(f.read())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench_binary", nargs="?", help="path to bench_attention (not needed with --bench-json or "
                   "--multihead)")
    p.add_argument("--multihead", metavar="BENCH_MULTIHEAD",
                   help="compare MultiHeadAttention instead: run this bench_multihead binary and simple_llm's "
                   f"PyTorch MultiHeadAttention on {MH_SHAPES}, float; writes multihead_comparison.md and .json")
    p.add_argument("--mh-json", help="with --multihead: redo multihead_comparison.md from this saved JSON")
    p.add_argument("--rounds", type=int, default=3, help="with --multihead: interleaved rounds (default 3)")
    p.add_argument("--mh-reps", type=int, default=3,
                   help="with --multihead: --benchmark_repetitions of each bench_multihead run (default 3)")
    p.add_argument("--mh-min-time", type=float, default=0.5,
                   help="with --multihead: --benchmark_min_time of each bench_multihead run (default 0.5)")
    p.add_argument("--bench-json", help="reuse this bench_attention JSON output instead of running the binary")
    p.add_argument("--bench-args", nargs=argparse.REMAINDER, default=[],
                   help="everything after this goes to bench_attention (e.g. --benchmark_repetitions=9)")
    p.add_argument("--out-dir", help="default bench/results, or bench/results/quick with --quick")
    p.add_argument("--quick", action="store_true", help=f"only the shapes {QUICK_SHAPES}, float")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--openblas-dir", help="also time PyTorch with this directory (an OpenBLAS libblas.so.3) "
                   "first on LD_LIBRARY_PATH")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before each measuring step, wait up to this long for the machine to be idle")
    p.add_argument("--torch-json", help="reuse this torch.json (from an earlier run) instead of timing PyTorch")
    p.add_argument("--no-system-torch", action="store_true", help="skip PyTorch with the system's BLAS")
    p.add_argument("--torch-reps", type=int, default=7, help="most timed PyTorch calls per configuration")
    p.add_argument("--torch-min-reps", type=int, default=1, help="fewest timed PyTorch calls per configuration")
    p.add_argument("--torch-budget", type=float, default=10.0, help="seconds per PyTorch configuration, roughly")
    p.add_argument("--torch-max-t", type=int, default=16384, help="skip PyTorch above this T")
    p.add_argument("--torch-system-max-t", type=int, default=8192,
                   help="skip PyTorch with the system BLAS above this T (netlib BLAS: ~30 s a call at 16384)")
    # internal: the PyTorch child process
    p.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--label", default="system BLAS", help=argparse.SUPPRESS)
    p.add_argument("--shapes", help=argparse.SUPPRESS)
    p.add_argument("--module", choices=["head", "multihead"], default="head", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.multihead or args.mh_json:
        if args.torch_worker:
            p.error("--multihead is not a worker option")
        args.dtypes = ["float"]
        args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes \
            else MH_SHAPES
        if args.quick:
            args.rounds = 1
        multihead_main(args)
        return

    if args.dtypes is None:
        args.dtypes = ["float"] if args.quick else ["float", "double"]
    if args.shapes:
        args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    else:
        args.shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.torch_worker:
        torch_worker(args)
        return

    if args.out_dir is None:
        args.out_dir = os.path.join(HERE, "results", "quick") if args.quick else os.path.join(HERE, "results")
    if not args.bench_json and not args.bench_binary:
        p.error("give the bench_attention binary, or --bench-json")
    os.makedirs(args.out_dir, exist_ok=True)
    json_path = os.path.join(args.out_dir, "bench_attention.json")
    info_path = os.path.join(args.out_dir, "run_info.json")
    if args.bench_json:
        json_path = args.bench_json
        run_info = {}
        saved = os.path.join(os.path.dirname(os.path.abspath(json_path)), "run_info.json")
        if os.path.exists(saved):
            with open(saved) as f:
                run_info = json.load(f)
        run_info["reused"] = True
    else:
        if args.wait_quiet > 0:
            wait_quiet(args.wait_quiet)
        run_info = {"date": datetime.datetime.now().isoformat(timespec="seconds")}
        bench_cmd = run_bench(args, json_path)
        run_info["commands"] = [" ".join(map(shlex.quote, bench_cmd)),
                                " ".join(map(shlex.quote, [sys.executable] + sys.argv))]
    ours, context = parse_bench(json_path)

    torch_path = os.path.join(args.out_dir, "torch.json")
    if args.torch_json:
        with open(args.torch_json) as f:
            torch_runs = json.load(f)
    else:
        torch_runs = []
        if not args.no_system_torch:
            torch_runs.append(run_torch(args, "system BLAS", min(args.torch_max_t, args.torch_system_max_t)))
        if args.openblas_dir:
            torch_runs.append(run_torch(args, "OpenBLAS", args.torch_max_t, args.openblas_dir))
    if os.path.abspath(torch_path) != os.path.abspath(args.torch_json or ""):
        with open(torch_path, "w") as f:
            json.dump(torch_runs, f, indent=1)

    if not run_info.get("reused"):
        run_info["loadavg"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
        run_info["cpu_pressure"] = cpu_pressure()
        with open(info_path, "w") as f:
            json.dump(run_info, f, indent=1)
    md = os.path.join(args.out_dir, "comparison.md")
    png = os.path.join(args.out_dir, "time_vs_T.png")
    write_table(args, ours, context, torch_runs, run_info, md)
    try:
        write_plot(args, ours, torch_runs, png)
        print(f"[torch_compare] wrote {md} and {png}", file=sys.stderr)
    except ImportError as e:  # matplotlib missing: the table is still written
        print(f"[torch_compare] wrote {md}; no plot ({e}: install python3-matplotlib)", file=sys.stderr)
    with open(md) as f:
        print(f.read())


if __name__ == "__main__":
    main()
