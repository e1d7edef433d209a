"""Spectra as images + a pretrained ViT (Strano Moraes et al., "Applying vision transformers to the
spectral analysis of astronomical objects"; code: astromer-science/spectromer). SPECS.md §2.

A spectrum is rendered to a 224 × 224 RGB image (line plot, overlap plot or 2D map; the rendering
is not part of this module), and a DINO ViT-B/16 pretrained on ImageNet is fine-tuned on it with
a linear head on the CLS token.

Backbone (:class:`ViT`), the architecture of Hugging Face ``ViTModel`` / timm
``VisionTransformer`` exactly, so both checkpoint layouts load (:mod:`spectrax.convert_weights`):

    pixels [B, 224, 224, 3] (already normalised)
      -> ``patch_embed``: Conv 16×16, stride 16, 3 -> D         [B, 196, D]
      -> prepend ``cls_token`` [1, 1, D], add ``pos_embed`` [1, 197, D]
      -> ``encoder``: 12 pre-LN blocks (x + attn(LN x); x + MLP(LN x)), MLP D -> 4D -> D with
         exact (erf) GELU, q/k/v/out projections with bias, then a final LayerNorm
      => tokens [B, 197, D]; CLS features = tokens[:, 0]         (``last_hidden_state[:, 0]``)

The encoder is :class:`spectrax.nn.TransformerEncoder` with ``norm_first=True`` and
``final_norm=True``: its block is exactly the ViT block, and its attention keeps q, k and v as
separate Linear layers like the HF port (timm's fused ``qkv`` is split on conversion).

Parameters of ViT-B/16 (D 768, 12 layers, 12 heads, MLP 3072; no pooler): 85,798,656 =
  patch 768·3·16·16 + 768 = 590,592;  cls 768;  pos 197·768 = 151,296;
  12 blocks × 7,087,872 (attention 4·768² + 4·768, MLP 2·768·3072 + 3072 + 768, 2 LayerNorms);
  final LayerNorm 1,536.

LayerNorm epsilon: 1e-12 in the HF port ``facebook/dino-vitb16`` (its config.json, and the
``ViTConfig`` default), 1e-6 in timm and the original DINO code that trained the weights. The
default variant 'b16' follows the HF port, which the reference fine-tunes; 'b16_timm' uses 1e-6.
With activations of order one the two differ by ~1e-6 relative, far below anything that matters.

Pixel normalisation (:data:`PIXEL_NORMS`): SPECS §2 says the reference feeds pixel/255 then
(x − 0.5) / 0.5 per channel ('reference', the default); DINO was pretrained with ImageNet's mean
and std ('imagenet'), which a user may prefer for a frozen backbone.

Heads (:class:`ViTHead`, SPECS §2): Linear(D → K) on the CLS features, logits for classification
(K classes, cross-entropy) or values for regression (K = 1, MSE); optionally hidden layers of 512
with ReLU first (``head_hidden=(512,)``). :class:`ViTForSpectra` keeps the backbone under
``backbone`` and the head under ``head`` so a training loop can freeze the backbone by path prefix
(``freeze_backbone`` in the config also sets ``frozen_paths`` and stops gradients into it).

Differences from the reference that are deliberate (SPECS §2): the reference divides the flux by
(1 + z) before rendering, leaking the redshift label into the image amplitude; spectrax renderers
must not, and nothing here does.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from spectrax.nn import Dropout, TransformerEncoder

COMPUTE_DTYPES = ("float32", "bfloat16")

# Per-channel (mean, std) applied to images in [0, 1]: (x − mean) / std.
PIXEL_NORMS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # The reference (SPECS §2): pixel/255, then (x − 0.5) / 0.5, i.e. [0, 1] -> [−1, 1].
    "reference": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # ImageNet statistics, which DINO's pretraining (and HF's image processor for it) used.
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

# Exact count for ViT-B/16 without pooler (module docstring).
VIT_B16_PARAMETERS = 85_798_656


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Every size of the ViT and its head. Defaults are DINO ViT-B/16 as in the HF port.

    Attributes:
      image_size: H = W of the input image, pixels (must be a multiple of ``patch_size``).
      patch_size: P, side of a square patch, pixels.
      num_channels: C of the input (3: RGB; RGBA images are fed as RGB, see :func:`to_rgb`).
      width: D, token width.
      num_layers: transformer blocks.
      num_heads: attention heads (D must divide).
      mlp_dim: hidden width of each block's MLP.
      layer_norm_eps: LayerNorm epsilon (1e-12 HF port, 1e-6 timm/DINO; module docstring).
      dropout: dropout inside the blocks (DINO / HF: 0).
      pixel_norm: key of :data:`PIXEL_NORMS`, the normalisation :class:`ViTForSpectra` applies.
      head_hidden: hidden widths of the head MLP (ReLU after each); () = one Linear(D → K).
      head_dropout: dropout before each head Linear.
      freeze_backbone: train only the head (sets ``frozen_paths``; gradients stop at the CLS).
      dtype: compute dtype, 'float32' or 'bfloat16'; parameters stay float32.
      attention: implementation of every attention layer (:func:`spectrax.nn.attend`; 'auto'
        picks per backend and shape).
    """

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0
    pixel_norm: str = "reference"
    head_hidden: tuple[int, ...] = ()
    head_dropout: float = 0.0
    freeze_backbone: bool = False
    dtype: str = "float32"
    attention: str = "auto"

    def __post_init__(self):
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} unknown; use one of {COMPUTE_DTYPES}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} not divisible by num_heads {self.num_heads}")
        if self.pixel_norm not in PIXEL_NORMS:
            raise ValueError(f"pixel_norm {self.pixel_norm!r} unknown; use one of "
                             f"{sorted(PIXEL_NORMS)}")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def grid_size(self) -> int:
        """Patches per image side (224 / 16 = 14)."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Sequence length including CLS (197 for B/16 at 224)."""
        return self.grid_size ** 2 + 1


_B16 = ViTConfig()

VARIANTS: dict[str, ViTConfig] = {
    # DINO ViT-B/16 as ported to HF (facebook/dino-vitb16), which the reference fine-tunes.
    "b16": _B16,
    # The same network with timm's / the DINO repository's LayerNorm epsilon.
    "b16_timm": dataclasses.replace(_B16, layer_norm_eps=1e-6),
    # CPU tests: ViT-Ti width on the same 224-pixel images (same renderers), 3 blocks.
    "tiny": dataclasses.replace(_B16, width=192, num_layers=3, num_heads=3, mlp_dim=768),
}


def vit_config(variant: str = "b16", **overrides) -> ViTConfig:
    """The named ViT configuration ('b16', 'b16_timm', 'tiny'), fields optionally overridden."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ViT variant {variant!r}; known: {sorted(VARIANTS)}")
    return dataclasses.replace(VARIANTS[variant], **overrides)


def expected_parameter_count(cfg: ViTConfig) -> int:
    """Backbone parameters (no head), from the formula in the module docstring."""
    d, f, p, c = cfg.width, cfg.mlp_dim, cfg.patch_size, cfg.num_channels
    block = (4 * d * d + 4 * d) + (2 * d * f + f + d) + 4 * d
    return (p * p * c * d + d) + d + cfg.num_tokens * d + cfg.num_layers * block + 2 * d


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------

def to_rgb(images):
    """[B, H, W, 3 or 4] -> [B, H, W, 3]: drops an alpha channel (the reference saves RGBA PNGs
    and feeds their RGB channels)."""
    if images.shape[-1] == 4:
        return images[..., :3]
    if images.shape[-1] != 3:
        raise ValueError(f"images must have 3 (RGB) or 4 (RGBA) channels, got shape "
                         f"{images.shape}")
    return images


def normalize_images(images, pixel_norm: str = "reference"):
    """Images in [0, 1] (pixel / 255), [B, H, W, 3|4] -> (x − mean) / std per channel, float32
    [B, H, W, 3]; see :data:`PIXEL_NORMS`."""
    mean, std = PIXEL_NORMS[pixel_norm]
    images = to_rgb(jnp.asarray(images, jnp.float32))
    return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# ------------------------------------------------------------------------------------------------
# Backbone
# ------------------------------------------------------------------------------------------------

class ViTFeatures(NamedTuple):
    """Backbone output. ``cls``: [B, D], the CLS token after the final LayerNorm (what the heads
    read). ``tokens``: [B, 1 + N, D], the whole sequence after the final LayerNorm (HF's
    ``last_hidden_state``; N = 196 patches, row-major over the 14 × 14 grid)."""

    cls: jax.Array
    tokens: jax.Array


class ViT(nnx.Module):
    """The ViT backbone (module docstring). Sub-modules and parameters: ``patch_embed`` (Conv,
    kernel [P, P, C, D] HWIO), ``cls_token`` [1, 1, D], ``pos_embed`` [1, 1 + N, D], ``encoder``
    (:class:`~spectrax.nn.TransformerEncoder`: ``layers/i/{norm1, self_attn, norm2, linear1,
    linear2}`` and the final ``norm``).

    Initialisation (for training from scratch; pretrained weights replace it): truncated normal
    σ = 0.02 for the CLS token and position embeddings as in HF/timm, flax defaults elsewhere.
    """

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, p, dtype = cfg.width, cfg.patch_size, cfg.compute_dtype
        # kernel == stride, no padding: each output position sees exactly one patch.
        self.patch_embed = nnx.Conv(cfg.num_channels, d, kernel_size=(p, p), strides=(p, p),
                                    padding="VALID", dtype=dtype, rngs=rngs)
        init = jax.nn.initializers.truncated_normal(0.02)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, d), jnp.float32))
        self.pos_embed = nnx.Param(init(rngs.params(), (1, cfg.num_tokens, d), jnp.float32))
        self.encoder = TransformerEncoder(
            cfg.num_layers, d, cfg.num_heads, cfg.mlp_dim, cfg.dropout, "gelu", norm_first=True,
            eps=cfg.layer_norm_eps, final_norm=True, dtype=dtype, attention=cfg.attention,
            rngs=rngs)

    def __call__(self, pixels, *, train: bool = False) -> ViTFeatures:
        """Encodes normalised images.

        Args:
          pixels: [B, H, W, C] float, already normalised (:func:`normalize_images`), NHWC;
            H = W = cfg.image_size (position embeddings are not interpolated).
          train: enables dropout (needs a 'dropout' rng stream when cfg.dropout > 0).

        Returns:
          :class:`ViTFeatures` in the compute dtype.
        """
        cfg = self.cfg
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"ViT expects images [B, {', '.join(map(str, expected))}] (NHWC), "
                             f"got {tuple(pixels.shape)}")
        dtype = cfg.compute_dtype
        x = self.patch_embed(jnp.asarray(pixels, dtype))                  # [B, g, g, D]
        x = x.reshape(x.shape[0], -1, x.shape[-1])                         # [B, N, D], row-major
        cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(dtype)
        tokens = self.encoder(x, deterministic=not train)
        return ViTFeatures(cls=tokens[:, 0], tokens=tokens)


# ------------------------------------------------------------------------------------------------
# Head and the full model
# ------------------------------------------------------------------------------------------------

class ViTHead(nnx.Module):
    """MLP on the CLS features: ``hidden`` Linear+ReLU layers (``layers/0..``), then ``out``
    Linear → K. Logits for classification, values for regression; float32 output.

    Args:
      width: D, input features. num_outputs: K.
      hidden: hidden widths (SPECS §2 mentions an optional 512); () = a single Linear.
      dropout: rate before every Linear.
    """

    def __init__(self, width: int, num_outputs: int, *, hidden: tuple[int, ...] = (),
                 dropout: float = 0.0, dtype=None, rngs: nnx.Rngs):
        widths = (width, *hidden)
        self.layers = nnx.List([nnx.Linear(a, b, dtype=dtype, rngs=rngs)
                                for a, b in zip(widths[:-1], widths[1:])])
        self.out = nnx.Linear(widths[-1], num_outputs, dtype=dtype, rngs=rngs)
        self.dropout = Dropout(dropout, rngs=rngs)

    def __call__(self, features, *, train: bool = False):
        """features [B, D] -> [B, K] float32."""
        x = features
        for layer in self.layers:
            x = jax.nn.relu(layer(self.dropout(x, deterministic=not train)))
        return self.out(self.dropout(x, deterministic=not train)).astype(jnp.float32)


Renderer = Callable[..., jax.Array]


class ViTForSpectra(nnx.Module):
    """ViT backbone (``backbone``) + :class:`ViTHead` (``head``): images (or spectra, through a
    renderer) -> [B, K].

    Args:
      cfg: :class:`ViTConfig`.
      num_outputs: K (classes, or 1 for a regression target). The output keeps its K axis.
      renderer: optional callable ``renderer(*inputs) -> images [B, H, W, 3|4]`` in [0, 1],
        traceable by JAX (e.g. a 2D-map renderer taking ``flux, mask, wavelength``). Without one,
        the model takes images directly.
      rngs: initialisation (and dropout) streams.

    ``frozen_paths`` is ``('backbone',)`` when ``cfg.freeze_backbone``, for the training loop.
    """

    def __init__(self, cfg: ViTConfig, num_outputs: int, renderer: Renderer | None = None, *,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.renderer = renderer
        self.frozen_paths = ("backbone",) if cfg.freeze_backbone else ()
        self.backbone = ViT(cfg, rngs=rngs)
        self.head = ViTHead(cfg.width, num_outputs, hidden=cfg.head_hidden,
                            dropout=cfg.head_dropout, dtype=cfg.compute_dtype, rngs=rngs)

    def features(self, images, *, train: bool = False) -> ViTFeatures:
        """Images [B, H, W, 3|4] float in [0, 1] -> :class:`ViTFeatures` (normalised here)."""
        return self.backbone(normalize_images(images, self.cfg.pixel_norm), train=train)

    def __call__(self, *inputs, train: bool = False):
        """Predicts.

        Args:
          *inputs: ``images`` [B, H, W, 3|4] float in [0, 1] when there is no renderer;
            otherwise whatever the renderer takes (e.g. ``flux, mask, wavelength``).
          train: enables dropout.

        Returns:
          [B, K] float32 logits or regression values.
        """
        if self.renderer is None and len(inputs) != 1:
            raise ValueError("ViTForSpectra without a renderer takes one argument, the images "
                             f"[B, H, W, 3]; got {len(inputs)} positional arguments")
        images = self.renderer(*inputs) if self.renderer is not None else inputs[0]
        # A frozen backbone is still run in inference mode and gets no backward pass at all.
        frozen = self.cfg.freeze_backbone
        cls = self.features(images, train=train and not frozen).cls
        if frozen:
            cls = jax.lax.stop_gradient(cls)
        return self.head(cls, train=train)


def build(model_cfg, rngs: nnx.Rngs, num_outputs: int) -> ViTForSpectra:
    """Registry hook: ``model_cfg.variant`` (default 'b16'), ``model_cfg.dtype`` and
    ``model_cfg.attention``; optional ``freeze_backbone``, ``head_hidden``, ``pixel_norm`` fields
    are honoured when present."""
    overrides = {"dtype": getattr(model_cfg, "dtype", None) or "float32",
                 "attention": getattr(model_cfg, "attention", None) or "auto"}
    for name in ("freeze_backbone", "head_hidden", "pixel_norm"):
        value = getattr(model_cfg, name, None)
        if value is not None:
            overrides[name] = tuple(value) if name == "head_hidden" else value
    cfg = vit_config(getattr(model_cfg, "variant", None) or "b16", **overrides)
    return ViTForSpectra(cfg, num_outputs, rngs=rngs)
