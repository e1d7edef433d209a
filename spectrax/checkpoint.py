"""The one place that calls Orbax: save / restore of the training state and the data position.

A checkpoint at step N holds three items:
- ``state``: model parameters, other model variables (BatchNorm statistics), optimiser state
  and the step counter, each array saved with its sharding (restoring onto another mesh
  reshards);
- ``data``: the Grain iterator state (JSON), so a resumed run continues the same batch stream;
- ``meta``: JSON facts about the run (config name, model summary, normalisation statistics).

Orbax writes each step into a temporary directory (``<step>.orbax-checkpoint-tmp-<time>``) and
renames it to ``<step>`` when complete, so a process killed during a save leaves the previous
checkpoint intact. :meth:`Checkpointer.latest_step` ignores those temporary directories and, as
a second line of defence (file systems without atomic rename, a directory copied by hand), any
step directory that lacks one of the three items.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

# The items of one checkpoint step (sub-directories of ``<step>/``).
ITEMS = ("state", "data", "meta")


class CheckpointMismatchError(ValueError):
    """A checkpoint whose arrays do not fit the model being restored."""


def path_str(path) -> str:
    """'encoder/stem/conv1/kernel' from a jax key path (NNX's trailing 'value' dropped)."""
    parts = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(str(name))
    if parts and parts[-1] == "value":
        parts = parts[:-1]
    return "/".join(parts)


def flat_shapes(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p): tuple(getattr(x, "shape", ())) for p, x in leaves}


class Checkpointer:
    """Saves and restores training checkpoints under ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str | Path, *, keep: int = 2, async_save: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        # Handlers named up front, so a fresh process can read metadata and restore any item.
        handlers = {"state": ocp.StandardCheckpointHandler(),
                    "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=handlers)

    def latest_step(self) -> int | None:
        """The newest COMPLETE step, or None (temporary and partial step directories skipped)."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            if self.is_complete(step):
                return step
        return None

    def is_complete(self, step: int) -> bool:
        """True when ``<step>/`` holds every item a restore reads (state, data, meta)."""
        d = self.directory / str(step)
        return all((d / item).is_dir() and any((d / item).iterdir()) for item in ITEMS)

    def save(self, step: int, state: Any, data_state: dict, meta: dict, *,
             force: bool = False) -> bool:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, abstract_state: Any, step: int | None = None):
        """Restores onto ``abstract_state`` (ShapeDtypeStructs carrying the target shardings).

        Returns (state, data_state, meta). Raises CheckpointMismatchError listing every array
        whose name or shape differs when the checkpoint belongs to another architecture.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        self._check_compatible(step, abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return restored.state, restored.data, restored.meta

    def restore_subset(self, target: Any, step: int | None = None):
        """Restores only the top-level entries of the state named in ``target`` (e.g. params and
        model state, not the optimiser moments, for inference) onto its shardings.

        Returns (subset, meta). Raises CheckpointMismatchError listing the arrays of ``target``
        whose name or shape differs (entries the checkpoint has beyond ``target`` are fine)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        self._check_compatible(step, target, partial=True)
        # The manager's handler for 'state' restores whole trees only; a PyTree handler on the
        # same directory restores a subset.
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
            subset = reader.restore(self.directory / str(step) / "state", args=ocp.args.PyTreeRestore(
                item=target, partial_restore=True,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return subset, meta.meta

    def restore_raw(self, step: int | None = None):
        """The saved state as it is on disk (host arrays), without a target structure."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(self._local_target(step)),
            meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def _local_target(self, step: int) -> Any:
        """The saved arrays' shapes and dtypes placed on this process's first device.

        Without a target Orbax reuses the saved shardings, which fails when the checkpoint was
        written on another set of devices (e.g. an 8-device run read on 1).
        """
        try:
            saved = self.manager.item_metadata(step)["state"]
        except Exception:  # metadata unavailable: let Orbax use what it finds
            return None
        if saved is None:
            return None
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            saved)

    def _check_compatible(self, step: int, abstract_state: Any, partial: bool = False) -> None:
        try:
            saved = self.manager.item_metadata(step)["state"]
        except Exception:  # metadata unavailable: let Orbax report what it finds
            return
        if saved is None:
            return
        if partial:
            saved = {k: v for k, v in saved.items() if k in abstract_state}
        want, have = flat_shapes(abstract_state), flat_shapes(saved)
        # Parameters first: optimiser moments repeat every parameter difference.
        order = lambda k: (not k.startswith("params/"), k)
        problems = [(k, f"  missing in checkpoint: {k} {want[k]}") for k in set(want) - set(have)]
        problems += [(k, f"  not in model: {k} {have[k]}") for k in set(have) - set(want)]
        problems += [(k, f"  shape differs: {k} model {want[k]} vs checkpoint {have[k]}")
                     for k in set(want) & set(have) if want[k] != have[k]]
        problems = [text for _, text in sorted(problems, key=lambda kv: order(kv[0]))]
        if problems:
            shown = problems[:40] + ([f"  ... and {len(problems) - 40} more"]
                                     if len(problems) > 40 else [])
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} does not match this model "
                f"({len(problems)} differences):\n" + "\n".join(shown))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def subtree(tree: dict, prefix: str) -> dict:
    """The nested-dict subtree at 'a/b' (raises KeyError naming what exists)."""
    node = tree
    for part in [p for p in prefix.split("/") if p]:
        if not isinstance(node, dict) or part not in node:
            have = sorted(node) if isinstance(node, dict) else type(node).__name__
            raise KeyError(f"no '{part}' in checkpoint tree at '{prefix}' (have {have})")
        node = node[part]
    return node



