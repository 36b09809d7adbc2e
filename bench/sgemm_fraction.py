#!/usr/bin/env python3
"""Useful throughput of bench_attention as a fraction of the best one-thread SGEMM (issue 9's goal line).

Runs each given bench_attention binary with --openblas=<libopenblas.so.0> (so that the ceiling is the faster of
Eigen's and OpenBLAS's 1024^3 SGEMM, measured by the binary at startup) and many short repetitions, in
interleaved rounds. On a shared machine the fastest repetition is the one least disturbed, so a row is the
minimum over all rounds and repetitions, and the ceiling the highest best-SGEMM any round measured.

  bench/sgemm_fraction.py --openblas <libopenblas.so.0> build-a/bench/bench_attention build-b/bench/bench_attention
  OPENBLAS_CORETYPE=Haswell bench/sgemm_fraction.py ...   # OpenBLAS's AVX2 kernel, for an AVX2 build

Only Python's standard library; prints one block per binary.
"""
import argparse
import collections
import json
import os
import subprocess


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("binaries", nargs="+")
    p.add_argument("--openblas", required=True, help="path of libopenblas.so.0 (the SGEMM ceiling)")
    p.add_argument("--filter", default="^attention/packed/float/B:(8/T:1024|1/T:4096)/threads:1/")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repetitions", type=int, default=10)
    p.add_argument("--min-time", type=float, default=0.05)
    a = p.parse_args()
    best = collections.defaultdict(lambda: (float("inf"), 0.0))  # (run, binary) -> (seconds, flops)
    ceiling = collections.defaultdict(float)
    peak = collections.defaultdict(float)
    for _ in range(a.rounds):
        for b in a.binaries:
            out = subprocess.run([b, "--openblas=" + a.openblas, "--benchmark_filter=" + a.filter,
                                  f"--benchmark_repetitions={a.repetitions}", f"--benchmark_min_time={a.min_time}",
                                  "--benchmark_format=json", "--benchmark_report_aggregates_only=false",
                                  "--benchmark_display_aggregates_only=false"],
                                 capture_output=True, text=True, check=True).stdout
            j = json.loads(out)
            ceiling[b] = max(ceiling[b], float(j["context"]["best_sgemm_gflops_1thread"]))
            peak[b] = max(peak[b], float(j["context"]["peak_fma_float_gflops_1thread"]))
            for x in j["benchmarks"]:
                if x.get("run_type") != "iteration":
                    continue
                scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[x["time_unit"]]
                t = x["real_time"] * scale
                key = (x["run_name"], b)
                if t < best[key][0]:
                    best[key] = (t, x["FLOP"] * t)  # the FLOP counter is a rate
    for b in a.binaries:
        print(f"{b}: best SGEMM (max over rounds) {ceiling[b]:.1f} GFLOP/s, peak FMA {peak[b]:.1f}")
        for (name, binary), (t, flops) in sorted(best.items()):
            if binary != b:
                continue
            g = flops / t / 1e9
            print(f"  {name}: min {t * 1e3:.2f} ms, {g:.1f} GFLOP/s, frac_gemm {g / ceiling[b]:.3f}, "
                  f"frac_peak {g / peak[b]:.3f}")


if __name__ == "__main__":
    main()
