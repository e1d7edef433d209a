"""Pretrained ViT-B/16 weights (DINO) from a PyTorch checkpoint file into
:class:`spectrax.models.vit.ViT`.

Nothing is downloaded here or at run time. Obtain a checkpoint once, on a machine with internet:

* Hugging Face port (``facebook/dino-vitb16``, what the reference fine-tunes)::

      huggingface-cli download facebook/dino-vitb16 model.safetensors --local-dir dino-vitb16
      # or pytorch_model.bin; both layouts load

* timm (``vit_base_patch16_224.dino``)::

      import timm, torch
      model = timm.create_model("vit_base_patch16_224.dino", pretrained=True)
      torch.save(model.state_dict(), "vit_base_patch16_224_dino.pth")

* the DINO repository's ``dino_vitbase16_pretrain.pth`` (same names as timm), or a full DINO
  training checkpoint (its ``teacher`` weights are used, ``backbone.`` prefixes stripped).

Then convert once (the .npz loads without torch, into any process)::

      python -m spectrax.convert_weights dino-vitb16/model.safetensors weights/
      # -> weights/vit_b16.npz

and in Python::

      from spectrax.convert_weights import load_pretrained_vit
      report = load_pretrained_vit(model, "weights/vit_b16.npz")  # or the original file

Formats read: ``.safetensors`` (the ``safetensors`` package's numpy loader, no torch needed),
``.pth``/``.pt``/``.bin``/``.ckpt`` (``torch.load(weights_only=True)``: needs torch), and ``.npz``
written by this module.

Naming schemes (detected from the keys; ``module.``, ``backbone.``, ``vit.`` prefixes stripped),
spectrax ``ViT`` parameter <- Hugging Face ``ViTModel`` name | timm / DINO name:

  patch_embed/kernel [P,P,C,D] HWIO   <- embeddings.patch_embeddings.projection.weight (OIHW)
                                         | patch_embed.proj.weight (OIHW)
  cls_token [1,1,D]                   <- embeddings.cls_token | cls_token
  pos_embed [1,1+N,D]                 <- embeddings.position_embeddings | pos_embed
  encoder/layers/i/norm1              <- encoder.layer.i.layernorm_before | blocks.i.norm1
  encoder/layers/i/self_attn/q_proj,  <- ...attention.attention.{query,key,value}
    k_proj, v_proj                       | blocks.i.attn.qkv (fused [3D, D], rows q | k | v)
  encoder/layers/i/self_attn/out_proj <- ...attention.output.dense | blocks.i.attn.proj
  encoder/layers/i/norm2              <- ...layernorm_after | blocks.i.norm2
  encoder/layers/i/linear1            <- ...intermediate.dense | blocks.i.mlp.fc1
  encoder/layers/i/linear2            <- ...output.dense | blocks.i.mlp.fc2
  encoder/norm                        <- layernorm | norm

Linear weights are transposed ((out, in) -> (in, out)); LayerNorm ``weight`` becomes ``scale``.
Ignored: HF ``pooler.*``, ``classifier.*`` and ``embeddings.mask_token``, timm/DINO ``head.*``
(task-specific heads; a mask token only serves masked-image-modelling pretraining).
Anything else that does not fit — a missing tensor, an unexpected name, a wrong shape (e.g. a
ViT-S/16 or a ViT-B/8 checkpoint) — raises :class:`CheckpointMismatchError` listing every
offending name and shape, before any parameter of the module is changed.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectrax.models.vit import ViT, ViTConfig, vit_config

# Prefixes that wrap the backbone's names in the layouts we read (DDP, DINO's MultiCropWrapper,
# HF's task models).
_WRAPPER_PREFIXES = ("module.", "backbone.", "vit.")
# Containers of the state dict inside a training checkpoint, most specific first.
_CONTAINER_KEYS = ("teacher", "state_dict", "model")
# Task heads, and HF's mask token (used only for masked-image-modelling pretraining).
_IGNORED = {"hf": ("pooler.", "classifier.", "embeddings.mask_token"), "timm": ("head.",)}
# Key holding the JSON metadata in the .npz files written by :func:`save_converted`.
_META_KEY = "__spectrax_vit__"

ParamPath = tuple  # an nnx parameter path, e.g. ('encoder', 'layers', 0, 'linear1', 'kernel')


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not fit the ViT configuration; the message lists them all."""


# ------------------------------------------------------------------------------------------------
# Reading files
# ------------------------------------------------------------------------------------------------

def _to_numpy(value) -> np.ndarray:
    """A torch tensor or array-like -> float32 numpy array (bf16/fp16 checkpoints widen)."""
    if hasattr(value, "detach"):  # torch.Tensor; numpy has no bfloat16, so widen in torch
        return value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _unwrap(obj: Any) -> Mapping[str, Any]:
    """Finds the flat {name: tensor} dict inside a saved object (a training checkpoint may nest
    it under 'teacher', 'state_dict' or 'model')."""
    for key in _CONTAINER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            return _unwrap(obj[key])
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict (a mapping of names to tensors), got "
                         f"{type(obj).__name__}")
    return obj


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a checkpoint file into {name: float32 numpy array}.

    ``.safetensors`` needs only the ``safetensors`` package; ``.npz`` (from this module, or any
    flat npz) needs nothing; other suffixes are PyTorch pickles read with
    ``torch.load(weights_only=True)`` (no arbitrary code runs), which needs torch.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError as err:
            raise ImportError("reading .safetensors needs the 'safetensors' package "
                              "(pip install safetensors)") from err
        try:
            return {k: _to_numpy(v) for k, v in load_file(path).items()}
        except (TypeError, ValueError):
            # numpy has no bfloat16: fall back to torch's loader for such files when present.
            from safetensors.torch import load_file as load_torch
            return {k: _to_numpy(v) for k, v in load_torch(path).items()}
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            return {k: (data[k] if k == _META_KEY else _to_numpy(data[k])) for k in data.files}
    try:
        import torch
    except ImportError as err:
        raise ImportError(f"{path!r} is a PyTorch checkpoint; reading it needs torch. Install "
                          "torch, or convert it to .safetensors elsewhere") from err
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return {k: _to_numpy(v) for k, v in _unwrap(obj).items() if hasattr(v, "shape")}


# ------------------------------------------------------------------------------------------------
# Name mapping
# ------------------------------------------------------------------------------------------------

def _strip_wrappers(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def detect_layout(names) -> str:
    """'hf', 'timm' or 'spectrax' (an .npz from :func:`save_converted`), from the tensor names
    (already stripped of wrapper prefixes)."""
    names = list(names)
    if any("/" in n for n in names):
        return "spectrax"
    if any(n.startswith(("embeddings.", "encoder.layer.")) for n in names):
        return "hf"
    if any(n == "cls_token" or n.startswith(("blocks.", "patch_embed.")) for n in names):
        return "timm"
    raise CheckpointMismatchError(
        "not a ViT checkpoint in a known layout (Hugging Face ViTModel, timm/DINO "
        f"VisionTransformer or spectrax .npz); first names: {sorted(names)[:10]}")


def _linear(w):   # PyTorch Linear weight (out, in) -> flax kernel (in, out)
    return w.T


def _conv(w):     # PyTorch Conv2d weight OIHW -> flax HWIO
    return w.transpose(2, 3, 1, 0)


def _same(w):
    return w


# (regex on the source name, function (match, tensor) -> [(target path, array), ...]).
_Rule = tuple[str, Callable[[re.Match, np.ndarray], list[tuple[ParamPath, np.ndarray]]]]


def _leaf(*path, fn=_same):
    """A rule target: one tensor -> one parameter; '{i}' in the path is the layer index."""
    def apply(m, w):
        resolved = tuple(int(m["i"]) if part == "{i}" else part for part in path)
        return [(resolved, fn(w))]
    return apply


def _layer(*rest, fn=_same):
    return _leaf("encoder", "layers", "{i}", *rest, fn=fn)


def _norm_rules(src: str, *target) -> list[_Rule]:
    return [(src + r"\.weight", _leaf(*target, "scale")), (src + r"\.bias", _leaf(*target, "bias"))]


def _linear_rules(src: str, *target, layer: bool = True) -> list[_Rule]:
    leaf = _layer if layer else _leaf
    return [(src + r"\.weight", leaf(*target, "kernel", fn=_linear)),
            (src + r"\.bias", leaf(*target, "bias"))]


def _split_qkv(kind: str):
    """timm's fused qkv: weight [3D, D] / bias [3D], rows ordered q | k | v."""
    def apply(m, w):
        q, k, v = np.split(w, 3, axis=0)
        fn = _linear if kind == "weight" else _same
        i = int(m["i"])
        return [(("encoder", "layers", i, "self_attn", name, "kernel" if kind == "weight"
                  else "bias"), fn(part)) for name, part in (("q_proj", q), ("k_proj", k),
                                                             ("v_proj", v))]
    return apply


_HF_LAYER = r"encoder\.layer\.(?P<i>\d+)\."
_HF_RULES: list[_Rule] = [
    (r"embeddings\.cls_token", _leaf("cls_token")),
    (r"embeddings\.position_embeddings", _leaf("pos_embed")),
    (r"embeddings\.patch_embeddings\.projection\.weight", _leaf("patch_embed", "kernel", fn=_conv)),
    (r"embeddings\.patch_embeddings\.projection\.bias", _leaf("patch_embed", "bias")),
    *_linear_rules(_HF_LAYER + r"attention\.attention\.query", "self_attn", "q_proj"),
    *_linear_rules(_HF_LAYER + r"attention\.attention\.key", "self_attn", "k_proj"),
    *_linear_rules(_HF_LAYER + r"attention\.attention\.value", "self_attn", "v_proj"),
    *_linear_rules(_HF_LAYER + r"attention\.output\.dense", "self_attn", "out_proj"),
    *_linear_rules(_HF_LAYER + r"intermediate\.dense", "linear1"),
    *_linear_rules(_HF_LAYER + r"output\.dense", "linear2"),
    *_norm_rules(_HF_LAYER + r"layernorm_before", "encoder", "layers", "{i}", "norm1"),
    *_norm_rules(_HF_LAYER + r"layernorm_after", "encoder", "layers", "{i}", "norm2"),
    *_norm_rules(r"layernorm", "encoder", "norm"),
]

_TIMM_LAYER = r"blocks\.(?P<i>\d+)\."
_TIMM_RULES: list[_Rule] = [
    (r"cls_token", _leaf("cls_token")),
    (r"pos_embed", _leaf("pos_embed")),
    (r"patch_embed\.proj\.weight", _leaf("patch_embed", "kernel", fn=_conv)),
    (r"patch_embed\.proj\.bias", _leaf("patch_embed", "bias")),
    (_TIMM_LAYER + r"attn\.qkv\.weight", _split_qkv("weight")),
    (_TIMM_LAYER + r"attn\.qkv\.bias", _split_qkv("bias")),
    *_linear_rules(_TIMM_LAYER + r"attn\.proj", "self_attn", "out_proj"),
    *_linear_rules(_TIMM_LAYER + r"mlp\.fc1", "linear1"),
    *_linear_rules(_TIMM_LAYER + r"mlp\.fc2", "linear2"),
    *_norm_rules(_TIMM_LAYER + r"norm1", "encoder", "layers", "{i}", "norm1"),
    *_norm_rules(_TIMM_LAYER + r"norm2", "encoder", "layers", "{i}", "norm2"),
    *_norm_rules(r"norm", "encoder", "norm"),
]

_RULES = {"hf": _HF_RULES, "timm": _TIMM_RULES}


def _path_str(path: ParamPath) -> str:
    return "/".join(str(p) for p in path)


@functools.lru_cache(maxsize=4)
def abstract_vit(cfg: ViTConfig) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, abstract parameters, abstract other state) of ``ViT(cfg)``, made once per
    configuration: tracing the 86 M-parameter initialisation takes seconds even abstractly."""
    return nnx.split(nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)


def _expected_params(cfg: ViTConfig) -> dict[str, tuple[ParamPath, tuple[int, ...]]]:
    """{'a/b/0/c': (path, shape)} of every parameter of ``ViT(cfg)``, without allocating."""
    _, params, _ = abstract_vit(cfg)
    return {_path_str(path): (tuple(path), tuple(v.shape))
            for path, v in nnx.to_flat_state(params)}


def _map_names(state_dict: Mapping[str, np.ndarray], layout: str):
    """Source tensors -> ({target 'a/b/c': (array, source name)}, unmatched names, ignored)."""
    produced: dict[str, tuple[np.ndarray, str]] = {}
    unmatched, ignored = [], []
    for name, tensor in state_dict.items():
        if layout == "spectrax":
            if name != _META_KEY:
                produced[name] = (np.asarray(tensor, np.float32), name)
            continue
        short = _strip_wrappers(name)
        if short.startswith(_IGNORED[layout]):
            ignored.append(name)
            continue
        for pattern, apply in _RULES[layout]:
            m = re.fullmatch(pattern, short)
            if m:
                for path, array in apply(m, np.asarray(tensor, np.float32)):
                    produced[_path_str(path)] = (np.ascontiguousarray(array), name)
                break
        else:
            unmatched.append(name)
    return produced, unmatched, ignored


def convert_state_dict(state_dict: Mapping[str, np.ndarray], cfg: ViTConfig | None = None,
                       ) -> tuple[nnx.State, dict]:
    """Maps a checkpoint's tensors onto the parameters of ``ViT(cfg)``.

    Args:
      state_dict: {name: array} in the HF, timm/DINO or spectrax-npz layout (module docstring);
        arrays in PyTorch layouts (Linear (out, in), Conv OIHW).
      cfg: the target configuration (default ViT-B/16); only sizes matter here.

    Returns:
      (state, info): ``state`` an ``nnx.State`` of float32 numpy arrays with exactly the structure
      of ``nnx.state(ViT(cfg), nnx.Param)``; ``info`` = {'layout', 'loaded', 'ignored'}.

    Raises:
      CheckpointMismatchError: listing missing parameters, unexpected checkpoint names and shape
        mismatches (checkpoint name, its shape after layout conversion, expected shape).
    """
    cfg = cfg or vit_config("b16")
    layout = detect_layout(_strip_wrappers(n) for n in state_dict if n != _META_KEY)
    expected = _expected_params(cfg)
    produced, unmatched, ignored = _map_names(state_dict, layout)

    missing = [k for k in expected if k not in produced]
    unexpected = sorted(f"{src} {tuple(arr.shape)}" for k, (arr, src) in produced.items()
                        if k not in expected)
    unexpected += sorted(f"{n} {tuple(np.shape(state_dict[n]))}" for n in unmatched)
    wrong_shape = [f"{src} -> {k}: checkpoint {tuple(arr.shape)}, expected {expected[k][1]}"
                   for k, (arr, src) in produced.items()
                   if k in expected and tuple(arr.shape) != expected[k][1]]
    if missing or unexpected or wrong_shape:
        lines = [f"checkpoint ({layout} layout) does not match the ViT configuration (width "
                 f"{cfg.width}, {cfg.num_layers} layers, patch {cfg.patch_size}, image "
                 f"{cfg.image_size}):"]
        for title, items in (("shape mismatches", wrong_shape),
                             ("missing parameters (expected shape)",
                              [f"{k} {expected[k][1]}" for k in missing]),
                             ("unexpected checkpoint tensors", unexpected)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in items)
        raise CheckpointMismatchError("\n".join(lines))

    flat = [(path, nnx.Param(produced[key][0])) for key, (path, _) in expected.items()]
    info = {"layout": layout, "loaded": len(flat), "ignored": sorted(ignored)}
    return nnx.from_flat_state(flat), info


# ------------------------------------------------------------------------------------------------
# Loading into a module, saving converted weights
# ------------------------------------------------------------------------------------------------

def _backbone(module: nnx.Module) -> ViT:
    if isinstance(module, ViT):
        return module
    backbone = getattr(module, "backbone", None)
    if isinstance(backbone, ViT):
        return backbone
    raise TypeError(f"expected a ViT or a module with a ViT 'backbone' attribute, got "
                    f"{type(module).__name__}")


def concrete_state(state: nnx.State, seed: int = 0) -> nnx.State:
    """``state`` with every abstract leaf made concrete: RNG keys folded from ``seed``, anything
    else zeros. Meant for what ``nnx.eval_shape`` leaves abstract besides the parameters one
    loads (the dropout layers' RNG streams), so that the module can run."""
    base = jax.random.key(seed)
    flat = []
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        value = var.get_value()
        if isinstance(value, jax.ShapeDtypeStruct):
            if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
                value = jnp.broadcast_to(jax.random.fold_in(base, i), value.shape)
            else:
                value = jnp.zeros(value.shape, value.dtype)
            var = var.replace(value)
        flat.append((path, var))
    return nnx.from_flat_state(flat)


def vit_from_state(state: nnx.State, cfg: ViTConfig) -> ViT:
    """A ready-to-run :class:`ViT` holding ``state`` (from :func:`convert_state_dict`), built
    without a random initialisation (dropout RNG streams seeded with 0)."""
    graphdef, _, rest = abstract_vit(cfg)
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, state), concrete_state(rest))


def load_pretrained_vit(module: nnx.Module, path: str | os.PathLike) -> dict:
    """Loads a checkpoint file into ``module`` (a :class:`ViT`, or e.g. a ``ViTForSpectra``
    whose ``backbone`` is one) in place, leaving any head untouched.

    Works on a :class:`ViT` made by ``nnx.eval_shape`` too (its parameters become the loaded
    arrays, its dropout RNG streams are seeded with 0), which avoids a random initialisation of
    86 M parameters that is then thrown away. A head outside the backbone is not touched, so a
    full model with a head should be built normally.

    Returns:
      a report: {'path', 'layout' ('hf' | 'timm' | 'spectrax'), 'loaded' (tensors),
      'parameters' (elements), 'ignored' (checkpoint names skipped: heads, pooler),
      'layer_norm_eps', 'note'}.

    Raises:
      CheckpointMismatchError (module unchanged), FileNotFoundError, ImportError (torch missing
      for a .pth/.bin).
    """
    backbone = _backbone(module)
    state, info = convert_state_dict(read_checkpoint(path), backbone.cfg)
    nnx.update(backbone, jax.tree.map(jnp.asarray, state))
    # An eval_shape'd backbone still has abstract RNG streams; give them values so it runs.
    nnx.update(backbone, concrete_state(nnx.state(backbone, nnx.Not(nnx.Param))))
    eps = backbone.cfg.layer_norm_eps
    note = ""
    if info["layout"] == "timm" and eps != 1e-6:
        note = (f"timm/DINO weights were trained with LayerNorm eps 1e-6; this model uses {eps:g} "
                "(numerically negligible; variant 'b16_timm' matches exactly)")
    elif info["layout"] == "hf" and eps != 1e-12:
        note = (f"the HF port uses LayerNorm eps 1e-12; this model uses {eps:g} (numerically "
                "negligible; variant 'b16' matches exactly)")
    n_params = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(state))
    return {"path": os.fspath(path), **info, "parameters": n_params, "layer_norm_eps": eps,
            "note": note}


def save_converted(state: nnx.State, cfg: ViTConfig, out_path: str | os.PathLike,
                   info: Mapping | None = None) -> str:
    """Writes converted parameters as an .npz ({'a/b/0/c': array} plus JSON metadata under
    ``__spectrax_vit__``), readable by :func:`load_pretrained_vit` without torch."""
    out_path = os.fspath(out_path)
    arrays = {_path_str(path): np.asarray(v[...]) for path, v in nnx.to_flat_state(state)}
    meta = {"format": 1, "config": dataclasses.asdict(cfg), "source": dict(info or {})}
    arrays[_META_KEY] = np.array(json.dumps(meta))
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    np.savez(out_path, **arrays)
    return out_path


def convert_file(in_path: str | os.PathLike, out_dir: str | os.PathLike,
                 variant: str = "b16") -> tuple[str, dict]:
    """Reads ``in_path``, checks it against ``vit_config(variant)``, writes
    ``out_dir/vit_<variant>.npz``. Returns (output path, info)."""
    cfg = vit_config(variant)
    state, info = convert_state_dict(read_checkpoint(in_path), cfg)
    info = {**info, "source_file": os.path.basename(os.fspath(in_path))}
    out = save_converted(state, cfg, os.path.join(os.fspath(out_dir), f"vit_{variant}.npz"), info)
    return out, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spectrax.convert_weights",
        description="Convert a timm / Hugging Face / DINO ViT checkpoint (.pth, .bin, "
                    ".safetensors) into a spectrax .npz (see the module docstring for how to "
                    "obtain one).")
    parser.add_argument("checkpoint", help="input checkpoint file")
    parser.add_argument("out_dir", help="output directory (created if needed)")
    parser.add_argument("--variant", default="b16",
                        help="spectrax ViT variant the checkpoint must match (default b16)")
    args = parser.parse_args(argv)
    try:
        out, info = convert_file(args.checkpoint, args.out_dir, args.variant)
    except (CheckpointMismatchError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}: {info['loaded']} tensors from a {info['layout']} checkpoint"
          + (f"; ignored {len(info['ignored'])}: {', '.join(info['ignored'])}"
             if info["ignored"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
