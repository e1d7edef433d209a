"""A trained model, restored for inference only: what predict, embeddings and the tools run.

:class:`InferenceModel` restores the parameters and model state (BatchNorm statistics) of a
checkpoint, and the task's statistics (label standardisation, SpectraFM's normalisation), but
not the optimiser moments a training run carries (two thirds of a checkpoint under AdamW), onto
a mesh over THIS process's devices: every process of a multi-host job runs its own share of
the inputs without waiting for the others, and each batch is split over its local devices.

    model = InferenceModel.from_checkpoint(config, "runs/specpt_redshift_bgs-zscan")
    out = model(batch)          # a SpectrumBatch -> the task's predictions, numpy
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from spectrax import checkpoint as ckpt_lib
from spectrax import sharding, tasks
from spectrax.data.pipeline import to_global
from spectrax.models import registry
from spectrax.spectra import SpectrumBatch


def local_mesh(fsdp: int = 1) -> jax.sharding.Mesh:
    """A ('data', 'fsdp') mesh over this process's devices only (no cross-process collective:
    processes predict independently). ``fsdp`` is used when it divides the local device count."""
    devices = jax.local_devices()
    fsdp = fsdp if fsdp > 0 and len(devices) % fsdp == 0 else 1
    return jax.sharding.Mesh(np.array(devices).reshape(len(devices) // fsdp, fsdp),
                             sharding.MESH_AXES)


def rng_state_like(abstract: Any) -> Any:
    """Concrete RNG state of an abstract model's ``nnx.RngState`` (keys from seed 0, counts 0).

    Inference draws no random numbers (no dropout), but merging a model needs concrete values;
    this makes them without building the model."""
    def make(a):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            key = jax.random.key(0)
            return key if a.shape == () else jax.random.split(key, a.shape)
        return jax.numpy.zeros(a.shape, a.dtype)

    return jax.tree.map(make, abstract)


class InferenceModel:
    """A restored model, its task, and the task's jitted ``predict``.

    Attributes:
      config: the config the checkpoint was trained with.
      task: the task (statistics restored from the checkpoint).
      step: the checkpoint's training step.
      mesh, batch_sharding: this process's devices; batches are split over them.
      state: {"params", "other"}: the restored arrays.
    """

    def __init__(self, config, state: dict, graphdef, rng_state, task, step: int, mesh):
        self.config, self.state, self.task, self.step, self.mesh = config, state, task, step, mesh
        self.graphdef, self.rng_state = graphdef, rng_state
        self.batch_sharding = sharding.batch_sharding(mesh)
        self._predict = self.jit(lambda model, batch: task.predict(model, batch))

    @classmethod
    def from_checkpoint(cls, config, checkpoint: str | Path) -> "InferenceModel":
        """Restores the latest checkpoint of a run directory (or of its checkpoints/ folder)."""
        path = Path(checkpoint)
        if path.name == "checkpoints":
            path = path.parent
        mesh = local_mesh(config.mesh.fsdp)
        task = tasks.get_task(config.task, **config.task_kwargs.to_dict())
        abstract_model = nnx.eval_shape(lambda: registry.build_model(
            config.model, rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1)))
        graphdef, params, rng, other = nnx.split(abstract_model, nnx.Param, nnx.RngState, ...)
        target = {"params": params, "other": other}
        shardings = sharding.tree_shardings(target, mesh)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              target, shardings)
        ckpt = ckpt_lib.Checkpointer(path)
        try:
            step = ckpt.latest_step()
            if step is None:
                raise FileNotFoundError(f"--checkpoint {checkpoint}: no complete checkpoint in "
                                        f"{ckpt.directory}")
            state, meta = ckpt.restore_subset(target, step)
        finally:
            ckpt.close()
        # The task's statistics and label columns as trained (label standardisation, ...).
        task.load_state(meta.get("task_state"))
        return cls(config, state, graphdef, rng_state_like(rng), task, step, mesh)

    def model(self, state: dict | None = None) -> nnx.Module:
        """A Module view of ``state`` (default: the restored one), for use inside jit."""
        state = self.state if state is None else state
        return nnx.merge(self.graphdef, state["params"], self.rng_state, state["other"],
                         copy=True)

    def jit(self, fn: Callable[[nnx.Module, SpectrumBatch], Any]
            ) -> Callable[[dict, SpectrumBatch], Any]:
        """``fn(model, device_batch)`` jitted as a function of (state, device batch)."""
        return jax.jit(lambda state, batch: fn(self.model(state), batch))

    def device_batch(self, batch: SpectrumBatch) -> SpectrumBatch:
        """A host batch split over this process's devices (rows must divide evenly)."""
        return to_global(batch, self.batch_sharding)

    def dispatch(self, batch: SpectrumBatch) -> dict[str, jax.Array]:
        """Starts the task's predictions for a host (or already placed) batch and returns at
        once (jax dispatch is asynchronous): the devices compute while the host goes on, e.g.
        refining the previous batch; :meth:`fetch` waits for them."""
        if isinstance(batch.flux, np.ndarray):
            batch = self.device_batch(batch)
        return self._predict(self.state, batch)

    @staticmethod
    def fetch(out: dict[str, jax.Array]) -> dict[str, np.ndarray]:
        """The numpy values of :meth:`dispatch`'s result (waits for the computation)."""
        return {k: np.asarray(v) for k, v in out.items()}

    def __call__(self, batch: SpectrumBatch) -> dict[str, np.ndarray]:
        """The task's predictions for a host (or already placed) batch, as numpy arrays."""
        return self.fetch(self.dispatch(batch))

    @property
    def local_devices(self) -> int:
        return self.mesh.size
