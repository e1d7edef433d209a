"""A from-scratch MLP on a fixed pixel window: the baseline SpectraFM's stage-3 result is
compared with (the paper trains it on the same 100 iron-rich stars, 512 pixels, [Fe/H] only)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from spectrax.models.spectrafm import FE_WINDOW
from spectrax.nn import Dropout


@dataclasses.dataclass(frozen=True)
class WindowMLPConfig:
    """pixel_range: (first, stop) pixel indices of the window; hidden: widths of the hidden
    layers; dropout between them."""

    pixel_range: tuple[int, int] = FE_WINDOW
    hidden: tuple[int, ...] = (256, 128)
    dropout: float = 0.1


class WindowMLP(nnx.Module):
    """flux [B, L] (median-normalised, ≈ 1 on the continuum), mask [B, L] -> [B, K].

    Inputs are the window's flux minus 1 (absorption depths), 0 at masked pixels, so a masked
    pixel looks like continuum rather than like a deep line."""

    def __init__(self, cfg: WindowMLPConfig, num_outputs: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        a, b = cfg.pixel_range
        widths = (b - a,) + tuple(cfg.hidden)
        self.layers = nnx.List([nnx.Linear(i, o, rngs=rngs) for i, o in zip(widths[:-1], widths[1:])])
        self.dropout = Dropout(cfg.dropout, rngs=rngs)
        self.out = nnx.Linear(widths[-1], num_outputs, rngs=rngs)

    def __call__(self, flux, mask, wavelength, *, train: bool = False):
        a, b = self.cfg.pixel_range
        if flux.shape[1] < b:
            raise ValueError(f"spectra have {flux.shape[1]} pixels; the window ends at {b}")
        x = jnp.where(mask[:, a:b], flux[:, a:b] - 1.0, 0.0)
        for layer in self.layers:
            x = self.dropout(jax.nn.gelu(layer(x)), deterministic=not train)
        return self.out(x)


def build(model_cfg, rngs: nnx.Rngs, num_outputs: int) -> WindowMLP:
    pr = tuple(getattr(model_cfg, "pixel_range", ()) or FE_WINDOW)
    return WindowMLP(WindowMLPConfig(pixel_range=pr), num_outputs, rngs=rngs)
