"""Sinusoidal embeddings of continuous coordinates, and the wavelength embedding built on them.

A spectrum's pixels are located by wavelength, not by index: two surveys on different grids must
give the same embedding to the same wavelength. :class:`WavelengthEmbedding` therefore embeds the
wavelength value itself (in Å, through log10), never a pixel position.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

# Range of sinusoid periods in log10(λ/Å) units, after Różański et al. (2023): from 1e-6 (far finer
# than any pixel: Δlog10 λ ≈ 3.5e-5 for DESI's 0.8 Å at 9800 Å) up to 10 (longer than any optical/IR
# range, so the slowest sinusoids act as a smooth, monotonic coordinate).
DEFAULT_MIN_PERIOD = 1e-6
DEFAULT_MAX_PERIOD = 10.0


def sinusoidal_embedding(x, dim: int, min_period: float, max_period: float):
    """Embeds a continuous coordinate with sinusoids at log-spaced periods.

    For ``dim // 2`` periods p_k spaced geometrically from ``min_period`` to ``max_period``
    (inclusive), returns ``concat([sin(2π x / p_k)]_k, [cos(2π x / p_k)]_k)``: the sin half first,
    then the cos half, each ordered from the shortest period to the longest.

    Args:
      x: [...] float, the coordinate, in the same units as the periods.
      dim: even number of output features.
      min_period, max_period: shortest and longest period, > 0, in units of ``x``.

    Returns:
      [..., dim] float32.

    Note: in float32, ``x / p`` for a tiny period is a large number whose fractional part keeps few
    significant bits, so the shortest periods are numerically coarse. They stay deterministic
    (equal ``x`` gives bit-equal features), which is what consistency across surveys needs.
    """
    if dim <= 0 or dim % 2:
        raise ValueError(f"sinusoidal_embedding needs a positive even dim, got {dim}")
    if not 0 < min_period <= max_period:
        raise ValueError(
            f"need 0 < min_period <= max_period, got min_period={min_period}, "
            f"max_period={max_period}")
    return jnp.concatenate(sinusoid_halves(x, dim, min_period, max_period), axis=-1)


def sinusoid_halves(x, dim: int, min_period: float, max_period: float):
    """(sin half, cos half) of :func:`sinusoidal_embedding`, each [..., dim // 2] float32: for
    callers that reduce the features before joining them (no [..., dim] array is written)."""
    periods = np.geomspace(min_period, max_period, dim // 2)
    # Multiply by the reciprocal computed in float64 so the only float32 rounding is in the product.
    angular_frequency = jnp.asarray(2.0 * math.pi / periods, jnp.float32)
    angles = jnp.asarray(x, jnp.float32)[..., None] * angular_frequency
    return jnp.sin(angles), jnp.cos(angles)


class WavelengthEmbedding(nnx.Module):
    """Embedding of wavelengths in Å, optionally followed by a learned projection.

    The coordinate is x = log10(λ / Å) (so a redshift is a constant shift of x), embedded by
    :func:`sinusoidal_embedding` with periods log-spaced from ``min_period`` to ``max_period`` in
    log10 units (default 1e-6 … 10, after Różański et al. 2023). Where λ <= 0 (padding, by the
    spectrax convention λ = −1) the embedding is exactly zero, after the projection too.

    The embedding depends only on the value of λ, never on where it sits in an array: equal
    wavelengths in two surveys' arrays get equal embeddings.

    Args:
      num_sinusoid_features: even number of sinusoidal features (half sin, half cos).
      out_features: if given, a learned Linear maps the sinusoids to this width (needs ``rngs``).
      min_period, max_period: period range in log10(λ/Å) units.
      dtype: compute dtype of the projection (parameters stay float32).
    """

    def __init__(self, num_sinusoid_features: int, out_features: int | None = None, *,
                 min_period: float = DEFAULT_MIN_PERIOD, max_period: float = DEFAULT_MAX_PERIOD,
                 dtype=None, rngs: nnx.Rngs | None = None):
        if num_sinusoid_features <= 0 or num_sinusoid_features % 2:
            raise ValueError(
                f"num_sinusoid_features must be positive and even, got {num_sinusoid_features}")
        self.num_sinusoid_features = num_sinusoid_features
        self.min_period = min_period
        self.max_period = max_period
        if out_features is None:
            self.proj = None
        else:
            if rngs is None:
                raise ValueError("WavelengthEmbedding with out_features needs rngs for its Linear")
            self.proj = nnx.Linear(num_sinusoid_features, out_features, dtype=dtype, rngs=rngs)

    @property
    def features(self) -> int:
        """Width of the output."""
        return self.num_sinusoid_features if self.proj is None else self.proj.out_features

    def summed(self, wavelength, axis: int = -1):
        """The embedding summed over ``axis`` of ``wavelength`` (e.g. the pixels of a patch):
        ``self(wavelength).sum(axis)`` with the same values, cheaper without a projection.

        Without a projection the sin and cos halves are reduced before they are joined, so XLA
        fuses the sinusoids into the reduction instead of writing the per-pixel [..., F] array
        (on XLA:CPU the tokenizer's [32, 244, 32, 128] embedding and its concatenation took
        ~60 ms of the step besides the sinusoids themselves).

        Args:
          wavelength: [...] float Å, values <= 0 mark padding (they add nothing).

        Returns:
          [... without ``axis``, features].
        """
        wavelength = jnp.asarray(wavelength, jnp.float32)
        axis = axis % wavelength.ndim   # an axis of the output too (the features come last)
        if self.proj is not None:
            return self(wavelength).sum(axis)
        valid = (wavelength > 0)[..., None]
        x = jnp.log10(jnp.where(wavelength > 0, wavelength, 1.0))
        halves = sinusoid_halves(x, self.num_sinusoid_features, self.min_period, self.max_period)
        return jnp.concatenate([jnp.where(valid, h, 0.0).sum(axis) for h in halves], axis=-1)

    def __call__(self, wavelength):
        """Embeds wavelengths.

        Args:
          wavelength: [...] float, vacuum Å; values <= 0 mark padding.

        Returns:
          [..., features]; zeros where ``wavelength <= 0``.
        """
        wavelength = jnp.asarray(wavelength, jnp.float32)
        valid = wavelength > 0
        # Substitute 1 Å before the log so padding never produces -inf/NaN (not even in gradients).
        x = jnp.log10(jnp.where(valid, wavelength, 1.0))
        emb = sinusoidal_embedding(x, self.num_sinusoid_features, self.min_period,
                                   self.max_period)
        if self.proj is not None:
            emb = self.proj(emb)
        return jnp.where(valid[..., None], emb, jnp.zeros((), emb.dtype))
