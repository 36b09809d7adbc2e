#!/usr/bin/python3
"""Compare head-attention's fast path with ONNX Runtime (CPU) on simple_llm's HeadAttention (issue 9).

ONNX Runtime is driven through its Node.js binding, the npm package onnxruntime-node (its bundled
libonnxruntime.so has the CPU contrib ops; there is no pip here). Steps:

 1. onnxruntime-node: installed into --ort-dir (default /tmp/ort-node) with `npm install --prefix`, its npm
    cache inside that folder too, when not there already. Nothing outside --ort-dir is touched; delete the
    folder to undo. Its postinstall script is skipped (--ignore-scripts): it only fetches the optional CUDA /
    TensorRT binaries; the CPU library ships in the package.
 2. ONNX graphs of simple_llm's HeadAttention (tests/simple_llm_head.py, emb 512, head 64, float32, one module
    built under torch.manual_seed(0)), one file per shape (static shapes), into --models-dir (default
    /tmp/ort-models):
      plain      torch.onnx.export of the module itself (opset 14): MatMul/Add projections, MatMul, Div,
                 the tril mask (Where), Softmax, MatMul
      attention  com.microsoft Attention(x, W[emb, 3 head], b[3 head]), num_heads 1, unidirectional 1
      gqa        MatMul + Add into packed QKV [B, T, 3 head], then com.microsoft GroupQueryAttention
                 (num_heads 1, kv_num_heads 1, causal by construction: no past, seqlens_k = T - 1,
                 total_sequence_length = T)
      slice      binding overhead: x [B, T, emb] -> Slice -> [B, T, head], the attention models' input and
                 output sizes with (almost) no work; subtracted from the three above
      identity   x -> Identity -> [B, T, emb], for reference (its output is 8x the attention output)
 3. Parity: each attention graph run by ORT (bench/ort_runner.js parity) on one input per shape, against
    PyTorch's float32 output of the same module: max |ort - torch| / max |torch| must be <= 1e-4.
 4. Timing: --rounds interleaved rounds; in each, shape by shape, our bench_attention
    (attention/<--path>/float/B:<B>/T:<T>/threads:<1|2>, --benchmark_repetitions 3) and one node process timing
    every ORT model of that shape on 1 and 2 threads (bench/ort_runner.js time), in an order rotated each round.
    A cell is the median over rounds of each round's median.
 5. With --ggml-dir DIR (bench/ggml_setup.sh's folder): llama.cpp's CPU backend (ggml) joins the rotation, one
    bench/ggml_attention process per shape and round (--only that prefill shape, one head), timing
    ggml_flash_attn_ext and mul_mat + soft_max_ext with F32 and F16 K/V (columns ggml_fa_f32 ... ggml_mm_f16), its
    parity against ours checked inside it; see bench/README.md ("ggml_compare.py") for what its graphs compute.
 6. Writes results/ort_comparison.md and results/ort_comparison.json.

Usage (always /usr/bin/python3: torch 1.13 and python3-onnx live there):
  /usr/bin/python3 bench/ort_compare.py --bench /tmp/ort-build/bench/bench_attention
  /usr/bin/python3 bench/ort_compare.py --parity-only            # install, build graphs, check parity
  /usr/bin/python3 bench/ort_compare.py --from-json bench/results/ort_comparison.json   # redo the .md only
"""

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from torch_compare import cpu_pressure, fmt_ms, git_head, lscpu_summary, machine_busy, parse_bench, wait_quiet  # noqa: E402

EMB, HEAD = 512, 64
SHAPES = [(2, 10), (8, 1024), (1, 4096)]
OPS = ["plain", "attention", "gqa"]
OVERHEAD = ["slice", "identity"]
OP_LABEL = {"plain": "plain (torch.onnx.export)", "attention": "com.microsoft Attention",
            "gqa": "com.microsoft GroupQueryAttention"}
PARITY_TOL = 1e-4


def log(msg):
    print(f"[ort_compare] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- onnxruntime-node
def ensure_ort(args):
    pkg = os.path.join(args.ort_dir, "node_modules", "onnxruntime-node")
    if not os.path.isdir(pkg):
        for tool in ("node", "npm"):
            if not shutil.which(tool):
                sys.exit(f"[ort_compare] `{tool}` not found: apt-get install nodejs npm")
        os.makedirs(args.ort_dir, exist_ok=True)
        cmd = ["npm", "install", "--prefix", args.ort_dir, "--cache", os.path.join(args.ort_dir, ".npm-cache"),
               "--ignore-scripts", "--no-audit", "--no-fund", "--no-save", f"onnxruntime-node@{args.ort_version}"]
        log("installing: " + " ".join(map(shlex.quote, cmd)))
        env = dict(os.environ, ONNXRUNTIME_NODE_INSTALL="skip")
        subprocess.run(cmd, check=True, env=env, stdout=sys.stderr)
    libs = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(pkg, "bin")) for f in fs
            if f.startswith("libonnxruntime.so")]
    if not libs:
        sys.exit(f"[ort_compare] no libonnxruntime.so under {pkg}/bin")
    with open(os.path.join(pkg, "package.json")) as f:
        version = json.load(f)["version"]
    return {"dir": args.ort_dir, "package_version": version, "library": libs[0]}


def node_env(args):
    env = dict(os.environ)
    env["NODE_PATH"] = os.path.join(args.ort_dir, "node_modules")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.pop(var, None)
    return env


# ---------------------------------------------------------------------------------------------------- graphs
def make_module():
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from simple_llm_head import HeadAttention

    torch.manual_seed(0)
    return HeadAttention(EMB, HEAD, max(t for _, t in SHAPES), dtype=torch.float32).eval()


def packed_weights(module):
    """W [emb, 3 head] = [Wqᵀ | Wkᵀ | Wvᵀ] and b [3 head] = [bq | bk | bv], numpy float32."""
    import numpy as np

    w = np.concatenate([m.weight.detach().numpy().T for m in (module._q, module._k, module._v)], axis=1)
    b = np.concatenate([m.bias.detach().numpy() for m in (module._q, module._k, module._v)])
    return np.ascontiguousarray(w, dtype=np.float32), b.astype(np.float32)


def contrib_model(kind, b, t, w, bias):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [b, t, EMB])
    out_dim = EMB if kind == "identity" else HEAD
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [b, t, out_dim])
    inits, nodes = [], []
    if kind == "attention":
        inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(bias, "bias")]
        nodes = [helper.make_node("Attention", ["x", "W", "bias"], ["y"], domain="com.microsoft",
                                  num_heads=1, unidirectional=1)]
    elif kind == "gqa":
        inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(bias, "bias"),
                 numpy_helper.from_array(np.full([b], t - 1, dtype=np.int32), "seqlens_k"),
                 numpy_helper.from_array(np.array(t, dtype=np.int32), "total_sequence_length")]
        nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]),
                 helper.make_node("Add", ["xw", "bias"], ["qkv"]),
                 helper.make_node("GroupQueryAttention",
                                  ["qkv", "", "", "", "", "seqlens_k", "total_sequence_length"],
                                  ["y", "present_key", "present_value"], domain="com.microsoft",
                                  num_heads=1, kv_num_heads=1)]
    elif kind == "slice":
        inits = [numpy_helper.from_array(np.array(v, dtype=np.int64), n)
                 for v, n in (([0], "starts"), ([HEAD], "ends"), ([2], "axes"))]
        nodes = [helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"])]
    elif kind == "identity":
        nodes = [helper.make_node("Identity", ["x"], ["y"])]
    else:
        raise ValueError(kind)
    graph = helper.make_graph(nodes, f"head_attention_{kind}", [x], [y], inits)
    opsets = [helper.make_opsetid("", 14)]
    if kind in ("attention", "gqa"):
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="head-attention bench/ort_compare.py")
    model.ir_version = 8
    return model


def build_models(args, module):
    import onnx
    import torch

    os.makedirs(args.models_dir, exist_ok=True)
    w, bias = packed_weights(module)
    paths = {}
    for b, t in args.shapes:
        for kind in OPS + OVERHEAD:
            path = os.path.join(args.models_dir, f"{kind}_B{b}_T{t}.onnx")
            paths[(kind, b, t)] = path
            if kind == "plain":
                x = torch.zeros(b, t, EMB)
                with torch.no_grad():
                    torch.onnx.export(module, (x,), path, input_names=["x"], output_names=["y"], opset_version=14,
                                      do_constant_folding=True)
            else:
                model = contrib_model(kind, b, t, w, bias)
                if kind in OVERHEAD:
                    onnx.checker.check_model(model)
                onnx.save(model, path)
    log(f"built {len(paths)} models in {args.models_dir}")
    return paths


# ---------------------------------------------------------------------------------------------------- parity
def check_parity(args, module, paths):
    import numpy as np
    import torch

    rows, ok = [], True
    with tempfile.TemporaryDirectory(prefix="ort-parity-") as tmp:
        for b, t in args.shapes:
            gen = torch.Generator().manual_seed(1000 + t)
            x = torch.rand(b, t, EMB, generator=gen) * 2 - 1
            with torch.no_grad():
                ref = module(x).numpy()
            in_path = os.path.join(tmp, "x.bin")
            x.numpy().astype(np.float32).tofile(in_path)
            for kind in OPS:
                out_path = os.path.join(tmp, f"y_{kind}.bin")
                cmd = ["node", os.path.join(HERE, "ort_runner.js"), "parity", paths[(kind, b, t)], in_path, str(b),
                       str(t), out_path]
                proc = subprocess.run(cmd, env=node_env(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
                if proc.returncode != 0:
                    err = (proc.stderr.strip().splitlines() or ["?"])[0][:300]
                    rows.append({"op": kind, "B": b, "T": t, "ok": False, "error": err})
                    log(f"parity {kind} B={b} T={t}: ORT FAILED: {err}")
                    ok = False
                    continue
                y = np.fromfile(out_path, dtype=np.float32)
                if y.size != ref.size:
                    rows.append({"op": kind, "B": b, "T": t, "ok": False, "error": f"output size {y.size}"})
                    ok = False
                    continue
                y = y.reshape(ref.shape)
                rel = float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))
                good = bool(rel <= PARITY_TOL)
                ok &= good
                rows.append({"op": kind, "B": b, "T": t, "ok": good, "max_abs_diff_over_max_abs": rel})
                log(f"parity {kind:9s} B={b} T={t}: max|ort - torch| / max|torch| = {rel:.2e} "
                    f"({'ok' if good else 'FAIL'}, tolerance {PARITY_TOL:g})")
    return ok, rows


# ---------------------------------------------------------------------------------------------------- timing
def run_ours(args, b, t, tmp):
    out = os.path.join(tmp, f"ours_B{b}_T{t}.json")
    cmd = [os.path.abspath(args.bench), f"--benchmark_filter=^attention/{args.path}/float/B:{b}/T:{t}/threads:[12]/",
           f"--benchmark_repetitions={args.reps}", f"--benchmark_min_time={args.min_time}",
           f"--benchmark_out={out}", "--benchmark_out_format=json"]
    if args.openblas_dir:  # bench_attention also times OpenBLAS's SGEMM, for the best-SGEMM ceiling
        cmd.append("--openblas=" + os.path.join(args.openblas_dir, "libopenblas.so.0"))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    medians, context = parse_bench(out)
    rows = {}
    for (path, dtype, bb, tt, threads), r in medians.items():
        if path == args.path and dtype == "float" and threads in args.threads:
            rows[threads] = {"ms": r["ms"], "cpu_ms": r.get("cpu_ms")}
    return rows, context, " ".join(map(shlex.quote, cmd))


def run_ort(args, b, t, paths, order, tmp):
    jobs = [{"name": kind, "model": paths[(kind, b, t)], "B": b, "T": t, "emb": EMB, "threads": n}
            for kind in order for n in args.threads]
    cfg = {"min_time": args.ort_min_time, "min_calls": args.ort_min_calls, "max_calls": 20000,
           "warmup": args.ort_warmup, "jobs": jobs}
    cfg_path = os.path.join(tmp, f"jobs_B{b}_T{t}.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    cmd = ["node", os.path.join(HERE, "ort_runner.js"), "time", cfg_path]
    out = subprocess.run(cmd, check=True, env=node_env(args), stdout=subprocess.PIPE, text=True).stdout
    data = json.loads(out)
    rows = {}
    for r in data["results"]:
        rows[(r["name"], r["threads"])] = {"ms": r["median_ms"], "min_ms": r["min_ms"], "calls": r["calls"]}
    return rows, data, " ".join(map(shlex.quote, cmd))


def run_torch(args, b, t):
    """simple_llm's PyTorch module with OpenBLAS, through torch_compare.py's worker (float32, same threads)."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = args.openblas_dir + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(var, None)
    cmd = [sys.executable, os.path.join(HERE, "torch_compare.py"), "--torch-worker", "--label", "OpenBLAS",
           "--shapes", f"{b}x{t}", "--dtypes", "float", "--threads", *map(str, args.threads), "--torch-reps", "7",
           "--torch-budget", "5", "--module", "head"]
    out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    data = json.loads(out)
    return {r["threads"]: {"ms": r["median_ms"], "reps": r["reps"]} for r in data["results"]}, data, \
        " ".join(map(shlex.quote, cmd))


GGML_OPS = ["ggml_fa_f32", "ggml_fa_f16", "ggml_mm_f32", "ggml_mm_f16"]


def run_ggml(args, b, t, rnd):
    """bench/ggml_attention for one single-head prefill shape: {(op, threads): {"ms": ...}}, the process's JSON."""
    binary = os.path.join(args.ggml_dir, "ggml_attention")
    lib = os.path.join(args.ggml_dir, "node_modules", "@node-llama-cpp", "linux-x64", "bins", "linux-x64")
    cmd = [binary, "--lib-dir", lib, "--rounds", "1", "--first-round", str(rnd), "--no-limits",
           "--prefill-shapes", f"{b}x{t}", "--only", f"^prefill/h1/B{b}_T{t}$",
           "--threads", ",".join(map(str, args.threads)), "--min-time", str(args.ggml_min_time)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    data = json.loads(out)
    rows = {}
    for r in data["results"]:
        op = "ggml_ours_harness" if r["impl"] == "ours" else f"{r['impl']}_{r['kv']}"
        rows[(op, r["threads"])] = {"ms": r["median_us"] / 1000.0, "min_ms": r["min_us"] / 1000.0}
    return rows, data, " ".join(map(shlex.quote, cmd))


def run_rounds(args, paths, ops):
    rounds = []
    context, versions, commands = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="ort-compare-") as tmp:
        for rnd in range(args.rounds):
            if args.wait_quiet > 0:
                wait_quiet(args.wait_quiet)
            busy_before = machine_busy(1.0)
            rec = {"round": rnd, "busy_before": busy_before, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                   "ours": [], "ort": []}
            for si, (b, t) in enumerate(args.shapes):
                units = ["ours", "ort"] + (["torch"] if args.openblas_dir else []) + (["ggml"] if args.ggml_dir else [])
                k = (rnd + si) % len(units)
                units = units[k:] + units[:k]
                kinds = ops + OVERHEAD
                kinds = kinds[rnd % len(kinds):] + kinds[:rnd % len(kinds)]
                for unit in units:
                    if unit == "ours":
                        rows, context, commands["ours"] = run_ours(args, b, t, tmp)
                        for n, r in rows.items():
                            rec["ours"].append({"B": b, "T": t, "threads": n, **r})
                            log(f"round {rnd + 1} ours B={b} T={t} threads={n}: {r['ms']:.3f} ms")
                    elif unit == "torch":
                        rows, data, commands["torch"] = run_torch(args, b, t)
                        versions["torch"] = data["torch_version"]
                        versions["torch_blas"] = data["blas_libraries"]
                        for n, r in rows.items():
                            rec["ort"].append({"op": "torch", "B": b, "T": t, "threads": n, **r})
                            log(f"round {rnd + 1} PyTorch+OpenBLAS B={b} T={t} threads={n}: {r['ms']:.3f} ms")
                    elif unit == "ggml":
                        rows, data, commands["ggml"] = run_ggml(args, b, t, rnd)
                        versions["ggml_cpu_library"] = data["ggml_cpu_library"]
                        versions["ggml_parity"] = versions.get("ggml_parity", []) + [
                            p for p in data["parity"] if rnd == 0]
                        for (op, n), r in rows.items():
                            rec["ort"].append({"op": op, "B": b, "T": t, "threads": n, **r})
                            log(f"round {rnd + 1} {op} B={b} T={t} threads={n}: {r['ms']:.3f} ms")
                    else:
                        rows, data, commands["ort"] = run_ort(args, b, t, paths, kinds, tmp)
                        versions.update(data["ort_version"])
                        versions["node_runtime"] = data["node"]
                        for (kind, n), r in rows.items():
                            rec["ort"].append({"op": kind, "B": b, "T": t, "threads": n, **r})
            rec["busy_after"] = machine_busy(1.0)
            rounds.append(rec)
    return rounds, context, versions, commands


def summarise(args, rounds):
    """{(name, B, T, threads): {"ms": median over rounds, "min": ..., "max": ..., "n": rounds}}; name "<op>_net" is
    an ORT op less the slice model's time of the same shape, threads and round (the binding's per-call overhead)."""
    per = {}
    for rec in rounds:
        for r in rec["ours"]:
            per.setdefault(("ours", r["B"], r["T"], r["threads"]), []).append(r["ms"])
        slice_ms = {(r["B"], r["T"], r["threads"]): r["ms"] for r in rec["ort"] if r["op"] == "slice"}
        for r in rec["ort"]:
            per.setdefault((r["op"], r["B"], r["T"], r["threads"]), []).append(r["ms"])
            over = slice_ms.get((r["B"], r["T"], r["threads"]))
            if r["op"] in OPS and over is not None:
                per.setdefault((r["op"] + "_net", r["B"], r["T"], r["threads"]), []).append(max(r["ms"] - over, 0.0))
    out = {}
    for key, v in per.items():
        out[key] = {"ms": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
    return out


# ---------------------------------------------------------------------------------------------------- output
def fx(num, den):
    if num is None or den is None or den == 0:
        return "—"
    return f"{num / den:.3g}x"


def write_md(args, saved, path):
    s = {tuple(x["key"]): x for x in saved["summary"]}
    info = saved["run_info"]

    def ms(name, b, t, n):
        row = s.get((name, b, t, n))
        return row["ms"] if row else None

    lines = ["# head-attention vs ONNX Runtime (CPU), simple_llm's HeadAttention\n"]
    lines.append(f"Measured {info['date']} by `bench/ort_compare.py`" +
                 (f", table rewritten {datetime.datetime.now().isoformat(timespec='seconds')}" if info.get("reused") else "")
                 + ".\n")
    lines.append(f"- Machine: {info['cpu']}; lscpu model name: **{info['cpu_model']}**. Shared: compare within this run only.")
    ours_path = saved["settings"].get("path", "fast")
    what = {"fast": "`BatchedHeadAttention<float>` fast path", "fast_ws": "`HeadAttention<float>::forward_into` with a Workspace",
            "packed": "`PackedHeadAttention<float>` (weights prepared once)",
            "packed_ws": "`PackedHeadAttention<float>::forward_into` with a Workspace"}[ours_path]
    lines.append(f"- Library: {info.get('library_commit') or '?'}; ours = {what} "
                 f"(`bench_attention`, `attention/{ours_path}/float/B:<B>/T:<T>/threads:<n>`, median of "
                 f"{saved['settings']['reps']} repetitions of {saved['settings']['min_time']} s per round).")
    ort = info["ort"]
    lines.append(f"- ONNX Runtime {ort.get('versions', {}).get('common', '?')} via npm `onnxruntime-node@"
                 f"{ort['package_version']}` (Node.js {ort.get('versions', {}).get('node_runtime', '?')}), CPU "
                 "execution provider, session options: graphOptimizationLevel 'all', intraOpNumThreads = threads, "
                 "interOpNumThreads 1, executionMode 'sequential'. Each call is one `await session.run({x})` "
                 f"timed alone after {saved['settings']['ort_warmup']} warm-up calls, for at least "
                 f"{saved['settings']['ort_min_time']} s and {saved['settings']['ort_min_calls']} calls; median.")
    lines.append("- Graphs (emb 512, head 64, float32, static shapes, one file per shape): **plain** = "
                 "`torch.onnx.export` (opset 14) of simple_llm's module; **Attention** = `com.microsoft.Attention` "
                 "(weights packed [512, 192], bias [192], num_heads 1, unidirectional 1); **GQA** = MatMul + Add "
                 "into packed QKV [B, T, 192], then `com.microsoft.GroupQueryAttention` (num_heads = kv_num_heads = 1, "
                 "no past, seqlens_k = T − 1, total_sequence_length = T: causal by construction).")
    lines.append("- **ORT times have the binding's per-call overhead subtracted**: the time of a Slice model "
                 "with the same input [B, T, 512] and output [B, T, 64] (run, feed, fetch, Node's async hop; a "
                 "B·T·64-float copy of work), same shape, threads and round; a cell is the median over rounds of "
                 "those differences. The raw times and the overhead are in the "
                 "second table; an Identity model ([B, T, 512] out) is there too for reference.")
    if ort.get("versions", {}).get("torch"):
        libs = ", ".join(os.path.basename(x) for x in ort["versions"].get("torch_blas", []))
        lines.append(f"- PyTorch + OpenBLAS: torch {ort['versions']['torch']}, simple_llm's module, "
                     f"`torch.no_grad()`, `torch.set_num_threads(threads)`, timed by torch_compare.py's worker "
                     f"(median of up to 7 calls after a warm-up; BLAS loaded: {libs}); no overhead subtracted.")
    has_ggml = any(k[0] in GGML_OPS for k in s)
    if has_ggml:
        gv = saved["settings"].get("ggml_versions", {})
        par = ort.get("versions", {}).get("ggml_parity", [])
        worst32 = max((p["max_abs_diff"] / p["max_abs_ours"] for p in par if p["case"].endswith("f32")), default=None)
        worst16 = max((p["max_abs_diff"] / p["max_abs_ours"] for p in par if p["case"].endswith("f16")), default=None)
        lines.append(f"- llama.cpp's CPU backend (ggml), `bench/ggml_attention` from `--ggml-dir` (npm "
                     f"`node-llama-cpp@{gv.get('node_llama_cpp', '?')}` + `@node-llama-cpp/linux-x64@"
                     f"{gv.get('node_llama_cpp_linux_x64', '?')}`, CPU library "
                     f"`{os.path.basename(ort.get('versions', {}).get('ggml_cpu_library', '?'))}`): the same "
                     "projections (one F32 [512, 192] mul_mat + add) then `ggml_flash_attn_ext` (fa) or mul_mat + "
                     "`ggml_soft_max_ext` + mul_mat (mm), K/V in F32 or converted to F16 inside the graph; "
                     "`ggml_graph_compute` with a ggml_threadpool of `threads` threads; median per-call wall time, "
                     "no binding overhead to subtract (C++). Its weights are a HeadAttention(512, 64, seed 42) of "
                     "this library (not the torch module's); parity against ours inside the harness, max relative "
                     f"difference F32 {worst32 if worst32 is None else f'{worst32:.1e}'}, F16 "
                     f"{worst16 if worst16 is None else f'{worst16:.1e}'}. `ours (ggml harness)` in the raw table "
                     "is our PackedHeadAttention::forward_into with a Workspace timed inside that process.")
    lines.append(f"- {saved['settings']['rounds']} interleaved rounds (per shape: ours, the ORT process and, if asked, "
                 "PyTorch and ggml, in an order rotated every round); a cell is the median over rounds of each "
                 "round's median.")
    ratios = sorted(r["cpu_ms"] / r["ms"] for rec in saved["rounds"] for r in rec["ours"]
                    if r["threads"] == 1 and r.get("cpu_ms") and r.get("ms"))
    if ratios:
        lines.append(f"- Contention check: our one-thread runs got CPU time / wall time = {statistics.median(ratios):.2f} "
                     f"(median; lowest {ratios[0]:.2f}; 1.00 = the core was ours).")
    busy = [r.get("busy_before") for r in saved["rounds"]] + [r.get("busy_after") for r in saved["rounds"]]
    busy = [b for b in busy if b is not None]
    if busy:
        lines.append(f"- Machine busy (all CPUs, 1 s samples before and after each round, "
                     f"while this script runs nothing): {', '.join(f'{b:.0%}' for b in busy)}. Load average after "
                     f"the run {info.get('loadavg', '?')}.")
        if max(busy) > 0.25:
            lines.append("- **Warning: the machine was busy during this run** (another process used the CPUs): the "
                         "two-thread rows are unreliable, and one-thread wall times may be inflated.")
    par = saved.get("parity", [])
    if par:
        worst = {}
        for p in par:
            if "max_abs_diff_over_max_abs" in p:
                worst[p["op"]] = max(worst.get(p["op"], 0.0), p["max_abs_diff_over_max_abs"])
        lines.append("- Parity against PyTorch's float32 output on every shape above, worst max |ort − torch| / max |torch|: "
                     + ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
                     + f" (tolerance {PARITY_TOL:g}; " + ("all passed" if all(p["ok"] for p in par) else "FAILURES: "
                     + "; ".join(f"{p['op']} B={p['B']} T={p['T']}: {p.get('error', 'over tolerance')}"
                                 for p in par if not p["ok"])) + ").")
    ctx = info.get("bench_context") or {}

    def gf(key):
        try:
            return float(ctx[key])
        except (KeyError, ValueError):
            return 0.0

    eigen_sgemm, openblas_sgemm = gf("sgemm_gflops_1thread"), gf("openblas_sgemm_gflops_1thread")
    best_sgemm, peak = max(eigen_sgemm, openblas_sgemm), gf("peak_fma_float_gflops_1thread")
    if best_sgemm > 0:
        lines.append(f"- Ceilings, measured by bench_attention at the start of its last round (one thread, GFLOP/s): "
                     f"1024³ SGEMM Eigen {eigen_sgemm:.1f}, OpenBLAS {openblas_sgemm:.1f}"
                     + (" (not measured: no --openblas-dir)" if openblas_sgemm == 0 else "")
                     + "; peak FMA rate (12 independent fused multiply-add chains on the widest registers) "
                     f"{peak:.1f}. The table's `GFLOP/s` column is ours, useful flops (projections plus the causal "
                     "halves of QKᵀ and PV) over wall time, and its fraction of the best SGEMM and of the peak "
                     "(n threads: n times the one-thread figures).")
    # ggml's library folder (an npm path with "@node-llama-cpp" in it) as LIBDIR: Doxygen, which reads these
    # pages, takes an @word for a command even inside a code span.
    commands = [re.sub(r"--lib-dir \S+", "--lib-dir LIBDIR", c) for c in info.get("commands", [])]
    lines.append("- Commands: " + "; ".join(f"`{c}`" for c in commands) + ".")
    lines.append("")

    lines.append("## Wall clock, ms per forward call of the whole [B, T, 512] batch (ORT: overhead subtracted)\n")
    has_torch = any(k[0] == "torch" for k in s)
    head = ["shape (B, T)", "threads", "ours", "ORT plain", "ORT Attention", "ORT GQA", "ORT best",
            "ORT best / ours", "binding overhead"] + (["PyTorch + OpenBLAS", "PyTorch / ours"] if has_torch else [])
    if has_ggml:
        head += ["ggml fa F32", "ggml fa F16", "ggml mm F32", "ggml mm F16", "ggml best / ours"]
    if best_sgemm > 0:
        head += ["ours GFLOP/s (of best SGEMM, of peak)"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|---|---:|" + "|".join(["---:"] * (len(head) - 2)) + "|")
    names = {"plain": "plain", "attention": "Attention", "gqa": "GQA"}
    for b, t in saved["shapes"]:
        for n in saved["threads"]:
            ours = ms("ours", b, t, n)
            net = {k: ms(k + "_net", b, t, n) for k in OPS}
            have = {k: v for k, v in net.items() if v is not None}
            best = min(have, key=have.get) if have else None
            row = [f"{b}, {t}", str(n), f"**{fmt_ms(ours)}**"] + [fmt_ms(net[k]) for k in OPS]
            row += [f"{fmt_ms(have[best])} ({names[best]})" if best else "—",
                    fx(have[best], ours) if best else "—", fmt_ms(ms("slice", b, t, n))]
            if has_torch:
                row += [fmt_ms(ms("torch", b, t, n)), fx(ms("torch", b, t, n), ours)]
            if has_ggml:
                g = {k: ms(k, b, t, n) for k in GGML_OPS}
                gh = [v for v in g.values() if v is not None]
                row += [fmt_ms(g[k]) for k in GGML_OPS] + [fx(min(gh), ours) if gh else "—"]
            if best_sgemm > 0:
                flops = b * (2.0 * t * 512 * 3 * 64 + 2.0 * 64 * t * (t + 1))
                rate = flops / (ours * 1e-3) * 1e-9 if ours else 0.0
                row += [f"{rate:.1f} ({rate / (n * best_sgemm):.2f}, {rate / (n * peak):.2f})" if peak > 0
                        else f"{rate:.1f} ({rate / (n * best_sgemm):.2f})"]
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("ORT best / ours > 1: ours is faster. An ORT cell is (raw median − overhead median); `—`: the op "
                 "failed or was not run.\n")

    lines.append("## Raw ORT medians (ms, overhead not subtracted) and the overhead models\n")
    head = ["shape (B, T)", "threads", "plain", "Attention", "GQA", "Slice [B,T,64] (subtracted)",
            "Identity [B,T,512]", "ours: min – max over rounds", "ORT best raw: min – max"]
    if has_ggml:
        head += ["ours (ggml harness: packed, Workspace)"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|---|---:|" + "|".join(["---:"] * (len(head) - 2)) + "|")
    for b, t in saved["shapes"]:
        for n in saved["threads"]:
            raw = {k: ms(k, b, t, n) for k in OPS}
            have = {k: v for k, v in raw.items() if v is not None}
            best = min(have, key=have.get) if have else None
            o = s.get(("ours", b, t, n))
            bs = s.get((best, b, t, n)) if best else None
            row = [f"{b}, {t}", str(n)] + [fmt_ms(raw[k]) for k in OPS]
            row += [fmt_ms(ms("slice", b, t, n)), fmt_ms(ms("identity", b, t, n))]
            row += [f"{fmt_ms(o['min'])} – {fmt_ms(o['max'])}" if o else "—",
                    f"{fmt_ms(bs['min'])} – {fmt_ms(bs['max'])}" if bs else "—"]
            if has_ggml:
                row += [fmt_ms(ms("ggml_ours_harness", b, t, n))]
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def ggml_versions(ggml_dir):
    from ggml_compare import versions  # noqa: E402  (bench/ggml_compare.py, same folder)

    return versions(ggml_dir)


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], stdout=subprocess.PIPE, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return "unknown"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", default="/tmp/ort-build/bench/bench_attention", help="our bench_attention binary")
    p.add_argument("--bench-source", help="what --bench was built from, for the record (default: this checkout's "
                   "commit, marked when include/ has uncommitted changes)")
    p.add_argument("--path", default="fast", choices=["fast", "fast_ws", "packed", "packed_ws"],
                   help="which of our bench_attention paths is timed: attention/<path>/... (default fast, the "
                        "layer's forward; packed: PackedHeadAttention's)")
    p.add_argument("--ort-dir", default="/tmp/ort-node", help="npm --prefix for onnxruntime-node (installed if missing)")
    p.add_argument("--ort-version", default="1.30.0", help="onnxruntime-node version to install")
    p.add_argument("--models-dir", default="/tmp/ort-models", help="where the ONNX files go")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--shapes", help="B x T list, e.g. 2x10,8x1024 (default the three README shapes)")
    p.add_argument("--reps", type=int, default=3, help="bench_attention --benchmark_repetitions per round")
    p.add_argument("--min-time", type=float, default=0.3, help="bench_attention --benchmark_min_time")
    p.add_argument("--ort-min-time", type=float, default=1.0, help="seconds of timed ORT calls per model and round")
    p.add_argument("--ort-min-calls", type=int, default=5)
    p.add_argument("--ort-warmup", type=int, default=3)
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before each round wait up to this long for the machine to be under 10%% busy")
    p.add_argument("--openblas-dir", help="also time simple_llm's PyTorch module (torch_compare.py's worker) with "
                   "this directory (OpenBLAS's libblas.so.3) first on LD_LIBRARY_PATH, in the same rounds")
    p.add_argument("--ggml-dir", help="also time llama.cpp's CPU backend: bench/ggml_setup.sh's folder (with the "
                   "built ggml_attention), in the same rounds")
    p.add_argument("--ggml-min-time", type=float, default=0.3, help="ggml_attention --min-time per case and round")
    p.add_argument("--parity-only", action="store_true", help="install, build the graphs, check parity, stop")
    p.add_argument("--from-json", help="rewrite ort_comparison.md from this saved JSON")
    args = p.parse_args()
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    os.makedirs(args.out_dir, exist_ok=True)
    md_path = os.path.join(args.out_dir, "ort_comparison.md")
    json_path = os.path.join(args.out_dir, "ort_comparison.json")

    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        saved["run_info"]["reused"] = True
        write_md(args, saved, md_path)
        print(open(md_path).read())
        return

    log(f"CPU: {lscpu_summary()}")
    if args.ggml_dir and not os.path.exists(os.path.join(args.ggml_dir, "ggml_attention")):
        subprocess.run(["sh", os.path.join(HERE, "ggml_setup.sh"), args.ggml_dir], check=True, stdout=sys.stderr)
    ort = ensure_ort(args)
    log(f"onnxruntime-node {ort['package_version']} in {ort['dir']} ({ort['library']})")
    module = make_module()
    paths = build_models(args, module)
    ok, parity = check_parity(args, module, paths)
    log("parity: " + ("all graphs within tolerance" if ok else "SOME GRAPHS FAILED (see above); timing the rest"))
    if args.parity_only:
        sys.exit(0 if ok else 1)
    failed = {(r["op"], r["B"], r["T"]) for r in parity if "error" in r}

    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    log(f"timing: {args.rounds} rounds, shapes {args.shapes}, threads {args.threads}")
    ops = [k for k in OPS if not any(f[0] == k for f in failed)]
    if ops != OPS:
        log(f"not timing {sorted(set(OPS) - set(ops))}: ORT rejected them")
    rounds, context, versions, commands = run_rounds(args, paths, ops)
    ort["versions"] = versions
    run_info = {"date": date, "cpu": lscpu_summary(), "cpu_model": cpu_model(), "library_commit": args.bench_source or git_head(),
                "ort": ort, "bench_context": context,
                "commands": [" ".join(map(shlex.quote, [sys.executable] + sys.argv)), commands.get("ours", ""),
                             commands.get("ort", "")] + ([commands["torch"]] if "torch" in commands else [])
                            + ([commands["ggml"]] if "ggml" in commands else []),
                "loadavg": " ".join(f"{v:.2f}" for v in os.getloadavg()), "cpu_pressure": cpu_pressure()}
    summary = summarise(args, rounds)
    saved = {"run_info": run_info, "shapes": args.shapes, "threads": args.threads,
             "settings": dict({k: getattr(args, k) for k in ("rounds", "reps", "min_time", "ort_min_time",
                                                              "ort_min_calls", "ort_warmup", "path")},
                              **({"ggml_dir": args.ggml_dir, "ggml_versions": ggml_versions(args.ggml_dir)}
                                 if args.ggml_dir else {})),
             "parity": parity,
             "summary": [{"key": list(k), **v} for k, v in sorted(summary.items(), key=lambda kv: str(kv[0]))],
             "rounds": rounds}
    with open(json_path, "w") as f:
        json.dump(saved, f, indent=1)
    write_md(args, saved, md_path)
    log(f"wrote {md_path} and {json_path}")
    print(open(md_path).read())


if __name__ == "__main__":
    main()
