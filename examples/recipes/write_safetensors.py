#!/usr/bin/python3
"""A safetensors writer with json + numpy only, for machines without the `safetensors` package.

    from write_safetensors import save_file
    save_file({k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}, "model.safetensors")

What safetensors.torch.save_file(model.state_dict(), path) writes, for float32, float64 and bool tensors.

    /usr/bin/python3 write_safetensors.py OUT.safetensors [PREFIX]

writes a random simple_llm MultiHeadAttention(num_heads=4, emb_size=32, head_size=8, max_seq_len=16) state_dict
under PREFIX (the recipe's ctest loads it with pytorch_weights). Exits 77 (a skipped test) without numpy.
"""

import json
import struct
import sys


def save_file(tensors, path):
    """tensors: {name: numpy array}. Writes them little-endian and row-major, as the format says."""
    import numpy as np

    dtypes = {np.dtype("float32"): "F32", np.dtype("float64"): "F64", np.dtype("bool"): "BOOL"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        data = array.astype(array.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtypes[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def main():
    try:
        import numpy as np
    except ImportError:
        print("numpy not found: skipped")
        sys.exit(77)
    path, prefix = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""
    heads, emb, head, max_seq_len = 4, 32, 8, 16
    rng = np.random.default_rng(7)
    tensors = {}
    for i in range(heads):
        for p in ("_q", "_k", "_v"):
            tensors[f"{prefix}_heads.{i}.{p}.weight"] = rng.uniform(-0.2, 0.2, (head, emb)).astype(np.float32)
            tensors[f"{prefix}_heads.{i}.{p}.bias"] = rng.uniform(-0.2, 0.2, head).astype(np.float32)
        tensors[f"{prefix}_heads.{i}._tril_mask"] = np.tril(np.ones((max_seq_len, max_seq_len), dtype=bool))
    tensors[f"{prefix}_layer.weight"] = rng.uniform(-0.2, 0.2, (emb, heads * head)).astype(np.float32)
    tensors[f"{prefix}_layer.bias"] = rng.uniform(-0.2, 0.2, emb).astype(np.float32)
    save_file(tensors, path)
    print(f"wrote {len(tensors)} tensors to {path}")


if __name__ == "__main__":
    main()
