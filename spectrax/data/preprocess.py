"""Per-spectrum preprocessing inside the jitted input-to-model path (jax.numpy).

It runs on the accelerator as part of every train / eval / predict step, so the same function
serves training and inference and nothing is precomputed per model on disk.
"""
from __future__ import annotations

import jax.numpy as jnp


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
    med = jnp.nanmedian(jnp.where(mask, flux, jnp.nan), axis=-1)
    n_valid = jnp.sum(mask, axis=-1)
    mean_abs = jnp.sum(jnp.abs(flux), axis=-1) / jnp.maximum(n_valid, 1)
    med = jnp.where(n_valid > 0, med, 0.0)  # nanmedian of all-NaN is NaN: never let it out
    use_median = med > min_scale
    scale = jnp.where(use_median, med, jnp.where(mean_abs > min_scale, mean_abs, 1.0))
    flux_n = flux / scale[:, None]
    ivar_n = jnp.where(mask, ivar * scale[:, None] ** 2, 0.0)
    return flux_n, ivar_n, scale, ~use_median
