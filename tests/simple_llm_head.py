"""simple_llm's HeadAttention module, the one PyTorch definition shared by the fixture generator
(tests/generate_fixtures.py) and the benchmark comparison (bench/torch_compare.py)."""

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
        self._tril_mask = torch.tril(torch.ones(max_seq_len, max_seq_len))

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
