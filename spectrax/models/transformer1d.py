"""The 1D transformer baseline of Strano Moraes et al. (SPECS.md §2): a plain transformer over the
pixels of a 1D spectrum, the paper's comparison point for its image-based ViT (redshift R² 0.875
on SLOMOST-Med).

The paper describes it in one sentence (linear projections of flux and of wavelength, sinusoidal
positional encoding, 6 layers, 8 heads, width 512, LayerNorm, global average pooling, an MLP
regression head) and its public code does not contain it. spectrax's reading:

    flux [B, L] (median-normalised by the caller), wavelength [B, L] Å, mask [B, L] (True = valid)
      -> valid = mask ∧ finite flux ∧ finite λ > 0; invalid pixels get flux 0 and λ̂ 0
      -> tokens of P pixels (``patch_size``; P = 1 is the paper: one token per pixel)
      -> ``flux_proj`` Linear(P → D)(flux) + ``wavelength_proj`` Linear(P → D)(λ̂)
         + sinusoidal encoding of the token index (Vaswani et al.: period 2π·10000^(2i/D))
      -> ``encoder``: post-LN blocks as PyTorch's nn.TransformerEncoderLayer defaults (FFN 2048,
         ReLU, dropout 0.1, LayerNorm eps 1e-5); tokens without a valid pixel are never keys
      -> mean over valid tokens (global average pooling)
      -> ``head``: Linear(D → 256), ReLU, dropout, Linear(256 → K)  => [B, K] float32

Decisions where the paper is silent, and why:

* λ̂ = (λ − 3536.714 Å) / (10413.580 − 3536.714 Å): the reference's wavelength cut (SPECS §2) maps
  to [0, 1]; raw Ångström values into a Linear layer would give activations of order 10⁴.
* The sinusoidal encoding is of the token's index, as in Vaswani et al.; the wavelength enters
  through its own projection (both are what the paper lists).
* PyTorch's encoder-layer defaults (post-LN, FFN 2048 = 4·512, ReLU, dropout 0.1): the paper's
  authors work in PyTorch and state no other values.
* Long spectra: SDSS/LAMOST spectra have ~3,900-4,600 pixels; one token per pixel makes attention
  O(L²) = 2·10⁷ scores per head and layer, fine on an accelerator with a fused kernel but not on a
  CPU. ``patch_size`` P groups P consecutive pixels into one token (a Linear over the P fluxes and
  one over the P wavelengths), dividing the sequence by P. 'paper' keeps P = 1; 'small' (P 8) and
  'tiny' (P 16) are for CPU runs. A token is valid when any of its pixels is; invalid pixels inside
  it contribute zeros.

Masked pixels never influence the output: their values are replaced before any arithmetic, tokens
with no valid pixel are excluded as attention keys and from the pooling, and a spectrum without a
valid pixel pools to zeros (a finite output from the head's biases).

Parameters, 'paper' (P = 1), K outputs: 2·(D + D) projections + 6 × 3,152,384 (blocks) +
(512·256 + 256) + (256·K + K) head = 19,047,680 + 257·K (19,047,937 for K = 1). 'small':
605,441 and 'tiny': 18,721 for K = 1 (:func:`expected_parameter_count`).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from spectrax.nn import Dropout, TransformerEncoder, sinusoidal_embedding

COMPUTE_DTYPES = ("float32", "bfloat16")

# The reference's wavelength cut (SPECS §2), Å: λ̂ = 0 and 1 at these wavelengths.
WAVELENGTH_MIN = 3536.714
WAVELENGTH_MAX = 10413.580


@dataclasses.dataclass(frozen=True)
class Transformer1DConfig:
    """Every size of the 1D transformer baseline. Defaults are the paper (P = 1).

    Attributes:
      d_model: D, token width (even: the positional encoding pairs sin/cos).
      num_heads: attention heads; num_layers: encoder blocks; ffn_dim: block MLP width.
      dropout: dropout in the blocks, after the embedding and in the head.
      activation: 'relu' or 'gelu' in the block MLPs.
      norm_first: pre-LN blocks (+ a final LayerNorm) instead of PyTorch's default post-LN.
      layer_norm_eps: LayerNorm epsilon.
      patch_size: P, pixels per token (module docstring, "Long spectra").
      head_hidden: hidden widths of the MLP head (ReLU after each).
      wavelength_min, wavelength_max: Å mapped to λ̂ = 0 and 1.
      pe_base: the 10000 of the sinusoidal encoding.
      dtype: compute dtype, 'float32' or 'bfloat16'; parameters stay float32.
      attention: implementation of every attention layer (:func:`spectrax.nn.attend`; 'auto'
        picks per backend and shape).
    """

    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 6
    ffn_dim: int = 2048
    dropout: float = 0.1
    activation: str = "relu"
    norm_first: bool = False
    layer_norm_eps: float = 1e-5
    patch_size: int = 1
    head_hidden: tuple[int, ...] = (256,)
    wavelength_min: float = WAVELENGTH_MIN
    wavelength_max: float = WAVELENGTH_MAX
    pe_base: float = 10000.0
    dtype: str = "float32"
    attention: str = "auto"

    def __post_init__(self):
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} unknown; use one of {COMPUTE_DTYPES}")
        if self.d_model <= 0 or self.d_model % 2:
            raise ValueError(f"d_model must be positive and even, got {self.d_model}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} not divisible by num_heads "
                             f"{self.num_heads}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if not self.wavelength_min < self.wavelength_max:
            raise ValueError("need wavelength_min < wavelength_max")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


_PAPER = Transformer1DConfig()

VARIANTS: dict[str, Transformer1DConfig] = {
    # SPECS §2: width 512, 6 layers, 8 heads, one token per pixel.
    "paper": _PAPER,
    # CPU development: width 128, 3 layers, 4 heads, 8-pixel tokens (4,000 px -> 500 tokens).
    "small": dataclasses.replace(_PAPER, d_model=128, num_heads=4, num_layers=3, ffn_dim=512,
                                 patch_size=8, head_hidden=(64,)),
    # Seconds-long tests.
    "tiny": dataclasses.replace(_PAPER, d_model=32, num_heads=2, num_layers=2, ffn_dim=64,
                                patch_size=16, head_hidden=(16,)),
}


def transformer1d_config(variant: str, **overrides) -> Transformer1DConfig:
    """The named configuration ('paper', 'small', 'tiny'), fields optionally overridden (e.g.
    ``patch_size=8`` for the paper widths on long spectra)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown transformer1d variant {variant!r}; known: {sorted(VARIANTS)}")
    return dataclasses.replace(VARIANTS[variant], **overrides)


def expected_parameter_count(cfg: Transformer1DConfig, num_outputs: int) -> int:
    """Parameters of :class:`Transformer1D` (module docstring formula)."""
    d, f, p = cfg.d_model, cfg.ffn_dim, cfg.patch_size
    block = (4 * d * d + 4 * d) + (2 * d * f + f + d) + 4 * d
    final_norm = 2 * d if cfg.norm_first else 0
    widths = (d, *cfg.head_hidden, num_outputs)
    head = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    return 2 * (p * d + d) + cfg.num_layers * block + final_norm + head


def positional_encoding(num_tokens: int, dim: int, base: float = 10000.0):
    """[num_tokens, dim] float32 sinusoidal encoding of the token index: pair i has period
    2π·base^(2i/dim) (Vaswani et al.), sin half then cos half (the layout is immaterial to a
    learned model)."""
    # Vaswani's periods are geometric from 2π to 2π·base^((dim−2)/dim), exactly what
    # sinusoidal_embedding spaces between its two end points.
    return sinusoidal_embedding(jnp.arange(num_tokens, dtype=jnp.float32), dim,
                                min_period=2 * math.pi,
                                max_period=2 * math.pi * base ** ((dim - 2) / dim))


def _patch(x, patch_size: int, fill):
    """[B, L] -> [B, ceil(L / P), P], the tail padded with ``fill``."""
    length = x.shape[1]
    pad = -length % patch_size
    x = jnp.pad(x, ((0, 0), (0, pad)), constant_values=fill)
    return x.reshape(x.shape[0], -1, patch_size)


def masked_mean(x, mask):
    """Mean of ``x`` [B, N, D] over the tokens where ``mask`` [B, N] is True -> [B, D] float32;
    zeros for a row without any True."""
    weights = mask.astype(jnp.float32)[..., None]
    total = jnp.sum(x.astype(jnp.float32) * weights, axis=1)
    return total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


class Transformer1D(nnx.Module):
    """The 1D transformer baseline (module docstring). Sub-modules: ``flux_proj``,
    ``wavelength_proj`` (Linear P → D), ``encoder`` (:class:`~spectrax.nn.TransformerEncoder`),
    ``head_layers/0..`` (hidden Linear), ``head_out`` (Linear → K).

    Args:
      cfg: :class:`Transformer1DConfig`.
      num_outputs: K (regression targets, or class logits).
    """

    def __init__(self, cfg: Transformer1DConfig, num_outputs: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, p, dtype = cfg.d_model, cfg.patch_size, cfg.compute_dtype
        self.flux_proj = nnx.Linear(p, d, dtype=dtype, rngs=rngs)
        self.wavelength_proj = nnx.Linear(p, d, dtype=dtype, rngs=rngs)
        self.dropout = Dropout(cfg.dropout, rngs=rngs)
        self.encoder = TransformerEncoder(
            cfg.num_layers, d, cfg.num_heads, cfg.ffn_dim, cfg.dropout, cfg.activation,
            norm_first=cfg.norm_first, eps=cfg.layer_norm_eps, final_norm=cfg.norm_first,
            dtype=dtype, attention=cfg.attention, rngs=rngs)
        widths = (d, *cfg.head_hidden)
        self.head_layers = nnx.List([nnx.Linear(a, b, dtype=dtype, rngs=rngs)
                                     for a, b in zip(widths[:-1], widths[1:])])
        self.head_out = nnx.Linear(widths[-1], num_outputs, dtype=dtype, rngs=rngs)

    def tokens(self, flux, mask, wavelength, *, train: bool = False):
        """Encodes spectra -> (tokens [B, N, D] compute dtype, token_mask [B, N] bool),
        N = ceil(L / P)."""
        cfg = self.cfg
        flux = jnp.asarray(flux, jnp.float32)
        wavelength = jnp.asarray(wavelength, jnp.float32)
        valid = (jnp.asarray(mask, bool) & jnp.isfinite(flux) & jnp.isfinite(wavelength)
                 & (wavelength > 0))
        # Replace invalid values before any arithmetic, so neither they nor their gradients
        # (NaN · 0 is NaN) can reach the output.
        flux = jnp.where(valid, flux, 0.0)
        scaled = (wavelength - cfg.wavelength_min) / (cfg.wavelength_max - cfg.wavelength_min)
        scaled = jnp.where(valid, scaled, 0.0)
        p, dtype = cfg.patch_size, cfg.compute_dtype
        token_mask = jnp.any(_patch(valid, p, False), axis=-1)                 # [B, N]
        x = (self.flux_proj(_patch(flux, p, 0.0).astype(dtype))
             + self.wavelength_proj(_patch(scaled, p, 0.0).astype(dtype)))     # [B, N, D]
        x = x + positional_encoding(x.shape[1], cfg.d_model, cfg.pe_base).astype(dtype)
        x = self.dropout(x, deterministic=not train)
        return self.encoder(x, token_mask, deterministic=not train), token_mask

    def __call__(self, flux, mask, wavelength, *, train: bool = False):
        """Predicts.

        Args:
          flux: [B, L] float, median-normalised by the caller; anything (NaN too) where invalid.
          mask: [B, L] bool, True = valid pixel.
          wavelength: [B, L] float, vacuum Å; ≤ 0 (−1) marks padding.
          train: enables dropout (needs a 'dropout' rng stream).

        Returns:
          [B, K] float32.
        """
        tokens, token_mask = self.tokens(flux, mask, wavelength, train=train)
        x = masked_mean(tokens, token_mask).astype(self.cfg.compute_dtype)
        for layer in self.head_layers:
            x = self.dropout(jax.nn.relu(layer(x)), deterministic=not train)
        return self.head_out(x).astype(jnp.float32)


def build(model_cfg, rngs: nnx.Rngs, num_outputs: int) -> Transformer1D:
    """Registry hook: ``model_cfg.variant`` (default 'small'), ``model_cfg.dtype``,
    ``model_cfg.attention`` and an optional ``patch_size`` field."""
    overrides = {"dtype": getattr(model_cfg, "dtype", None) or "float32",
                 "attention": getattr(model_cfg, "attention", None) or "auto"}
    patch_size = getattr(model_cfg, "patch_size", None)
    if patch_size:
        overrides["patch_size"] = int(patch_size)
    cfg = transformer1d_config(getattr(model_cfg, "variant", None) or "small", **overrides)
    return Transformer1D(cfg, num_outputs, rngs=rngs)
