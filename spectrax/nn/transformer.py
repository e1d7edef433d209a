"""Transformer encoder/decoder layers that mirror PyTorch's ``nn.TransformerEncoderLayer`` and
``nn.TransformerDecoderLayer`` (same sub-module names, same parameter counts, post-LN by default),
so reference checkpoints map by path and published parameter counts are reproduced exactly.

Sequences are batch-first: [B, L, D]. Masks are key-padding masks, [B, L] bool, True = valid.
Every layer and stack takes ``attention=``, the implementation of
:func:`spectrax.nn.attention.attend` its attention layers use ('auto' by default).
"""
from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from spectrax.nn.activations import gelu
from spectrax.nn.attention import MultiHeadAttention
from spectrax.nn.dropout import Dropout

ACTIVATIONS: dict[str, Callable] = {
    "relu": jax.nn.relu,
    # PyTorch's "gelu" is the exact (erf) form, not the tanh approximation.
    "gelu": gelu,
}


def _activation(name: str) -> Callable:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _feed_forward(layer, x, deterministic: bool):
    """linear2(dropout(activation(linear1(x)))), the feed-forward sub-layer of both layer types.

    Its parts live directly on the layer (``linear1``, ``dropout``, ``linear2``), where PyTorch
    keeps them, so state-dict keys map one to one."""
    hidden = _activation(layer.activation)(layer.linear1(x))
    return layer.linear2(layer.dropout(hidden, deterministic=deterministic))


class TransformerEncoderLayer(nnx.Module):
    """Self-attention + feed-forward block, like ``nn.TransformerEncoderLayer(batch_first=True)``.

    post-LN (``norm_first=False``, PyTorch's default):
      x = norm1(x + dropout1(self_attn(x)));  x = norm2(x + dropout2(ffn(x)))
    pre-LN (``norm_first=True``):
      x = x + dropout1(self_attn(norm1(x)));  x = x + dropout2(ffn(norm2(x)))

    Parameters: 4D² + 4D (attention) + 2·D·F + F + D (feed-forward) + 4D (two LayerNorms);
    D=512, H=8, F=2048 gives 3,152,384 as in PyTorch.
    """

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float = 0.1,
                 activation: str = "relu", norm_first: bool = False, eps: float = 1e-5, *,
                 dtype=None, attention: str = "auto", rngs: nnx.Rngs):
        _activation(activation)  # fail at construction, not at the first call
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout=dropout, dtype=dtype,
                                            implementation=attention, rngs=rngs)
        self.activation = activation
        self.linear1 = nnx.Linear(d_model, ffn_dim, dtype=dtype, rngs=rngs)
        self.dropout = Dropout(dropout, rngs=rngs)
        self.linear2 = nnx.Linear(ffn_dim, d_model, dtype=dtype, rngs=rngs)
        self.norm1 = nnx.LayerNorm(d_model, epsilon=eps, dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d_model, epsilon=eps, dtype=dtype, rngs=rngs)
        self.dropout1 = Dropout(dropout, rngs=rngs)
        self.dropout2 = Dropout(dropout, rngs=rngs)

    def __call__(self, x, key_mask=None, *, deterministic: bool):
        """x: [B, L, D]; key_mask: [B, L] bool (True = valid) or None. Returns [B, L, D]."""
        def attend(h):
            return self.dropout1(self.self_attn(h, h, key_mask, deterministic=deterministic),
                                 deterministic=deterministic)

        def feed_forward(h):
            return self.dropout2(_feed_forward(self, h, deterministic),
                                 deterministic=deterministic)

        if self.norm_first:
            x = x + attend(self.norm1(x))
            return x + feed_forward(self.norm2(x))
        x = self.norm1(x + attend(x))
        return self.norm2(x + feed_forward(x))


class TransformerDecoderLayer(nnx.Module):
    """Self-attention + cross-attention + feed-forward, like ``nn.TransformerDecoderLayer``.

    post-LN (default):
      x = norm1(x + dropout1(self_attn(x)))
      x = norm2(x + dropout2(multihead_attn(x, memory)))
      x = norm3(x + dropout3(ffn(x)))
    pre-LN (``norm_first=True``) normalises each sub-layer's input instead. The memory is not
    normalised here (PyTorch does not either).

    Parameters for D=512, H=8, F=2048: 4,204,032, as in PyTorch.
    """

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float = 0.1,
                 activation: str = "relu", norm_first: bool = False, eps: float = 1e-5, *,
                 dtype=None, attention: str = "auto", rngs: nnx.Rngs):
        _activation(activation)
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout=dropout, dtype=dtype,
                                            implementation=attention, rngs=rngs)
        self.multihead_attn = MultiHeadAttention(d_model, num_heads, dropout=dropout,
                                                 dtype=dtype, implementation=attention,
                                                 rngs=rngs)
        self.activation = activation
        self.linear1 = nnx.Linear(d_model, ffn_dim, dtype=dtype, rngs=rngs)
        self.dropout = Dropout(dropout, rngs=rngs)
        self.linear2 = nnx.Linear(ffn_dim, d_model, dtype=dtype, rngs=rngs)
        self.norm1 = nnx.LayerNorm(d_model, epsilon=eps, dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d_model, epsilon=eps, dtype=dtype, rngs=rngs)
        self.norm3 = nnx.LayerNorm(d_model, epsilon=eps, dtype=dtype, rngs=rngs)
        self.dropout1 = Dropout(dropout, rngs=rngs)
        self.dropout2 = Dropout(dropout, rngs=rngs)
        self.dropout3 = Dropout(dropout, rngs=rngs)

    def __call__(self, x, memory, *, self_mask=None, memory_mask=None, deterministic: bool):
        """Decodes.

        Args:
          x: [B, Lq, D] target sequence.
          memory: [B, Lk, D] encoder output.
          self_mask: [B, Lq] bool key-padding mask of ``x`` (True = valid) or None.
          memory_mask: [B, Lk] bool key-padding mask of ``memory`` or None.

        Returns:
          [B, Lq, D].
        """
        def self_attend(h):
            return self.dropout1(self.self_attn(h, h, self_mask, deterministic=deterministic),
                                 deterministic=deterministic)

        def cross_attend(h):
            out = self.multihead_attn(h, memory, memory_mask, deterministic=deterministic)
            return self.dropout2(out, deterministic=deterministic)

        def feed_forward(h):
            return self.dropout3(_feed_forward(self, h, deterministic),
                                 deterministic=deterministic)

        if self.norm_first:
            x = x + self_attend(self.norm1(x))
            x = x + cross_attend(self.norm2(x))
            return x + feed_forward(self.norm3(x))
        x = self.norm1(x + self_attend(x))
        x = self.norm2(x + cross_attend(x))
        return self.norm3(x + feed_forward(x))


class TransformerEncoder(nnx.Module):
    """A stack of :class:`TransformerEncoderLayer` (``layers/0``, ``layers/1``, …), like
    ``nn.TransformerEncoder``, with an optional final LayerNorm (``final_norm``; usual with
    pre-LN layers, absent in PyTorch's default and in the SpecPT reference)."""

    def __init__(self, num_layers: int, d_model: int, num_heads: int, ffn_dim: int,
                 dropout: float = 0.1, activation: str = "relu", norm_first: bool = False,
                 eps: float = 1e-5, final_norm: bool = False, *, dtype=None,
                 attention: str = "auto", rngs: nnx.Rngs):
        self.layers = nnx.List([
            TransformerEncoderLayer(d_model, num_heads, ffn_dim, dropout, activation,
                                    norm_first, eps, dtype=dtype, attention=attention,
                                    rngs=rngs)
            for _ in range(num_layers)])
        self.norm = (nnx.LayerNorm(d_model, epsilon=eps, dtype=dtype, rngs=rngs)
                     if final_norm else None)

    def __call__(self, x, key_mask=None, *, deterministic: bool):
        """x: [B, L, D]; key_mask: [B, L] bool or None. Returns [B, L, D]."""
        for layer in self.layers:
            x = layer(x, key_mask, deterministic=deterministic)
        return x if self.norm is None else self.norm(x)


class TransformerDecoder(nnx.Module):
    """A stack of :class:`TransformerDecoderLayer`, like ``nn.TransformerDecoder``, with an
    optional final LayerNorm."""

    def __init__(self, num_layers: int, d_model: int, num_heads: int, ffn_dim: int,
                 dropout: float = 0.1, activation: str = "relu", norm_first: bool = False,
                 eps: float = 1e-5, final_norm: bool = False, *, dtype=None,
                 attention: str = "auto", rngs: nnx.Rngs):
        self.layers = nnx.List([
            TransformerDecoderLayer(d_model, num_heads, ffn_dim, dropout, activation,
                                    norm_first, eps, dtype=dtype, attention=attention,
                                    rngs=rngs)
            for _ in range(num_layers)])
        self.norm = (nnx.LayerNorm(d_model, epsilon=eps, dtype=dtype, rngs=rngs)
                     if final_norm else None)

    def __call__(self, x, memory, *, self_mask=None, memory_mask=None, deterministic: bool):
        """x: [B, Lq, D]; memory: [B, Lk, D]; masks [B, Lq] / [B, Lk] bool or None."""
        for layer in self.layers:
            x = layer(x, memory, self_mask=self_mask, memory_mask=memory_mask,
                      deterministic=deterministic)
        return x if self.norm is None else self.norm(x)
