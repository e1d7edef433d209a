"""Model registry: ``config.model`` -> an NNX module, plus parameter accounting.

The training loop, ``spectrax.predict`` and the benchmarks build models only through
:func:`build_model`, so adding a model means adding one entry to :data:`BUILDERS`.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

from flax import nnx


def _specpt_autoencoder(m, rngs):
    from spectrax.models import specpt
    return specpt.SpecPTAutoencoder(specpt.specpt_config(m.variant or "small", dtype=m.dtype),
                                    rngs=rngs)


def _specpt_redshift(m, rngs):
    from spectrax.models import specpt
    return specpt.SpecPTRedshift(specpt.specpt_config(m.variant or "small", dtype=m.dtype),
                                 head=m.head or None,
                                 batch_mixing_attention=m.batch_mixing_attention, rngs=rngs)


def _zscan(m, rngs):
    """The learned matched-filter redshift scan; ``m.scan`` holds its redshift range (z_min,
    z_max, prior_z_range) and any other :class:`~spectrax.models.zscan.ZScanConfig` field."""
    from spectrax.models import zscan
    overrides = m.scan.to_dict() if m.get("scan") is not None else {}
    if "prior_z_range" in overrides:
        overrides["prior_z_range"] = tuple(overrides["prior_z_range"])
    return zscan.ZScan(zscan.zscan_config(m.variant or "small", dtype=m.dtype, **overrides),
                       rngs=rngs)


def _tokenizer(m, rngs):
    from spectrax.models import tokenizer
    return tokenizer.SpectralTokenizer(
        tokenizer.tokenizer_config(m.variant or "small", dtype=m.dtype), rngs=rngs)


def _spectrafm(m, rngs):
    from spectrax.models import spectrafm
    return spectrafm.SpectraFM(spectrafm.spectrafm_config(m.variant or "small", dtype=m.dtype),
                               rngs=rngs)


def _tokenizer_adapted(m, rngs):
    from spectrax.models import tokenizer
    if not m.num_outputs:
        raise ValueError("config.model.num_outputs must be set for tokenizer_adapted (classes "
                         "for classification, labels for regression)")
    return tokenizer.AdaptedTokenizer(
        tokenizer.tokenizer_config(m.variant or "small", dtype=m.dtype), m.num_outputs,
        rngs=rngs)


def _vit(m, rngs):
    """ViT-B/16 (or 'tiny') on spectra rendered on the fly as ``m.representation`` images."""
    import functools

    from spectrax import render
    from spectrax.models import vit
    model = vit.build(m, rngs, m.num_outputs or 3)
    if m.get("representation"):
        options = m.render.to_dict() if m.get("render") is not None else {}
        model.renderer = functools.partial(render.render, m.representation,
                                           config=render.RenderConfig(**options))
    return model


def _transformer1d(m, rngs):
    from spectrax.models import transformer1d
    return transformer1d.build(m, rngs, m.num_outputs or 1)


def _window_mlp(m, rngs):
    from spectrax.models import mlp
    return mlp.build(m, rngs, m.num_outputs or 1)


BUILDERS: dict[str, Callable[[Any, nnx.Rngs], nnx.Module]] = {
    "spectrafm": _spectrafm,
    "specpt_autoencoder": _specpt_autoencoder,
    "specpt_redshift": _specpt_redshift,
    "zscan": _zscan,
    "tokenizer": _tokenizer,
    "tokenizer_adapted": _tokenizer_adapted,
    "vit": _vit,
    "transformer1d": _transformer1d,
    "window_mlp": _window_mlp,
}


def compute_dtype(name: str) -> str:
    """``config.model.dtype`` resolved: ``'auto'`` is bfloat16 on accelerators (GPU, TPU: their
    matmul units run bf16 at several times the fp32 rate) and float32 on CPU (no bf16 speed-up;
    XLA:CPU emulates parts of it). Parameters, optimiser state and losses stay float32 either
    way."""
    if name != "auto":
        return name
    import jax
    return "bfloat16" if jax.default_backend() in ("gpu", "tpu", "cuda", "rocm") else "float32"


def build_model(model_cfg, *, rngs: nnx.Rngs) -> nnx.Module:
    """Builds ``model_cfg.name`` (see :data:`BUILDERS`) with the config's variant/head.

    Also applies ``model_cfg.attention`` (the attention implementation of every layer, see
    :mod:`spectrax.nn.attention`) and resolves ``model_cfg.dtype='auto'`` (:func:`compute_dtype`).
    """
    from spectrax.nn.attention import set_default_implementation

    if model_cfg.name not in BUILDERS:
        raise ValueError(f"config.model.name={model_cfg.name!r}; known: {sorted(BUILDERS)}")
    set_default_implementation(model_cfg.get("attention", "auto"))
    dtype = compute_dtype(model_cfg.get("dtype", "float32"))
    if dtype != model_cfg.get("dtype", "float32"):
        model_cfg = model_cfg.copy_and_resolve_references()
        with model_cfg.unlocked():
            model_cfg.dtype = dtype
    return BUILDERS[model_cfg.name](model_cfg, rngs)


def check_input_length(model_cfg, length: int | None) -> None:
    """Fixed-grid models (SpecPT's paper architecture) refuse data of another length."""
    model = nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))
    cfg = getattr(model, "cfg", None)
    fixed = getattr(cfg, "architecture", None) == "paper"
    if fixed and length is not None and length != cfg.input_length:
        raise ValueError(
            f"model {model_cfg.name}:{model_cfg.variant} is defined on {cfg.input_length} pixels "
            f"but the data have {length}; resample onto its grid (DESI: 3600-9824 Å, 0.8 Å) "
            "or use a variant that accepts any length ('tokens')")


def default_frozen(model_cfg) -> tuple[str, ...]:
    """Parameter paths a model freezes by its own definition (e.g. SpecPT's paper heads)."""
    model = nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))
    return tuple(getattr(model, "frozen_paths", ()))


def parameter_table(abstract_model: nnx.Module, model_cfg=None, depth: int = 2) -> dict:
    """Parameter counts (nnx.Param only; BatchNorm statistics excluded) grouped by module path,
    at most ``depth`` components deep. Paths in the model's ``unregistered_paths`` are listed but
    left out of the total, as the reference's own count leaves them out."""
    from spectrax.models import _param_sizes, _under

    excluded = tuple(getattr(abstract_model, "unregistered_paths", ()))
    rows: OrderedDict[str, int] = OrderedDict()
    for path, size in _param_sizes(abstract_model):
        module = path.split("/")[:-1]  # drop the leaf name (kernel, bias, ...)
        key = "/".join(module[:depth])
        rows[key] = rows.get(key, 0) + size
    table = [{"path": k, "count": v, "excluded": any(_under(k, e) for e in excluded)}
             for k, v in rows.items()]
    return {"rows": table, "total": sum(r["count"] for r in table if not r["excluded"])}
