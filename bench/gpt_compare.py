#!/usr/bin/python3
"""Text generation: milliseconds per generated token, simple_llm's PyTorch GPT.generate against the C++ GPT of
examples/gpt (the library's PackedMultiHeadAttention with a KV cache per Decoder), on the same weights.

For each model size (random weights, PyTorch's default init, torch.manual_seed fixed) the script writes the
safetensors file with examples/gpt/export_gpt.py, then measures in interleaved rounds, 1 and 2 threads:
  PyTorch   simple_llm's generate(x, k, do_sample=False) on a text of n tokens, divided by k (k = 4): each
            token re-runs the whole forward over the last min(n, max_seq_len) tokens (simple_llm has no cache);
            in a child process per round, with OpenBLAS when --openblas-dir is given (Debian's torch calls the
            system's libblas.so.3, the slow reference BLAS otherwise)
  ours      bench_gpt (Google Benchmark): one cached decode step at position n (gpt/step), one token past the
            window (gpt/window: the window recomputed), and a whole generate of 16 prompt + max_seq_len new
            tokens (gpt/generate)
and writes bench/results/gpt_generate.md (the table, medians over rounds, the machine, the command) and
gpt_generate.json (every measurement).

  /usr/bin/python3 bench/gpt_compare.py BUILD/bench/bench_gpt \\
      --openblas-dir /tmp/openblas/root/usr/lib/x86_64-linux-gnu/openblas-openmp [--rounds 3] [--quick]
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "examples", "gpt"))

# name, (vocab_size, max_seq_len, emb_size, num_heads, head_size, num_layers)
SIZES = [
    ("E256", (5000, 512, 256, 8, 32, 4)),
    ("E512", (5000, 512, 512, 8, 64, 4)),
]
POSITIONS = [16, 128, 256, 511]  # n: the text's length when the token is generated
TORCH_NEW = 4  # tokens per PyTorch generate call when timing one position
THREADS = [1, 2]


def build_models(tmp):
    import torch
    from export_gpt import export_gpt
    from simple_llm_gpt import GPT

    paths = {}
    for name, sizes in SIZES:
        torch.manual_seed(2026)
        model = GPT(*sizes)
        path = os.path.join(tmp, name + ".safetensors")
        torch.save({"model_state_dict": model.state_dict(), "sizes": sizes}, path + ".pt")
        export_gpt(model, path, torch.float32)
        paths[name] = path
    return paths


def torch_worker(args):
    """Child process: time simple_llm's generate for one model and thread count; prints JSON."""
    import torch
    from simple_llm_gpt import GPT

    torch.set_num_threads(args.threads)
    saved = torch.load(args.worker_model, map_location="cpu")
    model = GPT(*saved["sizes"])
    model.load_state_dict(saved["model_state_dict"])
    model.eval()
    vocab, max_len = saved["sizes"][0], saved["sizes"][1]
    gen = torch.Generator().manual_seed(7)
    result = {"threads": args.threads, "config": torch.__config__.parallel_info().splitlines()[0:3]}

    def per_token(n, k, repeats):
        x = torch.randint(0, vocab, (1, n), generator=gen)
        with torch.no_grad():
            model.generate(x, 1, do_sample=False)  # warm-up
            best = []
            for _ in range(repeats):
                start = time.perf_counter()
                model.generate(x, k, do_sample=False)
                best.append((time.perf_counter() - start) / k * 1e3)
        return statistics.median(best)

    repeats = 1 if args.quick else 3
    result["step"] = {str(n): per_token(n, TORCH_NEW, repeats) for n in POSITIONS}
    result["window"] = per_token(max_len, TORCH_NEW, repeats)
    if not args.quick:
        result["generate"] = per_token(16, max_len, 1)
    print(json.dumps(result))


def run_torch(args, model_pt, threads):
    env = dict(os.environ)
    if args.openblas_dir:
        env["LD_LIBRARY_PATH"] = args.openblas_dir + (":" + env["LD_LIBRARY_PATH"] if "LD_LIBRARY_PATH" in env else "")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker-model", model_pt, "--threads", str(threads)]
    if args.quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_ours(args, model, json_path):
    flt = "gpt/(step|window)/" if args.quick else "gpt/"
    cmd = [args.bench, "--model=" + model, "--benchmark_filter=" + flt, "--benchmark_format=json",
           "--benchmark_out_format=json", "--benchmark_out=" + json_path, "--benchmark_min_time=0.2"]
    subprocess.run(cmd, check=True, capture_output=True)
    with open(json_path) as f:
        data = json.load(f)
    out = {}
    for b in data["benchmarks"]:
        # "gpt/step/n:16/threads:1/real_time" -> "gpt/step/n:16/threads:1"
        name = b["name"].replace("/iterations:1", "").replace("/real_time", "")
        out[name] = b["ms_per_token"]
    return out


def lscpu_model():
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def git_head():
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return "?"


def weight_bytes(sizes):
    """Bytes of float weights a decode step reads: every Decoder's matrices, the last Linear."""
    vocab, _, emb, heads, head, layers = sizes
    per_layer = 3 * heads * head * emb + heads * head * emb + 8 * emb * emb
    return 4 * (layers * per_layer + vocab * emb)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", nargs="?", help="BUILD/bench/bench_gpt")
    parser.add_argument("--openblas-dir", help="a directory with OpenBLAS's libblas.so.3, for PyTorch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one round, steps and window only")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--worker-model", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_model:
        return torch_worker(args)
    if not args.bench:
        parser.error("the bench_gpt program is required")
    rounds = 1 if args.quick else args.rounds
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_models(tmp)
        for r in range(rounds):
            for name, _ in SIZES:
                ours = run_ours(args, paths[name], os.path.join(tmp, f"ours.{name}.{r}.json"))
                for threads in THREADS:
                    theirs = run_torch(args, paths[name] + ".pt", threads)
                    runs.append({"round": r, "model": name, "threads": threads, "torch": theirs,
                                 "ours": {k: v for k, v in ours.items() if k.endswith(f"threads:{threads}")}})
                    print(f"round {r} {name} threads {threads}: torch {theirs['step']} ours "
                          f"{runs[-1]['ours']}", file=sys.stderr)
    write_results(args, runs)


def median_of(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def write_results(args, runs):
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Text generation: ms per generated token, simple_llm's PyTorch generate vs examples/gpt", "",
             f"- {stamp}, {lscpu_model()}, {os.cpu_count()} cores, commit {git_head()}; PyTorch "
             f"{__import__('torch').__version__} with "
             f"{'OpenBLAS (' + args.openblas_dir + ')' if args.openblas_dir else 'the system BLAS'}",
             f"- command: `/usr/bin/python3 bench/gpt_compare.py {args.bench}"
             f"{' --openblas-dir ' + args.openblas_dir if args.openblas_dir else ''}"
             f"{' --quick' if args.quick else ' --rounds ' + str(args.rounds)}`",
             f"- medians of {len({r['round'] for r in runs})} interleaved rounds; greedy, float32, one sequence",
             "- PyTorch: simple_llm's generate re-runs the forward over the whole text (up to max_seq_len) per "
             "token; ours: a cached decode step per token while the text fits max_seq_len, the window "
             "recomputed per token past it (learned absolute positions), as simple_llm crops",
             "", "| model | threads | position n | PyTorch (ms/token) | ours (ms/token) | ours faster |",
             "|---|---:|---|---:|---:|---:|"]
    for name, sizes in SIZES:
        for threads in THREADS:
            sel = [r for r in runs if r["model"] == name and r["threads"] == threads]
            rows = [(f"{n}", [r["torch"]["step"][str(n)] for r in sel],
                     [r["ours"].get(f"gpt/step/n:{n}/threads:{threads}") for r in sel]) for n in POSITIONS]
            rows.append(("past max_seq_len", [r["torch"]["window"] for r in sel],
                         [r["ours"].get(f"gpt/window/threads:{threads}") for r in sel]))
            gen = [r["ours"].get(f"gpt/generate/prompt:16/new:{sizes[1]}/threads:{threads}") for r in sel]
            if any(g is not None for g in gen):
                rows.append((f"whole generate, 16 + {sizes[1]} tokens", [r["torch"].get("generate") for r in sel],
                             gen))
            label = (f"{name}: vocab {sizes[0]}, emb {sizes[2]}, {sizes[3]}×{sizes[4]} heads, {sizes[5]} "
                     f"decoders, max_seq_len {sizes[1]}")
            for pos, theirs, ours in rows:
                t, o = median_of(theirs), median_of(ours)
                ratio = f"{t / o:.1f}x" if t and o else "–"
                lines.append(f"| {label} | {threads} | {pos} | {t:.3f} | {o:.3f} | {ratio} |" if t and o else
                             f"| {label} | {threads} | {pos} | {t} | {o} | – |")
        lines.append(f"| {name}: float weights a decode step reads | | | | {weight_bytes(sizes) / 2**20:.1f} MiB | |")
    with open(os.path.join(args.out, "gpt_generate.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "gpt_generate.json"), "w") as f:
        json.dump({"date": stamp, "cpu": lscpu_model(), "commit": git_head(), "runs": runs}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
