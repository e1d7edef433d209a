"""PyTorch eager baselines of the spectrax models, for the throughput comparison of
``python -m benchmarks.run --torch``.

Straightforward PyTorch (``nn.Linear``, ``nn.Conv1d``, ``nn.LayerNorm``,
``F.scaled_dot_product_attention``) written from the spectrax modules, layer for layer, at the
sizes of a spectrax config dataclass, so the FLOPs and parameter counts are the same:

* :class:`SpecPT` — ``spectrax.models.specpt`` (the 'paper' architecture used by the 'small'
  variant: conv stem, flatten -> projection, post-LN encoder and decoder over a sequence of
  length one, linear1/linear2 back to pixels; and the 'tokens' architecture: stem positions as
  tokens, wavelength embedding, pre-LN stacks with key-padding masks, per-token pixel head,
  30 % of the blocks hidden in training).
* :class:`Tokenizer` — ``spectrax.models.tokenizer`` (patch embed 2P -> D + pooled sinusoidal
  wavelength embedding, pre-LN encoder/decoder stacks with final LayerNorms, pixel head).
* :class:`SpectraFM` — ``spectrax.models.spectrafm`` (GELU(w·x + b) + PE per token, post-LN blocks
  whose attention has an extra key/value, decoder cross-attention from one request token, MLP,
  prediction and log-variance heads).
* :class:`ViT` — ``spectrax.models.vit``: Hugging Face ``ViTModel`` (no pooler, SDPA attention)
  + a linear head on the CLS token, the architecture spectrax mirrors (its weights load from
  either). The images are rendered once per batch by spectrax's own renderer (the config's
  representation, jitted) outside the timed PyTorch step, which therefore does not include the
  rendering the spectrax step does inside: the comparison favours PyTorch by that much.
* :class:`Transformer1D` — ``spectrax.models.transformer1d`` (flux and wavelength projections of
  P-pixel tokens + sinusoidal position encoding, post-LN encoder with key masks, masked mean
  pooling, MLP head).

Each comes with the loss of its spectrax task, computed from the same batch the jax step gets
(median normalisation, SpectraFM's pixel and label sampling, ... all inside the step, as in
spectrax), and :class:`TorchTrainStep` runs forward + backward + gradient clipping + AdamW.

Weights are not shared with jax (the comparison is about speed); parameter counts are checked
equal to the spectrax model's by :func:`check_parameter_count`. Differences that change no
FLOP count: ``torch.nanmedian`` returns the lower of the two middle values where jax averages
them; dropout masks come from torch's generator.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ==============================================================================================
# Shared layers (spectrax.nn)
# ==============================================================================================
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}  # F.gelu is the exact (erf) form, as spectrax
_EXPLICIT_ATTENTION = [False]


@contextlib.contextmanager
def explicit_attention():
    """Within this context :class:`Attention` computes softmax(q kᵀ/√d) v with explicit matmuls
    instead of ``F.scaled_dot_product_attention``: the same FLOPs, but visible to
    ``torch.utils.flop_counter`` (which has no formula for SDPA's CPU kernel). Not for timing."""
    _EXPLICIT_ATTENTION[0] = True
    try:
        yield
    finally:
        _EXPLICIT_ATTENTION[0] = False


def _sdpa(q, k, v, mask):
    if not _EXPLICIT_ATTENTION[0]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


class Attention(nn.Module):
    """``spectrax.nn.MultiHeadAttention`` (and SpectraFM's extra-key/value subclass).

    q/k/v/out projections D -> D with bias (4D² + 4D parameters, + 2D for ``extra_kv``);
    boolean key masks, True = valid. Without ``extra_kv``, a sample with no valid key attends
    everywhere and its output is zeroed (spectrax's guard; PyTorch's own MHA returns NaN there).
    Dropout is applied to the attended values before ``out_proj``, where spectrax applies it.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0,
                 extra_kv: bool = False):
        super().__init__()
        self.num_heads, self.head_dim, self.dropout = num_heads, d_model // num_heads, dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.extra_kv = extra_kv
        if extra_kv:
            self.bias_k = nn.Parameter(torch.randn(d_model) * d_model ** -0.5)
            self.bias_v = nn.Parameter(torch.randn(d_model) * d_model ** -0.5)

    def _heads(self, x):
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)   # [B, H, N, Dh]

    def forward(self, q_in, kv_in, key_mask=None):
        b, lq, d = q_in.shape
        q, k, v = (self._heads(self.q_proj(q_in)), self._heads(self.k_proj(kv_in)),
                   self._heads(self.v_proj(kv_in)))
        has_valid = None
        if self.extra_kv:
            # The extra key/value is appended to every sample and is always attendable.
            extra = lambda p: p.view(1, self.num_heads, 1, self.head_dim).expand(  # noqa: E731
                b, -1, -1, -1)
            k = torch.cat([k, extra(self.bias_k)], dim=2)
            v = torch.cat([v, extra(self.bias_v)], dim=2)
            if key_mask is None:
                key_mask = torch.ones(b, kv_in.shape[1], dtype=torch.bool, device=q_in.device)
            key_mask = torch.cat([key_mask, torch.ones(b, 1, dtype=torch.bool,
                                                       device=q_in.device)], dim=1)
        elif key_mask is not None:
            has_valid = key_mask.any(-1)
            key_mask = key_mask | ~has_valid[:, None]
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = _sdpa(q, k, v, mask)
        out = F.dropout(out, self.dropout, self.training)
        out = self.out_proj(out.transpose(1, 2).reshape(b, lq, d))
        if has_valid is not None:
            out = torch.where(has_valid[:, None, None], out, torch.zeros((), dtype=out.dtype))
        return out


class EncoderLayer(nn.Module):
    """``spectrax.nn.TransformerEncoderLayer``: self-attention + feed-forward, post- or pre-LN."""

    def __init__(self, d_model, num_heads, ffn_dim, dropout=0.1, activation="relu",
                 norm_first=False, eps=1e-5):
        super().__init__()
        self.self_attn = Attention(d_model, num_heads, dropout)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.p, self.act, self.norm_first = dropout, _ACTIVATIONS[activation], norm_first

    def _ffn(self, x):
        h = F.dropout(self.act(self.linear1(x)), self.p, self.training)
        return F.dropout(self.linear2(h), self.p, self.training)

    def forward(self, x, key_mask=None):
        drop = lambda t: F.dropout(t, self.p, self.training)  # noqa: E731
        if self.norm_first:
            h = self.norm1(x)
            x = x + drop(self.self_attn(h, h, key_mask))
            return x + self._ffn(self.norm2(x))
        x = self.norm1(x + drop(self.self_attn(x, x, key_mask)))
        return self.norm2(x + self._ffn(x))


class DecoderLayer(nn.Module):
    """``spectrax.nn.TransformerDecoderLayer`` (post-LN, as SpecPT 'paper' uses it)."""

    def __init__(self, d_model, num_heads, ffn_dim, dropout=0.1, activation="relu", eps=1e-5):
        super().__init__()
        self.self_attn = Attention(d_model, num_heads, dropout)
        self.multihead_attn = Attention(d_model, num_heads, dropout)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.norm3 = nn.LayerNorm(d_model, eps=eps)
        self.p, self.act = dropout, _ACTIVATIONS[activation]

    def forward(self, x, memory):
        drop = lambda t: F.dropout(t, self.p, self.training)  # noqa: E731
        x = self.norm1(x + drop(self.self_attn(x, x)))
        x = self.norm2(x + drop(self.multihead_attn(x, memory)))
        h = F.dropout(self.act(self.linear1(x)), self.p, self.training)
        return self.norm3(x + drop(self.linear2(h)))


class Stack(nn.Module):
    """``spectrax.nn.TransformerEncoder``: encoder layers and an optional final LayerNorm."""

    def __init__(self, num_layers, d_model, num_heads, ffn_dim, dropout, activation, norm_first,
                 eps, final_norm):
        super().__init__()
        self.layers = nn.ModuleList([
            EncoderLayer(d_model, num_heads, ffn_dim, dropout, activation, norm_first, eps)
            for _ in range(num_layers)])
        self.norm = nn.LayerNorm(d_model, eps=eps) if final_norm else None

    def forward(self, x, key_mask=None):
        for layer in self.layers:
            x = layer(x, key_mask)
        return x if self.norm is None else self.norm(x)


def sinusoidal_embedding(x, dim: int, min_period: float, max_period: float):
    """``spectrax.nn.sinusoidal_embedding``: [..., dim] = [sin(2πx/p_k)]_k ++ [cos(2πx/p_k)]_k."""
    periods = np.geomspace(min_period, max_period, dim // 2)
    freq = torch.as_tensor(2.0 * math.pi / periods, dtype=torch.float32)
    angles = x.float()[..., None] * freq
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class WavelengthEmbedding(nn.Module):
    """``spectrax.nn.WavelengthEmbedding``: sinusoids of log10(λ/Å) (+ optional Linear); zero
    where λ <= 0 (padding)."""

    def __init__(self, features: int, out_features: int | None, min_period: float,
                 max_period: float):
        super().__init__()
        self.features, self.min_period, self.max_period = features, min_period, max_period
        self.proj = None if out_features is None else nn.Linear(features, out_features)

    def forward(self, wavelength):
        valid = wavelength > 0
        x = torch.log10(torch.where(valid, wavelength, torch.ones_like(wavelength)))
        emb = sinusoidal_embedding(x, self.features, self.min_period, self.max_period)
        if self.proj is not None:
            emb = self.proj(emb)
        return torch.where(valid[..., None], emb, torch.zeros((), dtype=emb.dtype))


def median_normalise(flux, ivar, mask, min_scale: float = 1e-6):
    """``spectrax.data.preprocess.median_normalise`` -> (flux_n, ivar_n, scale, used_fallback)."""
    flux = torch.where(mask, flux, torch.zeros(()))
    med = torch.nanmedian(torch.where(mask, flux, torch.full((), float("nan"))), dim=-1).values
    n_valid = mask.sum(-1)
    mean_abs = flux.abs().sum(-1) / n_valid.clamp(min=1)
    med = torch.where(n_valid > 0, med, torch.zeros(()))
    use_median = med > min_scale
    scale = torch.where(use_median, med,
                        torch.where(mean_abs > min_scale, mean_abs, torch.ones(())))
    ivar_n = torch.where(mask, ivar * scale[:, None] ** 2, torch.zeros(()))
    return flux / scale[:, None], ivar_n, scale, ~use_median


# ==============================================================================================
# SpecPT (spectrax.models.specpt)
# ==============================================================================================
def _blocks(x, length_tokens: int, block: int, fill: float):
    """[B, L] -> [B, T, S] pixel blocks (``specpt.token_blocks``), ``fill`` past L."""
    pad = length_tokens * block - x.shape[1]
    return F.pad(x, (0, pad), value=fill).view(x.shape[0], length_tokens, block)


class SpecPT(nn.Module):
    """The SpecPT autoencoder at the sizes of a ``spectrax.models.specpt.SpecPTConfig``.

    forward(flux_n [B, L], mask [B, L] bool, wavelength [B, L] Å) -> reconstruction [B, L]."""

    def __init__(self, cfg):
        from spectrax.models import specpt
        super().__init__()
        self.cfg = cfg
        self.num_tokens = cfg.num_tokens
        _, self.block = specpt.stem_token_geometry(cfg)
        chans = (1,) + tuple(cfg.conv_channels)
        self.stem = nn.ModuleList([
            nn.Sequential(nn.Conv1d(c_in, c_out, k, s, p),
                          nn.BatchNorm1d(c_out, eps=cfg.batch_norm_eps,
                                         momentum=cfg.batch_norm_momentum), nn.ReLU())
            for c_in, c_out, k, s, p in zip(chans[:-1], chans[1:], cfg.conv_kernels,
                                            cfg.conv_strides, cfg.conv_paddings)])
        self.pool = nn.MaxPool1d(cfg.pool_kernel, cfg.pool_stride, cfg.pool_padding)
        stack = lambda n: Stack(n, cfg.d_model, cfg.num_heads, cfg.ffn_dim,  # noqa: E731
                                cfg.dropout, cfg.activation, cfg.norm_first,
                                cfg.layer_norm_eps, final_norm=cfg.norm_first)
        self.transformer = stack(cfg.num_encoder_layers)
        if cfg.architecture == "paper":
            self.proj = nn.Linear(cfg.flat_features, cfg.d_model)
            self.decoder = nn.ModuleList([
                DecoderLayer(cfg.d_model, cfg.num_heads, cfg.ffn_dim, cfg.dropout,
                             cfg.activation, cfg.layer_norm_eps)
                for _ in range(cfg.num_decoder_layers)])
            self.linear1 = nn.Linear(cfg.d_model, cfg.flat_features)
            self.linear2 = nn.Linear(cfg.flat_features, cfg.input_length)
        else:
            self.token_proj = nn.Linear(cfg.conv_channels[-1], cfg.d_model)
            self.wavelength_embedding = WavelengthEmbedding(
                cfg.wavelength_sinusoids, cfg.d_model, cfg.wavelength_min_period,
                cfg.wavelength_max_period)
            self.decoder = stack(cfg.num_decoder_layers)
            self.pixel_head = nn.Linear(cfg.d_model, self.block)

    def _stem(self, flux):
        x = flux[:, None, :]                                                   # [B, 1, L]
        for block in self.stem:
            x = block(x)
        return self.pool(x)                                                    # [B, C, T]

    def _token_mask(self, mask, t):
        valid = _blocks(mask.float(), t, self.block, 0.0).sum(-1)
        in_range = _blocks(torch.ones(1, mask.shape[1]), t, self.block, 0.0).sum(-1)
        return 2.0 * valid > in_range

    def _token_wavelength(self, wavelength, t):
        blocks = _blocks(wavelength, t, self.block, -1.0)
        has = blocks > 0
        count = has.sum(-1)
        total = torch.where(has, blocks, torch.zeros(())).sum(-1)
        return torch.where(count > 0, total / count.clamp(min=1), torch.full((), -1.0))

    def forward(self, flux, mask, wavelength):
        b, length = flux.shape
        if self.cfg.architecture == "paper":
            flat = self._stem(flux).flatten(1)        # channel-major, like spectrax's transpose
            x = self.transformer(self.proj(flat)[:, None, :])      # a sequence of length ONE
            seq = x
            for layer in self.decoder:                 # target = memory = encoder output
                seq = layer(seq, x)
            return self.linear2(F.relu(self.linear1(seq[:, 0, :])))
        t = -(-length // self.block)
        if self.training and self.cfg.mask_ratio > 0:
            # Masked autoencoding: hide whole token blocks (dropout on ones, as spectrax).
            keep = F.dropout(torch.ones(b, t), self.cfg.mask_ratio, True) > 0
            keep_px = keep.repeat_interleave(self.block, dim=1)[:, :length]
            flux, mask = torch.where(keep_px, flux, torch.zeros(())), mask & keep_px
        flux = torch.where(mask, flux, torch.zeros(()))
        feats = self._stem(flux).transpose(1, 2)                               # [B, T, C]
        tokens = self.token_proj(feats) + self.wavelength_embedding(
            self._token_wavelength(wavelength, t))
        tmask = self._token_mask(mask, t)
        decoded = self.decoder(self.transformer(tokens, tmask), tmask)
        return self.pixel_head(decoded).reshape(b, -1)[:, :length]


def specpt_loss(model: SpecPT, batch: dict) -> torch.Tensor:
    """``spectrax.tasks.ReconstructionTask`` (L1): mean |recon − flux_n| over valid pixels."""
    flux_n, _, _, _ = median_normalise(batch["flux"], batch["ivar"], batch["mask"])
    recon = model(flux_n, batch["mask"], batch["wavelength"])
    w = (batch["mask"] & batch["valid"][:, None]).float()
    return ((recon - flux_n).abs() * w).sum() / w.sum().clamp(min=1.0)


# ==============================================================================================
# Universal spectral tokenizer (spectrax.models.tokenizer)
# ==============================================================================================
class Tokenizer(nn.Module):
    """The tokenizer autoencoder at the sizes of a ``tokenizer.TokenizerConfig``.

    forward(flux, mask, wavelength, ivar) on raw spectra -> (reconstruction, flux_n, sigma_n,
    valid): normalisation, patches, encoder, decoder, pixel head, as spectrax."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.d_model, cfg.patch_size
        self.wavelength_embedding = WavelengthEmbedding(
            d, None, cfg.wavelength_min_period, cfg.wavelength_max_period)
        self.patch_embed = nn.Linear(2 * p, d)
        stack = lambda n: Stack(n, d, cfg.num_heads, cfg.mlp_dim, cfg.dropout,  # noqa: E731
                                cfg.activation, True, cfg.layer_norm_eps, final_norm=True)
        self.encoder = stack(cfg.num_encoder_layers)
        self.decoder = stack(cfg.num_decoder_layers)
        self.pixel_head = nn.Linear(d, p)

    def _patches(self, x, fill):
        p = self.cfg.patch_size
        n = -(-x.shape[1] // p)
        return F.pad(x, (0, n * p - x.shape[1]), value=fill).view(x.shape[0], n, p)

    def embed_wavelength(self, wavelength):
        """Mean per-pixel sinusoidal embedding of each patch over pixels with λ > 0."""
        wave = self._patches(wavelength, -1.0)                                 # [B, N, P]
        count = (wave > 0).sum(-1)
        total = self.wavelength_embedding(wave).sum(-2)                        # [B, N, D]
        return total / count.clamp(min=1)[..., None].to(total.dtype)

    def forward(self, flux, mask, wavelength, ivar):
        ok = torch.isfinite(ivar) & (ivar > 0)
        sigma = torch.where(ok, torch.rsqrt(torch.where(ok, ivar, torch.ones(()))),
                            torch.zeros(()))
        valid = mask & (wavelength > 0) & torch.isfinite(flux) & torch.isfinite(sigma) & (
            sigma > 0)
        zero = torch.zeros(())
        flux, sigma = torch.where(valid, flux, zero), torch.where(valid, sigma, zero)
        median = torch.nanmedian(torch.where(valid, flux, torch.full((), float("nan"))),
                                 dim=-1).values
        median = torch.where(valid.any(-1), median, zero)
        scale = median.clamp(min=self.cfg.min_scale)
        flux_n, sigma_n = flux / scale[:, None], sigma / scale[:, None]
        values = torch.cat([self._patches(flux_n, 0.0), self._patches(sigma_n, 0.0)], dim=-1)
        x = self.patch_embed(values) + self.embed_wavelength(wavelength)
        token_mask = 2 * self._patches(valid.to(torch.int32), 0).sum(-1) > self.cfg.patch_size
        tokens = self.encoder(x, token_mask)
        # Decoding onto the input grid embeds its wavelengths again, as spectrax's decode().
        x = self.decoder(tokens + self.embed_wavelength(wavelength), token_mask)
        recon = self.pixel_head(x).reshape(x.shape[0], -1)[:, :flux.shape[1]]
        return recon, flux_n, sigma_n, valid


def gaussian_nll(pred, target, sigma, mask):
    """``tokenizer.gaussian_nll``: (1/N_valid) Σ m (y − ŷ)² / σ²."""
    w = mask & torch.isfinite(sigma) & (sigma > 0) & torch.isfinite(target)
    safe_sigma = torch.where(w, sigma, torch.ones(()))
    r = torch.where(w, (torch.where(w, target, torch.zeros(())) - pred) / safe_sigma,
                    torch.zeros(()))
    return (r * r).sum() / w.sum().clamp(min=1).float()


def tokenizer_loss(model: Tokenizer, batch: dict) -> torch.Tensor:
    """``spectrax.tasks.TokenizerReconstructionTask``."""
    recon, flux_n, sigma_n, valid = model(batch["flux"], batch["mask"], batch["wavelength"],
                                          batch["ivar"])
    return gaussian_nll(recon, flux_n, sigma_n, valid & batch["valid"][:, None])


# ==============================================================================================
# SpectraFM (spectrax.models.spectrafm)
# ==============================================================================================
class PostLNBlock(nn.Module):
    """``h = LN(q + Drop(MHA(q, kv)))``; ``out = LN(h + Drop(W2 GELU(W1 h)))``, extra key/value."""

    def __init__(self, d_model, num_heads, ffn_dim, dropout, eps):
        super().__init__()
        self.attention = Attention(d_model, num_heads, dropout, extra_kv=True)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.p = dropout

    def forward(self, q, kv, key_mask):
        h = self.norm1(q + F.dropout(self.attention(q, kv, key_mask), self.p, self.training))
        ffn = self.linear2(F.gelu(self.linear1(h)))
        return self.norm2(h + F.dropout(ffn, self.p, self.training))


class SpectraFM(nn.Module):
    """SpectraFM at the sizes of a ``spectrafm.SpectraFMConfig``.

    forward(values [B, N], wavelength [B, N] Å, token_ids [B, N], request_ids [B])
    -> (prediction [B], log-variance [B])."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.weight = nn.Parameter(torch.rand(cfg.num_token_ids, d))
        self.bias = nn.Parameter(nn.init.xavier_uniform_(torch.empty(cfg.num_token_ids, d)))
        block = lambda h, f: PostLNBlock(d, h, f, cfg.dropout, cfg.layer_norm_eps)  # noqa: E731
        self.encoder = nn.ModuleList([block(h, f) for h, f in zip(cfg.encoder_heads,
                                                                  cfg.encoder_ffn)])
        self.decoder = nn.ModuleList([block(h, f) for h, f in zip(cfg.decoder_heads,
                                                                  cfg.decoder_ffn)])
        widths = (d,) + tuple(cfg.decoder_mlp)
        self.mlp = nn.ModuleList([nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.pred_head = nn.Linear(widths[-1], 1)
        self.logvar_head = nn.Linear(widths[-1], 1)
        i = np.arange(d // 2, dtype=np.float64)
        freq = (cfg.pe_scale / (cfg.wavelength_max - cfg.wavelength_min)
                / cfg.pe_base ** (2.0 * i / d))
        self.register_buffer("pe_frequency", torch.as_tensor(freq, dtype=torch.float32),
                             persistent=False)

    def _lookup(self, table, ids):
        return torch.where((ids == 0)[..., None], torch.zeros(()), table[ids])

    def _pe(self, wavelength):
        valid = torch.isfinite(wavelength) & (wavelength > 0)
        offset = torch.where(valid, wavelength - self.cfg.wavelength_min, torch.zeros(()))
        angles = offset[..., None] * self.pe_frequency
        pe = torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).flatten(-2)
        return torch.where(valid[..., None], pe, torch.zeros(()))

    def forward(self, values, wavelength, token_ids, request_ids):
        key_mask = (token_ids != 0) & torch.isfinite(values)
        ids = torch.where(key_mask, token_ids, torch.zeros((), dtype=token_ids.dtype))
        values = torch.where(key_mask, values, torch.zeros(()))
        wavelength = torch.where(key_mask, wavelength, torch.zeros(()))
        x = F.gelu(self._lookup(self.weight, ids) * values[..., None]
                   + self._lookup(self.bias, ids)) + self._pe(wavelength)
        for block in self.encoder:
            x = block(x, x, key_mask)
        q = self._lookup(self.weight, request_ids)[:, None, :]
        for block in self.decoder:
            q = block(q, x, key_mask)
        h = q[:, 0, :]
        for layer in self.mlp:
            h = F.dropout(F.gelu(layer(h)), self.cfg.dropout, self.training)
        return self.pred_head(h)[:, 0], self.logvar_head(h)[:, 0]


class SpectraFMLoss:
    """``spectrax.tasks.spectrafm.SpectraFMTask.loss`` for a fitted task: flux standardisation
    with its per-pixel statistics, ``context`` random valid pixels per star (top-k of uniform
    scores), one random known label per star (Gumbel-max), Gaussian NLL with the label error."""

    FLUX_RANGE = (0.05, 1.2)

    def __init__(self, task, cfg):
        stats = task.stats
        self.pixel_median = torch.as_tensor(np.asarray(stats["pixel_median"], np.float32))
        self.pixel_mad = torch.as_tensor(np.asarray(stats["pixel_mad"], np.float32))
        self.label_median = torch.tensor([stats["label_median"][n] for n in task.labels])
        self.label_mad = torch.tensor([stats["label_mad"][n] for n in task.labels])
        self.request_ids = torch.tensor([cfg.label_token_ids[n] for n in task.labels])
        self.k, self.has_errors = len(task.labels), task.has_errors
        self.pixel_range, self.pixel_id = task.pixel_range, cfg.pixel_token_id
        self.context = task.context or cfg.context_length

    def __call__(self, model: SpectraFM, batch: dict) -> torch.Tensor:
        flux, nan = batch["flux"], torch.full((), float("nan"))
        ok = batch["mask"] & (flux >= self.FLUX_RANGE[0]) & (flux <= self.FLUX_RANGE[1])
        a, b = self.pixel_range
        if b > a:
            pix = torch.arange(flux.shape[1])
            ok = ok & (pix >= a) & (pix < b)
        z = (torch.where(ok, flux, nan) - self.pixel_median) / self.pixel_mad
        z = torch.where(z.abs() <= 10.0, z, nan)
        ok = ok & torch.isfinite(z) & batch["valid"][:, None]
        z = torch.where(ok, z, torch.zeros(()))
        # Up to `context` distinct valid pixels per star: invalid pixels scored behind all valid.
        scores = torch.rand(ok.shape) + torch.where(ok, 0.0, 2.0)
        idx = torch.topk(-scores, self.context, dim=1).indices
        tok_ok = torch.gather(ok, 1, idx)
        idx = torch.where(tok_ok, idx, torch.zeros((), dtype=idx.dtype))
        zero = torch.zeros(())
        values = torch.where(tok_ok, torch.gather(z, 1, idx), zero)
        wave = torch.where(tok_ok, torch.gather(batch["wavelength"], 1, idx), zero)
        ids = torch.where(tok_ok, self.pixel_id, 0)
        k = self.k
        known = batch["label_mask"][:, :k] & batch["valid"][:, None]
        gumbel = -torch.log(-torch.log(torch.rand(known.shape).clamp(1e-20, 1.0)))
        which = torch.where(known, gumbel, torch.full((), -float("inf"))).argmax(-1)
        has = known.any(-1)
        y = (torch.gather(batch["labels"][:, :k], 1, which[:, None])[:, 0]
             - self.label_median[which]) / self.label_mad[which]
        if self.has_errors:
            err = torch.gather(batch["labels"][:, k:2 * k], 1, which[:, None])[:, 0]
            err_ok = torch.gather(batch["label_mask"][:, k:2 * k], 1, which[:, None])[:, 0]
            sigma = torch.where(err_ok, err, zero) / self.label_mad[which]
        else:
            sigma = torch.zeros_like(y)
        pred, logvar = model(values, wave, ids, self.request_ids[which])
        valid = has & batch["valid"]
        y = torch.where(valid, y, pred)
        sigma = torch.where(valid & torch.isfinite(sigma), sigma, zero)
        logvar = torch.where(valid, logvar, zero)
        total_var = torch.exp(logvar) + sigma ** 2 + 1e-8
        per_row = 0.5 * ((y - pred) ** 2 / total_var + torch.log(total_var))
        return torch.where(valid, per_row, zero).sum() / valid.sum().clamp(min=1)


# ==============================================================================================
# ViT on rendered spectra (spectrax.models.vit) and the 1D transformer (.transformer1d)
# ==============================================================================================
class ViT(nn.Module):
    """``spectrax.models.vit.ViTForSpectra`` without its renderer: Hugging Face ``ViTModel`` at
    the sizes of a ``vit.ViTConfig`` + Linear(D → K) on the CLS features.

    forward(images [B, H, W, 3] in [0, 1]) -> logits [B, K]: pixel normalisation (the config's
    ``pixel_norm``), NCHW, backbone, head."""

    def __init__(self, cfg, num_outputs: int):
        from transformers import ViTConfig as HFConfig
        from transformers import ViTModel

        from spectrax.models import vit
        super().__init__()
        if cfg.head_hidden:
            raise ValueError("the PyTorch ViT baseline has a single Linear head")
        hf = HFConfig(hidden_size=cfg.width, num_hidden_layers=cfg.num_layers,
                      num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim,
                      hidden_act="gelu", layer_norm_eps=cfg.layer_norm_eps,
                      image_size=cfg.image_size, patch_size=cfg.patch_size,
                      num_channels=cfg.num_channels, qkv_bias=True,
                      hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=0.0)
        hf._attn_implementation = "sdpa"
        self.backbone = ViTModel(hf, add_pooling_layer=False)
        self.head = nn.Linear(cfg.width, num_outputs)
        mean, std = vit.PIXEL_NORMS[cfg.pixel_norm]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images):
        x = (images[..., :3].permute(0, 3, 1, 2) - self.mean) / self.std
        return self.head(self.backbone(pixel_values=x).last_hidden_state[:, 0])


def vit_classification_loss(model: ViT, batch: dict) -> torch.Tensor:
    """``spectrax.tasks.ClassificationTask``: cross-entropy over labelled valid rows, on the
    images rendered into ``batch['images']`` (:func:`torch_batches`)."""
    logits = model(batch["images"])
    y = batch["labels"][:, 0].long().clamp(0, logits.shape[1] - 1)
    w = (batch["label_mask"][:, 0] & batch["valid"]).float()
    ce = F.cross_entropy(logits, y, reduction="none")
    return (ce * w).sum() / w.sum().clamp(min=1.0)


class Transformer1D(nn.Module):
    """``spectrax.models.transformer1d.Transformer1D`` at the sizes of its config.

    forward(flux_n [B, L], mask [B, L], wavelength [B, L] Å) -> [B, K]."""

    def __init__(self, cfg, num_outputs: int):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.d_model, cfg.patch_size
        self.flux_proj = nn.Linear(p, d)
        self.wavelength_proj = nn.Linear(p, d)
        self.encoder = Stack(cfg.num_layers, d, cfg.num_heads, cfg.ffn_dim, cfg.dropout,
                             cfg.activation, cfg.norm_first, cfg.layer_norm_eps,
                             final_norm=cfg.norm_first)
        widths = (d,) + tuple(cfg.head_hidden)
        self.head_layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(widths[:-1],
                                                                           widths[1:])])
        self.head_out = nn.Linear(widths[-1], num_outputs)

    def _patches(self, x, fill):
        p = self.cfg.patch_size
        n = -(-x.shape[1] // p)
        return F.pad(x, (0, n * p - x.shape[1]), value=fill).view(x.shape[0], n, p)

    def forward(self, flux, mask, wavelength):
        cfg = self.cfg
        valid = mask & torch.isfinite(flux) & torch.isfinite(wavelength) & (wavelength > 0)
        flux = torch.where(valid, flux, torch.zeros(()))
        scaled = (wavelength - cfg.wavelength_min) / (cfg.wavelength_max - cfg.wavelength_min)
        scaled = torch.where(valid, scaled, torch.zeros(()))
        token_mask = self._patches(valid, False).any(-1)
        x = self.flux_proj(self._patches(flux, 0.0)) + self.wavelength_proj(
            self._patches(scaled, 0.0))
        n, dim = x.shape[1], cfg.d_model
        # Vaswani's encoding of the token index, spectrax's layout (sin half, cos half).
        pe = sinusoidal_embedding(torch.arange(n, dtype=torch.float32), dim, 2 * math.pi,
                                  2 * math.pi * cfg.pe_base ** ((dim - 2) / dim))
        x = F.dropout(x + pe, cfg.dropout, self.training)
        x = self.encoder(x, token_mask)
        w = token_mask.float()[..., None]
        x = (x * w).sum(1) / w.sum(1).clamp(min=1.0)
        for layer in self.head_layers:
            x = F.dropout(F.relu(layer(x)), cfg.dropout, self.training)
        return self.head_out(x)


class RegressionLoss:
    """``spectrax.tasks.RegressionTask``: MSE in standardised units over known labels, the
    task's train-split mean and std."""

    def __init__(self, task):
        self.mean = torch.tensor(task.mean, dtype=torch.float32)
        self.std = torch.tensor(task.std, dtype=torch.float32)

    def __call__(self, model: Transformer1D, batch: dict) -> torch.Tensor:
        flux_n, _, _, _ = median_normalise(batch["flux"], batch["ivar"], batch["mask"])
        pred = model(flux_n, batch["mask"], batch["wavelength"]).reshape(
            batch["labels"].shape[0], -1)
        w = (batch["label_mask"] & batch["valid"][:, None]).float()
        target = (batch["labels"] - self.mean) / self.std
        return ((pred - target) ** 2 * w).sum() / w.sum().clamp(min=1.0)


# ==============================================================================================
# Building and training
# ==============================================================================================
TORCH_MODEL_NAMES = ("specpt_autoencoder", "tokenizer", "spectrafm", "vit", "transformer1d")


def model_dataclass(model_cfg):
    """The spectrax size dataclass of ``config.model`` (variant resolved as the registry does)."""
    if model_cfg.name == "specpt_autoencoder":
        from spectrax.models import specpt
        return specpt.specpt_config(model_cfg.variant or "small")
    if model_cfg.name == "tokenizer":
        from spectrax.models import tokenizer
        return tokenizer.tokenizer_config(model_cfg.variant or "small")
    if model_cfg.name == "spectrafm":
        from spectrax.models import spectrafm
        return spectrafm.spectrafm_config(model_cfg.variant or "small")
    if model_cfg.name == "vit":
        from spectrax.models import vit
        return vit.vit_config(model_cfg.variant or "b16")
    if model_cfg.name == "transformer1d":
        from spectrax.models import transformer1d
        return transformer1d.transformer1d_config(model_cfg.variant or "small")
    raise ValueError(f"no PyTorch baseline for model {model_cfg.name!r}; have "
                     f"{TORCH_MODEL_NAMES}")


def build(model_cfg, task=None) -> tuple[nn.Module, Callable[[nn.Module, dict], torch.Tensor]]:
    """(module, loss_fn(module, batch) -> scalar) for a spectrax ``config.model``; SpectraFM
    needs its fitted spectrax ``task`` (statistics, labels). Build under ``torch.device('meta')``
    to count parameters without allocating them."""
    cfg = model_dataclass(model_cfg)
    if model_cfg.name == "specpt_autoencoder":
        return SpecPT(cfg), specpt_loss
    if model_cfg.name == "tokenizer":
        return Tokenizer(cfg), tokenizer_loss
    if model_cfg.name == "vit":
        if task is not None and type(task).__name__ != "ClassificationTask":
            raise ValueError("the PyTorch ViT baseline has the classification loss only")
        return ViT(cfg, model_cfg.get("num_outputs") or 3), vit_classification_loss
    if model_cfg.name == "transformer1d":
        return (Transformer1D(cfg, model_cfg.get("num_outputs") or 1),
                RegressionLoss(task) if task is not None else None)
    return SpectraFM(cfg), (SpectraFMLoss(task, cfg) if task is not None else None)


def parameter_count(module: nn.Module) -> int:
    """Trainable parameters (BatchNorm running statistics are buffers, not counted, as spectrax
    does not count its BatchStat variables)."""
    return sum(p.numel() for p in module.parameters())


def spectrax_parameter_count(model_cfg) -> int:
    """nnx.Param elements of the spectrax model of ``model_cfg``, built abstractly (no memory)."""
    import jax
    from flax import nnx

    from spectrax.models import registry
    abstract = nnx.eval_shape(lambda: registry.build_model(model_cfg, rngs=nnx.Rngs(0)))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))))


def check_parameter_count(module: nn.Module, model_cfg) -> int:
    """Asserts the PyTorch module has exactly the spectrax model's parameter count; returns it."""
    theirs, ours = spectrax_parameter_count(model_cfg), parameter_count(module)
    assert ours == theirs, (f"PyTorch {model_cfg.name}:{model_cfg.variant} has {ours:,} "
                            f"parameters, spectrax {theirs:,}")
    return ours


def batch_to_torch(batch) -> dict[str, torch.Tensor]:
    """A host ``SpectrumBatch`` (numpy) -> dict of CPU tensors, same dtypes (float32, bool)."""
    names = ("flux", "ivar", "wavelength", "mask", "labels", "label_mask", "valid")
    return {n: torch.from_numpy(np.ascontiguousarray(np.asarray(getattr(batch, n))))
            for n in names}


def torch_batches(model_cfg, host_batches) -> list[dict[str, torch.Tensor]]:
    """:func:`batch_to_torch` of every host batch; for the ViT also ``images`` [B, H, W, 3],
    rendered by the spectrax model's own renderer from the median-normalised flux (as
    ``spectrax.tasks.forward`` feeds it), once, outside any timed step."""
    out = [batch_to_torch(b) for b in host_batches]
    if model_cfg.name != "vit":
        return out
    import jax
    from flax import nnx

    from spectrax.data.preprocess import median_normalise
    from spectrax.models import registry
    renderer = registry.build_model(model_cfg, rngs=nnx.Rngs(0)).renderer
    if renderer is None:
        raise ValueError("the ViT baseline needs config.model.representation (a renderer)")

    @jax.jit
    def images(flux, ivar, mask, wavelength):
        return renderer(median_normalise(flux, ivar, mask)[0], mask, wavelength)

    for b, tb in zip(host_batches, out):
        tb["images"] = torch.from_numpy(np.array(images(b.flux, b.ivar, b.mask, b.wavelength)))
    return out


class _LossModule(nn.Module):
    """model + loss as one module, so ``torch.compile`` sees (and fuses) both."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


class TorchTrainStep:
    """One training step as spectrax's: loss -> backward -> clip global norm -> AdamW.

    Args:
      model, loss_fn: from :func:`build`.
      lr, weight_decay, clip_norm: the config's optimiser settings (``torch.optim.AdamW`` is
        decoupled weight decay, as ``optax.adamw``).
      compile: run model + loss through ``torch.compile`` (the optimiser stays eager).
    """

    def __init__(self, model: nn.Module, loss_fn, *, lr: float, weight_decay: float,
                 clip_norm: float, compile: bool = False):
        self.model = model.train()
        self.loss_module = _LossModule(model, loss_fn)
        self.forward = torch.compile(self.loss_module) if compile else self.loss_module
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.clip_norm = clip_norm

    def __call__(self, batch: dict) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = self.forward(batch)
        loss.backward()
        if self.clip_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        self.opt.step()
        return loss.detach()


def warm_up(step: Callable[[dict], Any], batches: list[dict], calls: int = 2) -> float:
    """Runs ``step`` ``calls`` times (the first includes torch.compile's compilation); returns
    the seconds the first call took. Raises FloatingPointError on a non-finite loss."""
    t0 = time.perf_counter()
    loss = step(batches[0])
    first = time.perf_counter() - t0
    for i in range(1, calls):
        loss = step(batches[i % len(batches)])
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite PyTorch loss {float(loss)}")
    return first


def time_block(step: Callable[[dict], Any], batches: list[dict], steps: int) -> float:
    """Seconds per step over ``steps`` calls on the fixed batches. PyTorch on CPU runs
    synchronously, so the clock needs no device synchronisation."""
    t0 = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    return (time.perf_counter() - t0) / steps
