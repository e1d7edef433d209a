"""Tasks: what a model is asked to do, its loss, its metrics and what a prediction is.

The training loop knows only this interface:

- ``label_names``: which manifest labels the task needs (checked against the shard manifest);
- ``loss(model, batch, *, train, rng) -> (loss, aux)``: a scalar fp32 loss and a dict of scalar
  diagnostics, computed only over valid rows / pixels / labels; ``rng`` is a per-step key
  (tasks that sample, e.g. SpectraFM's pixels, use it; evaluation passes None);
- ``predict(model, batch) -> dict[str, [B, ...]]``: what the model says about each spectrum;
- ``metrics(outputs) -> dict``: host-side metrics over a whole split, where ``outputs`` holds
  the concatenated predictions plus ``labels``, ``label_mask``, ``valid`` (and ``ids``);
- ``figures(outputs, batch_examples, workdir) -> list[path]``;
- ``catalogue(outputs) -> dict[column, array]`` for the FITS catalogue of ``spectrax.predict``.

Optional hooks (defaults in :class:`spectrax.tasks.base.Task`): ``bind_labels(available)`` lets
a task use labels only when the shards have them (e.g. the survey of each spectrum);
``fit_state(stats, data_dir)`` takes what the task needs from the train split's statistics
(label standardisation), and ``state()`` / ``load_state()`` carry it through checkpoints, so
fine-tunes and inference reuse the statistics the model was trained with.
``calibration_splits(model)`` and ``calibrate(outputs_by_split)``: a calibration fitted once
after the last training step on the evaluation outputs of those splits (the redshift task's
S/N-dependent ZERR), kept in the task's state.

Models are called as ``model(flux, mask, wavelength, train=bool)`` on median-normalised flux,
except models with ``takes_raw_spectra = True`` (the tokenizer family), which normalise inside
and are called as ``model(flux, mask, wavelength, ivar=ivar, train=bool)`` on raw flux.
"""
from __future__ import annotations

from spectrax.tasks.base import Task, forward, model_inputs, valid_rows
from spectrax.tasks.classification import ClassificationTask
from spectrax.tasks.reconstruction import ReconstructionTask
from spectrax.tasks.redshift import RedshiftTask
from spectrax.tasks.regression import RegressionTask
from spectrax.tasks.spectrafm import SpectraFMTask
from spectrax.tasks.tokenizer import TokenizerReconstructionTask

# config.task -> the task class, built with config.task_kwargs.
TASKS = {"reconstruction": ReconstructionTask, "redshift": RedshiftTask,
         "tokenizer_reconstruction": TokenizerReconstructionTask,
         "classification": ClassificationTask, "regression": RegressionTask,
         "spectrafm": SpectraFMTask}

__all__ = ["TASKS", "ClassificationTask", "ReconstructionTask", "RedshiftTask", "RegressionTask",
           "SpectraFMTask", "Task", "TokenizerReconstructionTask", "forward", "get_task",
           "model_inputs", "valid_rows"]


def get_task(name: str, **kwargs) -> Task:
    """The task ``name`` (a key of :data:`TASKS`) built with ``kwargs``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name](**kwargs)
