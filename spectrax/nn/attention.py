"""Multi-head attention with boolean key-padding masks, computed by
``jax.nn.dot_product_attention``.

Going through ``jax.nn.dot_product_attention`` lets every model use the fused cuDNN kernel on GPU
(``implementation='cudnn'``) and XLA's implementation elsewhere, with one code path.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class MultiHeadAttention(nnx.Module):
    """Multi-head attention laid out like PyTorch's ``nn.MultiheadAttention``.

    Parameters: ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj``, each a Linear D → D with bias:
    4·D² + 4·D parameters, the same count as PyTorch's fused ``in_proj_weight`` [3D, D] +
    ``in_proj_bias`` [3D] + ``out_proj``. A PyTorch state dict maps by splitting ``in_proj_*`` into
    thirds (q, k, v) and transposing the weights (flax kernels are [in, out]).

    Dropout: ``jax.nn.dot_product_attention`` has no dropout on the attention weights, so
    ``dropout`` is applied to the attended values (the per-head outputs, before ``out_proj``)
    instead. At rate 0 (PyTorch's default) the two are identical.

    Rows without any valid key: PyTorch returns NaN there. This module returns exactly zero for such
    queries (so a residual connection passes its input through unchanged).

    Args:
      embed_dim: D, model width; must be divisible by ``num_heads``.
      num_heads: H.
      dropout: dropout rate on the attended values, see above.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
      implementation: passed to ``jax.nn.dot_product_attention`` (None = XLA, 'cudnn' = fused).
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
            # [B, Lk] -> [B, 1, 1, Lk], broadcast by dot_product_attention to [B, H, Lq, Lk].
            mask = safe_mask[:, None, None, :]
        attended = jax.nn.dot_product_attention(q, k, v, mask=mask,
                                                implementation=self.implementation)
        attended = self.dropout(attended, deterministic=deterministic)
        out = self.out_proj(attended.reshape(attended.shape[:-2] + (self.embed_dim,)))
        if has_valid_key is not None:
            out = jnp.where(has_valid_key[:, None, None], out, jnp.zeros((), out.dtype))
        return out
