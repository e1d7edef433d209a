"""Multi-head attention with boolean key-padding masks, and the one function every model's
attention goes through, :func:`attend`.

Implementations (``implementation=`` of :func:`attend` and of the modules; a model passes its
config's ``attention`` field, which ``spectrax.models.registry.build_model`` fills from
``config.model.attention``):

* ``'auto'`` (the default): :func:`choose_implementation` picks one of the below at trace time
  from the backend, the dtype and the shapes.
* ``'deferred'``: softmax attention written for XLA with the normalisation deferred:
  ``out = (exp(s - max s) @ V) / sum exp(s - max s)``. The [B, N, T, S] score matrix is read and
  written fewer times than by ``jax.nn.dot_product_attention``'s XLA path (no normalised
  probability matrix, a broadcast additive mask instead of a select over the scores). Same
  maths: the maximum is taken under ``stop_gradient`` because the softmax does not depend on it.
* ``'blocked'``: online-softmax ("flash") attention in pure JAX, :func:`blocked_attention`: a
  ``lax.scan`` over blocks of keys keeps a running maximum, sum and weighted value sum per query,
  so no [T, S] score matrix is ever materialised; its custom VJP recomputes each block's scores
  from the saved log-sum-exp (memory O(B·N·T·H), not O(B·N·T·S)).
* ``'xla'``: ``jax.nn.dot_product_attention(implementation='xla')``.
* ``'cudnn'``: ``jax.nn.dot_product_attention(implementation='cudnn')``, the fused
  flash-attention kernel on NVIDIA GPUs (bf16/fp16 inputs only; jax raises otherwise), given
  the mask and sequence lengths it accepts (:func:`cudnn_attention`).

Where each is faster: ``python -m benchmarks.attention`` times forward + backward of one
attention call per shape (implementations in interleaved blocks); what decides ``'auto'`` is the
whole training step of each model (:func:`choose_implementation`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectrax.nn.dropout import Dropout

IMPLEMENTATIONS = ("auto", "deferred", "blocked", "xla", "cudnn")

# Additive bias of a masked score. Finite, so that a block whose keys are all masked gives
# exp(0) = 1 instead of exp(-inf + inf) = NaN; the rescaling by exp(m_old - m_new) removes such
# contributions as soon as a valid key arrives (every query has one: the callers guarantee it).
_MASKED = np.float32(-1e30)

# Keys per block of 'blocked'. XLA:CPU rewrites a reduction over more than 32 elements into a
# reduce-window + reduce pair that runs several times slower than a plain row reduction, so on
# CPU the per-block max and sum stay at 32 (64 and 16 measured slower on the models' shapes);
# accelerators want few, large blocks (each scan step is a kernel launch).
DEFAULT_BLOCK_KEYS = 32
ACCELERATOR_BLOCK_KEYS = 512
# On CPU 'blocked' walks the batch in chunks whose score block [chunk, N, T, block_keys] takes at
# most this many bytes, so the per-block passes (exp, max, sum, the small matmuls) run from the
# cores' L2 caches (1 MiB each on the 2-core development machine) instead of main memory.
CPU_BLOCK_BYTES = 3 << 19   # 1.5 MiB


def check_implementation(name: str | None) -> str:
    """``name`` validated (None = ``'auto'``); a ValueError names ``config.model.attention``."""
    name = "auto" if name is None else name
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {name!r}: use one of {IMPLEMENTATIONS} "
                         "(config.model.attention)")
    return name


def choose_implementation(q_shape, k_shape, dtype, backend: str | None = None) -> str:
    """The implementation ``'auto'`` resolves to for queries [B, T, N, H], keys [B, S, N, H].

    * GPU: ``'cudnn'`` for bf16/fp16 inputs and a head dimension cuDNN's flash kernel takes (a
      multiple of 8, at most 128); otherwise as below.
    * Otherwise (CPU, TPU, GPU in float32): ``'deferred'``, and ``'blocked'`` once the float32
      score matrix B·N·T·S would exceed :data:`MATERIALISE_LIMIT_BYTES`. On CPU the blocked
      scan wins for one attention call in isolation, but not in the models' whole training
      steps: with ``'deferred'`` SpectraFM ``small`` takes 524 ms a step against 639 ms blocked
      (T = S = 512, head dim 16), the tokenizer ``small`` 758 vs 877 ms, the 1D transformer
      ``small`` 1,936 vs 2,367 ms, ViT tiny 312 vs 348 ms (2-core x86 VM, load ~2, batch 32
      / 16, 2026-12-05, interleaved blocks of 5 steps).
    """
    backend = backend or jax.default_backend()
    b, t, n, h = q_shape
    s = k_shape[1]
    if backend in ("gpu", "cuda", "rocm"):
        if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and h % 8 == 0 and h <= 128:
            return "cudnn"
    return "blocked" if b * n * t * s * 4 > MATERIALISE_LIMIT_BYTES else "deferred"


# Accelerators materialise score matrices up to this size with 'auto' (bytes of the float32
# scores of one attention call; the backward pass holds about three such arrays at once).
MATERIALISE_LIMIT_BYTES = 1 << 30


def attend(q, k, v, mask=None, *, implementation: str | None = "auto"):
    """Scaled dot-product attention.

    Args:
      q: [B, T, N, H] queries; k, v: [B, S, N, H] keys and values, one dtype.
      mask: bool broadcastable to [B, N, T, S], True = may attend; every query needs at least one
        attendable key (the callers guarantee it). None = all keys.
      implementation: see the module docstring; None = ``'auto'``.

    Returns:
      [B, T, N, H] in the dtype of ``q``.
    """
    implementation = check_implementation(implementation)
    if implementation == "auto":
        implementation = choose_implementation(q.shape, k.shape, q.dtype)
    if implementation == "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    if implementation == "cudnn":
        return cudnn_attention(q, k, v, mask)
    if implementation == "blocked":
        return blocked_attention(q, k, v, mask)
    return deferred_attention(q, k, v, mask)


def deferred_attention(q, k, v, mask=None):
    """The ``'deferred'`` implementation (module docstring); arguments as :func:`attend`."""
    # Scores in float32 whatever the compute dtype (bf16 scores lose the small differences the
    # softmax amplifies); the two matmuls still take the compute-dtype operands.
    scores = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        # An additive [.., S] bias fuses into the exp below; a select would be a pass of its own.
        scores = scores + jnp.where(mask, 0.0, _MASKED)
    peak = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    unnormalised = jnp.exp(scores - peak)
    total = jnp.sum(unnormalised, axis=-1)                          # [B, N, T]
    out = jnp.einsum("bnts,bsnh->btnh", unnormalised.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    out = out / jnp.transpose(total, (0, 2, 1))[..., None]
    return out.astype(q.dtype)


def cudnn_attention(q, k, v, mask=None):
    """``jax.nn.dot_product_attention(implementation='cudnn')`` with a key mask of any
    broadcastable shape; arguments as :func:`attend`.

    cuDNN takes a mask as a bias of shape [B|1, N|1, T, S] (the query axis not broadcast) and, when
    training with a bias, only even T and S. :func:`even_lengths` reshapes the problem to
    that (padded keys masked, padded queries dropped from the output), which changes no output.
    """
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    t = q.shape[1]
    q, k, v, mask = even_lengths(q, k, v, mask)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")[:, :t]


def even_lengths(q, k, v, mask):
    """(q, k, v, mask) with T and S padded to even lengths and the mask broadcast to
    [B|1, N|1, T, S]: padded keys (zeros) are masked for every query, padded queries (zeros)
    attend to every key and are to be dropped by the caller. Attention over the result,
    restricted to the first T queries, equals attention over the inputs."""
    t, s = q.shape[1], k.shape[1]
    mask = jnp.asarray(mask, bool)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (t, s))
    if s % 2:
        k = jnp.pad(k, ((0, 0), (0, 1), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 1), (0, 0), (0, 0)))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, 1)), constant_values=False)
    if t % 2:
        q = jnp.pad(q, ((0, 0), (0, 1), (0, 0), (0, 0)))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 1), (0, 0)), constant_values=True)
    return q, k, v, mask


# ----------------------------------------------------------------------------------------------
# Blocked (online-softmax) attention
# ----------------------------------------------------------------------------------------------
def blocked_attention(q, k, v, mask=None, *, block_keys: int | None = None,
                      batch_chunk: int | None = None):
    """Online-softmax attention over blocks of ``block_keys`` keys; arguments as :func:`attend`.

    Forward (per block j of keys, for every query at once): ``s = q kⱼᵀ/√H + bias``,
    ``m' = max(m, max s)``, ``l' = l·e^(m−m') + Σ e^(s−m')``, ``acc' = acc·e^(m−m') +
    e^(s−m') vⱼ``; finally ``out = acc / l``. Backward (custom VJP, FlashAttention-2's): the
    scores of each block are recomputed from the saved log-sum-exp ``m + log l``, so memory stays
    O(B·N·T·H) instead of O(B·N·T·S). Scores, statistics and accumulators are float32; the
    matmuls take the compute-dtype operands.

    Args:
      block_keys: keys per block; None: 32 on CPU, 512 on accelerators.
      batch_chunk: samples per outer step (a ``lax.map`` over the batch), so that one block's
        scores [chunk, N, T, block_keys] stay in cache; None: on CPU the largest divisor of B
        whose block fits :data:`CPU_BLOCK_BYTES`, elsewhere the whole batch.

    Returns:
      [B, T, N, H] in the dtype of ``q``.
    """
    b, t, n, _ = q.shape
    s = k.shape[1]
    cpu = jax.default_backend() == "cpu"
    if block_keys is None:
        block_keys = DEFAULT_BLOCK_KEYS if cpu else ACCELERATOR_BLOCK_KEYS
    block_keys = min(block_keys, s)
    if batch_chunk is None:
        batch_chunk = b
        if cpu:
            per_sample = n * t * block_keys * 4
            batch_chunk = max([c for c in range(1, b + 1)
                               if b % c == 0 and c * per_sample <= CPU_BLOCK_BYTES] or [1])
    if mask is None:
        bias = jnp.zeros((1, 1, 1, s), jnp.float32)
    else:
        mask = jnp.asarray(mask, bool)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        bias = jnp.where(jnp.broadcast_to(mask, mask.shape[:3] + (s,)), 0.0, _MASKED)
    bias = jax.lax.stop_gradient(bias)
    blocks = -(-s // block_keys)
    pad = blocks * block_keys - s

    def attend_chunk(q, k, v, bias):
        # Keys, values and the bias in blocks along S, the block index first (scan's axis);
        # padded keys are masked.
        kt = _key_blocks(jnp.transpose(k, (0, 2, 1, 3)), 2, blocks, pad, 0.0)  # [J, B, N, K, H]
        vt = _key_blocks(jnp.transpose(v, (0, 2, 1, 3)), 2, blocks, pad, 0.0)
        bias = _key_blocks(bias, 3, blocks, pad, _MASKED)                    # [J, B|1, .., K]
        out = _flash(jnp.transpose(q, (0, 2, 1, 3)), kt, vt, bias)          # [B, N, T, H]
        return jnp.transpose(out, (0, 2, 1, 3)).astype(q.dtype)

    if batch_chunk >= b:
        return attend_chunk(q, k, v, bias)
    bias = jnp.broadcast_to(bias, (b,) + bias.shape[1:])
    split = lambda x: x.reshape((b // batch_chunk, batch_chunk) + x.shape[1:])  # noqa: E731
    out = jax.lax.map(lambda a: attend_chunk(*a), (split(q), split(k), split(v), split(bias)))
    return out.reshape(q.shape)


def _key_blocks(x, axis: int, blocks: int, pad: int, fill):
    """Splits ``x``'s key axis ``axis`` (padded by ``pad`` with ``fill``) into ``blocks`` blocks
    and moves the block index to the front: [..., S, ...] -> [blocks, ..., S/blocks, ...]."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    x = jnp.pad(x, widths, constant_values=fill)
    x = x.reshape(x.shape[:axis] + (blocks, x.shape[axis] // blocks) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _statistics_dtype(x):
    """float32 for bf16/fp16/fp32 operands, float64 for float64 (the float64 reference tests)."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _flash_forward_scan(q, k_blocks, v_blocks, bias_blocks):
    """(out [B, N, T, H], log-sum-exp [B, N, T]) of the online softmax, both float32 (float64
    for float64 inputs).

    q: [B, N, T, H]; k_blocks, v_blocks: [J, B, N, K, H]; bias_blocks: [J, B|1, N|1, T|1, K]."""
    b, n, t, h = q.shape
    scale = 1.0 / math.sqrt(h)
    f32 = _statistics_dtype(q)

    def step(carry, block):
        peak, total, acc = carry
        k, v, bias = block
        scores = jnp.einsum("bnth,bnkh->bntk", q, k, preferred_element_type=f32)
        scores = scores * scale + bias
        new_peak = jnp.maximum(peak, jnp.max(scores, axis=-1))
        weights = jnp.exp(scores - new_peak[..., None])
        rescale = jnp.exp(peak - new_peak)
        total = total * rescale + jnp.sum(weights, axis=-1)
        acc = acc * rescale[..., None] + jnp.einsum(
            "bntk,bnkh->bnth", weights.astype(v.dtype), v, preferred_element_type=f32)
        return (new_peak, total, acc), None

    init = (jnp.full((b, n, t), _MASKED, f32), jnp.zeros((b, n, t), f32),
            jnp.zeros((b, n, t, h), f32))
    (peak, total, acc), _ = jax.lax.scan(step, init, (k_blocks, v_blocks, bias_blocks))
    return acc / total[..., None], peak + jnp.log(total)


@jax.custom_vjp
def _flash(q, k_blocks, v_blocks, bias_blocks):
    """Online-softmax attention on pre-blocked operands (see :func:`_flash_forward_scan`);
    returns [B, N, T, H] float32 (float64 for float64 inputs)."""
    return _flash_forward_scan(q, k_blocks, v_blocks, bias_blocks)[0]


def _flash_fwd(q, k_blocks, v_blocks, bias_blocks):
    out, lse = _flash_forward_scan(q, k_blocks, v_blocks, bias_blocks)
    return out, (q, k_blocks, v_blocks, bias_blocks, out, lse)


def _flash_bwd(residuals, d_out):
    """FlashAttention-2's backward: per key block, P = exp(s − lse) from the recomputed
    scores, dV = Pᵀ dO, dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)), dQ += dS K / √H,
    dK = dSᵀ Q / √H."""
    q, k_blocks, v_blocks, bias_blocks, out, lse = residuals
    scale = 1.0 / math.sqrt(q.shape[-1])
    f32 = _statistics_dtype(q)
    d_out = d_out.astype(f32)
    delta = jnp.sum(d_out * out, axis=-1)                                  # [B, N, T]
    d_out_c = d_out.astype(v_blocks.dtype)

    def step(dq, block):
        k, v, bias = block
        scores = jnp.einsum("bnth,bnkh->bntk", q, k, preferred_element_type=f32)
        probs = jnp.exp(scores * scale + bias - lse[..., None])
        dv = jnp.einsum("bntk,bnth->bnkh", probs.astype(v.dtype), d_out_c,
                        preferred_element_type=f32)
        dp = jnp.einsum("bnth,bnkh->bntk", d_out_c, v, preferred_element_type=f32)
        ds = (probs * (dp - delta[..., None]) * scale).astype(q.dtype)
        dq = dq + jnp.einsum("bntk,bnkh->bnth", ds, k, preferred_element_type=f32)
        dk = jnp.einsum("bntk,bnth->bnkh", ds, q, preferred_element_type=f32)
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q.shape, f32),
                                (k_blocks, v_blocks, bias_blocks))
    return dq.astype(q.dtype), dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


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
      implementation: of :func:`attend` (module docstring); None = ``'auto'``.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, dropout: float = 0.0, dtype=None,
                 implementation: str | None = "auto", rngs: nnx.Rngs):
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dtype = dtype
        self.implementation = check_implementation(implementation)
        linear = lambda: nnx.Linear(embed_dim, embed_dim, dtype=dtype, rngs=rngs)  # noqa: E731
        self.q_proj = linear()
        self.k_proj = linear()
        self.v_proj = linear()
        self.out_proj = linear()
        self.dropout = Dropout(dropout, rngs=rngs)

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
