#!/usr/bin/python3
"""Golden safetensors files for tests/unit-safetensors.cpp, and the PyTorch side of the save check.

Run with the system Python that has torch and numpy (Debian's python3-torch, python3-numpy); there is no
`safetensors` package: the files are written and read here with json + numpy, following the format
(https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes of JSON
({"__metadata__": {...}, name: {"dtype", "shape", "data_offsets": [begin, end]}, ...}, padded with spaces to a
multiple of 8), then the data section, little-endian, row-major.

    /usr/bin/python3 tests/generate_safetensors.py
        Rewrites tests/fixtures/safetensors/: for each case (head, mha) and dtype (F64, F32, F16, BF16)
          <case>.<dtype>.safetensors     the module's state_dict() in that dtype, _tril_mask buffers included
          <case>.<dtype>.io.safetensors  x [B, T, emb] and out, PyTorch's forward(x): in float64 for F64, and in
                                         float32 for F32, F16 and BF16 (for F16 and BF16: the float32 module
                                         whose weights are the rounded ones, so the only difference left with
                                         the C++ side is float32 rounding)
          dtypes.safetensors             one tensor of each integer dtype (I64, I32, I16, I8, U64, U32, U16, U8,
                                         BOOL) holding its extremes and values that float / double cannot hold
                                         exactly, a zero-element I32 [3, 0, 2], an F32 scalar, and all 256 bytes
                                         of F8_E4M3 and F8_E5M2 next to their float32 values (f8_*.f32, decoded
                                         here from the format's definition), with metadata
          manifest.json                  for every file above: its metadata and each tensor's dtype and shape as
                                         written; and the values of dtypes.safetensors' non-F8 tensors
        Deterministic: rerunning writes identical files.

    /usr/bin/python3 tests/generate_safetensors.py --check <file> head <emb_size> <head_size> <max_seq_len>
    /usr/bin/python3 tests/generate_safetensors.py --check <file> mha <num_heads> <emb_size> <head_size> <max_seq_len>
        Loads <file> (written by head_attention::save_state_dict) into simple_llm's module with
        load_state_dict(strict=True), runs it on the `x` of <file minus .safetensors>.io.safetensors and compares
        with that file's `out` (the C++ output): relative error (max |diff| / max |out|) at most 1e-10 in float64,
        2e-5 in float32. Exit status 0 when it holds.
"""

import copy
import json
import math
import os
import struct
import sys

import numpy as np
import torch

from simple_llm_head import HeadAttention, MultiHeadAttention

B, T = 2, 10
# name, kind, sizes (head: emb, head, max_seq_len; mha: num_heads, emb, head, max_seq_len), torch seed
CASES = [
    ("head", "head", (16, 8, 12), 2024),
    ("mha", "mha", (3, 16, 8, 12), 2025),
]
DTYPES = ["F64", "F32", "F16", "BF16"]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}

NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BOOL": "u1", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "F8_E4M3": "u1", "F8_E5M2": "u1"}
ELEMENT_SIZE = {"BOOL": 1, "F16": 2, "BF16": 2, "F32": 4, "I32": 4, "F64": 8, "I64": 8, "I16": 2, "I8": 1, "U64": 8,
                "U32": 4, "U16": 2, "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def to_entry(t):
    """(dtype, shape, little-endian bytes) of a torch tensor, or of a (dtype, numpy array) pair for the dtypes
    torch 1.13 lacks (U16, U32, U64, F8_*: their raw values)."""
    if isinstance(t, tuple):
        dtype, array = t
        return dtype, list(array.shape), np.ascontiguousarray(array).astype(NUMPY_DTYPES[dtype]).tobytes()
    t = t.detach().contiguous().cpu()
    shape = list(t.shape)
    if t.dtype == torch.bfloat16:
        # numpy has no bfloat16: its bits as int16 (torch rounds to nearest even when converting to bfloat16).
        return "BF16", shape, t.view(torch.int16).numpy().astype("<i2").tobytes()
    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bool: "BOOL",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8"}
    dtype = names[t.dtype]
    return dtype, shape, t.numpy().astype(NUMPY_DTYPES[dtype]).tobytes()


def write_safetensors(path, tensors, metadata=None):
    """tensors: name -> torch tensor. Larger elements first, by name within a size (every tensor aligned)."""
    entries = {name: to_entry(t) for name, t in tensors.items()}
    order = sorted(entries, key=lambda n: (-ELEMENT_SIZE[entries[n][0]], n))
    header = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name in order:
        dtype, shape, data = entries[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            f.write(entries[name][2])
    return {"metadata": header["__metadata__"],
            "tensors": {name: {"dtype": entries[name][0], "shape": entries[name][1]} for name in entries}}


def f8_e4m3_value(byte):
    """float8_e4m3fn, from its definition: sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities;
    S.1111.111 is NaN."""
    sign = -1.0 if byte & 0x80 else 1.0
    exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return float("nan")
    if exponent == 0:
        return sign * math.ldexp(mantissa / 8.0, -6)
    return sign * math.ldexp(1.0 + mantissa / 8.0, exponent - 7)


def dtype_tensors():
    """The tensors of dtypes.safetensors, and the values of the integer ones (row-major, as Python ints and
    bools) for the manifest."""
    values = {
        "i64": ("I64", [[-2**63, -1, 0, 1], [2**24 + 1, 2**53 + 1, 2**63 - 1, 255]]),
        "i32": ("I32", [[-2**31, -129], [-1, 0], [127, 2**31 - 1]]),
        "i16": ("I16", [-2**15, -1, 0, 2**15 - 1]),
        "i8": ("I8", [[-128, -1], [0, 127]]),
        "u64": ("U64", [0, 2**53 + 1, 2**64 - 1]),
        "u32": ("U32", [[0, 2**31], [2**32 - 1, 7]]),
        "u16": ("U16", [0, 1, 65535]),
        "u8": ("U8", [0, 1, 127, 128, 255]),
        "bool": ("BOOL", [[True, False, True], [False, False, True]]),
        "scalar": ("F32", 2.5),
    }
    torch_types = {"I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                   "BOOL": torch.bool, "F32": torch.float32}
    tensors = {}
    for name, (dtype, v) in values.items():
        if dtype in torch_types:
            tensors[name] = torch.tensor(v, dtype=torch_types[dtype])
        else:
            tensors[name] = (dtype, np.array(v, dtype=NUMPY_DTYPES[dtype]))
    tensors["empty"] = torch.zeros(3, 0, 2, dtype=torch.int32)
    every_byte = np.arange(256, dtype=np.uint8)
    tensors["f8_e4m3"] = ("F8_E4M3", every_byte)
    tensors["f8_e4m3.f32"] = torch.tensor([f8_e4m3_value(b) for b in range(256)], dtype=torch.float32)
    tensors["f8_e5m2"] = ("F8_E5M2", every_byte)
    # F8_E5M2 is the top byte of a binary16: numpy's float16 decodes it.
    tensors["f8_e5m2.f32"] = torch.from_numpy((every_byte.astype(np.uint16) << 8).view(np.float16).astype(np.float32))
    flat = {name: np.array(v, dtype=object).reshape(-1).tolist() for name, (dtype, v) in values.items()}
    flat["empty"] = []
    return tensors, flat


def read_safetensors(path):
    """name -> torch tensor, with the checks that matter here (offsets tile the data section)."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    data = raw[8 + n:]
    header.pop("__metadata__", None)
    tensors = {}
    end = 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
        begin, stop = info["data_offsets"]
        assert begin == end, f"{path}: {name} does not start where the previous tensor ends"
        end = stop
        chunk = data[begin:stop]
        shape = info["shape"]
        count = int(np.prod(shape)) if shape else 1
        assert len(chunk) == count * ELEMENT_SIZE[info["dtype"]], f"{path}: {name}: byte size"
        if info["dtype"] == "BF16":
            bits = np.frombuffer(chunk, dtype="<u2").astype(np.uint32) << 16
            t = torch.from_numpy(bits.view(np.float32).copy()).to(torch.bfloat16)
        elif info["dtype"] == "BOOL":
            t = torch.from_numpy(np.frombuffer(chunk, dtype="u1").astype(np.bool_))
        else:
            t = torch.from_numpy(np.frombuffer(chunk, dtype=NUMPY_DTYPES[info["dtype"]]).copy())
        tensors[name] = t.reshape(shape)
    assert end == len(data), f"{path}: trailing bytes in the data section"
    return tensors


def build(kind, sizes, dtype):
    if kind == "head":
        return HeadAttention(*sizes, dtype=dtype).eval()
    if kind == "mha":
        return MultiHeadAttention(*sizes, dtype=dtype).eval()
    raise ValueError(f"unknown module kind {kind!r} (head or mha)")


def emb_size(kind, sizes):
    return sizes[0] if kind == "head" else sizes[1]


def io_path(path):
    assert path.endswith(".safetensors"), path
    return path[:-len(".safetensors")] + ".io.safetensors"


def relative_error(ours, expected):
    scale = expected.abs().max().item()
    diff = (ours.double() - expected.double()).abs().max().item()
    return diff / scale if scale > 0 else diff


def generate(out_dir):
    torch.set_num_threads(1)  # deterministic reductions
    os.makedirs(out_dir, exist_ok=True)
    manifest = {"files": {}}
    for name, kind, sizes, seed in CASES:
        torch.manual_seed(seed)
        module64 = build(kind, sizes, torch.float64)
        x64 = torch.randn(B, T, emb_size(kind, sizes), dtype=torch.float64)
        x32 = x64.float()
        for dtype in DTYPES:
            if dtype == "F64":
                state = module64.state_dict()
                module, x = module64, x64
            else:
                reduced = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
                state = {k: (v.to(reduced) if v.is_floating_point() else v) for k, v in module64.state_dict().items()}
                # The float32 module with exactly the rounded weights: what a C++ float layer loaded from the file
                # should reproduce.
                module = copy.deepcopy(module64).float()
                module.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in state.items()},
                                       strict=True)
                x = x32
            with torch.no_grad():
                out = module(x)
            assert torch.isfinite(out).all()
            base = os.path.join(out_dir, f"{name}.{dtype}")
            manifest["files"][f"{name}.{dtype}.safetensors"] = write_safetensors(base + ".safetensors", state)
            manifest["files"][f"{name}.{dtype}.io.safetensors"] = write_safetensors(base + ".io.safetensors",
                                                                                     {"x": x, "out": out})
            # Round trip through our own reader.
            back = read_safetensors(base + ".safetensors")
            assert set(back) == set(state), (set(back), set(state))
            for k, v in state.items():
                assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    tensors, values = dtype_tensors()
    manifest["files"]["dtypes.safetensors"] = write_safetensors(
        os.path.join(out_dir, "dtypes.safetensors"), tensors,
        {"format": "pt", "generator": "tests/generate_safetensors.py", "note": "caf\u00e9, \u2211 of dtypes"})
    manifest["values"] = {"dtypes.safetensors": values}
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    print(f"wrote {len(CASES) * len(DTYPES) * 2 + 2} files ({total} bytes) to {out_dir}", file=sys.stderr)


def check(path, kind, sizes):
    state = read_safetensors(path)
    io = read_safetensors(io_path(path))
    dtype = state[next(k for k in state if k.endswith(".weight"))].dtype
    module = build(kind, sizes, dtype)
    module.load_state_dict(state, strict=True)  # raises on any missing or unexpected key, or a wrong shape
    x, expected_cpp = io["x"], io["out"]
    with torch.no_grad():
        out = module(x.to(dtype))
    if out.shape != expected_cpp.shape:
        print(f"check {path}: output shape {tuple(out.shape)} != C++ {tuple(expected_cpp.shape)}: FAILED")
        return 1
    error = relative_error(expected_cpp, out)
    ok = error <= TOLERANCE[dtype]
    print(f"check {path}: {kind} {sizes}, {dtype}, strict load_state_dict OK, "
          f"relative error of the C++ output {error:.3g} (bound {TOLERANCE[dtype]:g}): {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def main(argv):
    if len(argv) >= 2 and argv[1] == "--check":
        if len(argv) < 4:
            print(__doc__, file=sys.stderr)
            return 2
        return check(argv[2], argv[3], tuple(int(s) for s in argv[4:]))
    generate(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "safetensors"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
