"""Per-spectrum preprocessing inside the jitted input-to-model path (jax.numpy).

It runs on the accelerator as part of every train / eval / predict step, so the same function
serves training and inference and nothing is precomputed per model on disk.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _order_keys(x):
    """uint32 keys that sort like the float32 values ``x`` (sign bit flipped for x ≥ 0, all
    bits flipped for x < 0)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _from_order_keys(keys):
    negative = (keys >> 31) == 0
    bits = jnp.where(negative, ~keys, keys & jnp.uint32(0x7FFFFFFF))
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def masked_median(x, valid):
    """Median of ``x`` [B, L] float32 over the ``valid`` [B, L] entries of each row (NaN
    entries count as invalid), as ``jnp.nanmedian`` of the masked rows gives it: the middle
    value, or the mean of the two middle values for an even count; NaN for a row with none.

    Found without sorting: the k-th smallest value is located bit by bit on order-preserving
    uint32 keys (32 counting passes over [B, L]), and the next one by one min pass. A sort of
    [32, 7781] was 17 % of SpecPT small's CPU training step (38 ms of ops, benchmarks.profile).
    """
    valid = valid & ~jnp.isnan(x)
    keys = _order_keys(x)
    n = jnp.sum(valid, axis=-1)                           # [B]
    k = jnp.maximum(n - 1, 0) // 2                        # lower middle, 0-based

    def step(i, kth):
        trial = kth + (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        below = jnp.sum(valid & (keys < trial[:, None]), axis=-1)
        return jnp.where(below <= k, trial, kth)

    kth = jax.lax.fori_loop(0, 32, step, jnp.zeros(x.shape[0], jnp.uint32))
    at_most = jnp.sum(valid & (keys <= kth[:, None]), axis=-1)
    above = jnp.min(jnp.where(valid & (keys > kth[:, None]), keys, jnp.uint32(0xFFFFFFFF)),
                    axis=-1)
    upper = jnp.where(at_most > k + 1, kth, above)        # the (k+1)-th smallest
    lo, hi = _from_order_keys(kth), _from_order_keys(upper)
    med = jnp.where(n % 2 == 1, lo, lo * 0.5 + hi * 0.5)
    return jnp.where(n > 0, med, jnp.nan)


def median_normalise(flux, ivar, mask, *, min_scale: float = 1e-6):
    """Divides each spectrum by the median of its valid pixels; ivar scales by the square.

    The SpecPT reference divides by a plain median and drops spectra whose median is <= 0;
    faint targets (ELG continua have S/N < 1 per pixel) often have such medians, so instead of
    dropping them we fall back to the mean |flux| of the valid pixels, and to 1 when even that is
    ~0 (an all-masked or all-zero spectrum). Masked pixels never enter the median.

    Args:
      flux: [B, L] float, 0 at bad pixels.
      ivar: [B, L] float.
      mask: [B, L] bool, True = valid.
    Returns:
      flux_n [B, L], ivar_n [B, L] (both 0 at bad pixels), scale [B] (flux units),
      used_fallback [B] bool (median <= 0 or no valid pixel).
    """
    flux = jnp.where(mask, flux, 0.0)
    med = masked_median(flux, mask)
    n_valid = jnp.sum(mask, axis=-1)
    mean_abs = jnp.sum(jnp.abs(flux), axis=-1) / jnp.maximum(n_valid, 1)
    med = jnp.where(n_valid > 0, med, 0.0)  # nanmedian of all-NaN is NaN: never let it out
    use_median = med > min_scale
    scale = jnp.where(use_median, med, jnp.where(mean_abs > min_scale, mean_abs, 1.0))
    flux_n = flux / scale[:, None]
    ivar_n = jnp.where(mask, ivar * scale[:, None] ** 2, 0.0)
    return flux_n, ivar_n, scale, ~use_median
