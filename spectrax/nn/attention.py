"""Multi-head attention with boolean key-padding masks, and the one function every model's
attention goes through, :func:`attend`.

Implementations (``implementation=`` of :func:`attend` and the modules, or process-wide with
:func:`set_default_implementation`, which ``spectrax.models.registry.build_model`` calls with
``config.model.attention``):

* ``'deferred'`` (the default): softmax attention written for XLA with the normalisation
  deferred: ``out = (exp(s - max s) @ V) / sum exp(s - max s)``. The [B, N, T, S] score matrix
  is read and written fewer times than by ``jax.nn.dot_product_attention``'s XLA path (no
  normalised probability matrix, a broadcast additive mask instead of a select over the scores,
  no transposed copies of it). Forward + backward of one layer at SpectraFM 'small' shapes
  (q [32, 512, 4, 16], k/v [32, 513, 4, 16], key mask) took 368 ms instead of 597 ms on the
  2-core development CPU (2026-11-23, a one-off timing script, not the benchmark harness). Same maths: the maximum is taken
  under ``stop_gradient`` because the softmax does not depend on it.
* ``'xla'``: ``jax.nn.dot_product_attention(implementation='xla')``.
* ``'cudnn'``: ``jax.nn.dot_product_attention(implementation='cudnn')``, the fused
  flash-attention kernel on NVIDIA GPUs (bf16/fp16 inputs only; jax raises otherwise).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

IMPLEMENTATIONS = ("deferred", "xla", "cudnn")
_default_implementation = "deferred"


def set_default_implementation(name: str | None) -> None:
    """Sets the implementation :func:`attend` uses when its caller passes none (trace time: jit
    a function after setting this). ``None`` or ``'auto'`` restores ``'deferred'``."""
    global _default_implementation
    name = "deferred" if name in (None, "auto") else name
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {name!r}: use one of {IMPLEMENTATIONS} "
                         "(config.model.attention)")
    _default_implementation = name


def default_implementation() -> str:
    return _default_implementation


def attend(q, k, v, mask=None, *, implementation: str | None = None):
    """Scaled dot-product attention.

    Args:
      q: [B, T, N, H] queries; k, v: [B, S, N, H] keys and values, one dtype.
      mask: bool broadcastable to [B, N, T, S], True = may attend; every query needs at least one
        attendable key (the callers guarantee it). None = all keys.
      implementation: see the module docstring; None = :func:`default_implementation`.

    Returns:
      [B, T, N, H] in the dtype of ``q``.
    """
    implementation = implementation or _default_implementation
    if implementation in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    if implementation != "deferred":
        raise ValueError(f"attention implementation {implementation!r}: use one of "
                         f"{IMPLEMENTATIONS}")
    # Scores in float32 whatever the compute dtype (bf16 scores lose the small differences the
    # softmax amplifies); the two matmuls still take the compute-dtype operands.
    scores = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        # An additive [.., S] bias fuses into the exp below; a select would be a pass of its own.
        scores = scores + jnp.where(mask, 0.0, np.float32(-1e30))
    peak = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    unnormalised = jnp.exp(scores - peak)
    total = jnp.sum(unnormalised, axis=-1)                          # [B, N, T]
    out = jnp.einsum("bnts,bsnh->btnh", unnormalised.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    out = out / jnp.transpose(total, (0, 2, 1))[..., None]
    return out.astype(q.dtype)


class MultiHeadAttention(nnx.Module):
    """Multi-head attention laid out like PyTorch's ``nn.MultiheadAttention``.

    Parameters: ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj``, each a Linear D → D with bias:
    4·D² + 4·D parameters, the same count as PyTorch's fused ``in_proj_weight`` [3D, D] +
    ``in_proj_bias`` [3D] + ``out_proj``. A PyTorch state dict maps by splitting ``in_proj_*`` into
    thirds (q, k, v) and transposing the weights (flax kernels are [in, out]).

    Dropout: :func:`attend` has no dropout on the attention weights (nor has the fused cuDNN
    kernel), so
    ``dropout`` is applied to the attended values (the per-head outputs, before ``out_proj``)
    instead. At rate 0 (PyTorch's default) the two are identical.

    Rows without any valid key: PyTorch returns NaN there. This module returns exactly zero for such
    queries (so a residual connection passes its input through unchanged).

    Args:
      embed_dim: D, model width; must be divisible by ``num_heads``.
      num_heads: H.
      dropout: dropout rate on the attended values, see above.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
      implementation: of :func:`attend`; None = the process default (``'deferred'``).
    """

    def __init__(self, embed_dim: int, num_heads: int, *, dropout: float = 0.0, dtype=None,
                 implementation: str | None = None, rngs: nnx.Rngs):
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dtype = dtype
        self.implementation = implementation
        linear = lambda: nnx.Linear(embed_dim, embed_dim, dtype=dtype, rngs=rngs)  # noqa: E731
        self.q_proj = linear()
        self.k_proj = linear()
        self.v_proj = linear()
        self.out_proj = linear()
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def _split_heads(self, x):
        """[B, L, D] -> [B, L, H, D/H]."""
        return x.reshape(x.shape[:-1] + (self.num_heads, self.head_dim))

    def __call__(self, q_in, kv_in, key_mask=None, *, deterministic: bool = True):
        """Attends from ``q_in`` to ``kv_in``.

        Args:
          q_in: [B, Lq, D] queries.
          kv_in: [B, Lk, D] keys and values (pass ``q_in`` again for self-attention).
          key_mask: [B, Lk] bool, True = this key may be attended; None = all keys valid.
          deterministic: True disables dropout (evaluation).

        Returns:
          [B, Lq, D] in the compute dtype; zeros for every query of a sample with no valid key.
        """
        q = self._split_heads(self.q_proj(q_in))
        k = self._split_heads(self.k_proj(kv_in))
        v = self._split_heads(self.v_proj(kv_in))
        # dot_product_attention wants q, k, v in one dtype; the projections' outputs agree already
        # unless dtype is None and the inputs differ, so promote explicitly.
        dtype = jnp.result_type(q, k, v)
        q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
        mask = has_valid_key = None
        if key_mask is not None:
            key_mask = jnp.asarray(key_mask, bool)
            has_valid_key = jnp.any(key_mask, axis=-1)
            # A sample with no valid key would divide by zero in the softmax (NaN in PyTorch and
            # possibly in fused kernels, in the forward or the backward pass). Let its queries
            # attend everywhere, which is well defined, and zero their output below.
            safe_mask = key_mask | ~has_valid_key[:, None]
            # [B, Lk] -> [B, 1, 1, Lk], broadcast by attend to [B, H, Lq, Lk].
            mask = safe_mask[:, None, None, :]
        attended = attend(q, k, v, mask, implementation=self.implementation)
        attended = self.dropout(attended, deterministic=deterministic)
        out = self.out_proj(attended.reshape(attended.shape[:-2] + (self.embed_dim,)))
        if has_valid_key is not None:
            out = jnp.where(has_valid_key[:, None, None], out, jnp.zeros((), out.dtype))
        return out
