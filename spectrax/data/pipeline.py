"""Grain pipelines: ArrayRecord shards -> decoded records -> host batches -> global sharded arrays.

Batches come in a few pixel lengths, the *buckets*: ``config.data.buckets`` for spectra on their
native grids (SDSS ~4000 px next to APOGEE's 7514), or the one fixed length of a model on one
grid (``config.data.length``, else the shard grid's: a single bucket). Every spectrum goes to
the smallest bucket that holds it and is padded to its length (padding pixels: masked,
λ = −1); a batch holds spectra of one bucket; the model compiles once per bucket.
:func:`bucket_plan` reports the padding waste of a policy. One mechanism for both cases.

Training stream (:func:`train_iterator`): endless, shuffled per epoch with the run's seed,
deterministic in (seed, batch index); every process computes the same global batch and takes
its own rows of it. Its Grain iterator state is a position, which :mod:`spectrax.checkpoint`
stores with the model, so a resumed run sees exactly the batches an uninterrupted run would
have seen, and the global batches do not depend on the number of processes.

Evaluation stream (:func:`eval_batches`): every record of a split exactly once, bucket by
bucket in read order, each bucket's last batch padded with invalid rows
(``SpectrumBatch.valid`` False) so that no spectrum is dropped and shapes stay static for jit.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator, Sequence

import grain
import jax
import numpy as np

from spectrax.data import inputs, shards
from spectrax.spectra import SpectrumBatch, SpectrumError, pad_batch_rows, stack_records


def batch_lengths(data_cfg, directory) -> tuple[int, ...]:
    """The pixel lengths of a config's batches: ``data.buckets``, else its fixed length
    (``data.length``, else :func:`_one_bucket` of the shard directory) as one bucket."""
    if tuple(data_cfg.buckets):
        return tuple(sorted(int(b) for b in data_cfg.buckets))
    return (int(data_cfg.length),) if data_cfg.length else _one_bucket(directory)


def _one_bucket(directory) -> tuple[int]:
    """The length of the shard directory's shared grid, or, when its records carry their own
    grids (e.g. APOGEE-like stars, all 7514 px), its longest record over every split."""
    manifest = shards.read_manifest(directory)
    grid = manifest.grid_array()
    if grid is not None:
        return (len(grid),)
    return (max(int(shards.record_lengths(directory, s).max(initial=1))
                for s in manifest.splits),)


# --------------------------------------------------------------------------------------------
# Length buckets
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BucketPlan:
    """Which bucket every record of a split belongs to, and what that costs in padding.

    Attributes:
      buckets: bucket lengths in pixels, increasing.
      assignment: [N] int, bucket index of each record (read order).
      lengths: [N] int, pixels of each record.
      padding_waste: fraction of the pixels of padded batches that are padding, under this
        policy; ``padding_waste_single`` is the same for one bucket at the longest length.
    """

    buckets: tuple[int, ...]
    assignment: np.ndarray
    lengths: np.ndarray
    padding_waste: float
    padding_waste_single: float

    def summary(self) -> dict[str, Any]:
        counts = np.bincount(self.assignment, minlength=len(self.buckets))
        return {"buckets": list(self.buckets), "spectra_per_bucket": counts.tolist(),
                "padding_waste": self.padding_waste,
                "padding_waste_single_bucket": self.padding_waste_single}


def bucket_plan(lengths: np.ndarray, buckets: Sequence[int], where: str = "data") -> BucketPlan:
    """Assigns records of ``lengths`` pixels to the smallest bucket length that holds them.

    Raises:
      SpectrumError: a record is longer than the largest bucket (named by its read index), or
        buckets are not positive.
    """
    buckets = tuple(sorted(int(b) for b in buckets))
    lengths = np.asarray(lengths, np.int64)
    if not buckets or buckets[0] <= 0:
        raise SpectrumError(f"bucket lengths must be positive, got {buckets}")
    too_long = np.flatnonzero(lengths > buckets[-1])
    if too_long.size:
        raise SpectrumError(
            f"{where}: {too_long.size} spectra are longer than the largest bucket "
            f"({buckets[-1]} px), e.g. record {int(too_long[0])} with "
            f"{int(lengths[too_long[0]])} px; add a larger bucket to config.data.buckets (or "
            "raise config.data.length)")
    assignment = inputs.bucket_index(lengths, buckets)
    padded = np.asarray(buckets)[assignment]
    total = float(lengths.sum())
    waste = 1.0 - total / max(float(padded.sum()), 1.0)
    single = 1.0 - total / max(float(buckets[-1] * len(lengths)), 1.0)
    return BucketPlan(buckets, assignment, lengths, waste, single)


class _BucketSchedule:
    """Global batch i -> record indices, for an endless shuffled stream of one-bucket batches.

    Epoch e permutes each bucket's records with ``default_rng([seed, e])``, cuts them into
    batches of ``global_batch`` (each bucket's remainder waits for a later epoch's permutation),
    and shuffles the batch order, so buckets interleave. Deterministic in (seed, i): the Grain
    iterator state (a position) is all a checkpoint needs.
    """

    def __init__(self, plan: BucketPlan, global_batch: int, seed: int):
        self.members = [np.flatnonzero(plan.assignment == b) for b in range(len(plan.buckets))]
        self.global_batch = global_batch
        self.seed = seed
        self.per_epoch = sum(len(m) // global_batch for m in self.members)
        if self.per_epoch == 0:
            raise SpectrumError(
                f"no length bucket holds one global batch ({global_batch} spectra; bucket sizes "
                f"{[len(m) for m in self.members]}); lower config.batch_size or merge buckets")
        self._cache: dict[int, list[tuple[int, np.ndarray]]] = {}

    def epoch(self, e: int) -> list[tuple[int, np.ndarray]]:
        cached = self._cache.get(e)  # reader threads share this; never read it twice
        if cached is None:
            rng = np.random.default_rng([self.seed, e])
            batches = []
            for b, m in enumerate(self.members):
                perm = rng.permutation(m)
                for k in range(len(m) // self.global_batch):
                    batches.append((b, perm[k * self.global_batch:(k + 1) * self.global_batch]))
            order = rng.permutation(len(batches))
            cached = [batches[j] for j in order]
            self._cache = {e: cached}  # keep one epoch in memory
        return cached

    def __call__(self, i: int) -> tuple[int, np.ndarray]:
        return self.epoch(i // self.per_epoch)[i % self.per_epoch]


class _ReadBucketBatch:
    """Global batch index -> this process's rows of it, decoded and stacked at bucket length."""

    def __init__(self, source: shards.ShardSource, schedule: _BucketSchedule, plan: BucketPlan,
                 *, process_index: int, process_count: int, num_labels: int,
                 grid: np.ndarray | None):
        self.source, self.schedule, self.plan = source, schedule, plan
        self.pi, self.pc = process_index, process_count
        self.num_labels, self.grid = num_labels, grid

    def __call__(self, i: int) -> SpectrumBatch:
        bucket, rows = self.schedule(int(i))
        local = len(rows) // self.pc
        mine = rows[self.pi * local:(self.pi + 1) * local]
        records = [self.source[int(k)] for k in mine]
        return stack_records(records, num_labels=self.num_labels, grid=self.grid,
                             length=self.plan.buckets[bucket])


def train_iterator(directory: str, *, batch_size: int, seed: int,
                   buckets: Sequence[int] | None = None, split: str = "train",
                   num_threads: int = 2, process_index: int | None = None,
                   process_count: int | None = None) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of this process's rows of the global batches.

    Args:
      directory: shard directory (with manifest.json).
      batch_size: rows per batch on THIS process (global batch / process count).
      seed: shuffle seed; each epoch gets its own permutation derived from it.
      buckets: batch lengths in pixels (:func:`batch_lengths`); default: the shard grid's
        length as one bucket.
      num_threads: Grain reader threads.

    Every batch holds spectra of one bucket, padded to its length; all processes see the same
    bucket at the same step. The iterator supports ``get_state()`` / ``set_state(state)`` for
    exact resumption.
    """
    manifest = shards.read_manifest(directory)
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if manifest.count(split) < batch_size * pc:
        raise ValueError(
            f"{directory}: split '{split}' has {manifest.count(split)} spectra, fewer than one "
            f"global batch ({batch_size} x {pc} processes); lower config.batch_size")
    plan = bucket_plan(shards.record_lengths(directory, split),
                       buckets or _one_bucket(directory), where=f"{directory} split '{split}'")
    schedule = _BucketSchedule(plan, batch_size * pc, seed)
    read = _ReadBucketBatch(shards.ShardSource(directory, split), schedule, plan,
                            process_index=pi, process_count=pc,
                            num_labels=len(manifest.label_names), grid=manifest.grid_array())
    # An index space far beyond any run (2**40 batches); MapDataset.range is lazy.
    ds = grain.MapDataset.range(2**40).map(read)
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4)
    return iter(ds.to_iter_dataset(options))


def eval_batches(directory: str, split: str, *, batch_size: int,
                 buckets: Sequence[int] | None = None) -> Iterator[SpectrumBatch]:
    """Every spectrum of ``split`` once, bucket by bucket (read order within a bucket); each
    bucket's last batch padded with invalid rows. ``buckets`` as in :func:`train_iterator`."""
    manifest = shards.read_manifest(directory)
    plan = bucket_plan(shards.record_lengths(directory, split),
                       buckets or _one_bucket(directory), where=f"{directory} split '{split}'")
    source = shards.ShardSource(directory, split)
    grid = manifest.grid_array()
    for b, length in enumerate(plan.buckets):
        members = np.flatnonzero(plan.assignment == b)
        for start in range(0, len(members), batch_size):
            records = [source[int(k)] for k in members[start:start + batch_size]]
            batch = stack_records(records, num_labels=len(manifest.label_names), grid=grid,
                                  length=length)
            yield pad_batch_rows(batch, batch_size)


def num_eval_batches(directory: str, split: str, batch_size: int,
                     buckets: Sequence[int] | None = None) -> int:
    plan = bucket_plan(shards.record_lengths(directory, split),
                       buckets or _one_bucket(directory))
    counts = np.bincount(plan.assignment, minlength=len(plan.buckets))
    return int(sum(-(-c // batch_size) for c in counts))


# --------------------------------------------------------------------------------------------
# Inference batches of records from any input (spectrax.data.inputs)
# --------------------------------------------------------------------------------------------
def select_labels(values, have: Sequence[str], want: Sequence[str]) -> np.ndarray:
    """[K] float32: the values of the ``want`` label columns among a record's ``have`` columns
    (matched by name), NaN where it has no such label."""
    values = np.atleast_1d(np.asarray(values if values is not None else [], np.float32))
    have = list(have)
    return np.array([values[have.index(n)] if n in have and have.index(n) < values.size
                     else np.nan for n in want], np.float32)


def batches_by_length(rows: Iterable[inputs.ModelRecord], batch_size: int,
                      label_names: Sequence[str]
                      ) -> Iterator[tuple[SpectrumBatch, list[inputs.ModelRecord]]]:
    """Host batches of ``batch_size`` rows, each of ONE padded length (``row.length``), with
    the rows in it (the batch's last rows are invalid padding when fewer).

    Each length fills its own batch and is emitted when full; the partial batches follow at the
    end, shortest length first. So jit compiles once per length, and rows keep read order
    within a length. Labels are the record's values of ``label_names`` by name."""
    groups: dict[int, list[inputs.ModelRecord]] = {}

    def stack(n, group):
        records = [{**r.record, "labels": select_labels(r.record.get("labels"), r.label_names,
                                                        label_names)} for r in group]
        return pad_batch_rows(stack_records(records, len(label_names), length=n), batch_size)

    for row in rows:
        group = groups.setdefault(row.length, [])
        group.append(row)
        if len(group) == batch_size:
            yield stack(row.length, group), group
            groups[row.length] = []
    for n in sorted(groups):
        if groups[n]:
            yield stack(n, groups[n]), groups[n]


# --------------------------------------------------------------------------------------------
# Host batch -> global jax.Array batch
# --------------------------------------------------------------------------------------------
def to_global(batch: SpectrumBatch, sharding: jax.sharding.NamedSharding) -> SpectrumBatch:
    """Assembles this process's rows into globally sharded arrays (batch axis sharded).

    ``sharding`` shards the leading (batch) axis; trailing axes are replicated. Works on one
    device, many devices and many processes alike. Host-only ``ids`` are dropped.
    """
    def put(x):
        spec = jax.sharding.PartitionSpec(sharding.spec[0], *([None] * (np.ndim(x) - 1)))
        s = jax.sharding.NamedSharding(sharding.mesh, spec)
        return jax.make_array_from_process_local_data(s, np.asarray(x))

    return jax.tree.map(put, batch.for_device())
