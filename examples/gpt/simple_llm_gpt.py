"""simple_llm's GPT at inference, a faithful copy for the C++ example in this directory (gpt.hpp): the
embeddings, FeedForward, Decoder and GPT modules of simple_llm/embedding/*.py and
simple_llm/transformer/{feed_forward,decoder,gpt}.py, with their submodule names (so state_dict() has
simple_llm's keys) and GPT.generate as simple_llm has it. The attention modules come from
tests/simple_llm_head.py, the one copy of simple_llm's HeadAttention and MultiHeadAttention in this repository.

Training (GPT.fit), the tokenizer and the device argument are left out: nothing here needs them."""

import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
from simple_llm_head import MultiHeadAttention  # noqa: E402


class TokenEmbeddings(nn.Module):
    """simple_llm's TokenEmbeddings: one learned row per token id."""

    def __init__(self, vocab_size, emb_size):
        super().__init__()
        self._embedding = nn.Embedding(vocab_size, emb_size)

    def forward(self, x):
        return self._embedding(x)


class PositionalEmbeddings(nn.Module):
    """simple_llm's PositionalEmbeddings: learned absolute positions, called with a length (the key has no
    leading underscore: `embedding.weight`)."""

    def __init__(self, max_seq_len, emb_size):
        super().__init__()
        self._max_seq_len = max_seq_len
        self.embedding = nn.Embedding(max_seq_len, emb_size)

    def forward(self, seq_len):
        if seq_len < 1 or seq_len > self._max_seq_len:
            raise IndexError(f"seq_len {seq_len} must be in [1, {self._max_seq_len}]")
        positions = torch.arange(seq_len, device=self.embedding.weight.device)
        return self.embedding(positions)


class FeedForward(nn.Module):
    """simple_llm's FeedForward: Linear(E, 4E), ReLU, Linear(4E, E), dropout."""

    def __init__(self, emb_size, dropout=0.1):
        super().__init__()
        self._layer1 = nn.Linear(emb_size, 4 * emb_size)
        self._relu = nn.ReLU()
        self._layer2 = nn.Linear(4 * emb_size, emb_size)
        self._dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self._dropout(self._layer2(self._relu(self._layer1(x))))


class Decoder(nn.Module):
    """simple_llm's Decoder, post-norm: norm1(attention(x) + x), then norm2(ff(out) + out)."""

    def __init__(self, num_heads, emb_size, head_size, max_seq_len, dropout=0.1):
        super().__init__()
        self._heads = MultiHeadAttention(num_heads, emb_size, head_size, max_seq_len, dropout)
        self._ff = FeedForward(emb_size, dropout)
        self._norm1 = nn.LayerNorm(emb_size)
        self._norm2 = nn.LayerNorm(emb_size)

    def forward(self, x, mask=None):
        attention = self._heads(x, mask)
        out = self._norm1(attention + x)
        ffn_out = self._ff(out)
        return self._norm2(ffn_out + out)


class GPT(nn.Module):
    """simple_llm's GPT: token + positional embeddings, num_layers Decoders, Linear to the vocabulary."""

    def __init__(self, vocab_size, max_seq_len, emb_size, num_heads, head_size, num_layers, dropout=0.1):
        super().__init__()
        self._vocab_size = vocab_size
        self._max_seq_len = max_seq_len
        self._emb_size = emb_size
        self._num_heads = num_heads
        self._head_size = head_size
        self._num_layers = num_layers
        self._token_embeddings = TokenEmbeddings(vocab_size, emb_size)
        self._position_embeddings = PositionalEmbeddings(max_seq_len, emb_size)
        self._dropout = nn.Dropout(dropout)
        self._decoders = nn.ModuleList(
            [Decoder(num_heads, emb_size, head_size, max_seq_len, dropout) for _ in range(num_layers)])
        self._linear = nn.Linear(emb_size, vocab_size)

    @property
    def max_seq_len(self):
        return self._max_seq_len

    def forward(self, x):
        """x [B, T] token ids to logits [B, T, vocab_size]."""
        if x.size(1) > self._max_seq_len:
            raise ValueError(f"sequence length {x.size(1)} exceeds max_seq_len {self._max_seq_len}")
        tok_out = self._token_embeddings(x)
        pos_out = self._position_embeddings(x.size(1)).unsqueeze(0)
        out = self._dropout(tok_out + pos_out)
        for decoder in self._decoders:
            out = decoder(out)
        return self._linear(out)

    def generate(self, x, max_new_tokens, do_sample, temperature=1.0, top_k=None, top_p=None):
        """simple_llm's generate: for each new token, the last max_seq_len tokens through the whole forward
        (no cache), the last position's logits divided by temperature (when > 0), top-k and top-p filtering
        when sampling, softmax, then torch.multinomial or argmax. Returns x with the new tokens appended."""
        for _ in range(max_new_tokens):
            x_cond = x[:, -self._max_seq_len:]
            logits = self.forward(x_cond)
            last_logits = logits[:, -1, :]
            if temperature > 0:
                logits_scaled = last_logits / temperature
            else:
                logits_scaled = last_logits
            if do_sample and top_k is not None:
                _, topk_indices = torch.topk(logits_scaled, top_k, dim=-1)
                masked_logits = torch.full_like(logits_scaled, float("-inf"))
                masked_logits.scatter_(1, topk_indices, logits_scaled.gather(1, topk_indices))
                logits_scaled = masked_logits
            if do_sample and top_p is not None:
                probs = torch.softmax(logits_scaled, dim=-1)
                sorted_probs, sorted_indices = torch.sort(probs, descending=True, dim=-1)
                cum_probs = torch.cumsum(sorted_probs, dim=-1)
                sorted_mask = cum_probs <= top_p
                sorted_mask[:, 0] = True
                mask = torch.zeros_like(probs, dtype=torch.bool)
                mask.scatter_(1, sorted_indices, sorted_mask)
                logits_scaled = logits_scaled.masked_fill(~mask, float("-inf"))
            probs = torch.softmax(logits_scaled, dim=-1)
            if do_sample:
                next_token = torch.multinomial(probs, num_samples=1)
            else:
                next_token = torch.argmax(probs, dim=-1, keepdim=True)
            x = torch.cat([x, next_token], dim=1)
        return x

    def save(self, path):
        """simple_llm's GPT.save: the state_dict and the six sizes in one torch.save file."""
        torch.save({
            "model_state_dict": self.state_dict(),
            "vocab_size": self._vocab_size,
            "max_seq_len": self._max_seq_len,
            "emb_size": self._emb_size,
            "num_heads": self._num_heads,
            "head_size": self._head_size,
            "num_layers": self._num_layers,
        }, path)

    @classmethod
    def load(cls, path, device="cpu"):
        """simple_llm's GPT.load: rebuilds the model from a GPT.save file."""
        checkpoint = torch.load(path, map_location=device)
        model = cls(vocab_size=checkpoint["vocab_size"], max_seq_len=checkpoint["max_seq_len"],
                    emb_size=checkpoint["emb_size"], num_heads=checkpoint["num_heads"],
                    head_size=checkpoint["head_size"], num_layers=checkpoint["num_layers"])
        model.load_state_dict(checkpoint["model_state_dict"])
        return model.to(device)
