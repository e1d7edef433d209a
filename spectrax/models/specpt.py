"""SpecPT (Pattnaik, Kartaltepe & Binu): a convolutional + transformer autoencoder of DESI spectra
and the redshift regressor built on its encoder.

Two architectures share one conv stem (Conv1d + BatchNorm + ReLU ×3, then max-pool):

* ``'paper'`` reproduces the reference exactly (1,120,475,621 parameters). Its quirks are kept on
  purpose: the stem output is flattened and projected to ONE vector, which the transformer sees as
  a sequence of length one, so every attention reduces to out_proj(v_proj(x)) and the
  "transformer" attends to nothing; the decoder is called with target = memory = encoder output;
  ``linear2`` alone holds ~87% of the parameters.
* ``'tokens'`` is the corrected design: each of the stem's output positions (487 for DESI) is a
  token, projected to D and tagged with a wavelength embedding of its central wavelength; tokens
  whose pixels are mostly bad are excluded from attention as keys; the decoder maps every token
  back to its own pixels. It is far smaller and actually attends.

Inputs everywhere: ``flux`` [B, L] float32 (median-normalised, 0 at bad pixels), ``mask`` [B, L]
bool (True = valid), ``wavelength`` [B, L] float32 vacuum Å (−1 on padding). The conv stem works
in NLC layout ([B, L, C]); the paper flatten transposes to PyTorch's NCL first so a reference
state dict maps without reordering.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectrax.nn import (Dropout, Linear, MultiHeadAttention, TransformerDecoder,
                         TransformerEncoder, WavelengthEmbedding)
from spectrax.nn.embeddings import DEFAULT_MAX_PERIOD, DEFAULT_MIN_PERIOD

ARCHITECTURES = ("paper", "tokens")
COMPUTE_DTYPES = ("float32", "bfloat16")


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SpecPTConfig:
    """Every size of a SpecPT model. Defaults are the reference (``specpt_config('paper')``).

    Attributes:
      architecture: 'paper' (faithful, sequence of length one) or 'tokens' (corrected).
      input_length: L, pixels per spectrum (DESI b+r+z coadd: 7781). The paper architecture's
        Linear sizes depend on it; the tokens architecture accepts any L.
      conv_channels, conv_kernels, conv_strides, conv_paddings: the stem's Conv1d layers.
      pool_kernel, pool_stride, pool_padding: the stem's final max-pool (padding acts as −inf).
      batch_norm_momentum: PyTorch convention (weight of the new batch statistics, 0.1); flax's
        ``momentum`` is ``1 - batch_norm_momentum``.
      batch_norm_eps: BatchNorm epsilon.
      d_model, num_heads, ffn_dim: transformer width, heads, feed-forward width.
      num_encoder_layers, num_decoder_layers: transformer depth. In 'tokens' the decoder layers
        are self-attention layers over the tokens before the per-token pixel head.
      dropout: dropout in the transformer layers.
      activation: 'relu' (reference) or 'gelu' in the transformer feed-forward.
      norm_first: pre-LN transformer layers (plus a final LayerNorm) instead of post-LN.
      layer_norm_eps: LayerNorm epsilon.
      text_head_blocks: residual MLP blocks of the 'paper_text' redshift head (width d_model).
      count_head_widths: output widths of the 'paper_count' head's residual blocks.
      head_dropout: dropout in the redshift heads (reference: 0.2).
      wavelength_sinusoids: sinusoidal features of the token wavelength embedding ('tokens').
      mask_ratio: 'tokens' autoencoder only: fraction of token pixel blocks hidden from the
        encoder during training (flux zeroed, pixels masked) while the loss still asks for their
        flux. Without it the token autoencoder has no bottleneck (487 × D features for 7781
        pixels) and could learn the identity; with it the encoder must model spectra from context,
        as in masked autoencoders.
      wavelength_min_period, wavelength_max_period: its period range in log10(λ/Å) units.
      dtype: compute dtype, 'float32' or 'bfloat16'; parameters are always float32.
      attention: implementation of every attention layer (:func:`spectrax.nn.attend`; 'auto'
        picks per backend and shape).
    """

    architecture: str = "paper"
    input_length: int = 7781
    conv_channels: tuple[int, ...] = (64, 128, 256)
    conv_kernels: tuple[int, ...] = (41, 21, 11)
    conv_strides: tuple[int, ...] = (2, 2, 2)
    conv_paddings: tuple[int, ...] = (20, 10, 5)
    pool_kernel: int = 3
    pool_stride: int = 2
    pool_padding: int = 1
    batch_norm_momentum: float = 0.1
    batch_norm_eps: float = 1e-5
    d_model: int = 512
    num_heads: int = 8
    ffn_dim: int = 2048
    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    dropout: float = 0.1
    activation: str = "relu"
    norm_first: bool = False
    layer_norm_eps: float = 1e-5
    text_head_blocks: int = 5
    count_head_widths: tuple[int, ...] = (256, 256, 256)
    head_dropout: float = 0.2
    wavelength_sinusoids: int = 64
    mask_ratio: float = 0.0
    wavelength_min_period: float = DEFAULT_MIN_PERIOD
    wavelength_max_period: float = DEFAULT_MAX_PERIOD
    dtype: str = "float32"
    attention: str = "auto"

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r} unknown; use one of "
                             f"{ARCHITECTURES}")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} unknown; use one of {COMPUTE_DTYPES}")
        n = len(self.conv_channels)
        if not (len(self.conv_kernels) == len(self.conv_strides) == len(self.conv_paddings) == n):
            raise ValueError(
                "conv_channels, conv_kernels, conv_strides and conv_paddings must have equal "
                f"lengths, got {len(self.conv_channels)}, {len(self.conv_kernels)}, "
                f"{len(self.conv_strides)}, {len(self.conv_paddings)}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} not divisible by num_heads {self.num_heads}")
        if stem_lengths(self, self.input_length)[-1] < 1:
            raise ValueError(f"input_length {self.input_length} is too short for the conv stem")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def flax_batch_norm_momentum(self) -> float:
        """flax keeps ``momentum`` of the old running statistics; PyTorch weights the new batch."""
        return 1.0 - self.batch_norm_momentum

    @property
    def num_tokens(self) -> int:
        """Stem output positions for ``input_length`` pixels (487 for the paper sizes)."""
        return stem_lengths(self, self.input_length)[-1]

    def num_tokens_for(self, length: int) -> int:
        """Stem output positions for spectra of ``length`` pixels."""
        return stem_lengths(self, length)[-1]

    @property
    def flat_features(self) -> int:
        """Size of the flattened stem output, channels × positions (paper: 256 × 487 = 124,672)."""
        return self.conv_channels[-1] * self.num_tokens


# ------------------------------------------------------------------------------------------------
# Stem geometry: how stem positions (tokens) relate to pixels
# ------------------------------------------------------------------------------------------------

def _stem_windows(cfg: SpecPTConfig) -> list[tuple[int, int, int]]:
    """(kernel, stride, padding) of each downsampling step of the stem, conv layers then pool."""
    convs = list(zip(cfg.conv_kernels, cfg.conv_strides, cfg.conv_paddings))
    return convs + [(cfg.pool_kernel, cfg.pool_stride, cfg.pool_padding)]


def stem_lengths(cfg: SpecPTConfig, length: int) -> tuple[int, ...]:
    """Sequence lengths through the stem: (L, after conv1, …, after pool).

    Paper sizes: 7781 → 3891 → 1946 → 973 → 487.
    """
    lengths = [length]
    for kernel, stride, padding in _stem_windows(cfg):
        lengths.append((lengths[-1] + 2 * padding - kernel) // stride + 1)
    return tuple(lengths)


def stem_token_geometry(cfg: SpecPTConfig) -> tuple[float, int]:
    """(centre_of_token_0, pixels_per_token): where the stem's output positions sit on the pixels.

    pixels_per_token S is the stem's total stride (paper: 2·2·2·2 = 16 = ceil(7781 / 487)). Output
    i of a window (kernel k, stride s, padding p) is centred on input s·i − p + (k − 1)/2;
    composing the stem's windows puts token t's receptive-field centre at
    ``centre_of_token_0 + S·t`` (paper sizes: pixel 16·t).

    spectrax assigns token t the pixel block [S·t, S·(t+1)) (see :func:`token_blocks`): it is the
    token's key-padding mask, its wavelength and, in the tokens autoencoder, the pixels it decodes
    to. The block starts S/2 pixels after the receptive-field centre (6.4 Å on the DESI grid), a
    small offset next to a receptive field of hundreds of pixels, and in exchange the blocks
    always tile the whole spectrum: with "same" padding (p = (k − 1)/2) every stage gives
    ceil(n / s) outputs, so T = ceil(L / S) and T·S >= L.
    """
    centre, stride = 0.0, 1
    for kernel, s, padding in reversed(_stem_windows(cfg)):
        centre = s * centre - padding + (kernel - 1) / 2
        stride *= s
    return centre, stride


def token_blocks(cfg: SpecPTConfig, x, fill):
    """[B, L] pixel array -> [B, T, S]: row t holds pixels S·t … S·t + S − 1, ``fill`` past L.

    Raises:
      ValueError: when the stem's T tokens do not tile L pixels (a stem without "same" padding).
    """
    length = x.shape[1]
    num_tokens = stem_lengths(cfg, length)[-1]
    _, block = stem_token_geometry(cfg)
    if num_tokens * block < length:
        raise ValueError(
            f"the SpecPT stem gives {num_tokens} tokens of {block} pixels for {length} pixels, "
            "which leaves pixels without a token; use 'same' conv/pool paddings (p = (k-1)/2)")
    x = jnp.pad(x, ((0, 0), (0, num_tokens * block - length)), constant_values=fill)
    return x.reshape(x.shape[0], num_tokens, block)


def untoken_blocks(blocks, length: int):
    """Inverse of :func:`token_blocks`: [B, T, S] -> [B, L] (drops the fill past L)."""
    return blocks.reshape(blocks.shape[0], -1)[:, :length]


def token_mask(cfg: SpecPTConfig, mask):
    """Key-padding mask of the stem's tokens.

    Args:
      mask: [B, L] bool pixel mask, True = valid.

    Returns:
      [B, T] bool, True = valid token: more than half of the pixels of its block (see
      :func:`stem_token_geometry`; the last block may extend past L, only pixels < L count) are
      valid. A token is bad when at least half are masked.
    """
    valid = token_blocks(cfg, mask.astype(jnp.float32), 0.0).sum(-1)
    in_range = token_blocks(cfg, np.ones((1, mask.shape[1]), np.float32), 0.0).sum(-1)
    return 2.0 * valid > in_range


def token_wavelength(cfg: SpecPTConfig, wavelength):
    """Central wavelength of each stem token: the mean over the token's pixel block of the pixels
    that have a wavelength (λ > 0; masked pixels still have one, padding has −1).

    Args:
      wavelength: [B, L] float32, Å.

    Returns:
      [B, T] float32 Å; −1 for tokens that cover only padding.
    """
    blocks = token_blocks(cfg, wavelength.astype(jnp.float32), -1.0)
    has_wavelength = blocks > 0
    count = has_wavelength.sum(-1)
    total = jnp.where(has_wavelength, blocks, 0.0).sum(-1)
    return jnp.where(count > 0, total / jnp.maximum(count, 1), -1.0)


# ------------------------------------------------------------------------------------------------
# Named variants
# ------------------------------------------------------------------------------------------------

_PAPER = SpecPTConfig()

VARIANTS: dict[str, SpecPTConfig] = {
    # The reference, parameter for parameter.
    "paper": _PAPER,
    # The paper architecture, narrow enough for a CPU. Its linear2 still has
    # conv_channels[-1]·487·7781 weights, so the last stem width is kept at 16 (60.6 M weights):
    # with 64 channels linear2 alone would be 243 M parameters (~1 GB in fp32).
    "small": dataclasses.replace(
        _PAPER, conv_channels=(8, 16, 16), d_model=128, num_heads=4, ffn_dim=256,
        num_encoder_layers=2, num_decoder_layers=2, count_head_widths=(64, 64, 64)),
    # The corrected token architecture at CPU width: a stride-4 first convolution and four
    # times fewer tokens (244, 32 pixels = 25.6 Å each) than the paper's stem, because on a
    # 2-core CPU attention over 487 tokens dominated the step (≈0.9 s per layer at B=32, D=128).
    "tokens": dataclasses.replace(
        _PAPER, architecture="tokens", conv_channels=(16, 32, 64), conv_kernels=(15, 9, 5),
        conv_strides=(4, 2, 2), conv_paddings=(7, 4, 2), d_model=64, num_heads=4, ffn_dim=128,
        num_encoder_layers=2, num_decoder_layers=1, norm_first=True,
        count_head_widths=(64, 64, 64), mask_ratio=0.3),
    # The corrected token architecture at the paper's widths.
    "tokens_paper": dataclasses.replace(_PAPER, architecture="tokens", norm_first=True,
                                        mask_ratio=0.3),
    # The token architecture at toy width, for seconds-long end-to-end tests.
    "tiny": dataclasses.replace(
        _PAPER, architecture="tokens", conv_channels=(4, 8, 16), d_model=32, num_heads=2,
        ffn_dim=64, num_encoder_layers=1, num_decoder_layers=1, norm_first=True,
        text_head_blocks=1, count_head_widths=(16, 16, 16), wavelength_sinusoids=16,
        mask_ratio=0.3),
}


def specpt_config(variant: str, **overrides) -> SpecPTConfig:
    """The named SpecPT configuration, optionally with fields overridden.

    Variants: 'paper' (exact reference), 'small' (paper architecture, narrow), 'tokens'
    (corrected architecture, CPU width), 'tokens_paper' (corrected architecture, paper width),
    'tiny' (corrected architecture, toy width, for tests).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown SpecPT variant {variant!r}; known: {sorted(VARIANTS)}")
    return dataclasses.replace(VARIANTS[variant], **overrides)


# ------------------------------------------------------------------------------------------------
# Conv stem
# ------------------------------------------------------------------------------------------------

class ConvBlock(nnx.Module):
    """Conv1d + BatchNorm + ReLU on [B, L, C_in] -> [B, L', C_out]."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int,
                 padding: int, cfg: SpecPTConfig, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(in_channels, out_channels, kernel_size=(kernel,), strides=(stride,),
                             padding=((padding, padding),), dtype=cfg.compute_dtype, rngs=rngs)
        self.norm = nnx.BatchNorm(out_channels, momentum=cfg.flax_batch_norm_momentum,
                                  epsilon=cfg.batch_norm_eps, dtype=cfg.compute_dtype, rngs=rngs)

    def __call__(self, x, *, train: bool):
        return jax.nn.relu(self.norm(self.conv(x), use_running_average=not train))


class ConvStem(nnx.Module):
    """The SpecPT feature extractor: ConvBlocks (``blocks/0`` … ``blocks/n-1``) then a max-pool.

    [B, L] flux -> [B, T, C] (paper: [B, 7781] -> [B, 487, 256]).
    """

    def __init__(self, cfg: SpecPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        in_channels = (1,) + tuple(cfg.conv_channels[:-1])
        self.blocks = nnx.List([
            ConvBlock(c_in, c_out, k, s, p, cfg, rngs=rngs)
            for c_in, c_out, k, s, p in zip(in_channels, cfg.conv_channels, cfg.conv_kernels,
                                            cfg.conv_strides, cfg.conv_paddings)])

    def __call__(self, flux, *, train: bool):
        x = flux[:, :, None].astype(self.cfg.compute_dtype)
        for block in self.blocks:
            x = block(x, train=train)
        # PyTorch's MaxPool1d pads with −inf, so a padded position never wins the max. The init
        # value must be a Python scalar: a traced array (jnp.array(-inf) under jit) turns the op
        # into a generic reduce_window, which JAX cannot differentiate.
        cfg = self.cfg
        return jax.lax.reduce_window(
            x, -jnp.inf, jax.lax.max,
            window_dimensions=(1, cfg.pool_kernel, 1), window_strides=(1, cfg.pool_stride, 1),
            padding=((0, 0), (cfg.pool_padding, cfg.pool_padding), (0, 0)))


# ------------------------------------------------------------------------------------------------
# Encoder (shared by the autoencoder and the redshift model)
# ------------------------------------------------------------------------------------------------

class SpecPTEncoder(nnx.Module):
    """Conv stem + projection + transformer encoder.

    Sub-modules: ``stem``; 'paper': ``proj`` (Linear C·T → D) and ``transformer``; 'tokens':
    ``token_proj`` (Linear C → D), ``wavelength_embedding`` and ``transformer``. The redshift model
    holds an identical ``encoder``, so the autoencoder's encoder state copies over by path.
    """

    def __init__(self, cfg: SpecPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = cfg.compute_dtype
        self.stem = ConvStem(cfg, rngs=rngs)
        if cfg.architecture == "paper":
            self.proj = Linear(cfg.flat_features, cfg.d_model, dtype=dtype, rngs=rngs)
        else:
            self.token_proj = Linear(cfg.conv_channels[-1], cfg.d_model, dtype=dtype,
                                     rngs=rngs)
            self.wavelength_embedding = WavelengthEmbedding(
                cfg.wavelength_sinusoids, cfg.d_model, min_period=cfg.wavelength_min_period,
                max_period=cfg.wavelength_max_period, dtype=dtype, rngs=rngs)
        self.transformer = TransformerEncoder(
            cfg.num_encoder_layers, cfg.d_model, cfg.num_heads, cfg.ffn_dim, cfg.dropout,
            cfg.activation, cfg.norm_first, cfg.layer_norm_eps, final_norm=cfg.norm_first,
            dtype=dtype, attention=cfg.attention, rngs=rngs)

    def stem_features(self, flux, mask, *, train: bool):
        """Conv-stem output, [B, L] -> [B, T, C] (NLC).

        'paper' ignores ``mask`` (as the reference does; flux is finite, 0 at bad pixels);
        'tokens' zeroes masked pixels again so the network never depends on what they hold.
        """
        if self.cfg.architecture == "tokens":
            flux = jnp.where(mask, flux, 0.0)
        return self.stem(flux, train=train)

    def token_mask(self, mask):
        """[B, L] bool pixel mask -> [B, T] bool token mask (see :func:`token_mask`)."""
        return token_mask(self.cfg, mask)

    def __call__(self, flux, mask, wavelength, *, train: bool, stem_train: bool | None = None):
        """Encodes spectra.

        Args:
          flux: [B, L] float32; mask: [B, L] bool; wavelength: [B, L] float32 Å.
          train: training mode (dropout on, BatchNorm batch statistics).
          stem_train: training mode of the stem alone; None = ``train``. A frozen stem runs in
            inference mode so its BatchNorm statistics stay fixed too.

        Returns:
          'paper': [B, D], the single "token". 'tokens': [B, T, D] token features (masked tokens
          are computed but excluded as keys; use :meth:`token_mask`).
        """
        if self.cfg.architecture == "paper" and flux.shape[1] != self.cfg.input_length:
            raise ValueError(
                f"the paper SpecPT architecture is built for {self.cfg.input_length} pixels but "
                f"got spectra of {flux.shape[1]}; resample to the model's grid or set "
                "input_length in the config")
        stem_train = train if stem_train is None else stem_train
        features = self.stem_features(flux, mask, train=stem_train)          # [B, T, C]
        deterministic = not train
        if self.cfg.architecture == "paper":
            # Channel-major flatten (c·T + t), as PyTorch's x.flatten(1) on [B, C, T].
            flat = jnp.transpose(features, (0, 2, 1)).reshape(features.shape[0], -1)
            # The reference feeds ONE vector as a sequence of length one: attention is a no-op
            # mixing of nothing (softmax over a single key is 1).
            x = self.proj(flat)[:, None, :]
            return self.transformer(x, deterministic=deterministic)[:, 0, :]
        tokens = self.token_proj(features)
        tokens = tokens + self.wavelength_embedding(token_wavelength(self.cfg, wavelength))
        return self.transformer(tokens, self.token_mask(mask), deterministic=deterministic)


# ------------------------------------------------------------------------------------------------
# Autoencoder
# ------------------------------------------------------------------------------------------------

class SpecPTAutoencoder(nnx.Module):
    """SpecPT autoencoder: spectra [B, L] -> reconstruction [B, L] float32.

    'paper' sub-modules: ``encoder``, ``decoder`` (post-LN TransformerDecoder), ``linear1``
    (D → C·T, ReLU), ``linear2`` (C·T → L, no output activation). The decoder is called with
    target = memory = the encoder output (the reference's choice).

    'tokens' sub-modules: ``encoder``, ``decoder`` (self-attention layers over the tokens, with the
    token key-padding mask) and ``pixel_head`` (Linear D → S = pixels_per_token), whose outputs
    are laid back on the pixel axis (token t -> pixels [S·t, S·(t+1))) and cropped to L.
    """

    def __init__(self, cfg: SpecPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = cfg.compute_dtype
        self.encoder = SpecPTEncoder(cfg, rngs=rngs)
        if cfg.architecture == "paper":
            self.decoder = TransformerDecoder(
                cfg.num_decoder_layers, cfg.d_model, cfg.num_heads, cfg.ffn_dim, cfg.dropout,
                cfg.activation, cfg.norm_first, cfg.layer_norm_eps, final_norm=cfg.norm_first,
                dtype=dtype, attention=cfg.attention, rngs=rngs)
            self.linear1 = Linear(cfg.d_model, cfg.flat_features, dtype=dtype, rngs=rngs)
            self.linear2 = Linear(cfg.flat_features, cfg.input_length, dtype=dtype,
                                  rngs=rngs)
        else:
            self.decoder = TransformerEncoder(
                cfg.num_decoder_layers, cfg.d_model, cfg.num_heads, cfg.ffn_dim, cfg.dropout,
                cfg.activation, cfg.norm_first, cfg.layer_norm_eps, final_norm=cfg.norm_first,
                dtype=dtype, attention=cfg.attention, rngs=rngs)
            _, pixels_per_token = stem_token_geometry(cfg)
            self.pixel_head = Linear(cfg.d_model, pixels_per_token, dtype=dtype, rngs=rngs)
            # Dropout on a [B, T] array of ones draws the hidden blocks from the 'dropout' RNG
            # stream, which the training loop reseeds from (seed, step).
            self.block_masking = nnx.Dropout(cfg.mask_ratio, rngs=rngs)

    def hide_blocks(self, flux, mask, *, train: bool):
        """Masked-autoencoder input: during training, hide ``mask_ratio`` of the token blocks.

        Returns (flux, mask) with hidden blocks zeroed and masked; unchanged in inference.
        """
        if not train or self.cfg.mask_ratio <= 0:
            return flux, mask
        num_tokens = self.cfg.num_tokens_for(flux.shape[1])
        _, block = stem_token_geometry(self.cfg)
        keep = self.block_masking(jnp.ones((flux.shape[0], num_tokens), jnp.float32),
                                  deterministic=False) > 0
        keep_pixels = untoken_blocks(jnp.repeat(keep[:, :, None], block, axis=2), flux.shape[1])
        return jnp.where(keep_pixels, flux, 0.0), mask & keep_pixels

    @property
    def fixed_input_length(self) -> int | None:
        """Pixels the model is defined on (the paper architecture's dense layers), or None when
        it takes any length ('tokens')."""
        return self.cfg.input_length if self.cfg.architecture == "paper" else None

    def __call__(self, flux, mask, wavelength, *, train: bool):
        """flux [B, L] float32, mask [B, L] bool, wavelength [B, L] Å -> reconstruction [B, L]."""
        deterministic = not train
        if self.cfg.architecture == "tokens":
            flux, mask = self.hide_blocks(flux, mask, train=train)
        encoded = self.encoder(flux, mask, wavelength, train=train)
        if self.cfg.architecture == "paper":
            sequence = encoded[:, None, :]                                     # [B, 1, D]
            decoded = self.decoder(sequence, sequence, deterministic=deterministic)[:, 0, :]
            out = self.linear2(jax.nn.relu(self.linear1(decoded)))
        else:
            decoded = self.decoder(encoded, self.encoder.token_mask(mask),
                                   deterministic=deterministic)
            out = untoken_blocks(self.pixel_head(decoded), flux.shape[1])     # [B, T, S] -> [B, L]
        return out.astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# Redshift heads
# ------------------------------------------------------------------------------------------------

def _swish(x):
    return x * jax.nn.sigmoid(x)


class PositiveOutput(nnx.Module):
    """[B, W] -> z [B] float32 > 0: [Linear W→hidden, Swish, Dropout,] Linear →1, Softplus.

    With ``hidden=None`` only the final Linear + Softplus (the 'paper_count' head's output)."""

    def __init__(self, width: int, hidden: int | None, dropout: float, *, dtype,
                 rngs: nnx.Rngs):
        if hidden is None:
            self.hidden = None
        else:
            self.hidden = Linear(width, hidden, dtype=dtype, rngs=rngs)
        self.dropout = Dropout(dropout, rngs=rngs)
        self.output = Linear(width if hidden is None else hidden, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x, *, train: bool):
        if self.hidden is not None:
            x = self.dropout(_swish(self.hidden(x)), deterministic=not train)
        # Softplus in float32: z is small (BGS ~0.25) and bf16 would round it to ~3 digits.
        return jax.nn.softplus(self.output(x)[:, 0].astype(jnp.float32))


class TextResidualBlock(nnx.Module):
    """swish(LayerNorm(x + linear2(dropout(swish(linear1(x)))))), width D -> D (paper text)."""

    def __init__(self, width: int, dropout: float, *, dtype, rngs: nnx.Rngs):
        self.linear1 = Linear(width, width, dtype=dtype, rngs=rngs)
        self.linear2 = Linear(width, width, dtype=dtype, rngs=rngs)
        self.layer_norm = nnx.LayerNorm(width, epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.dropout = Dropout(dropout, rngs=rngs)

    def __call__(self, x, *, train: bool):
        h = self.dropout(_swish(self.linear1(x)), deterministic=not train)
        return _swish(self.layer_norm(x + self.linear2(h)))


class PaperTextHead(nnx.Module):
    """The head the paper's text describes: ``attention`` with a residual, 5 residual
    ``mlp_blocks``, then ``prediction`` [Linear D→D/2, Swish, Dropout, Linear D/2→1, Softplus].
    Input [B, D] -> z [B].

    ``batch_mixing_attention=False`` (default): each sample's vector is a sequence of length one
    attending to itself (attention = out_proj(v_proj(x))).

    ``batch_mixing_attention=True`` reproduces the REFERENCE DEFECT: it passed the 2-D (B, D)
    matrix to ``nn.MultiheadAttention``, which reads it as ONE unbatched sequence of length B, so
    every spectrum attends to its batch-mates and its predicted redshift depends on which other
    spectra share its batch (and on padding rows of a partial batch). Use only to replicate the
    reference's numbers.
    """

    def __init__(self, cfg: SpecPTConfig, batch_mixing_attention: bool, *, rngs: nnx.Rngs):
        dtype, width = cfg.compute_dtype, cfg.d_model
        self.batch_mixing_attention = batch_mixing_attention
        self.attention = MultiHeadAttention(width, cfg.num_heads, dtype=dtype,
                                            implementation=cfg.attention, rngs=rngs)
        self.mlp_blocks = nnx.List([
            TextResidualBlock(width, cfg.head_dropout, dtype=dtype, rngs=rngs)
            for _ in range(cfg.text_head_blocks)])
        self.prediction = PositiveOutput(width, width // 2, cfg.head_dropout, dtype=dtype,
                                         rngs=rngs)

    def __call__(self, features, *, train: bool):
        """features [B, D] -> z [B] float32, positive."""
        if self.batch_mixing_attention:
            sequence = features[None, :, :]        # one sequence of length B (the defect)
        else:
            sequence = features[:, None, :]        # B sequences of length one
        attended = self.attention(sequence, sequence, deterministic=not train)
        x = features + attended.reshape(features.shape)
        for block in self.mlp_blocks:
            x = block(x, train=train)
        return self.prediction(x, train=train)


class CountResidualBlock(nnx.Module):
    """swish(bn2(fc2(dropout(swish(bn1(fc1(x)))))) + skip(x)), width in -> out; ``skip`` is a
    Linear projection even when the widths agree (as in the head matching the paper's count)."""

    def __init__(self, in_width: int, out_width: int, cfg: SpecPTConfig, *, rngs: nnx.Rngs):
        dtype = cfg.compute_dtype
        norm = lambda: nnx.BatchNorm(  # noqa: E731
            out_width, momentum=cfg.flax_batch_norm_momentum, epsilon=cfg.batch_norm_eps,
            dtype=dtype, rngs=rngs)
        self.fc1 = Linear(in_width, out_width, dtype=dtype, rngs=rngs)
        self.bn1 = norm()
        self.dropout = Dropout(cfg.head_dropout, rngs=rngs)
        self.fc2 = Linear(out_width, out_width, dtype=dtype, rngs=rngs)
        self.bn2 = norm()
        self.skip = Linear(in_width, out_width, dtype=dtype, rngs=rngs)

    def __call__(self, x, *, train: bool):
        h = _swish(self.bn1(self.fc1(x), use_running_average=not train))
        h = self.bn2(self.fc2(self.dropout(h, deterministic=not train)),
                     use_running_average=not train)
        return _swish(h + self.skip(x))


class PaperCountHead(nnx.Module):
    """The older head whose size matches the paper's parameter count (74,016,257 with the encoder):
    3 :class:`CountResidualBlock` (D→256→256→256) then Linear 256→1 + Softplus. [B, D] -> z [B]."""

    def __init__(self, cfg: SpecPTConfig, *, rngs: nnx.Rngs):
        widths = (cfg.d_model,) + tuple(cfg.count_head_widths)
        self.mlp_blocks = nnx.List([
            CountResidualBlock(w_in, w_out, cfg, rngs=rngs)
            for w_in, w_out in zip(widths[:-1], widths[1:])])
        self.prediction = PositiveOutput(widths[-1], None, 0.0, dtype=cfg.compute_dtype,
                                         rngs=rngs)

    def __call__(self, features, *, train: bool):
        x = features
        for block in self.mlp_blocks:
            x = block(x, train=train)
        return self.prediction(x, train=train)


class TokenPoolingHead(nnx.Module):
    """Redshift head for the token encoder: a learned ``query`` attends over the valid tokens, then
    ``norm`` (LayerNorm) and ``prediction`` [Linear D→D, Swish, Dropout, Linear D→1, Softplus].
    tokens [B, T, D] + token mask [B, T] -> z [B]."""

    def __init__(self, cfg: SpecPTConfig, *, rngs: nnx.Rngs):
        dtype, width = cfg.compute_dtype, cfg.d_model
        self.query = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, width)))
        self.attention = MultiHeadAttention(width, cfg.num_heads, dtype=dtype,
                                            implementation=cfg.attention, rngs=rngs)
        self.norm = nnx.LayerNorm(width, epsilon=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.prediction = PositiveOutput(width, width, cfg.head_dropout, dtype=dtype, rngs=rngs)

    def __call__(self, tokens, tokens_mask, *, train: bool):
        query = jnp.broadcast_to(self.query[...], (tokens.shape[0], 1, tokens.shape[-1]))
        # A spectrum without any valid token pools to zeros (MultiHeadAttention's guard).
        pooled = self.attention(query.astype(tokens.dtype), tokens, tokens_mask,
                                deterministic=not train)[:, 0, :]
        return self.prediction(self.norm(pooled), train=train)


REDSHIFT_HEADS = ("paper_text", "paper_count", "tokens")


class SpecPTRedshift(nnx.Module):
    """SpecPT redshift regressor: ``encoder`` (a :class:`SpecPTEncoder`, same config as the
    autoencoder's, so its state copies over by path) + ``head``. Returns z [B] float32 > 0.

    Args:
      cfg: the encoder's configuration.
      head: 'paper_text' or 'paper_count' (paper architecture), 'tokens' (token architecture);
        None picks 'paper_text' or 'tokens' from ``cfg.architecture``.
      batch_mixing_attention: 'paper_text' only; reproduce the reference's cross-sample attention
        defect (see :class:`PaperTextHead`). Off by default.

    Class attributes:
      UNREGISTERED_PATHS: parameters the reference holds outside its registered modules (the conv
        stem, reached through a bound method of the autoencoder), so the paper's parameter counts
        leave them out: ``parameter_count(model, exclude=UNREGISTERED_PATHS)`` gives 77,103,617
        for 'paper_text' and 74,016,257 for 'paper_count'.
      FROZEN_BY_HEAD: per head, the paths the optimiser must not update (an unregistered stem is
        never optimised; 'paper_count' froze encoder and proj). Frozen parts also run in inference
        mode (BatchNorm running statistics, no dropout), so nothing about them changes in training.
    """

    UNREGISTERED_PATHS = ("encoder/stem",)
    FROZEN_BY_HEAD = {"paper_text": ("encoder/stem",), "paper_count": ("encoder",), "tokens": ()}

    def __init__(self, cfg: SpecPTConfig, head: str | None = None,
                 batch_mixing_attention: bool = False, *, rngs: nnx.Rngs):
        head = head or ("paper_text" if cfg.architecture == "paper" else "tokens")
        if head not in REDSHIFT_HEADS:
            raise ValueError(f"unknown SpecPT redshift head {head!r}; known: {REDSHIFT_HEADS}")
        needed = "tokens" if head == "tokens" else "paper"
        if cfg.architecture != needed:
            raise ValueError(f"head {head!r} needs the {needed!r} architecture, but the config "
                             f"has {cfg.architecture!r}")
        if batch_mixing_attention and head != "paper_text":
            raise ValueError("batch_mixing_attention only exists for the 'paper_text' head")
        self.cfg = cfg
        self.head_name = head
        self.encoder = SpecPTEncoder(cfg, rngs=rngs)
        if head == "paper_text":
            self.head = PaperTextHead(cfg, batch_mixing_attention, rngs=rngs)
        elif head == "paper_count":
            self.head = PaperCountHead(cfg, rngs=rngs)
        else:
            self.head = TokenPoolingHead(cfg, rngs=rngs)

    @property
    def frozen_paths(self) -> tuple[str, ...]:
        return self.FROZEN_BY_HEAD[self.head_name]

    @property
    def unregistered_paths(self) -> tuple[str, ...]:
        """Paths the paper's counts leave out: only the reference heads borrow an unregistered
        stem; the corrected 'tokens' model registers (and trains) its own."""
        return self.UNREGISTERED_PATHS if self.head_name.startswith("paper") else ()

    @property
    def fixed_input_length(self) -> int | None:
        """Pixels the model is defined on (the paper architecture's dense layers), or None when
        it takes any length ('tokens')."""
        return self.cfg.input_length if self.cfg.architecture == "paper" else None

    def __call__(self, flux, mask, wavelength, *, train: bool):
        """flux [B, L] float32, mask [B, L] bool, wavelength [B, L] Å -> z [B] float32."""
        frozen = self.frozen_paths
        encoder_train = train and "encoder" not in frozen
        stem_train = encoder_train and "encoder/stem" not in frozen
        features = self.encoder(flux, mask, wavelength, train=encoder_train,
                                stem_train=stem_train)
        if self.head_name == "tokens":
            return self.head(features, self.encoder.token_mask(mask), train=train)
        return self.head(features, train=train)
