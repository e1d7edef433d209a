"""Initialising a run from other weights (``config.init``): a subtree of another run's checkpoint
(``from_workdir``, ``prefix``, ``target``: e.g. the SpecPT encoder for the redshift model) and/or
a timm / Hugging Face ViT-B/16 file (``from_file``, into the model's ``backbone``)."""
from __future__ import annotations

import jax
from flax import nnx

from spectrax import checkpoint, convert_weights


def load_pretrained(state, trainer, from_workdir: str, prefix: str, target: str | None = None):
    """Copies the subtree ``prefix`` of another run's latest parameters (and BatchNorm
    statistics) into ``state``, at ``target`` (default: the same path; "" = the whole tree).
    Shapes must agree; mismatches are listed in the error.

    Returns (state, that run's task state or None): fine-tunes reuse its statistics."""
    target = prefix if target is None else target
    src = checkpoint.Checkpointer(from_workdir)
    if src.latest_step() is None:
        raise FileNotFoundError(
            f"config.init.from_workdir={from_workdir!r} holds no checkpoint; train that stage "
            "first (see the config's docstring for the command)")
    raw, meta = src.restore_raw()
    src.close()
    new = dict(state)
    for part in ("params", "other"):
        pure = nnx.to_pure_dict(state[part])
        src_tree = checkpoint.strip_value(raw[part])
        try:
            src_sub = checkpoint.subtree(src_tree, prefix)
            dst_sub = checkpoint.subtree(pure, target)
        except KeyError as e:
            if part == "other":  # no BatchNorm statistics under the prefix
                continue
            raise checkpoint.CheckpointMismatchError(f"{from_workdir}: {e}") from e
        have, want = checkpoint.flat_shapes(src_sub), checkpoint.flat_shapes(dst_sub)
        if have != want:
            diff = sorted(set(have.items()) ^ set(want.items()))
            raise checkpoint.CheckpointMismatchError(
                f"{from_workdir}: '{prefix}' does not match '{target}' of this model (was trained as "
                f"{meta.get('model')}): " + "; ".join(f"{k} {v}" for k, v in diff[:20]))
        checkpoint.assign_subtree(pure, target, src_sub)
        st = state[part]
        nnx.replace_by_pure_dict(st, pure)
        new[part] = jax.device_put(st, trainer.state_shardings[part])
    print(f"initialised '{target or 'everything'}' from '{prefix}' of {from_workdir} "
          f"(step {src.latest_step()})", flush=True)
    task_state = meta.get("task_state")
    if task_state and meta.get("task") != trainer.config.task:
        task_state = None  # another task's statistics mean nothing here
    return new, task_state


def load_backbone_weights(state, trainer, path: str):
    """Loads a timm / Hugging Face ViT-B/16 checkpoint file into the model's ``backbone``
    (:mod:`spectrax.convert_weights`); mismatched tensors are listed in the error."""
    model = trainer.model(state)
    report = convert_weights.load_pretrained_vit(model.backbone, path)
    _, params, _, _ = nnx.split(model, nnx.Param, nnx.RngState, ...)
    print(f"backbone initialised from {path}: {report}", flush=True)
    return {**state, "params": jax.device_put(params, trainer.state_shardings["params"])}


def initialise(state, trainer, init) -> tuple[dict, dict | None]:
    """A fresh ``state`` initialised as ``init`` (``config.init``) says; returns (state, the
    task state of the run it came from, or None). Without ``from_file`` and ``from_workdir``
    the state is returned unchanged."""
    task_state = None
    if init.get("from_file"):
        state = load_backbone_weights(state, trainer, init.from_file)
    if init.from_workdir:
        state, task_state = load_pretrained(state, trainer, init.from_workdir, init.prefix,
                                            target=init.target or None)
    return state, task_state
