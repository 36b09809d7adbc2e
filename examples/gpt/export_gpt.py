#!/usr/bin/python3
"""A simple_llm GPT as the safetensors file that examples/gpt/gpt.hpp (simple_llm::GPT) and generate.cpp read.

    /usr/bin/python3 examples/gpt/export_gpt.py <checkpoint.pt> <out.safetensors> [--dtype F32|F64]

<checkpoint.pt> is what simple_llm's GPT.save writes: torch.save of {'model_state_dict', 'vocab_size',
'max_seq_len', 'emb_size', 'num_heads', 'head_size', 'num_layers'}. From Python, export_gpt(model_or_checkpoint,
path) takes a GPT object (simple_llm's or the copy in simple_llm_gpt.py) or that dict.

The file holds the state_dict under simple_llm's own names (`_token_embeddings._embedding.weight`, ...,
`_decoders.{l}._heads._heads.{i}._q.weight`, ..., the bool `_tril_mask` buffers, `_linear.bias`) and the six
sizes in its `__metadata__`, as strings (the format allows only string values); the C++ side reads the sizes
from there and checks them against the tensor shapes. Floating-point tensors are written in the requested
dtype (default: as they are in the model). There is no `safetensors` package here (Debian has none): the file
is written with json + numpy, following the format; with the package, safetensors.torch.save_file(state,
path, metadata) writes an equivalent file.
"""

import argparse
import json
import struct

import numpy as np
import torch

CONFIG_KEYS = ("vocab_size", "max_seq_len", "emb_size", "num_heads", "head_size", "num_layers")

_DTYPES = {torch.float64: ("F64", "<f8"), torch.float32: ("F32", "<f4"), torch.float16: ("F16", "<f2"),
           torch.bool: ("BOOL", "u1"), torch.int64: ("I64", "<i8")}
_SIZES = {"F64": 8, "I64": 8, "F32": 4, "F16": 2, "BOOL": 1}


def save_safetensors(tensors, path, metadata):
    """tensors: name -> torch tensor; metadata: name -> string. Larger elements first, then by name, so that
    every tensor starts aligned; the JSON header is padded with spaces to a multiple of 8 bytes. Deterministic:
    the same tensors give the same bytes."""
    entries = {}
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        dtype, numpy_dtype = _DTYPES[t.dtype]
        entries[name] = (dtype, list(t.shape), t.numpy().astype(numpy_dtype).tobytes())
    order = sorted(entries, key=lambda n: (-_SIZES[entries[n][0]], n))
    header = {"__metadata__": dict(metadata)}
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


def config_from_state_dict(state):
    """The six sizes of the GPT whose state_dict this is, read from the tensor shapes."""
    vocab_size, emb_size = state["_token_embeddings._embedding.weight"].shape
    max_seq_len = state["_position_embeddings.embedding.weight"].shape[0]
    layers = {int(k.split(".")[1]) for k in state if k.startswith("_decoders.")}
    heads = {int(k.split(".")[4]) for k in state if k.startswith("_decoders.0._heads._heads.")}
    head_size = state["_decoders.0._heads._heads.0._q.weight"].shape[0]
    return {"vocab_size": int(vocab_size), "max_seq_len": int(max_seq_len), "emb_size": int(emb_size),
            "num_heads": len(heads), "head_size": int(head_size), "num_layers": len(layers)}


def export_gpt(model_or_checkpoint, path, dtype=None):
    """Writes a GPT (an nn.Module with simple_llm's state_dict names) or a GPT.save dict to `path`. dtype:
    torch.float32 or torch.float64 for every floating-point tensor, None to keep the model's. Returns the
    config written to the metadata."""
    if isinstance(model_or_checkpoint, dict):
        state = model_or_checkpoint["model_state_dict"]
        config = {k: int(model_or_checkpoint[k]) for k in CONFIG_KEYS}
        derived = config_from_state_dict(state)
        if derived != config:
            raise ValueError(f"the checkpoint's sizes {config} disagree with its tensors' {derived}")
    else:
        state = model_or_checkpoint.state_dict()
        config = config_from_state_dict(state)
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    metadata = {"format": "pt", "model": "simple_llm.GPT"}
    metadata.update({k: str(v) for k, v in config.items()})
    save_safetensors(state, path, metadata)
    return config


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a file written by simple_llm's GPT.save")
    parser.add_argument("output", help="the .safetensors file to write")
    parser.add_argument("--dtype", choices=["F32", "F64"], default=None,
                        help="the floating-point dtype of the tensors (default: the checkpoint's)")
    args = parser.parse_args()
    checkpoint = torch.load(args.checkpoint, map_location="cpu")
    dtype = {"F32": torch.float32, "F64": torch.float64, None: None}[args.dtype]
    config = export_gpt(checkpoint, args.output, dtype)
    print(f"wrote {args.output}: " + ", ".join(f"{k} = {v}" for k, v in config.items()))


if __name__ == "__main__":
    main()
