#!/usr/bin/python3
"""The Python half of examples/load_pytorch_weights.cpp: a PyTorch model's attention layer saved for C++.

    /usr/bin/python3 examples/export_pytorch_weights.py [output directory, default examples/data]

Builds simple_llm's MultiHeadAttention(num_heads=4, emb_size=32, head_size=8, max_seq_len=16) (here with random
weights; in real use, the trained `model._decoders[i]._heads` or whatever your module is), and writes
    mha_small.safetensors     its state_dict() as is: _heads.{i}._q.weight ..., _heads.{i}._tril_mask, _layer.*
    mha_small.io.safetensors  an input x [12, 32] and PyTorch's output for it, [12, 32], to compare against

With the `safetensors` package installed, the first file is one line:
    safetensors.torch.save_file(mha.state_dict(), "mha_small.safetensors")
Without it (Debian has no package for it), save_file below writes the same format with json + numpy.
Deterministic: rerunning writes identical files.
"""

import json
import os
import struct
import sys

import torch

# simple_llm's modules; in your project: from simple_llm... import MultiHeadAttention
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from simple_llm_head import MultiHeadAttention  # noqa: E402


def save_file(tensors, path):
    """A minimal safetensors writer: float32/float64/bool tensors, little-endian, row-major."""
    dtypes = {torch.float32: ("F32", "<f4"), torch.float64: ("F64", "<f8"), torch.bool: ("BOOL", "u1")}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors, key=lambda n: (tensors[n].dtype == torch.bool, n)):  # floats first: aligned
        t = tensors[name].detach().contiguous().cpu()
        dtype, numpy_dtype = dtypes[t.dtype]
        data = t.numpy().astype(numpy_dtype).tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(7)
    torch.set_num_threads(1)
    mha = MultiHeadAttention(num_heads=4, emb_size=32, head_size=8, max_seq_len=16).eval()  # eval: no dropout
    x = torch.randn(1, 12, 32)  # [B = 1, T = 12, emb_size]
    with torch.no_grad():
        out = mha(x)  # [1, 12, 32]
    save_file(mha.state_dict(), os.path.join(out_dir, "mha_small.safetensors"))
    save_file({"x": x[0], "out": out[0]}, os.path.join(out_dir, "mha_small.io.safetensors"))
    print(f"wrote mha_small.safetensors and mha_small.io.safetensors to {out_dir}")


if __name__ == "__main__":
    main()
