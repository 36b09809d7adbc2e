#!/usr/bin/python3
"""Generates the golden PyTorch autograd gradients in tests/fixtures/gradients/ for tests/unit-backward.cpp.

Run with the system Python that has torch (Debian's python3-torch):

    /usr/bin/python3 tests/generate_gradient_fixtures.py

Every case builds simple_llm's HeadAttention in float64 with PyTorch's default nn.Linear init under a fixed
torch.manual_seed, draws x = randn(B, T, emb) and grad_out = randn(B, T, head), and for each mask runs the
forward, then out.backward(grad_out), and records x.grad and every parameter's .grad. Files, in the format of
tests/generate_fixtures.py (its docstring describes it):

    <case>.f64.txt  the float64 weights, x, grad_out and autograd's float64 gradients
    <case>.f32.txt  the same weights, x and grad_out cast to float32, and autograd's float32 gradients

plus cases.txt, the list of case names. Tensors: q.weight ... v.bias, x [B, T, emb], grad_out [B, T, head],
lengths [B] (for the padded mask), window [1] (for the sliding-window mask), and for each mask M in causal
(the module itself), bidirectional, window (i - window < j <= i) and padded (causal plus keys at or after
lengths[b] masked): M.x.grad [B, T, emb], M.q.weight.grad [head, emb], M.q.bias.grad [head], and the same for
k and v. Deterministic: rerunning rewrites identical files.

MultiHeadAttention cases (listed in mha_cases.txt), in eval mode (dropout the identity): heads.<i>.q.weight ...
heads.<i>.v.bias, projection.weight [emb, heads·head], projection.bias, x, grad_out [B, T, emb], x.grad and the
.grad of every one of those parameters.
"""

import copy
import math
import os
import sys

import torch

from generate_fixtures import write_cases, write_fixture

GENERATOR = "tests/generate_gradient_fixtures.py"
from simple_llm_head import HeadAttention, MultiHeadAttention

# name, B, T, emb, head, max_seq_len, window. Small: the files stay under 200 kB in all.
CASES = [
    ("small", 2, 9, 6, 4, 12, 3),
    ("head_gt_emb", 3, 5, 3, 7, 8, 2),
    ("two_tiles", 1, 70, 8, 5, 80, 20),
]

MASKS = ["causal", "bidirectional", "window", "padded"]

# MultiHeadAttention in eval mode (dropout is the identity): name, B, T, num_heads, emb, head, max_seq_len.
MHA_CASES = [
    ("mha_small", 2, 9, 3, 8, 4, 12),
]


def masked_forward(module, x, mask, lengths, window):
    """The module's forward under one of MASKS (causal is the module's own forward)."""
    if mask == "causal":
        return module(x)
    T = x.shape[1]
    scores = module._q(x) @ module._k(x).transpose(-2, -1) / math.sqrt(module._head_size)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    if mask == "window":
        scores = scores.masked_fill(~((j <= i) & (j > i - window)), float("-inf"))
    elif mask == "padded":
        scores = scores.masked_fill(~(j <= i), float("-inf"))
        key_padding = torch.arange(T)[None, :] >= lengths[:, None]  # [B, T], True where masked
        scores = scores.masked_fill(key_padding[:, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ module._v(x)


def padding_lengths(B, T):
    """At least 1: a row that sees no key is NaN in PyTorch's softmax (0 in ours, tested elsewhere)."""
    return [max(1, T - b * (T // B + 1)) for b in range(B)]


def gradients(module, x, grad_out, lengths, window):
    tensors = []
    for mask in MASKS:
        module.zero_grad()
        xg = x.detach().clone().requires_grad_(True)
        out = masked_forward(module, xg, mask, lengths, window)
        out.backward(grad_out)
        tensors.append((f"{mask}.x.grad", xg.grad))
        for short, linear in (("q", module._q), ("k", module._k), ("v", module._v)):
            tensors.append((f"{mask}.{short}.weight.grad", linear.weight.grad.clone()))
            tensors.append((f"{mask}.{short}.bias.grad", linear.bias.grad.clone()))
    for name, t in tensors:
        assert torch.isfinite(t).all(), name
    return tensors


def case_tensors(module, x, grad_out, lengths, window):
    with torch.no_grad():
        tensors = [
            ("q.weight", module._q.weight.clone()),
            ("q.bias", module._q.bias.clone()),
            ("k.weight", module._k.weight.clone()),
            ("k.bias", module._k.bias.clone()),
            ("v.weight", module._v.weight.clone()),
            ("v.bias", module._v.bias.clone()),
            ("x", x),
            ("grad_out", grad_out),
            ("lengths", lengths.to(x.dtype)),
            ("window", torch.tensor([float(window)], dtype=x.dtype)),
        ]
    return tensors + gradients(module, x, grad_out, lengths, window)


def mha_tensors(module, x, grad_out):
    """The MultiHeadAttention's parameters, x, grad_out, and autograd's gradients of all of them (eval mode)."""
    module.eval()
    module.zero_grad()
    xg = x.detach().clone().requires_grad_(True)
    module(xg).backward(grad_out)
    tensors = []
    for i, head in enumerate(module._heads):
        for short, linear in (("q", head._q), ("k", head._k), ("v", head._v)):
            tensors.append((f"heads.{i}.{short}.weight", linear.weight.detach().clone()))
            tensors.append((f"heads.{i}.{short}.bias", linear.bias.detach().clone()))
    tensors += [("projection.weight", module._layer.weight.detach().clone()),
                ("projection.bias", module._layer.bias.detach().clone()), ("x", x), ("grad_out", grad_out),
                ("x.grad", xg.grad)]
    for i, head in enumerate(module._heads):
        for short, linear in (("q", head._q), ("k", head._k), ("v", head._v)):
            tensors.append((f"heads.{i}.{short}.weight.grad", linear.weight.grad.clone()))
            tensors.append((f"heads.{i}.{short}.bias.grad", linear.bias.grad.clone()))
    tensors += [("projection.weight.grad", module._layer.weight.grad.clone()),
                ("projection.bias.grad", module._layer.bias.grad.clone())]
    return tensors


def write_pair(out_dir, name, seed, sizes, tensors64, tensors32):
    """<name>.f64.txt and <name>.f32.txt."""
    write_fixture(os.path.join(out_dir, f"{name}.f64.txt"), name, "float64", seed, sizes, 1.0, tensors64, repr,
                  GENERATOR)
    write_fixture(os.path.join(out_dir, f"{name}.f32.txt"), name, "float32", seed, sizes, 1.0, tensors32,
                  lambda v: "%.9g" % v, GENERATOR)


def main():
    torch.set_num_threads(1)  # deterministic reductions
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "gradients")
    os.makedirs(out_dir, exist_ok=True)
    names = []
    for index, (name, B, T, emb, head, max_seq_len, window) in enumerate(CASES):
        seed = 2000 + index
        torch.manual_seed(seed)
        module64 = HeadAttention(emb, head, max_seq_len, dtype=torch.float64)
        x64 = torch.randn(B, T, emb, dtype=torch.float64)
        grad64 = torch.randn(B, T, head, dtype=torch.float64)
        module32 = copy.deepcopy(module64).float()
        lengths = torch.tensor(padding_lengths(B, T))
        sizes = (B, T, emb, head, max_seq_len)
        write_pair(out_dir, name, seed, sizes, case_tensors(module64, x64, grad64, lengths, window),
                   case_tensors(module32, x64.float(), grad64.float(), lengths, window))
        names.append(name)
    for index, (name, B, T, heads, emb, head, max_seq_len) in enumerate(MHA_CASES):
        seed = 3000 + index
        torch.manual_seed(seed)
        module64 = MultiHeadAttention(heads, emb, head, max_seq_len, dtype=torch.float64)
        x64 = torch.randn(B, T, emb, dtype=torch.float64)
        grad64 = torch.randn(B, T, emb, dtype=torch.float64)
        module32 = copy.deepcopy(module64).float()
        # sizes: B, T, emb, head, max_seq_len as for the head cases, then num_heads in the tensor list's names.
        sizes = (B, T, emb, head, max_seq_len)
        write_pair(out_dir, name, seed, sizes, mha_tensors(module64, x64, grad64),
                   mha_tensors(module32, x64.float(), grad64.float()))
    with open(os.path.join(out_dir, "mha_cases.txt"), "w", encoding="ascii") as f:
        f.write("# generated by tests/generate_gradient_fixtures.py: MultiHeadAttention cases, one per line\n")
        f.write("\n".join(c[0] for c in MHA_CASES) + "\n")
    write_cases(out_dir, names, GENERATOR)


if __name__ == "__main__":
    main()
