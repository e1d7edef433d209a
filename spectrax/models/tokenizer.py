"""Universal spectral tokenizer (The Polymathic AI Collaboration, "Universal Spectral Tokenization
via Self-Supervised Panchromatic Representation Learning"; no public code): a patch transformer
autoencoder that reads any survey's spectrum on its NATIVE pixel grid.

Pipeline, per spectrum (see SPECS.md §3)::

    flux, σ (or ivar), λ [Å], mask  on the native grid, [B, L]
      -> validity (mask ∧ λ > 0 ∧ finite ∧ σ > 0) and normalisation by the median valid flux
      -> patches of P pixels (L padded to a multiple of P with masked padding inside the model)
      -> Linear([flux, σ] of a patch, 2P values) + mean sinusoidal λ-embedding of its pixels
      -> pre-LN encoder blocks, bad patches excluded as attention keys
      => tokens [B, N, D], N = ceil(L / P), and their mask [B, N]     (the "tokenization")
      -> + λ-embedding of the requested output grid's patches
      -> pre-LN decoder blocks (mirrored: self-attention + MLP) -> Linear D -> P per token
      -> unpatch -> predicted normalised flux [B, L_out]

Decisions (the paper leaves them open):

* Wavelength embedding: :class:`~spectrax.nn.WavelengthEmbedding` on x = log10(λ/Å), D sinusoid
  features (no learned projection, so an embedding depends on nothing but λ), periods log-spaced
  from ``1e-4`` to ``10`` in log10 units. The upper end follows Różański et al. (2023): longer than
  the whole 0.36–1.7 µm range (0.67 dex), so the slowest features are a smooth coordinate. The
  lower end is raised from their 1e-6 because the per-pixel embeddings are *averaged over a
  patch*: averaging sin(2πx/p) over a patch spanning w dex multiplies it by ~sinc(w/p), so periods
  far below the patch span carry nothing. The finest patches are APOGEE's (32 × 6e-6 = 1.9e-4 dex)
  and GALAH's (~1.5e-4 dex); SDSS/DESI patches span 1–3e-3 dex. 1e-4 also keeps x/p well inside
  float32 precision (x ≈ 4 has a spacing of 5e-7), so features are smooth in λ, not quantised.
* Padding pixels (λ ≤ 0) have a zero embedding and are left out of the patch mean; masked pixels
  with a real wavelength are kept (their wavelength is still known).
* Decoder output: the mean flux only (P values per token). The loss uses the observed σ, as the
  paper's L = (1/N_valid) Σ m (y − ŷ)²/σ²; no predicted uncertainty.
* Requested output grid: its patch i is embedded and added to token i, so it must have the same
  number of patches as the input (checked; a ValueError otherwise). The native grid is the
  intended use; a grid that covers the same wavelengths patch for patch (e.g. shifted by a
  fraction of a pixel) also works. Decoding onto an arbitrary grid would need cross-attention from
  requested patches to the tokens, a different architecture.
* Median guard: scale = max(median of valid flux, ``min_scale``), ``min_scale`` = 0.1 flux units,
  the clamp of Polymathic's later codec. It survives medians <= 0 and spectra without valid
  pixels (scale 0.1), and is continuous in the median.
* Blocks: pre-LN with a final LayerNorm on each stack, GELU, MLP 4·D, no dropout by default
  (unspecified in the paper; 600k steps on a large corpus).

Parameter count (pre-LN, final norms, D model width, F = MLP width, P patch size):
  block = 4D² + 4D (attention) + 2DF + F + D (MLP) + 4D (two LayerNorms)
  total = (2P·D + D) + (E + Dec)·block + 2·2D (final norms) + (D·P + P)
'paper' (P 32, D 512, F 2048, 6 + 6 blocks): 37,880,352 — see :func:`expected_parameter_count`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from spectrax.data.preprocess import masked_median
from spectrax.nn import (Dropout, MultiHeadAttention, TransformerEncoder, WavelengthEmbedding,
                         gelu)

COMPUTE_DTYPES = ("float32", "bfloat16")

# Period range of the wavelength sinusoids, in log10(λ/Å) units (see the module docstring).
TOKENIZER_MIN_PERIOD = 1e-4
TOKENIZER_MAX_PERIOD = 10.0


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """Every size of a spectral tokenizer. Defaults are the paper's (``tokenizer_config('paper')``).

    Attributes:
      patch_size: P, pixels per patch (and per token).
      d_model: D, token width; also the number of wavelength sinusoid features (must be even).
      num_heads: attention heads.
      mlp_dim: hidden width of the blocks' MLP (paper: 4·D).
      num_encoder_layers, num_decoder_layers: blocks in the encoder and in the decoder.
      dropout: dropout rate inside the blocks.
      activation: 'gelu' or 'relu' in the MLP.
      layer_norm_eps: LayerNorm epsilon.
      wavelength_min_period, wavelength_max_period: sinusoid periods in log10(λ/Å) units.
      min_scale: floor of the normalisation scale, in flux units (the median guard).
      dtype: compute dtype, 'float32' or 'bfloat16'; parameters stay float32.
      attention: implementation of every attention layer (:func:`spectrax.nn.attend`; 'auto'
        picks per backend and shape).
    """

    patch_size: int = 32
    d_model: int = 512
    num_heads: int = 8
    mlp_dim: int = 2048
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dropout: float = 0.0
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5
    wavelength_min_period: float = TOKENIZER_MIN_PERIOD
    wavelength_max_period: float = TOKENIZER_MAX_PERIOD
    min_scale: float = 0.1
    dtype: str = "float32"
    attention: str = "auto"

    def __post_init__(self):
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} unknown; use one of {COMPUTE_DTYPES}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.d_model % 2:
            raise ValueError(f"d_model must be even (it is the sinusoid width), got {self.d_model}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} not divisible by num_heads {self.num_heads}")
        if not self.min_scale > 0:
            raise ValueError(f"min_scale must be > 0, got {self.min_scale}")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


_PAPER = TokenizerConfig()

VARIANTS: dict[str, TokenizerConfig] = {
    # SPECS §3: P = 32, D = 512, 6 + 6 blocks, 8 heads, MLP 4·D, pre-LN (37,880,352 parameters).
    "paper": _PAPER,
    # CPU width for development runs (≈ 0.8 M parameters).
    "small": dataclasses.replace(_PAPER, d_model=128, num_heads=4, mlp_dim=512,
                                 num_encoder_layers=2, num_decoder_layers=2),
    # Toy width for seconds-long tests.
    "tiny": dataclasses.replace(_PAPER, d_model=32, num_heads=2, mlp_dim=64,
                                num_encoder_layers=1, num_decoder_layers=1),
}


def tokenizer_config(variant: str, **overrides) -> TokenizerConfig:
    """The named tokenizer configuration ('paper', 'small', 'tiny'), optionally overridden."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown tokenizer variant {variant!r}; known: {sorted(VARIANTS)}")
    return dataclasses.replace(VARIANTS[variant], **overrides)


def expected_parameter_count(cfg: TokenizerConfig) -> int:
    """The closed-form parameter count of :class:`SpectralTokenizer` (module docstring)."""
    d, f, p = cfg.d_model, cfg.mlp_dim, cfg.patch_size
    block = (4 * d * d + 4 * d) + (2 * d * f + f + d) + 4 * d
    stacks = (cfg.num_encoder_layers + cfg.num_decoder_layers) * block + 2 * (2 * d)
    return (2 * p * d + d) + stacks + (d * p + p)


# ------------------------------------------------------------------------------------------------
# Pixels: validity, normalisation, patches
# ------------------------------------------------------------------------------------------------

def sigma_from_ivar(ivar):
    """[B, L] inverse variance -> σ [B, L]; 0 where ivar <= 0 or is not finite (a bad pixel)."""
    ivar = jnp.asarray(ivar, jnp.float32)
    ok = jnp.isfinite(ivar) & (ivar > 0)
    return jnp.where(ok, jax.lax.rsqrt(jnp.where(ok, ivar, 1.0)), 0.0)


def pixel_validity(flux, sigma, wavelength, mask):
    """[B, L] bool: the mask says valid, the pixel is not padding (λ > 0), flux and σ are finite
    and σ > 0 (a pixel without an error cannot enter the Gaussian likelihood)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return (jnp.asarray(mask, bool) & (jnp.asarray(wavelength) > 0) & jnp.isfinite(flux)
            & jnp.isfinite(sigma) & (sigma > 0))


def normalise(flux, sigma, valid, min_scale: float = 0.1):
    """Divides flux and σ by scale = max(median of the valid flux, ``min_scale``).

    The clamp is Polymathic's codec guard: a median <= 0 (faint or sky-dominated spectra) or a
    spectrum without valid pixels gets scale ``min_scale`` instead of a division by ~0.

    Args:
      flux, sigma: [B, L] float, flux units; anything (NaN too) at invalid pixels.
      valid: [B, L] bool.
      min_scale: floor of the scale, flux units.

    Returns:
      flux_n [B, L], sigma_n [B, L] (both exactly 0 at invalid pixels), scale [B] (flux units;
      multiply normalised outputs by ``scale[:, None]`` to de-normalise).
    """
    flux = jnp.where(valid, jnp.asarray(flux, jnp.float32), 0.0)
    sigma = jnp.where(valid, jnp.asarray(sigma, jnp.float32), 0.0)
    median = masked_median(flux, valid)
    # the median of a row without valid pixels is NaN; jnp.maximum would propagate it.
    median = jnp.where(jnp.any(valid, axis=-1), median, 0.0)
    scale = jnp.maximum(median, min_scale)
    return flux / scale[:, None], sigma / scale[:, None], scale


def num_patches(length: int, patch_size: int) -> int:
    """N = ceil(L / P)."""
    return -(-length // patch_size)


def patchify(x, patch_size: int, fill):
    """[B, L, ...] -> [B, N, P, ...], padding the pixel axis to N·P with ``fill``."""
    length = x.shape[1]
    pad = num_patches(length, patch_size) * patch_size - length
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return x.reshape((x.shape[0], -1, patch_size) + x.shape[2:])


def unpatchify(patches, length: int):
    """Inverse of :func:`patchify`: [B, N, P, ...] -> [B, L, ...] (drops the padding past L)."""
    b, n, p = patches.shape[:3]
    return patches.reshape((b, n * p) + patches.shape[3:])[:, :length]


def patch_mask(valid, patch_size: int):
    """[B, L] bool pixel validity -> [B, N] bool patch validity.

    A patch is bad when at least half of its P pixels are bad; padding (the pixels past L added to
    reach a multiple of P, and λ = −1 pixels, which are never valid) counts as bad. So a patch is
    valid only when strictly more than P/2 of its pixels are valid.
    """
    count = patchify(jnp.asarray(valid, jnp.int32), patch_size, 0).sum(-1)
    return 2 * count > patch_size


def pooled_wavelength_embedding(embedding: WavelengthEmbedding, wavelength, patch_size: int):
    """Mean per-pixel wavelength embedding of each patch, over the pixels that have a wavelength.

    Args:
      embedding: a per-pixel :class:`WavelengthEmbedding` (zero where λ <= 0).
      wavelength: [B, L] float Å, −1 on padding.

    Returns:
      [B, N, F] float32; zero for a patch of padding only. Masked pixels with a real wavelength
      count (their wavelength is known); padding pixels do not.

    Memory: the per-pixel embedding is [B, L, F] (B 64, L 7781, F 512: 1 GB in float32); XLA fuses
    the sinusoids into the reduction on accelerators, and it carries no gradient.
    """
    wave = patchify(jnp.asarray(wavelength, jnp.float32), patch_size, -1.0)     # [B, N, P]
    count = (wave > 0).sum(-1)
    total = embedding.summed(wave, axis=-1)                                      # [B, N, F]
    return total / jnp.maximum(count, 1)[..., None].astype(total.dtype)


# ------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------

def gaussian_nll(pred, target, sigma, mask, *, include_constants: bool = False):
    """Gaussian likelihood loss over valid pixels: (1/N_valid) Σ m_i (y_i − ŷ_i)² / σ_i².

    A pixel counts only where ``mask`` is True, σ is finite and > 0, and the target is finite, so
    σ = 0 / NaN at masked pixels never produces inf or NaN (in the value or the gradient). A batch
    without any valid pixel gives 0.

    Args:
      pred, target, sigma: [B, L] float (same units, e.g. normalised flux).
      mask: [B, L] bool, True = valid.
      include_constants: add (1/N_valid) Σ m_i (2 log σ_i + log 2π), making the value twice the
        mean negative log-likelihood per pixel.

    Returns:
      scalar float32.
    """
    pred = jnp.asarray(pred, jnp.float32)
    target = jnp.asarray(target, jnp.float32)
    sigma = jnp.asarray(sigma, jnp.float32)
    w = jnp.asarray(mask, bool) & jnp.isfinite(sigma) & (sigma > 0) & jnp.isfinite(target)
    # Substitute safe values BEFORE dividing so no inf/NaN exists even in the unused branch
    # (jnp.where's gradient would multiply it by zero and still give NaN).
    safe_sigma = jnp.where(w, sigma, 1.0)
    r = jnp.where(w, (jnp.where(w, target, 0.0) - pred) / safe_sigma, 0.0)
    terms = r * r
    if include_constants:
        terms = terms + jnp.where(w, 2.0 * jnp.log(safe_sigma) + jnp.log(2.0 * jnp.pi), 0.0)
    return terms.sum() / jnp.maximum(w.sum(), 1).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# The autoencoder
# ------------------------------------------------------------------------------------------------

@struct.dataclass
class TokenizerOutput:
    """What :meth:`SpectralTokenizer.__call__` returns.

    Attributes:
      reconstruction: [B, L_out] float32, predicted flux in normalised units.
      flux, sigma: [B, L] float32, the normalised input flux and σ (0 at invalid pixels): the
        target of :func:`gaussian_nll` on the native grid.
      pixel_mask: [B, L] bool, valid input pixels.
      scale: [B] float32 flux units: ``reconstruction * scale[:, None]`` is in flux units.
      tokens: [B, N, D], the encoder's tokens; token_mask: [B, N] bool.
    """

    reconstruction: Any
    flux: Any
    sigma: Any
    pixel_mask: Any
    scale: Any
    tokens: Any
    token_mask: Any

    def loss(self):
        """:func:`gaussian_nll` of the reconstruction against the input (native grid only)."""
        return gaussian_nll(self.reconstruction, self.flux, self.sigma, self.pixel_mask)


def _stack(cfg: TokenizerConfig, num_layers: int, rngs: nnx.Rngs) -> TransformerEncoder:
    """A pre-LN stack of self-attention + MLP blocks with a final LayerNorm."""
    return TransformerEncoder(num_layers, cfg.d_model, cfg.num_heads, cfg.mlp_dim, cfg.dropout,
                              cfg.activation, norm_first=True, eps=cfg.layer_norm_eps,
                              final_norm=True, dtype=cfg.compute_dtype,
                              attention=cfg.attention, rngs=rngs)


class SpectralTokenizer(nnx.Module):
    """The tokenizer autoencoder. Sub-modules: ``wavelength_embedding`` (no parameters),
    ``patch_embed`` (Linear 2P -> D), ``encoder`` and ``decoder`` (pre-LN block stacks),
    ``pixel_head`` (Linear D -> P).

    Inputs everywhere: flux [B, L] float32 (flux units, anything at bad pixels), mask [B, L] bool
    (True = valid), wavelength [B, L] float32 vacuum Å (−1 on padding), and exactly one of
    ivar [B, L] (1/flux²) or sigma [B, L] (flux units). L is free (rows of a batch share it, shorter
    spectra padded with λ = −1) and need not be a multiple of P.
    """

    def __init__(self, cfg: TokenizerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, d, p = cfg.compute_dtype, cfg.d_model, cfg.patch_size
        self.wavelength_embedding = WavelengthEmbedding(
            d, min_period=cfg.wavelength_min_period, max_period=cfg.wavelength_max_period)
        self.patch_embed = nnx.Linear(2 * p, d, dtype=dtype, rngs=rngs)
        self.encoder = _stack(cfg, cfg.num_encoder_layers, rngs)
        self.decoder = _stack(cfg, cfg.num_decoder_layers, rngs)
        self.pixel_head = nnx.Linear(d, p, dtype=dtype, rngs=rngs)

    # -- input preparation -----------------------------------------------------------------------

    def prepare(self, flux, mask, wavelength, *, ivar=None, sigma=None):
        """Validity and normalisation: -> flux_n [B, L], sigma_n [B, L], valid [B, L], scale [B].
        See :func:`pixel_validity` and :func:`normalise`."""
        if (ivar is None) == (sigma is None):
            raise ValueError("pass exactly one of ivar= or sigma= (the flux error)")
        sigma = sigma_from_ivar(ivar) if sigma is None else jnp.asarray(sigma, jnp.float32)
        valid = pixel_validity(flux, sigma, wavelength, mask)
        flux_n, sigma_n, scale = normalise(flux, sigma, valid, self.cfg.min_scale)
        return flux_n, sigma_n, valid, scale

    def embed_wavelength(self, wavelength):
        """[B, L] Å -> [B, N, D]: the pooled sinusoidal embedding of each patch."""
        return pooled_wavelength_embedding(self.wavelength_embedding, wavelength,
                                           self.cfg.patch_size)

    # -- encoder ---------------------------------------------------------------------------------

    def encode_normalised(self, flux_n, sigma_n, valid, wavelength, *, train: bool = False):
        """Encodes already normalised spectra (the output of :meth:`prepare`).

        Args:
          flux_n, sigma_n: [B, L] float32 normalised; valid: [B, L] bool; wavelength: [B, L] Å.

        Returns:
          tokens [B, N, D] (compute dtype), token_mask [B, N] bool (see :func:`patch_mask`).
        """
        p = self.cfg.patch_size
        # Zero bad pixels here too, so the tokens never depend on what bad pixels hold.
        values = jnp.concatenate([patchify(jnp.where(valid, flux_n, 0.0), p, 0.0),
                                  patchify(jnp.where(valid, sigma_n, 0.0), p, 0.0)], axis=-1)
        x = self.patch_embed(values.astype(self.cfg.compute_dtype))             # [B, N, D]
        x = x + self.embed_wavelength(wavelength).astype(x.dtype)
        token_mask = patch_mask(valid, p)
        return self.encoder(x, token_mask, deterministic=not train), token_mask

    def encode(self, flux, mask, wavelength, *, ivar=None, sigma=None, train: bool = False):
        """Raw spectra -> (tokens [B, N, D], token_mask [B, N] bool), N = ceil(L / P)."""
        flux_n, sigma_n, valid, _ = self.prepare(flux, mask, wavelength, ivar=ivar, sigma=sigma)
        return self.encode_normalised(flux_n, sigma_n, valid, wavelength, train=train)

    # -- decoder ---------------------------------------------------------------------------------

    def decode(self, tokens, token_mask, wavelength, *, train: bool = False):
        """Predicts the normalised flux on a requested grid.

        Args:
          tokens: [B, N, D]; token_mask: [B, N] bool (bad input patches stay excluded as keys).
          wavelength: [B, L_out] Å of the requested grid (−1 on padding); ceil(L_out / P) must be
            N: its patch i is added to token i (module docstring).

        Returns:
          [B, L_out] float32, normalised flux (multiply by the input's scale to de-normalise).
        """
        n_out = num_patches(wavelength.shape[1], self.cfg.patch_size)
        if n_out != tokens.shape[1]:
            raise ValueError(
                f"the requested grid has {wavelength.shape[1]} pixels = {n_out} patches of "
                f"{self.cfg.patch_size}, but the tokens are {tokens.shape[1]}; the tokenizer "
                "decodes onto grids with as many patches as the input (e.g. the native grid)")
        x = tokens + self.embed_wavelength(wavelength).astype(tokens.dtype)
        x = self.decoder(x, token_mask, deterministic=not train)
        patches = self.pixel_head(x).astype(jnp.float32)                          # [B, N, P]
        return unpatchify(patches, wavelength.shape[1])

    def __call__(self, flux, mask, wavelength, *, ivar=None, sigma=None, out_wavelength=None,
                 train: bool = False) -> TokenizerOutput:
        """Encodes and decodes; ``out_wavelength`` [B, L_out] defaults to the input grid."""
        flux_n, sigma_n, valid, scale = self.prepare(flux, mask, wavelength, ivar=ivar,
                                                     sigma=sigma)
        tokens, token_mask = self.encode_normalised(flux_n, sigma_n, valid, wavelength,
                                                    train=train)
        out_wavelength = wavelength if out_wavelength is None else out_wavelength
        recon = self.decode(tokens, token_mask, out_wavelength, train=train)
        return TokenizerOutput(reconstruction=recon, flux=flux_n, sigma=sigma_n,
                               pixel_mask=valid, scale=scale, tokens=tokens,
                               token_mask=token_mask)


# ------------------------------------------------------------------------------------------------
# Downstream adaptation on frozen tokens
# ------------------------------------------------------------------------------------------------

class AdaptationHead(nnx.Module):
    """The same small head for every downstream task: ONE learned ``query`` cross-attends to the
    tokens (bad tokens excluded as keys), then ``norm`` (LayerNorm) and an MLP (``mlp_in``, GELU,
    dropout, ``mlp_out``). Outputs are logits (classification) or values (regression).

    The tokens pass through ``jax.lax.stop_gradient``: the tokenizer is frozen, so no gradient is
    ever computed for it, whatever the caller differentiates.

    Args:
      d_model: D, token width. num_outputs: K.
      num_heads: attention heads (D must divide). mlp_dim: hidden width (default D).
    """

    def __init__(self, d_model: int, num_outputs: int, *, num_heads: int = 8,
                 mlp_dim: int | None = None, dropout: float = 0.0, eps: float = 1e-5,
                 dtype=None, attention: str = "auto", rngs: nnx.Rngs):
        mlp_dim = mlp_dim or d_model
        self.query = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, d_model)))
        self.attention = MultiHeadAttention(d_model, num_heads, dtype=dtype,
                                            implementation=attention, rngs=rngs)
        self.norm = nnx.LayerNorm(d_model, epsilon=eps, dtype=dtype, rngs=rngs)
        self.mlp_in = nnx.Linear(d_model, mlp_dim, dtype=dtype, rngs=rngs)
        self.dropout = Dropout(dropout, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_dim, num_outputs, dtype=dtype, rngs=rngs)

    def __call__(self, tokens, token_mask, *, train: bool = False):
        """tokens [B, N, D], token_mask [B, N] bool -> [B, K] float32. A spectrum without any
        valid token pools to zeros (MultiHeadAttention's guard), so its output stays finite."""
        tokens = jax.lax.stop_gradient(tokens)
        query = jnp.broadcast_to(self.query[...], (tokens.shape[0], 1, tokens.shape[-1]))
        pooled = self.attention(query.astype(tokens.dtype), tokens, token_mask,
                                deterministic=not train)[:, 0, :]
        h = gelu(self.mlp_in(self.norm(pooled)))
        return self.mlp_out(self.dropout(h, deterministic=not train)).astype(jnp.float32)


class AdaptedTokenizer(nnx.Module):
    """A frozen :class:`SpectralTokenizer` (``tokenizer``, always run in inference mode) plus an
    :class:`AdaptationHead` (``head``). ``frozen_paths`` tells the optimiser not to update the
    tokenizer. Raw spectra -> [B, K]."""

    frozen_paths = ("tokenizer",)
    takes_raw_spectra = True  # normalises inside and needs ivar (spectrax.tasks.forward)

    def __init__(self, cfg: TokenizerConfig, num_outputs: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.tokenizer = SpectralTokenizer(cfg, rngs=rngs)
        self.head = AdaptationHead(cfg.d_model, num_outputs, num_heads=cfg.num_heads,
                                   eps=cfg.layer_norm_eps, dtype=cfg.compute_dtype,
                                   attention=cfg.attention, rngs=rngs)

    def __call__(self, flux, mask, wavelength, *, ivar=None, sigma=None, train: bool = False):
        tokens, token_mask = self.tokenizer.encode(flux, mask, wavelength, ivar=ivar,
                                                   sigma=sigma, train=False)
        return self.head(tokens, token_mask, train=train)
