"""Model registry: ``config.model`` -> an NNX module, plus parameter accounting.

The training loop, ``spectrax.predict`` and the benchmarks build models only through
:func:`build_model`, so adding a model means adding one entry to :data:`BUILDERS`.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any, Callable

import jax
from flax import nnx

from spectrax import models, render
from spectrax.models import mlp, specpt, spectrafm, tokenizer, transformer1d, vit
from spectrax.nn.attention import check_implementation


def _compute(m) -> dict:
    """The compute settings every model config dataclass takes: dtype and attention."""
    return {"dtype": m.dtype, "attention": m.get("attention", "auto")}


def _specpt_autoencoder(m, rngs):
    return specpt.SpecPTAutoencoder(specpt.specpt_config(m.variant or "small", **_compute(m)),
                                    rngs=rngs)


def _specpt_redshift(m, rngs):
    return specpt.SpecPTRedshift(specpt.specpt_config(m.variant or "small", **_compute(m)),
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
    return tokenizer.SpectralTokenizer(
        tokenizer.tokenizer_config(m.variant or "small", **_compute(m)), rngs=rngs)


def _spectrafm(m, rngs):
    return spectrafm.SpectraFM(
        spectrafm.spectrafm_config(m.variant or "small", **_compute(m)), rngs=rngs)


def _tokenizer_adapted(m, rngs):
    if not m.num_outputs:
        raise ValueError("config.model.num_outputs must be set for tokenizer_adapted (classes "
                         "for classification, labels for regression)")
    return tokenizer.AdaptedTokenizer(
        tokenizer.tokenizer_config(m.variant or "small", **_compute(m)), m.num_outputs,
        rngs=rngs)


def _vit(m, rngs):
    """ViT-B/16 (or 'tiny') on spectra rendered on the fly as ``m.representation`` images."""
    model = vit.build(m, rngs, m.num_outputs or 3)
    if m.get("representation"):
        options = m.render.to_dict() if m.get("render") is not None else {}
        model.renderer = functools.partial(render.render, m.representation,
                                           config=render.RenderConfig(**options))
    return model


def _transformer1d(m, rngs):
    return transformer1d.build(m, rngs, m.num_outputs or 1)


def _window_mlp(m, rngs):
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
    return "bfloat16" if jax.default_backend() in ("gpu", "tpu", "cuda", "rocm") else "float32"


def build_model(model_cfg, *, rngs: nnx.Rngs) -> nnx.Module:
    """Builds ``model_cfg.name`` (see :data:`BUILDERS`) with the config's variant/head.

    ``model_cfg.attention`` (the implementation of every attention layer, see
    :mod:`spectrax.nn.attention`) goes to the model's size dataclass, which hands it to each
    layer; ``model_cfg.dtype='auto'`` is resolved by :func:`compute_dtype`.
    """
    if model_cfg.name not in BUILDERS:
        raise ValueError(f"config.model.name={model_cfg.name!r}; known: {sorted(BUILDERS)}")
    check_implementation(model_cfg.get("attention", "auto"))
    dtype = compute_dtype(model_cfg.get("dtype", "float32"))
    if dtype != model_cfg.get("dtype", "float32"):
        model_cfg = model_cfg.copy_and_resolve_references()
        with model_cfg.unlocked():
            model_cfg.dtype = dtype
    return BUILDERS[model_cfg.name](model_cfg, rngs)


def abstract_model(model_cfg) -> nnx.Module:
    """The model of ``model_cfg`` with shapes only (``nnx.eval_shape``: nothing allocated)."""
    return nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))


def check_input_length(model: nnx.Module, length: int | None) -> None:
    """Models defined on a fixed grid (``fixed_input_length``: SpecPT's paper architecture)
    refuse data of another length. ``model`` may be abstract (:func:`abstract_model`)."""
    fixed = getattr(model, "fixed_input_length", None)
    if fixed is not None and length is not None and length != fixed:
        raise ValueError(
            f"model {type(model).__name__} is defined on {fixed} pixels but the data have "
            f"{length}; resample onto its grid (DESI: 3600-9824 Å, 0.8 Å) or use a variant "
            "that accepts any length ('tokens')")


def default_frozen(model: nnx.Module) -> tuple[str, ...]:
    """Parameter paths a model freezes by its own definition (``frozen_paths``: e.g. SpecPT's
    paper heads, a frozen ViT backbone). ``model`` may be abstract."""
    return tuple(getattr(model, "frozen_paths", ()))


def module_counts(abstract_model: nnx.Module, depth: int = 2, *,
                  leaf_names: bool = True) -> dict[str, int]:
    """Parameter counts (nnx.Param only; BatchNorm statistics excluded) summed over the first
    ``depth`` components of each parameter's path, in path order; with ``leaf_names=False``
    the leaf names (kernel, bias, ...) are dropped first, so rows are modules.
    Example: ``{'decoder': 12612096, 'embedding/weight': 1925120, ...}``."""
    counts: OrderedDict[str, int] = OrderedDict()
    for path, size in models.param_sizes(abstract_model):
        parts = path.split("/") if leaf_names else path.split("/")[:-1]
        key = "/".join(parts[:depth])
        counts[key] = counts.get(key, 0) + size
    return dict(counts)


def parameter_table(abstract_model: nnx.Module, depth: int = 2) -> dict:
    """:func:`module_counts` as rows for the dry run. Paths in the model's
    ``unregistered_paths`` are listed but left out of the total, as the reference's own count
    leaves them out."""
    excluded = tuple(getattr(abstract_model, "unregistered_paths", ()))
    table = [{"path": k, "count": v, "excluded": any(models.is_under(k, e) for e in excluded)}
             for k, v in module_counts(abstract_model, depth, leaf_names=False).items()]
    return {"rows": table, "total": sum(r["count"] for r in table if not r["excluded"])}
