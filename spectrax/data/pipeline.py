"""Grain pipelines: ArrayRecord shards -> decoded records -> host batches -> global sharded arrays.

Training stream: records of the train split, sliced per process, shuffled with the run's seed
(a new permutation every epoch), repeated forever, stacked into fixed-size batches. Its Grain
iterator state is a small dict that :mod:`spectrax.checkpoint` stores with the model, so a
resumed run sees exactly the batches an uninterrupted run would have seen.

Evaluation stream: every record of a split exactly once, in file order, the last batch padded
with invalid rows (``SpectrumBatch.valid`` False) so that no spectrum is dropped and shapes stay
static for jit.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Iterator, Sequence

import grain
import jax
import numpy as np

from spectrax.data import shards
from spectrax.spectra import SpectrumBatch, SpectrumError, pad_batch_rows, stack_records


class _Decode:
    """(index, bytes) -> record dict (numpy); errors name the shard files and the record."""

    def __init__(self, where: str):
        self.where = where

    def __call__(self, index: int, data: bytes) -> dict[str, Any]:
        return shards.decode_record(data, where=f"{self.where} record {index}")


def _stack(records: Sequence[dict], *, num_labels: int, grid: np.ndarray | None,
           length: int | None, batch_size: int) -> SpectrumBatch:
    batch = stack_records(list(records), num_labels=num_labels, grid=grid, length=length)
    return pad_batch_rows(batch, batch_size)


def _source(directory: str, split: str) -> grain.MapDataset:
    """The split's records as a random-access Grain dataset of decoded dicts."""
    paths = shards.split_paths(directory, split)
    try:
        source = grain.sources.ArrayRecordDataSource(paths)
        len(source)
    except Exception as e:  # the C++ reader raises bare RuntimeErrors on damaged files
        raise SpectrumError(f"{', '.join(paths)}: corrupt or truncated ArrayRecord shard "
                            f"({type(e).__name__}: {e})") from e
    where = paths[0] if len(paths) == 1 else f"{directory} split '{split}' ({len(paths)} shards)"
    return grain.MapDataset.source(source).map_with_index(_Decode(where))


def pixel_length(manifest: shards.Manifest, requested: int | None = None) -> int | None:
    """Pixel axis length of batches: the config's request, else the manifest grid's length."""
    if requested:
        return int(requested)
    grid = manifest.grid_array()
    return None if grid is None else len(grid)


def train_iterator(directory: str, *, batch_size: int, seed: int, split: str = "train",
                   length: int | None = None, num_threads: int = 2,
                   process_index: int | None = None, process_count: int | None = None
                   ) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of host batches of this process's share.

    Args:
      directory: shard directory (with manifest.json).
      batch_size: rows per batch on THIS process (global batch / process count).
      seed: shuffle seed; each epoch gets its own permutation derived from it.
      length: pixel axis length (default: the manifest grid's length).
      num_threads: Grain reader threads.

    The iterator supports ``get_state()`` / ``set_state(state)`` for exact resumption.
    """
    manifest = shards.read_manifest(directory)
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    ds = _source(directory, split)
    if len(ds) < batch_size * pc:
        raise ValueError(
            f"{directory}: split '{split}' has {len(ds)} spectra, fewer than one global batch "
            f"({batch_size} x {pc} processes); lower config.batch_size")
    ds = ds[pi::pc]  # each process reads a disjoint slice of the data
    stack = functools.partial(_stack, num_labels=len(manifest.label_names),
                              grid=manifest.grid_array(),
                              length=pixel_length(manifest, length), batch_size=batch_size)
    ds = (ds.seed(seed).shuffle().repeat()
          .batch(batch_size, drop_remainder=True, batch_fn=stack))
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4 * batch_size)
    return iter(ds.to_iter_dataset(options))


def eval_batches(directory: str, split: str, *, batch_size: int, length: int | None = None,
                 num_threads: int = 2) -> Iterator[SpectrumBatch]:
    """Every spectrum of ``split`` once, in order; the last batch padded with invalid rows."""
    manifest = shards.read_manifest(directory)
    stack = functools.partial(_stack, num_labels=len(manifest.label_names),
                              grid=manifest.grid_array(),
                              length=pixel_length(manifest, length), batch_size=batch_size)
    ds = (_source(directory, split)
          .batch(batch_size, drop_remainder=False, batch_fn=stack))
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4 * batch_size)
    yield from ds.to_iter_dataset(options)


def num_eval_batches(directory: str, split: str, batch_size: int) -> int:
    n = shards.read_manifest(directory).count(split)
    return -(-n // batch_size)


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


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))
