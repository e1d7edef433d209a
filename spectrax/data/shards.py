"""Records <-> ArrayRecord shards, plus the manifest that describes a shard directory.

A shard directory looks like::

    manifest.json                      # what is in here: splits, counts, grid, label names, stats
    train-00000-of-00004.array_record  # one serialised record per entry (group_size:1, so any
    ...                                # record can be read at random, which Grain needs)
    test-00000-of-00001.array_record

A record is a dict (see :mod:`spectrax.spectra`): ``flux``/``ivar`` float32 [L], ``mask`` bool
[L], optional ``wavelength`` float32 [L] (records without one use the manifest's grid),
``labels`` float32 [K], ``id`` int64, optional ``meta`` (JSON-able scalars). Instead of a
``wavelength`` array a record may carry ``grid``, a descriptor of
:func:`spectrax.data.grids.grid_array`.
Serialisation is msgpack with raw little-endian array bytes (masks bit-packed): compact, fast,
and readable without spectrax.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import msgpack
import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from spectrax.data import grids
from spectrax.spectra import SpectrumError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# ArrayRecord writer options of every shard: group_size:1 makes every record its own chunk, so
# random access (what Grain does) costs one read; uncompressed because float spectra barely
# compress (zstd, ArrayRecord's default, saves ~11 % of a DESI record) while decompressing
# made each read ~5× slower (663 vs 122 µs per 63 kB DESI record, measured on the 2-core
# development machine). Files written with other options stay readable.
WRITER_OPTIONS = "group_size:1,uncompressed"
_ARRAY_KEYS = ("flux", "ivar", "wavelength", "labels")


# --------------------------------------------------------------------------------------------
# One record <-> bytes
# --------------------------------------------------------------------------------------------
def encode_record(record: Mapping[str, Any]) -> bytes:
    """Serialises one record to bytes (msgpack; arrays as dtype/shape/raw bytes)."""
    out: dict[str, Any] = {"id": int(record.get("id", -1))}
    for key in _ARRAY_KEYS:
        if record.get(key) is not None:
            arr = np.ascontiguousarray(record[key], dtype="<f4")
            out[key] = (arr.shape[0], memoryview(arr).cast("B"))  # packed without a copy
    mask = np.asarray(record["mask"], dtype=bool)
    out["mask"] = (mask.shape[0], np.packbits(mask).tobytes())
    if record.get("grid") is not None and record.get("wavelength") is None:
        out["grid"] = json.dumps(record["grid"], sort_keys=True, default=_jsonable)
    if record.get("meta"):
        out["meta"] = {k: _jsonable(v) for k, v in record["meta"].items()}
    return msgpack.packb(out, use_bin_type=True)


def decode_record(data: bytes, where: str = "record") -> dict[str, Any]:
    """Inverse of :func:`encode_record`. Raises SpectrumError naming ``where`` on corrupt bytes."""
    try:
        raw = msgpack.unpackb(data, raw=False)
        rec: dict[str, Any] = {"id": np.int64(raw["id"])}
        for key in _ARRAY_KEYS:
            if key in raw:
                n, buf = raw[key]
                rec[key] = np.frombuffer(buf, dtype="<f4", count=n)
        n, buf = raw["mask"]
        rec["mask"] = np.unpackbits(np.frombuffer(buf, np.uint8), count=n).astype(bool)
        if "meta" in raw:
            rec["meta"] = raw["meta"]
        if "grid" in raw:
            rec["wavelength"] = grids.grid_f32(raw["grid"])
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise SpectrumError(f"{where}: corrupt record ({type(e).__name__}: {e})") from e
    if len(rec["flux"]) != len(rec["mask"]):
        raise SpectrumError(f"{where}: corrupt record (flux/mask lengths differ)")
    return rec


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------
@dataclass
class Manifest:
    """Describes a shard directory.

    Attributes:
      label_names: names of the K label columns (e.g. ``["z"]``).
      splits: split name -> {"files": [relative paths], "count": int, optionally
        "file_counts": [records per file], "lengths_file": "<split>-lengths.npy" (pixels per
        record in read order)}.
      grid: the shared wavelength grid for records that carry none, as
        {"kind": "linear", "start": Å, "step": Å, "n": int} or None.
      stats: normalisation statistics (label mean/std, …) computed on the train split.
      report: what preparing this directory dropped or masked, and why (counts).
      source: free-form description of where the data came from.
    """

    label_names: list[str]
    splits: dict[str, dict[str, Any]]
    grid: dict[str, Any] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def grid_array(self) -> np.ndarray | None:
        """The shared grid as [n] float64 Å, or None."""
        return grids.grid_array(self.grid) if self.grid else None

    def count(self, split: str) -> int:
        return int(self.splits[split]["count"])


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> Path:
    path = Path(directory) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.__dict__, indent=2, default=_jsonable))
    os.replace(tmp, path)  # atomic: a reader never sees half a manifest
    return path


def read_manifest(directory: str | os.PathLike) -> Manifest:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise SpectrumError(
            f"{directory}: no {MANIFEST}; not a spectrax shard directory (make one with "
            "`python -m spectrax.prepare`)")
    try:
        raw = json.loads(path.read_text())
        return Manifest(**raw)
    except (json.JSONDecodeError, TypeError) as e:
        raise SpectrumError(f"{path}: unreadable manifest ({e})") from e


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
class ShardWriter:
    """Writes records of one split into ``num_shards`` ArrayRecord files, round-robin."""

    def __init__(self, directory: str | os.PathLike, split: str, num_shards: int = 1):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.files = [f"{split}-{i:05d}-of-{num_shards:05d}.array_record"
                      for i in range(num_shards)]
        self._writers = [ArrayRecordWriter(str(self.directory / f), WRITER_OPTIONS)
                         for f in self.files]
        self.split = split
        self.count = 0
        self._lengths: list[int] = []

    def write(self, record: Mapping[str, Any]) -> None:
        self._writers[self.count % len(self._writers)].write(encode_record(record))
        self._lengths.append(len(record["flux"]))
        self.count += 1

    def close(self) -> dict[str, Any]:
        for w in self._writers:
            w.close()
        # Pixel counts in READ order (file 0's records, then file 1's, ...: record c went to file
        # c % n), so the pipeline can bucket spectra by length without decoding them.
        lengths = np.asarray(self._lengths, np.int32)
        order = np.concatenate([np.arange(i, self.count, len(self.files))
                                for i in range(len(self.files))]) if self.count else lengths
        lengths_file = f"{self.split}-lengths.npy"
        np.save(self.directory / lengths_file, lengths[order.astype(np.int64)])
        n = len(self.files)
        return {"files": self.files, "count": self.count, "lengths_file": lengths_file,
                "file_counts": [len(range(i, self.count, n)) for i in range(n)]}


def assign_split(ids: np.ndarray, fractions: Mapping[str, float], seed: int) -> np.ndarray:
    """Deterministic split by hashing ids: the same spectrum lands in the same split whatever
    else is in the data set (so adding files never moves a test spectrum into train).

    Returns an array of split names, one per id.
    """
    names = list(fractions)
    edges = np.cumsum([fractions[n] for n in names])
    if not np.isclose(edges[-1], 1.0):
        raise ValueError(f"split fractions must sum to 1, got {dict(fractions)}")
    u = np.array([_unit_hash(int(i), seed) for i in np.asarray(ids).ravel()])
    idx = np.searchsorted(edges, u, side="right")
    return np.array(names, dtype=object)[np.minimum(idx, len(names) - 1)]


def _unit_hash(value: int, seed: int) -> float:
    h = hashlib.blake2b(f"{seed}:{value}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64


# --------------------------------------------------------------------------------------------
# Reading (random access; Grain wraps the same source)
# --------------------------------------------------------------------------------------------
def split_paths(directory: str | os.PathLike, split: str) -> list[str]:
    """Absolute paths of the shard files of one split, checked to exist."""
    manifest = read_manifest(directory)
    if split not in manifest.splits:
        raise SpectrumError(
            f"{directory}: no split '{split}' (has {sorted(manifest.splits)})")
    paths = [str(Path(directory) / f) for f in manifest.splits[split]["files"]]
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise SpectrumError(f"{directory}: manifest lists missing shard files {missing}")
    return paths


def record_lengths(directory: str | os.PathLike, split: str) -> np.ndarray:
    """Pixel count of every record of ``split`` in read order: [count] int32.

    Read from the split's lengths file when the writer left one, else by decoding every record
    once (shard directories written before lengths files existed)."""
    manifest = read_manifest(directory)
    entry = manifest.splits.get(split)
    if entry is None:
        raise SpectrumError(f"{directory}: no split '{split}' (has {sorted(manifest.splits)})")
    name = entry.get("lengths_file")
    if name and (Path(directory) / name).exists():
        lengths = np.load(Path(directory) / name)
        if len(lengths) != int(entry["count"]):
            raise SpectrumError(f"{Path(directory) / name}: {len(lengths)} lengths for "
                                f"{entry['count']} records; the shard directory is inconsistent")
        return lengths.astype(np.int32)
    return np.array([len(r["flux"]) for r in iter_records(directory, split)], np.int32)


class ShardSource:
    """The records of one split, by index: the ONE shard reader of spectrax.

    Training (Grain takes it as a random-access data source), evaluation, prediction and the
    tools all read shards through it. ``source[i]`` is record ``i`` decoded (read order: file 0's
    records, then file 1's, ...); ``source.raw(i)`` its bytes; ``source.where(i)`` names its
    file and position for messages. Opening a damaged file, reading a damaged record or
    decoding garbage raises SpectrumError naming the file (and record).

    Attributes:
      directory, split: what is read.
      paths: [F] shard files of the split.
      offsets: [F + 1] int, the first record index of each file (and the total).
      grid: the manifest's shared grid as float32 [L] (records without a wavelength of their
        own lie on it), or None.
      label_names: the manifest's label columns.
    """

    def __init__(self, directory: str | os.PathLike, split: str, *,
                 paths: Sequence[str] | None = None):
        """``paths``: only these files of the split (default: all, in manifest order)."""
        manifest = read_manifest(directory)
        self.directory, self.split = str(directory), split
        every = split_paths(directory, split)
        self.paths = list(every if paths is None else paths)
        self.label_names = list(manifest.label_names)
        self.grid = grids.grid_f32(manifest.grid) if manifest.grid else None
        known = dict(zip(every, manifest.splits[split].get("file_counts") or ()))
        counts = [known[p] if p in known else num_records(p) for p in self.paths]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # "path[start:end]" instructions: the data source then opens no file up front.
        self._source = ArrayRecordDataSource(
            [f"{p}[0:{n}]" for p, n in zip(self.paths, counts)]) if self.paths else None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> tuple[str, int]:
        """(shard file, position in it) of record ``i``."""
        f = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.paths[f], int(i - self.offsets[f])

    def where(self, i: int) -> str:
        path, pos = self.locate(i)
        return f"{path} record {pos}"

    def raw(self, i: int) -> bytes:
        if not 0 <= i < len(self):
            raise IndexError(f"{self.directory} split '{self.split}': record {i} of {len(self)}")
        try:
            return self._source[int(i)]
        except Exception as e:  # the C++ reader raises bare RuntimeErrors on damaged files
            raise SpectrumError(f"{self.where(i)}: unreadable (corrupt or truncated shard? "
                                f"{type(e).__name__}: {e})") from e

    def __getitem__(self, i: int) -> dict[str, Any]:
        return decode_record(self.raw(i), where=self.where(i))

    def __getitems__(self, indices) -> list[dict[str, Any]]:
        return [self[int(i)] for i in indices]


def num_records(path: str) -> int:
    """Records in one ArrayRecord file; SpectrumError naming it when it cannot be opened."""
    try:
        reader = ArrayRecordReader(path)
        n = reader.num_records()
        reader.close()
    except Exception as e:  # the C++ reader raises RuntimeError/ValueError on corruption
        raise SpectrumError(f"{path}: cannot open ArrayRecord shard (corrupt or truncated? "
                            f"{type(e).__name__}: {e})") from e
    return int(n)


def iter_records(directory: str | os.PathLike, split: str, *,
                 on_error: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
    """Every record of a split in read order.

    Args:
      on_error: None: a damaged file or record raises SpectrumError naming it. Otherwise it is
        called with that message and reading goes on (a file that cannot be opened is skipped
        whole, a damaged record alone), so one bad shard never stops a run over many.
    """
    if on_error is None:
        source = ShardSource(directory, split)
        for i in range(len(source)):
            yield source[i]
        return
    for path in split_paths(directory, split):
        try:
            source = ShardSource(directory, split, paths=[path])
        except SpectrumError as e:
            on_error(f"{e}; file skipped")
            continue
        for i in range(len(source)):
            try:
                yield source[i]
            except SpectrumError as e:
                on_error(f"{e}; record skipped")


def write_split(directory: str | os.PathLike, split: str, records: Iterable[Mapping[str, Any]],
                num_shards: int = 1) -> dict[str, Any]:
    """Writes an iterable of records as one split; returns its manifest entry."""
    writer = ShardWriter(directory, split, num_shards)
    for r in records:
        writer.write(r)
    return writer.close()
