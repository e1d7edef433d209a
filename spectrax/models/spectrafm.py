"""SpectraFM (Koblischke & Bovy 2024, built on Leung & Bovy's stellar perceptron): every spectral
pixel is a token, a small post-LN transformer encodes up to 512 of them, and a decoder answers ONE
requested stellar label with a prediction and a log-variance.

Tokens. A token is (value x, token id t, wavelength λ). Its embedding is
``e = GELU(w[t]·x + b[t]) + PE(λ)`` with learnable tables ``w``, ``b`` [num_token_ids, D]. Row 0
is padding and always the zero vector. All spectral pixels share ONE id
(:attr:`SpectraFMConfig.pixel_token_id`, 1 — the reference maps every pixel name onto its first
pixel, ``syn_apogee0``, whose vocabulary index is 1), so pixels differ only by value and PE; the
labels TEFF, LOGG, O_FE, MG_FE, FE_H have their own ids (:data:`LABEL_TOKEN_IDS` for the paper
table: 7515..7519, after the reference's 7514 pixel names; the compact tables of 'small' and
'tiny' put them at 2..6, see :attr:`SpectraFMConfig.label_token_ids`).

Wavelength encoding: λ̂ = (λ − 15000 Å) / 2000 Å; pair i = 0..D/2−1 has angle
1000·λ̂ / 10000^(2i/D), sin in even dims, cos in odd dims (interleaved). PE = 0 where there is no
wavelength (λ <= 0: SpectraFM's 0 and spectrax's −1 padding alike, labels, non-finite values).
Wavelengths outside [15000, 17000] Å are REFUSED with a ValueError whenever inputs are concrete
(eager calls, :func:`check_wavelength_range` on the host before a jitted loop): the sinusoids are
defined everywhere, but λ̂ outside [0, 1] puts the slow, position-like pairs where training never
put them, so a prediction there is a silent extrapolation. Use a config with another
``wavelength_min/max`` (a different model) for other ranges. Under jit nothing can raise; the
check is the host's job there.

Network (d_model 256, GELU, dropout 0.05, post-LN, LayerNorm eps 1e-5): encoder = 2 self-attention
blocks (16 heads / FFN 2048, 8 / 1024); decoder = 3 cross-attention blocks from the request token
to the encoder output (16/2048, 8/1024, 4/512), an MLP 256→2048→1024→512→256 and two Linear(256→1)
heads (prediction, log-variance). Attention has a learnable extra key/value
(:class:`AttentionWithExtraKV`). 'paper': 11,870,722 parameters, 8,020,482 without the tables.

Masks follow spectrax: True = valid. A token is a valid key when its id is not 0 and its value is
finite.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectrax.nn.activations import gelu
from spectrax.nn.attention import MultiHeadAttention, attend
from spectrax.nn.dropout import Dropout

COMPUTE_DTYPES = ("float32", "bfloat16")
LABEL_NAMES = ("TEFF", "LOGG", "O_FE", "MG_FE", "FE_H")
# The paper's stage 3: [Fe/H] from a 512-pixel window of the 7514-pixel APOGEE spectrum
# (pixels 4107–4618, 1.611–1.622 µm, two Fe lines), evaluated apart on iron-poor stars.
FE_WINDOW = (4107, 4619)
IRON_POOR_FE_H = -1.0  # [Fe/H] below this is "iron-poor"
PADDING_TOKEN_ID = 0

# Label standardisation of the paper (median, MAD-std), from the synthetic training set; the same
# statistics are reused for real spectra and every fine-tune.
PAPER_LABEL_STATS: dict[str, tuple[float, float]] = {
    "TEFF": (4702.5, 544.0), "LOGG": (2.478, 1.308), "O_FE": (0.0876, 0.0836),
    "MG_FE": (0.0670, 0.0849), "FE_H": (-0.159, 0.287),
}

# 1.4826 · MAD estimates the standard deviation of a Gaussian.
MAD_TO_STD = 1.4826
# |z| beyond this after standardisation is treated as a bad value (NaN, masked).
STANDARDIZE_CLIP = 10.0


def _is_concrete(*arrays) -> bool:
    """True when no argument is a tracer, i.e. values can be inspected on the host."""
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SpectraFMConfig:
    """Every size of a SpectraFM model. Defaults are the paper (``spectrafm_config('paper')``).

    Attributes:
      d_model: D, width of every token (even: the PE interleaves sin/cos pairs).
      encoder_heads, encoder_ffn: heads and FFN width of each encoder self-attention block.
      decoder_heads, decoder_ffn: the same for each decoder cross-attention block.
      decoder_mlp: output widths of the decoder MLP after the blocks (GELU + dropout each).
      num_token_ids: rows of the embedding tables (paper: 7520 = padding + 7514 pixel names +
        5 labels, most pixel rows unused since all pixels share one id; kept for the count and
        for loading reference weights).
      pixel_token_id: the id every spectral pixel uses.
      first_label_token_id: id of TEFF; LOGG, O_FE, MG_FE, FE_H follow consecutively.
      dropout: dropout rate everywhere (attention, residual branches, decoder MLP).
      layer_norm_eps: LayerNorm epsilon.
      wavelength_min, wavelength_max: Å, the encoding's range (λ̂ = 0 and 1); inputs outside it
        are refused (see the module docstring).
      pe_scale, pe_base: angle = pe_scale · λ̂ / pe_base^(2i/D).
      context_length: pixels per forward pass in training and in :func:`chunked_predict`.
      dtype: compute dtype, 'float32' or 'bfloat16'; parameters and losses stay float32.
      attention: implementation of every attention layer (:func:`spectrax.nn.attend`; 'auto'
        picks per backend and shape).
    """

    d_model: int = 256
    encoder_heads: tuple[int, ...] = (16, 8)
    encoder_ffn: tuple[int, ...] = (2048, 1024)
    decoder_heads: tuple[int, ...] = (16, 8, 4)
    decoder_ffn: tuple[int, ...] = (2048, 1024, 512)
    decoder_mlp: tuple[int, ...] = (2048, 1024, 512, 256)
    num_token_ids: int = 7520
    pixel_token_id: int = 1
    first_label_token_id: int = 7515
    dropout: float = 0.05
    layer_norm_eps: float = 1e-5
    wavelength_min: float = 15000.0
    wavelength_max: float = 17000.0
    pe_scale: float = 1000.0
    pe_base: float = 10000.0
    context_length: int = 512
    dtype: str = "float32"
    attention: str = "auto"

    def __post_init__(self):
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} unknown; use one of {COMPUTE_DTYPES}")
        if self.d_model <= 0 or self.d_model % 2:
            raise ValueError(f"d_model must be positive and even (sin/cos pairs), "
                             f"got {self.d_model}")
        for name in ("encoder", "decoder"):
            heads, ffn = getattr(self, f"{name}_heads"), getattr(self, f"{name}_ffn")
            if len(heads) != len(ffn) or not heads:
                raise ValueError(f"{name}_heads {heads} and {name}_ffn {ffn} must be non-empty "
                                 "and of equal length (one entry per block)")
            for h in heads:
                if self.d_model % h:
                    raise ValueError(f"d_model {self.d_model} not divisible by {h} heads")
        if not self.decoder_mlp:
            raise ValueError("decoder_mlp needs at least one layer")
        labels = range(self.first_label_token_id, self.first_label_token_id + len(LABEL_NAMES))
        if not 0 < self.pixel_token_id < self.num_token_ids or self.pixel_token_id in labels:
            raise ValueError(f"pixel_token_id {self.pixel_token_id} must be in "
                             f"1..{self.num_token_ids - 1} and not a label id {list(labels)}")
        if labels.start < 1 or labels.stop > self.num_token_ids:
            raise ValueError(f"label ids {list(labels)} do not fit a table of "
                             f"{self.num_token_ids} rows (row 0 is padding)")
        if not self.wavelength_min < self.wavelength_max:
            raise ValueError("need wavelength_min < wavelength_max")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def label_token_ids(self) -> dict[str, int]:
        """{'TEFF': id, 'LOGG': id, ...} for this configuration's table."""
        return {name: self.first_label_token_id + k for k, name in enumerate(LABEL_NAMES)}


_PAPER = SpectraFMConfig()
# Compact token table: padding, the shared pixel id and the five labels — all the rows in use.
_COMPACT_IDS = dict(num_token_ids=2 + len(LABEL_NAMES), pixel_token_id=1, first_label_token_id=2)

VARIANTS: dict[str, SpectraFMConfig] = {
    # The public code, parameter for parameter (11,870,722).
    "paper": _PAPER,
    # CPU width: D=64, the paper's head/FFN halving pattern at a quarter of the width.
    "small": dataclasses.replace(
        _PAPER, d_model=64, encoder_heads=(4, 2), encoder_ffn=(256, 128),
        decoder_heads=(4, 2, 1), decoder_ffn=(256, 128, 64), decoder_mlp=(256, 128, 64, 64),
        **_COMPACT_IDS),
    # Toy width, for tests.
    "tiny": dataclasses.replace(
        _PAPER, d_model=16, encoder_heads=(2, 1), encoder_ffn=(32, 16),
        decoder_heads=(2, 1, 1), decoder_ffn=(32, 16, 8), decoder_mlp=(32, 16), context_length=16,
        **_COMPACT_IDS),
}

# Label token ids of the paper table (the reference vocabulary: 7514 pixel names, then labels).
LABEL_TOKEN_IDS: dict[str, int] = _PAPER.label_token_ids
PIXEL_TOKEN_ID: int = _PAPER.pixel_token_id


def spectrafm_config(variant: str, **overrides) -> SpectraFMConfig:
    """The named SpectraFM configuration ('paper', 'small', 'tiny'), fields optionally
    overridden."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown SpectraFM variant {variant!r}; known: {sorted(VARIANTS)}")
    return dataclasses.replace(VARIANTS[variant], **overrides)


# ------------------------------------------------------------------------------------------------
# Wavelength encoding and token embedding
# ------------------------------------------------------------------------------------------------

def has_wavelength(wavelength):
    """[...] bool: True where λ carries a position (finite and > 0; 0 / −1 / NaN mean none)."""
    wavelength = jnp.asarray(wavelength)
    return jnp.isfinite(wavelength) & (wavelength > 0)


def wavelength_encoding(wavelength, cfg: SpectraFMConfig = _PAPER):
    """SpectraFM's sinusoidal wavelength encoding.

    Args:
      wavelength: [...] float, Å. No position where λ <= 0 or non-finite.
      cfg: supplies D, the range, pe_scale and pe_base.

    Returns:
      [..., D] float32: dim 2i = sin(angle_i), dim 2i+1 = cos(angle_i),
      angle_i = pe_scale·λ̂ / pe_base^(2i/D), λ̂ = (λ − λ_min)/(λ_max − λ_min); zeros where no λ.

    Precision: angles reach ~1000 rad, so float32 gives absolute errors ~1e-4 in the fastest pairs
    (λ − λ_min is exact in float32; the one combined frequency is computed in float64).
    """
    wavelength = jnp.asarray(wavelength, jnp.float32)
    valid = has_wavelength(wavelength)
    offset = jnp.where(valid, wavelength - jnp.float32(cfg.wavelength_min), 0.0)
    i = np.arange(cfg.d_model // 2, dtype=np.float64)
    frequency = (cfg.pe_scale / (cfg.wavelength_max - cfg.wavelength_min)
                 / cfg.pe_base ** (2.0 * i / cfg.d_model))
    angles = offset[..., None] * jnp.asarray(frequency, jnp.float32)
    # Interleave: stack (sin, cos) on a new last axis and flatten -> sin, cos, sin, cos, ...
    pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    pe = pe.reshape(pe.shape[:-2] + (cfg.d_model,))
    return jnp.where(valid[..., None], pe, 0.0)


def check_wavelength_range(wavelength, cfg: SpectraFMConfig = _PAPER) -> None:
    """Raises ValueError if any positioned wavelength lies outside [wavelength_min, max].

    Host-side (numpy); call it on a data set before a jitted loop, where the model cannot check.
    Padding (λ <= 0) and non-finite wavelengths are ignored.
    """
    lam = np.asarray(wavelength, np.float64)
    positioned = np.isfinite(lam) & (lam > 0)
    bad = positioned & ((lam < cfg.wavelength_min) | (lam > cfg.wavelength_max))
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} wavelengths lie outside SpectraFM's encoding range "
            f"[{cfg.wavelength_min:g}, {cfg.wavelength_max:g}] Å (e.g. {lam[bad].flat[0]:g} Å); "
            "the model never saw them. Cut those pixels (set their token id to 0) or use a config "
            "with a wider wavelength_min/wavelength_max (a different model).")


def _lookup(table, ids):
    """Rows of ``table`` [T, D] for ``ids`` [...]: [..., D], with row 0 (padding) forced to zero.

    Masking at lookup keeps padding exactly zero whatever the optimiser does to row 0, and gives
    row 0 no gradient. Ids >= T come back NaN (jnp.take's fill mode), never a silent clamp."""
    rows = jnp.take(table, ids, axis=0)
    return jnp.where((ids == PADDING_TOKEN_ID)[..., None], 0.0, rows)


class TokenEmbedding(nnx.Module):
    """SpectraFM's non-linear token embedding: ``GELU(w[t]·x + b[t]) + PE(λ)``.

    Parameters: ``weight`` and ``bias``, each [num_token_ids, D] (paper: 2 × 7520 × 256).
    Initialisation as the reference: weight ~ U(0, 1), bias Xavier-uniform, row 0 zero.
    """

    def __init__(self, cfg: SpectraFMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        shape = (cfg.num_token_ids, cfg.d_model)
        weight = jax.random.uniform(rngs.params(), shape, jnp.float32)
        bias = nnx.initializers.xavier_uniform()(rngs.params(), shape, jnp.float32)
        self.weight = nnx.Param(weight.at[PADDING_TOKEN_ID].set(0.0))
        self.bias = nnx.Param(bias.at[PADDING_TOKEN_ID].set(0.0))

    def __call__(self, values, wavelength, token_ids):
        """Embeds tokens.

        Args:
          values: [B, N] float32 standardised values (must be finite where token_ids != 0).
          wavelength: [B, N] Å; <= 0 for tokens without a position.
          token_ids: [B, N] int32, 0 = padding.

        Returns:
          [B, N, D] float32; exactly zero for padding tokens (GELU(0) = 0 and no PE).
        """
        w = _lookup(self.weight[...], token_ids)
        b = _lookup(self.bias[...], token_ids)
        e = gelu(w * values[..., None].astype(jnp.float32) + b)
        return e + wavelength_encoding(wavelength, self.cfg)

    def request(self, request_ids):
        """The decoder query of each star: ``w[t]`` of the requested label, [B] -> [B, D]
        (no bias, no GELU, no PE, as in the reference)."""
        return _lookup(self.weight[...], request_ids)


# ------------------------------------------------------------------------------------------------
# Attention with an extra key/value, and the post-LN block
# ------------------------------------------------------------------------------------------------

class AttentionWithExtraKV(MultiHeadAttention):
    """Multi-head attention with one learnable extra key/value (PyTorch ``add_bias_kv=True``).

    After the projections, ``bias_k`` and ``bias_v`` ([D], shared by all samples, split into heads
    like any key) are appended to the keys and values of every sample and are always attendable.
    Every softmax row therefore has at least one valid entry: a sample whose keys are all padding
    attends only to the extra value instead of dividing by zero.

    Parameters: q/k/v/out projections 4·D² + 4·D (inherited from
    :class:`spectrax.nn.MultiHeadAttention`) + bias_k, bias_v 2·D.

    Dropout: as in the shared layer, on the attended values (:func:`spectrax.nn.attend` has
    no attention-weight dropout); the reference drops attention weights instead.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, dropout: float = 0.0, dtype=None,
                 implementation: str | None = "auto", rngs: nnx.Rngs):
        super().__init__(embed_dim, num_heads, dropout=dropout, dtype=dtype,
                         implementation=implementation, rngs=rngs)
        # PyTorch: xavier_normal_ on a (1, 1, D) tensor, i.e. std = 1/sqrt(D).
        init = nnx.initializers.normal(stddev=embed_dim ** -0.5)
        self.bias_k = nnx.Param(init(rngs.params(), (embed_dim,), jnp.float32))
        self.bias_v = nnx.Param(init(rngs.params(), (embed_dim,), jnp.float32))

    def _append(self, x, extra):
        """[B, L, H, Dh] + extra [D] -> [B, L+1, H, Dh]."""
        extra = jnp.broadcast_to(self._split_heads(extra.astype(x.dtype)),
                                 (x.shape[0], 1, self.num_heads, self.head_dim))
        return jnp.concatenate([x, extra], axis=1)

    def __call__(self, q_in, kv_in, key_mask=None, *, deterministic: bool = True,
                 return_weights: bool = False):
        """Attends from ``q_in`` to ``kv_in`` plus the extra key/value.

        Args:
          q_in: [B, Lq, D] queries.
          kv_in: [B, Lk, D] keys/values.
          key_mask: [B, Lk] bool, True = attendable; None = all.
          deterministic: True disables dropout.
          return_weights: also return the softmax weights, averaged over heads.

        Returns:
          [B, Lq, D]; with ``return_weights`` also [B, Lq, Lk] float32 weights of the real keys
          (the extra key's share is 1 minus their sum).
        """
        q = self._split_heads(self.q_proj(q_in))
        k = self._append(self._split_heads(self.k_proj(kv_in)), self.bias_k[...])
        v = self._append(self._split_heads(self.v_proj(kv_in)), self.bias_v[...])
        dtype = jnp.result_type(q, k, v)
        q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
        batch, length = kv_in.shape[0], kv_in.shape[1]
        if key_mask is None:
            key_mask = jnp.ones((batch, length), bool)
        mask = jnp.concatenate([jnp.asarray(key_mask, bool), jnp.ones((batch, 1), bool)], -1)
        mask = mask[:, None, None, :]  # [B, 1, 1, Lk+1] -> broadcast over heads and queries
        weights = None
        if return_weights:
            # Explicit softmax (same maths as the fused call) so the weights can be returned.
            logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
            logits = jnp.where(mask, logits / math.sqrt(self.head_dim), -jnp.inf)
            probs = jax.nn.softmax(logits, axis=-1)
            attended = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32)).astype(dtype)
            weights = probs.mean(axis=1)[..., :-1]
        else:
            attended = attend(q, k, v, mask, implementation=self.implementation)
        attended = self.dropout(attended, deterministic=deterministic)
        out = self.out_proj(attended.reshape(attended.shape[:-2] + (self.embed_dim,)))
        return (out, weights) if return_weights else out


class PostLNBlock(nnx.Module):
    """SpectraFM's transformer block (self- or cross-attention):
    ``h = LN(q + Drop(MHA(q, kv, kv)))``; ``out = LN(h + Drop(W2 GELU(W1 h)))``.

    Parameters: 4D² + 6D (attention) + 2·D·F + F + D (FFN) + 4D (two LayerNorms).
    """

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, *, dropout: float,
                 eps: float, dtype=None, attention: str = "auto", rngs: nnx.Rngs):
        self.attention = AttentionWithExtraKV(d_model, num_heads, dropout=dropout, dtype=dtype,
                                              implementation=attention, rngs=rngs)
        self.linear1 = nnx.Linear(d_model, ffn_dim, dtype=dtype, rngs=rngs)
        self.linear2 = nnx.Linear(ffn_dim, d_model, dtype=dtype, rngs=rngs)
        self.norm1 = nnx.LayerNorm(d_model, epsilon=eps, dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d_model, epsilon=eps, dtype=dtype, rngs=rngs)
        self.dropout1 = Dropout(dropout, rngs=rngs)
        self.dropout2 = Dropout(dropout, rngs=rngs)

    def __call__(self, q, kv, key_mask, *, deterministic: bool, return_weights: bool = False):
        """q: [B, Lq, D]; kv: [B, Lk, D]; key_mask: [B, Lk] bool. Returns [B, Lq, D]
        (and the head-averaged weights [B, Lq, Lk] with ``return_weights``)."""
        attended = self.attention(q, kv, key_mask, deterministic=deterministic,
                                  return_weights=return_weights)
        weights = None
        if return_weights:
            attended, weights = attended
        h = self.norm1(q + self.dropout1(attended, deterministic=deterministic))
        ffn = self.linear2(gelu(self.linear1(h)))
        out = self.norm2(h + self.dropout2(ffn, deterministic=deterministic))
        return (out, weights) if return_weights else out


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------

def _blocks(cfg: SpectraFMConfig, heads, ffns, rngs):
    return nnx.List([
        PostLNBlock(cfg.d_model, h, f, dropout=cfg.dropout, eps=cfg.layer_norm_eps,
                    dtype=cfg.compute_dtype, attention=cfg.attention, rngs=rngs)
        for h, f in zip(heads, ffns)])


class SpectraFMDecoder(nnx.Module):
    """Request token -> cross-attention blocks over the encoder output -> MLP -> two heads.

    Sub-modules: ``blocks/0..`` (cross-attention, no decoder self-attention), ``mlp/0..``
    (Linear + GELU + dropout), ``pred_head`` and ``logvar_head`` (Linear → 1).
    """

    def __init__(self, cfg: SpectraFMConfig, *, rngs: nnx.Rngs):
        dtype = cfg.compute_dtype
        self.blocks = _blocks(cfg, cfg.decoder_heads, cfg.decoder_ffn, rngs)
        widths = (cfg.d_model,) + tuple(cfg.decoder_mlp)
        self.mlp = nnx.List([nnx.Linear(a, b, dtype=dtype, rngs=rngs)
                             for a, b in zip(widths[:-1], widths[1:])])
        self.dropout = Dropout(cfg.dropout, rngs=rngs)
        self.pred_head = nnx.Linear(widths[-1], 1, dtype=dtype, rngs=rngs)
        self.logvar_head = nnx.Linear(widths[-1], 1, dtype=dtype, rngs=rngs)

    def __call__(self, query, memory, key_mask, *, deterministic: bool,
                 return_attention: bool = False):
        """query: [B, 1, D]; memory: [B, N, D]; key_mask: [B, N] bool.

        Returns (prediction [B], log_variance [B], attention [B, N] float32 or None): the last
        block's head-averaged cross-attention weights of the request token."""
        x, weights = query, None
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if return_attention and i == last:
                x, weights = block(x, memory, key_mask, deterministic=deterministic,
                                   return_weights=True)
                weights = weights[:, 0, :]
            else:
                x = block(x, memory, key_mask, deterministic=deterministic)
        x = x[:, 0, :]
        for layer in self.mlp:
            x = self.dropout(gelu(layer(x)), deterministic=deterministic)
        return self.pred_head(x)[:, 0], self.logvar_head(x)[:, 0], weights


class SpectraFM(nnx.Module):
    """SpectraFM: pixels + wavelengths in, one requested label (prediction, log-variance) out.

    Sub-modules: ``embedding`` (weight, bias tables), ``encoder/0..`` (self-attention blocks),
    ``decoder`` (:class:`SpectraFMDecoder`). Stage-3 fine-tuning in the paper freezes
    ``encoder/1`` and ``decoder``.
    """

    def __init__(self, cfg: SpectraFMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embedding = TokenEmbedding(cfg, rngs=rngs)
        self.encoder = _blocks(cfg, cfg.encoder_heads, cfg.encoder_ffn, rngs)
        self.decoder = SpectraFMDecoder(cfg, rngs=rngs)

    def _check_inputs(self, wavelength, token_ids, key_mask):
        """Eager-only checks of the encoder inputs (on concrete arrays); under jit see
        :meth:`__call__`."""
        ids = np.asarray(token_ids)
        if ids.min(initial=0) < 0 or ids.max(initial=0) >= self.cfg.num_token_ids:
            raise ValueError(f"token_ids must lie in 0..{self.cfg.num_token_ids - 1}, got "
                             f"{ids.min()}..{ids.max()}")
        check_wavelength_range(np.where(np.asarray(key_mask), np.asarray(wavelength), 0.0),
                               self.cfg)

    def __call__(self, values, wavelength, token_ids, request_ids, *, train: bool = False,
                 return_attention: bool = False):
        """Predicts the requested label of each star.

        Args:
          values: [B, N] float32, standardised pixel fluxes (and/or known labels); NaN = bad.
          wavelength: [B, N] float32 Å; 0 (or −1) for padding and label tokens.
          token_ids: [B, N] int32; 0 = padding, cfg.pixel_token_id for pixels, label ids.
          request_ids: [B] int32, the label token id to predict for each star.
          train: enables dropout (needs the module's 'dropout' rng stream).
          return_attention: also return the last decoder block's cross-attention.

        Returns:
          (prediction [B], log_variance [B]) float32, in standardised label units; plus
          attention [B, N] float32 (head-averaged, raw: padded keys ~0, the extra key's share not
          included) when ``return_attention``.

        Keys are valid where token_ids != 0 and values are finite; such invalid tokens are
        embedded as padding (zero). Eagerly, bad ids and out-of-range wavelengths raise
        ValueError; under jit they cannot, so an unknown request id yields a NaN prediction.
        """
        request_ids = jnp.asarray(request_ids, jnp.int32)
        memory, key_mask = self.encode(values, wavelength, token_ids, train=train)
        return self.decode(memory, key_mask, request_ids, train=train,
                           return_attention=return_attention)

    def encode(self, values, wavelength, token_ids, *, train: bool = False):
        """The request-independent half of :meth:`__call__`: embedding + encoder blocks.

        Chunked inference encodes each chunk once and decodes every requested label from the
        same memory (:meth:`decode`), instead of running the encoder once per label.

        Args: as :meth:`__call__`.

        Returns:
          (memory [B, N, D] in the compute dtype, key_mask [B, N] bool).
        """
        values = jnp.asarray(values, jnp.float32)
        token_ids = jnp.asarray(token_ids, jnp.int32)
        if values.shape[-1] > self.cfg.context_length:  # shapes are static: raises under jit too
            raise ValueError(
                f"{values.shape[-1]} tokens exceed the context of {self.cfg.context_length}; "
                "longer spectra go through chunked inference (spectrafm.chunked_predict, or "
                "SpectraFMTask.predict, which spectrax.predict uses)")
        key_mask = (token_ids != PADDING_TOKEN_ID) & jnp.isfinite(values)
        if _is_concrete(values, wavelength, token_ids):
            self._check_inputs(wavelength, token_ids, key_mask)
        # As in the reference: a bad value becomes a padding token (zero embedding, no PE).
        safe_ids = jnp.where(key_mask, token_ids, PADDING_TOKEN_ID)
        safe_values = jnp.where(key_mask, values, 0.0)
        safe_wavelength = jnp.where(key_mask, jnp.asarray(wavelength, jnp.float32), 0.0)

        x = self.embedding(safe_values, safe_wavelength, safe_ids).astype(self.cfg.compute_dtype)
        for block in self.encoder:
            x = block(x, x, key_mask, deterministic=not train)
        return x, key_mask

    def decode(self, memory, key_mask, request_ids, *, train: bool = False,
               return_attention: bool = False):
        """The request half of :meth:`__call__`: the request token through the decoder.

        Args:
          memory, key_mask: from :meth:`encode`.
          request_ids: [B] int32 label token ids.

        Returns: as :meth:`__call__`.
        """
        request_ids = jnp.asarray(request_ids, jnp.int32)
        if _is_concrete(request_ids):
            unknown = sorted(set(np.asarray(request_ids).ravel().tolist())
                             - set(self.cfg.label_token_ids.values()))
            if unknown:
                raise ValueError(f"request_ids {unknown} are not label token ids of this model; "
                                 f"known labels: {self.cfg.label_token_ids}")
        query = self.embedding.request(request_ids)[:, None, :].astype(self.cfg.compute_dtype)
        pred, logvar, attention = self.decoder(query, memory, key_mask, deterministic=not train,
                                               return_attention=return_attention)
        known = jnp.isin(request_ids, jnp.asarray(list(self.cfg.label_token_ids.values())))
        pred = jnp.where(known, pred.astype(jnp.float32), jnp.nan)
        logvar = jnp.where(known, logvar.astype(jnp.float32), jnp.nan)
        return (pred, logvar, attention) if return_attention else (pred, logvar)


# ------------------------------------------------------------------------------------------------
# Loss, sampling, standardisation
# ------------------------------------------------------------------------------------------------

def spectrafm_loss(pred, logvar, y, sigma_label, valid):
    """Gaussian negative log-likelihood with the label's own uncertainty added, in float32.

    total_var = exp(logvar) + σ_label² + 1e-8; L = ½[(y − ŷ)²/total_var + ln total_var], averaged
    over valid rows (0 when none is valid).

    Args:
      pred, logvar: [B] model outputs (standardised label units).
      y: [B] target, standardised; may be NaN where not valid.
      sigma_label: [B] label uncertainty in standardised units (σ / MAD-std); NaN -> treated as 0.
      valid: [B] bool, rows that count.
    """
    pred, logvar, y, sigma = (jnp.asarray(a, jnp.float32) for a in (pred, logvar, y, sigma_label))
    valid = jnp.asarray(valid, bool)
    # Substitute before computing so NaN targets cannot leak into the gradient through where.
    y = jnp.where(valid, y, pred)
    sigma = jnp.where(valid & jnp.isfinite(sigma), sigma, 0.0)
    logvar = jnp.where(valid, logvar, 0.0)
    total_var = jnp.exp(logvar) + sigma ** 2 + 1e-8
    per_row = 0.5 * ((y - pred) ** 2 / total_var + jnp.log(total_var))
    count = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, per_row, 0.0)) / jnp.maximum(count, 1)


def sample_pixels(key, valid_mask, n: int = 512):
    """Up to ``n`` distinct valid pixels per star, uniformly at random (jit-friendly).

    Args:
      key: PRNG key.
      valid_mask: [B, L] bool, True = usable pixel.
      n: pixels per star (the context length).

    Returns:
      (indices [B, n] int32, mask [B, n] bool). Stars with fewer than n valid pixels get all of
      them; the remaining slots have mask False (their index is arbitrary: gather, then set the
      token id to 0 where mask is False).
    """
    valid_mask = jnp.asarray(valid_mask, bool)
    batch, length = valid_mask.shape
    if length < n:  # pad the pixel axis so top-n is defined; the pad is never valid
        valid_mask = jnp.pad(valid_mask, ((0, 0), (0, n - length)))
    # Random scores with invalid pixels pushed behind every valid one: the n smallest are a
    # uniform random subset of the valid pixels (or all of them, then invalid ones).
    scores = jax.random.uniform(key, valid_mask.shape) + jnp.where(valid_mask, 0.0, 2.0)
    _, indices = jax.lax.top_k(-scores, n)
    mask = jnp.take_along_axis(valid_mask, indices, axis=1)
    indices = jnp.where(mask, indices, 0).astype(jnp.int32)
    return indices, mask


def sample_request(key, label_mask):
    """One label index per star, uniform among its known labels (never an unknown one).

    Args:
      key: PRNG key.
      label_mask: [B, K] bool, True = label known (not NaN).

    Returns:
      (index [B] int32 in 0..K−1, valid [B] bool); valid is False for stars without any known
      label (their index is 0 and must not be used).
    """
    label_mask = jnp.asarray(label_mask, bool)
    # Gumbel-max: argmax of Gumbel noise over the allowed entries is a uniform draw among them.
    noise = jax.random.gumbel(key, label_mask.shape)
    index = jnp.argmax(jnp.where(label_mask, noise, -jnp.inf), axis=-1).astype(jnp.int32)
    return index, jnp.any(label_mask, axis=-1)


def fit_standardizer(x):
    """Robust per-column statistics on the host.

    Args:
      x: [N, L] array (rows = stars, columns = pixels or labels), NaN = missing.

    Returns:
      (median [L], mad_std [L]) float64: nan-median and 1.4826 · nan-median(|x − median|).
      Columns with no finite value give NaN; constant columns give mad_std 0 (every z is then
      NaN or ±inf and is masked by :func:`standardize`).
    """
    x = np.asarray(x, np.float64)
    median = np.nanmedian(x, axis=0)
    mad_std = MAD_TO_STD * np.nanmedian(np.abs(x - median), axis=0)
    return median, mad_std


def standardize(x, stats):
    """z = (x − median) / mad_std, with |z| > 10 (and non-finite z) set to NaN (= masked).

    Works on numpy or jax arrays, [..., L] with stats of shape [L]. Returns float32."""
    median, mad_std = stats
    xp = jnp if isinstance(x, jax.Array) else np
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (xp.asarray(x, xp.float32) - xp.asarray(median, xp.float32)) / xp.asarray(
            mad_std, xp.float32)
        return xp.where(xp.abs(z) <= STANDARDIZE_CLIP, z, xp.nan)


# ------------------------------------------------------------------------------------------------
# Inference on long spectra and attention maps
# ------------------------------------------------------------------------------------------------

def chunk_permutation(num_pixels: int, seed: int = 0) -> np.ndarray:
    """The fixed random pixel order of chunked inference: numpy's legacy
    ``RandomState(seed).permutation`` (the reference seeds ``np.random.seed(0)``)."""
    return np.random.RandomState(seed).permutation(num_pixels)


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """How spectra longer than the context are cut for inference: the pixels of
    ``[first, stop)`` in a fixed random order (:func:`chunk_permutation`, the same for every
    star), in ``n_chunks`` chunks of ``context`` pixels, the last padded.

    Attributes:
      order: [P] int pixel indices, in chunk order.
      n_chunks, context: chunks and pixels per chunk.
    """

    order: np.ndarray
    n_chunks: int
    context: int

    def arrange(self, x, fill):
        """[B, L] (numpy or jax) -> [C, B, context], padding with ``fill``."""
        pad = self.n_chunks * self.context - self.order.size
        x = jnp.pad(jnp.asarray(x)[:, self.order], ((0, 0), (0, pad)), constant_values=fill)
        return jnp.moveaxis(x.reshape(x.shape[0], self.n_chunks, self.context), 1, 0)

    def positions(self) -> np.ndarray:
        """[C, context] the pixel index each chunk slot holds (−1 on padding)."""
        pad = self.n_chunks * self.context - self.order.size
        return np.pad(self.order, (0, pad), constant_values=-1).reshape(self.n_chunks,
                                                                         self.context)


def chunk_layout(num_pixels: int, context: int, seed: int = 0,
                 pixel_range: tuple[int, int] = (0, 0)) -> ChunkLayout:
    """The chunks of a ``num_pixels`` grid (only ``pixel_range`` = [first, stop) of it when
    that is non-empty), ``context`` pixels each."""
    a, b = pixel_range if pixel_range[1] > pixel_range[0] else (0, num_pixels)
    order = a + chunk_permutation(b - a, seed)
    return ChunkLayout(order, -(-order.size // context), int(context))


def chunked_predict(model: "SpectraFM", values, wavelength, ok, request_ids,
                    layout: ChunkLayout, *, return_attention: bool = False):
    """Predicts labels from spectra longer than the context: the ONE chunked inference
    (the task's predictions, the catalogue, evaluation and attention maps all use it).

    Each chunk is encoded once (the encoder does not see the request) and decoded for every
    requested label. Per star, the prediction is the mean over chunks and the uncertainty is
    the MEAN OF THE PER-CHUNK σ = exp(½ logvar), as in the reference: not the inverse-variance
    combination, since the chunks see the same star, so their errors are not independent and
    σ/√n_chunks would be overconfident. Chunks in which a star has no valid pixel are left out
    of its means (NaN if none). Jittable.

    Args:
      model: a SpectraFM (train=False is used).
      values: [B, L] standardised flux; wavelength: [B, L] Å; ok: [B, L] bool, usable pixels.
      request_ids: K label token ids.
      layout: :func:`chunk_layout` of L.
      return_attention: also return the decoder's attention [C, K, B, context] and the chunk
        masks [C, B, context].

    Returns:
      (prediction [B, K], σ [B, K]) in standardised units (plus attention and masks).
    """
    vals = layout.arrange(values, 0.0)
    wave = layout.arrange(wavelength, 0.0)
    oks = layout.arrange(ok, False)
    b = vals.shape[1]

    def one_chunk(args):
        v, w, o = args
        ids = jnp.where(o, model.cfg.pixel_token_id, PADDING_TOKEN_ID)
        memory, key_mask = model.encode(v, jnp.where(o, w, 0.0), ids, train=False)
        outs = [model.decode(memory, key_mask, jnp.full((b,), r, jnp.int32), train=False,
                             return_attention=return_attention) for r in request_ids]
        preds = jnp.stack([o_[0] for o_ in outs], 1)
        sig = jnp.exp(0.5 * jnp.stack([o_[1] for o_ in outs], 1))
        att = jnp.stack([o_[2] for o_ in outs], 0) if return_attention else None
        return preds, sig, att

    preds, sigmas, att = jax.lax.map(one_chunk, (vals, wave, oks))   # [C, B, K]
    usable = oks.any(-1)[:, :, None]                                   # [C, B, 1]
    n = jnp.maximum(usable.sum(0), 1)
    pred = jnp.where(usable.any(0), jnp.sum(jnp.where(usable, preds, 0.0), 0) / n, jnp.nan)
    sigma = jnp.where(usable.any(0), jnp.sum(jnp.where(usable, sigmas, 0.0), 0) / n, jnp.nan)
    if return_attention:
        return pred, sigma, att, oks
    return pred, sigma


def attention_map(attention, key_mask, pixel_index, num_pixels: int):
    """Per-pixel attention averaged over stars (the paper's attention maps), host-side.

    Args:
      attention: [B, n] last-decoder-block weights (``return_attention=True``).
      key_mask: [B, n] bool, True = real pixel token.
      pixel_index: [B, n] int, position of each token in the full spectrum (0..num_pixels−1).
      num_pixels: length of the full spectrum.

    Returns:
      [num_pixels] float64: per star, padded keys zeroed and weights renormalised to sum 1, then
      scattered to pixel positions; each pixel averaged over the stars that contained it (0 where
      none did).
    """
    att = np.where(np.asarray(key_mask), np.asarray(attention, np.float64), 0.0)
    total = att.sum(axis=1, keepdims=True)
    att = np.where(total > 0, att / np.where(total > 0, total, 1.0), 0.0)
    index = np.asarray(pixel_index)
    valid = np.asarray(key_mask, bool)
    summed = np.bincount(index[valid], weights=att[valid], minlength=num_pixels)
    seen = np.bincount(index[valid], minlength=num_pixels)
    return np.where(seen > 0, summed / np.maximum(seen, 1), 0.0)
