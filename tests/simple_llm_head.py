"""simple_llm's HeadAttention and MultiHeadAttention modules, the one PyTorch definition shared by the fixture
generators (tests/generate_fixtures.py, tests/generate_safetensors.py), the benchmark comparison
(bench/torch_compare.py) and examples/export_pytorch_weights.py."""

import math

import torch
import torch.nn as nn


class HeadAttention(nn.Module):
    """simple_llm's HeadAttention, verbatim in behaviour."""

    def __init__(self, emb_size, head_size, max_seq_len, dtype=None):
        super().__init__()
        self._emb_size = emb_size
        self._head_size = head_size
        self._max_seq_len = max_seq_len
        self._q = nn.Linear(emb_size, head_size, dtype=dtype)
        self._k = nn.Linear(emb_size, head_size, dtype=dtype)
        self._v = nn.Linear(emb_size, head_size, dtype=dtype)
        # A registered (persistent) buffer, bool, as simple_llm has it: state_dict() holds it as `_tril_mask`.
        self.register_buffer("_tril_mask", torch.tril(torch.ones(max_seq_len, max_seq_len)).bool())

    def forward(self, x):
        return self.get_attention_weights(x) @ self._v(x)

    def get_attention_weights(self, x):
        seq_len = x.shape[1]
        if seq_len > self._max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len {self._max_seq_len}")
        q = self._q(x)
        k = self._k(x)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self._head_size)
        scores = scores.masked_fill(self._tril_mask[:seq_len, :seq_len] == 0, float("-inf"))
        return torch.softmax(scores, dim=-1)


class MultiHeadAttention(nn.Module):
    """simple_llm's MultiHeadAttention: num_heads HeadAttention modules side by side, their outputs concatenated
    and projected back to emb_size. state_dict() keys: _heads.{i}._q.weight ... _heads.{i}._tril_mask,
    _layer.weight, _layer.bias."""

    def __init__(self, num_heads, emb_size, head_size, max_seq_len, dropout=0.1, dtype=None):
        super().__init__()
        self._heads = nn.ModuleList(
            [HeadAttention(emb_size, head_size, max_seq_len, dtype=dtype) for _ in range(num_heads)])
        self._layer = nn.Linear(head_size * num_heads, emb_size, dtype=dtype)
        self._dropout = nn.Dropout(dropout)

    def forward(self, x, mask=None):  # mask is accepted and not used, as in simple_llm
        out = torch.cat([head(x) for head in self._heads], dim=-1)
        return self._dropout(self._layer(out))
