"""Evaluation of a training state over a whole split: the task's predictions, loss and metrics.

Used by the training loop (periodic and final evaluation) and by the benchmarks that evaluate
restored runs."""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from spectrax import metrics as M
from spectrax import sharding
from spectrax.data import pipeline, shards


def select_labels(batch, idx):
    """``batch`` with only the label columns ``idx`` (:func:`label_indices`), in that order."""
    if batch.labels.shape[1] == len(idx) and list(idx) == list(range(len(idx))):
        return batch
    return batch.replace(labels=batch.labels[:, idx], label_mask=batch.label_mask[:, idx])


def label_indices(manifest, task) -> list[int]:
    """Columns of the shards' labels that ``task`` needs, in ``task.label_names`` order;
    ValueError naming the missing ones."""
    missing = [n for n in task.label_names if n not in manifest.label_names]
    if missing:
        raise ValueError(f"task needs labels {missing} but the shards provide "
                         f"{manifest.label_names}")
    return [manifest.label_names.index(n) for n in task.label_names]


def evaluate(trainer, state, data_dir, split, config, idx) -> dict:
    """Runs the task's predictions over every spectrum of ``split``; returns metrics etc.

    ``outputs`` concatenates per-spectrum predictions over all batches (per-pixel arrays of
    different bucket lengths cannot be concatenated and are left out); ``examples`` holds
    (host batch, predictions) of the first batch of each distinct pixel length, for figures.
    """
    bs = sharding.round_up_batch(config.eval_batch_size, jax.device_count())
    step = trainer.jitted_eval_step
    outs, losses, examples = [], [], []
    pi, local = jax.process_index(), bs // jax.process_count()
    buckets = pipeline.batch_lengths(config.data, data_dir)
    n_batches = pipeline.num_eval_batches(data_dir, split, bs, buckets)
    batches = pipeline.eval_batches(data_dir, split, batch_size=bs, buckets=buckets)
    label_names = shards.read_manifest(data_dir).label_names
    for host in tqdm(batches, total=n_batches, desc=f"eval {split}", leave=False,
                     disable=jax.process_index() != 0):
        # Per-spectrum context the task's metrics may group by (not model inputs): the median
        # S/N and every label column of the shards, NaN where unknown (e.g. ``context_class``
        # for the redshift success thresholds, which differ for QSOs).
        context = {"snr": M.median_snr(host.flux, host.ivar, host.mask)}
        for j, name in enumerate(label_names):
            context[f"context_{name}"] = np.where(host.label_mask[:, j], host.labels[:, j],
                                                  np.nan)
        host = select_labels(host, idx)
        mine = jax.tree.map(lambda x: x[pi * local:(pi + 1) * local], host.for_device())
        pred, loss = step(state, pipeline.to_global(mine, trainer.batch_sharding))
        pred = jax.tree.map(np.asarray, multihost_utils.process_allgather(pred, tiled=True))
        if host.num_pixels not in {b.num_pixels for b, _ in examples}:
            examples.append((host, pred))
        outs.append({**pred, "labels": host.labels, "label_mask": host.label_mask,
                     "valid": host.valid, "ids": host.ids, **context})
        losses.append((float(loss), int(host.valid.sum())))
    cat = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]
           if len({o[k].shape[1:] for o in outs}) == 1}
    total = sum(n for _, n in losses)
    loss = sum(l * n for l, n in losses) / max(total, 1)
    metrics = trainer.task.metrics(cat)
    return {"loss": loss, "metrics": metrics, "outputs": cat, "examples": examples}


def calibrate_task(trainer, state, data_dir, config, idx) -> bool:
    """After the last training step: evaluates the splits the task calibrates on
    (``task.calibration_splits``, those the shards have) and lets it fit its calibration
    (``task.calibrate``); True if the task was asked to (save its state with the checkpoint)."""
    manifest = shards.read_manifest(data_dir)
    splits = [s for s in trainer.task.calibration_splits(trainer.abstract_model)
              if s in manifest.splits]
    if not splits:
        return False
    outputs = {s: evaluate(trainer, state, data_dir, s, config, idx)["outputs"] for s in splits}
    trainer.task.calibrate(outputs)
    return True
