"""Records <-> ArrayRecord shards, plus the manifest that describes a shard directory.

A shard directory looks like::

    manifest.json                      # what is in here: splits, counts, grid, label names, stats
    train-00000-of-00004.array_record  # one serialised record per entry (group_size:1, so any
    ...                                # record can be read at random, which Grain needs)
    test-00000-of-00001.array_record

A record is a dict (see :mod:`spectrax.spectra`): ``flux``/``ivar`` float32 [L], ``mask`` bool
[L], optional ``wavelength`` float32 [L] (records without one use the manifest's grid),
``labels`` float32 [K], ``id`` int64, optional ``meta`` (JSON-able scalars). Instead of a
``wavelength`` array a record may carry ``grid``, a descriptor of :func:`grid_array`.
Serialisation is msgpack with raw little-endian array bytes (masks bit-packed): compact, fast,
and readable without spectrax.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import msgpack
import numpy as np

from spectrax.spectra import SpectrumError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
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
            out[key] = (arr.shape[0], arr.tobytes())
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
            rec["wavelength"] = _grid_f32(raw["grid"])
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
# Wavelength grids described in a few numbers
# --------------------------------------------------------------------------------------------
def grid_array(desc: Mapping[str, Any]) -> np.ndarray:
    """A wavelength grid [n] float64 (Å) from its descriptor:

    - ``{"kind": "linear", "start": Å, "step": Å, "n": int}``
    - ``{"kind": "loglinear", "log10_start": ..., "log10_step": ..., "n": int}``
    - ``{"kind": "segments", "segments": [descriptor, ...]}``: concatenated sub-grids (CCDs,
      chips with gaps between them).

    Records and manifests store descriptors instead of arrays where a grid has a closed form:
    an APOGEE wavelength array is 30 kB per spectrum, its descriptor ~150 bytes.
    """
    return _grid_cached(json.dumps(desc, sort_keys=True, default=_jsonable))


@functools.lru_cache(maxsize=256)
def _grid_cached(key: str) -> np.ndarray:
    desc = json.loads(key)
    kind = desc.get("kind")
    if kind == "linear":
        out = desc["start"] + desc["step"] * np.arange(desc["n"])
    elif kind == "loglinear":
        out = 10.0 ** (desc["log10_start"] + desc["log10_step"] * np.arange(desc["n"]))
    elif kind == "segments":
        out = np.concatenate([_grid_cached(json.dumps(d, sort_keys=True))
                              for d in desc["segments"]])
    else:
        raise SpectrumError(f"wavelength grid of unknown kind {kind!r} (descriptor {desc})")
    out = np.asarray(out, np.float64)
    out.setflags(write=False)  # shared by every record that names this grid
    return out


@functools.lru_cache(maxsize=256)
def _grid_f32(key: str) -> np.ndarray:
    """The float32 grid records decode to (one shared read-only array per grid)."""
    out = _grid_cached(key).astype(np.float32)
    out.setflags(write=False)
    return out


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------
@dataclass
class Manifest:
    """Describes a shard directory.

    Attributes:
      label_names: names of the K label columns (e.g. ``["z"]``).
      splits: split name -> {"files": [relative paths], "count": int}.
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
        return grid_array(self.grid) if self.grid else None

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
        from array_record.python.array_record_module import ArrayRecordWriter

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.files = [f"{split}-{i:05d}-of-{num_shards:05d}.array_record"
                      for i in range(num_shards)]
        # group_size:1 makes every record its own chunk, so random access costs one read.
        self._writers = [ArrayRecordWriter(str(self.directory / f), "group_size:1")
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
        return {"files": self.files, "count": self.count, "lengths_file": lengths_file}


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


def iter_records(directory: str | os.PathLike, split: str) -> Iterator[dict[str, Any]]:
    """Reads every record of a split in file order (for tools and tests; training uses Grain)."""
    from array_record.python.array_record_module import ArrayRecordReader

    for path in split_paths(directory, split):
        try:
            reader = ArrayRecordReader(path)
            n = reader.num_records()
        except Exception as e:  # the C++ reader raises RuntimeError/ValueError on corruption
            raise SpectrumError(f"{path}: cannot open ArrayRecord shard ({e})") from e
        try:
            for i in range(n):
                try:
                    data = reader.read([i])[0]
                except Exception as e:
                    raise SpectrumError(f"{path}: record {i} unreadable ({e})") from e
                yield decode_record(data, where=f"{path} record {i}")
        finally:
            try:
                reader.close()
            except Exception as e:  # a truncated file is only detected when closing
                raise SpectrumError(f"{path}: corrupt or truncated ArrayRecord shard ({e})") from e


def write_split(directory: str | os.PathLike, split: str, records: Iterable[Mapping[str, Any]],
                num_shards: int = 1) -> dict[str, Any]:
    """Writes an iterable of records as one split; returns its manifest entry."""
    writer = ShardWriter(directory, split, num_shards)
    for r in records:
        writer.write(r)
    return writer.close()
