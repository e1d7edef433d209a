"""The one input layer: files, directories, shard directories and the simulator -> records.

``prepare``, ``predict``, ``embeddings`` and the tools all read their inputs through here:

- :func:`discover` turns what a user gave (``--input`` files and directories, any number) into
  *units*, the pieces read one at a time: a :class:`FileUnit` (the files one reader call needs:
  a DESI coadd and its redrock file, the CCD files of a GALAH star, one SDSS file, ...) or a
  :class:`ShardUnit` (a run of records of one shard file). Directories are searched recursively;
  a directory holding ``manifest.json`` is a shard directory. What cannot be used (a missing
  path, a redrock file without its coadd) is returned by name with the reason, never dropped
  silently.
- :class:`SimulatedUnit` is the same kind of piece for the embedded simulators (a chunk of
  rows), so simulated data go through exactly the pipeline real files go through.
- ``unit.open()`` reads one unit: an :class:`Opened` with the records (each with a ``where``
  that names file and row for messages), the label names, the shared wavelength grid and the
  counts of what was skipped or masked. A damaged file raises SpectrumError naming it (the
  caller skips the unit and carries on); a damaged record of a shard file is skipped, named and
  counted.
- :func:`blocks` cuts a unit list into consecutive blocks of about N spectra: prepare's Beam
  elements and predict's resumable parts.

Records are those of :func:`spectrax.spectra.sanitize_record` (flux/ivar float32 with 0 at bad
pixels, mask True = valid, labels float32 NaN = unknown, int64 ids); records without a
``wavelength`` of their own lie on ``Opened.grid``.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from spectrax.data import grids, mixture, shards, synthetic
from spectrax.data.readers import READERS, detect_survey
from spectrax.spectra import SpectrumError, sanitize_record


@dataclasses.dataclass
class Opened:
    """One unit, read.

    Attributes:
      records: iterator of ``(where, record)``; ``where`` names the file and row/record.
      label_names: names of the records' label columns.
      grid: shared wavelength-grid descriptor of records without their own, else None.
      counts: what was skipped or masked, by reason (filled as records are read for shard
        units, at open for file units).
      refused: messages naming the records that could not be read (shard units).
      split: the split every record belongs to (shard and simulated units), or None (files:
        the id hash decides).
      files: names of the files read (for reports).
    """

    records: Iterator[tuple[str, dict]]
    label_names: tuple[str, ...]
    grid: dict | None
    counts: dict[str, int]
    refused: list[str]
    split: str | None
    files: list[str]


@dataclasses.dataclass(frozen=True)
class FileUnit:
    """The files of one reader call (main file first)."""

    survey: str
    paths: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.paths[0]

    def size_hint(self) -> int:
        """Spectra expected in the unit, from headers (for block sizing only; 1 when the
        reader cannot tell)."""
        return max(1, READERS[self.survey].count(self.paths) or 1)

    def open(self) -> Opened:
        result = READERS[self.survey].read(self.paths)
        rows = ((f"{self.paths[0]} (id {int(r['id'])})", r) for r in result.records)
        return Opened(rows, tuple(result.label_names), result.grid, dict(result.counts), [],
                      None, [Path(p).name for p in self.paths])


@dataclasses.dataclass(frozen=True)
class ShardUnit:
    """Records ``[start, stop)`` of one shard file of a split."""

    directory: str
    split: str
    path: str
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.path}[{self.start}:{self.stop}]"

    def size_hint(self) -> int:
        return self.stop - self.start

    def open(self) -> Opened:
        manifest = shards.read_manifest(self.directory)
        source = shards.ShardSource(self.directory, self.split, paths=[self.path])
        counts: dict[str, int] = {}
        refused: list[str] = []

        def rows():
            for i in range(self.start, min(self.stop, len(source))):
                try:
                    rec = source[i]
                except SpectrumError as e:
                    refused.append(f"{e}; record skipped")
                    counts["refused_records"] = counts.get("refused_records", 0) + 1
                    continue
                rec.setdefault("meta", {})
                yield f"{source.where(i)} (id {int(rec['id'])})", rec

        return Opened(rows(), tuple(manifest.label_names), manifest.grid, counts, refused,
                      self.split, [Path(self.directory).name])


@dataclasses.dataclass(frozen=True)
class SimulatedUnit:
    """A chunk of an embedded simulator's split: rows ``[start, stop)`` of the DESI galaxy
    samples and APOGEE sets, or round-robin chunk indices ``[start, stop)`` of a multi-survey
    mixture (:func:`spectrax.data.mixture.mixture_chunk`) of ``n`` rows. ``id_offset`` is added
    to the simulator's ids (one offset per split, so ids never repeat across splits)."""

    simulator: str
    split: str
    seed: int
    start: int
    stop: int
    n: int
    id_offset: int = 0

    @property
    def name(self) -> str:
        return f"{self.simulator}/{self.split}[{self.start}:{self.stop}]"

    def size_hint(self) -> int:
        if self.simulator in mixture.MIXTURES:
            return (self.stop - self.start) * mixture.CHUNK * len(mixture.mixture(self.simulator))
        return self.stop - self.start

    def open(self) -> Opened:
        return Opened(((f"{self.name} ({int(r['id'])})", r) for r in self._records()),
                      tuple(simulator_label_names(self.simulator)), simulator_grid(self.simulator),
                      {}, [], self.split, [self.name])

    def _records(self) -> Iterator[dict]:
        sim = self.simulator
        if sim in DESI_SIMULATORS:
            d = synthetic.desi_galaxy_rows(self.start, self.stop, DESI_SIMULATORS[sim], self.seed)
            for i in range(len(d["z"])):
                yield {"flux": d["flux"][i], "ivar": d["ivar"][i], "mask": d["mask"][i],
                       "labels": np.array([d["z"][i]], np.float32),
                       "id": np.int64(self.id_offset + int(d["id"][i]))}
            return
        if sim in mixture.APOGEE_SETS:
            records = mixture.apogee_rows(sim, self.seed, self.start, self.stop)
        else:
            records = [r for c in range(self.start, self.stop)
                       for r in mixture.mixture_chunk(sim, self.n, self.seed, c)]
        for r in records:
            r["id"] = np.int64(self.id_offset + int(r["id"]))
            yield r


# The DESI-grid galaxy simulators: name -> sample of :mod:`spectrax.data.synthetic`.
DESI_SIMULATORS = {"desi_bgs": "bgs", "desi_elg": "elg"}


def simulators() -> list[str]:
    """Every simulator name ``config.data.simulator`` accepts."""
    return sorted(DESI_SIMULATORS) + sorted(mixture.MIXTURES) + sorted(mixture.APOGEE_SETS)


def simulator_label_names(simulator: str) -> list[str]:
    if simulator in DESI_SIMULATORS:
        return ["z"]
    if simulator in mixture.APOGEE_SETS:
        return mixture.apogee_label_names()
    if simulator in mixture.MIXTURES:
        return list(mixture.LABELS)
    raise ValueError(f"config.data.simulator={simulator!r}; known: {simulators()} (or set "
                     "config.data.path to a shard directory)")


def simulator_grid(simulator: str) -> dict | None:
    """The shared grid of a simulator's records (DESI galaxies), None when each has its own."""
    return dict(grids.DESI_GRID) if simulator in DESI_SIMULATORS else None


def simulated_units(simulator: str, sizes: dict[str, int], seed: int,
                    rows_per_unit: int = 512) -> list[SimulatedUnit]:
    """The units of a simulated data set: the k-th split gets its own seed (``seed * 10 + k``)
    and id offset ((k + 1) × 10^9 for DESI galaxies, × 10^14 for mixtures and APOGEE sets, whose
    ids are larger), so no spectrum is in two splits; chunks of ``rows_per_unit`` rows
    (mixtures: of round-robin chunk indices covering about that many rows)."""
    simulator_label_names(simulator)  # a clear error for an unknown name
    units = []
    for k, (split, n) in enumerate(sizes.items()):
        if n <= 0:
            continue
        s = seed * 10 + k
        offset = (k + 1) * (10**9 if simulator in DESI_SIMULATORS else 10**14)
        if simulator in mixture.MIXTURES:
            chunks = mixture.num_chunks(simulator, n)
            per = max(1, rows_per_unit // (mixture.CHUNK * len(mixture.mixture(simulator))))
            units += [SimulatedUnit(simulator, split, s, c, min(c + per, chunks), n, offset)
                      for c in range(0, chunks, per)]
        else:
            units += [SimulatedUnit(simulator, split, s, a, min(a + rows_per_unit, n), n, offset)
                      for a in range(0, n, rows_per_unit)]
    return units


# ----------------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Discovery:
    """What :func:`discover` found.

    Attributes:
      units: FileUnits (sorted by main file, per survey) and ShardUnits, in input order.
      skipped: (path, reason) of every file given or found that no unit uses.
      surveys: the surveys of the file units.
      ignored: files in searched directories that belong to no survey asked for (not errors:
        READMEs, catalogues of other surveys), counted by extension.
    """

    units: list
    skipped: list[tuple[str, str]]
    surveys: list[str]
    ignored: dict[str, int]


def is_shard_directory(path: Path) -> bool:
    return path.is_dir() and (path / shards.MANIFEST).exists()


def discover(inputs: Sequence[str | os.PathLike], *, survey: str = "auto",
             split: str | None = None, shard_block: int = 4096) -> Discovery:
    """Units of every input (files, directories, shard directories; any number, any order).

    Args:
      inputs: paths. A directory with ``manifest.json`` is a shard directory; other
        directories are searched recursively for survey files and shard directories.
      survey: the survey of raw files (a key of READERS), or "auto": each file's survey from
        its name (:func:`spectrax.data.readers.detect_survey`). Files given one by one are
        taken as ``survey`` whatever their name; in directories only files named as
        ``survey``'s are taken.
      split: only this split of shard directories (default: every split).
      shard_block: records per ShardUnit (a shard file is cut into runs of this many).

    Raises:
      FileNotFoundError: an input path does not exist (a usage error, not a bad file).
      ValueError: an unknown survey.
    """
    if survey != "auto" and survey not in READERS:
        raise ValueError(f"--survey={survey!r}; known: auto, {', '.join(sorted(READERS))}")
    files: dict[str, list[Path]] = {}
    shard_units: list[ShardUnit] = []
    skipped: list[tuple[str, str]] = []
    ignored: dict[str, int] = {}

    def add_file(f: Path, given: bool) -> None:
        s = survey if (survey != "auto" and given) else detect_survey(f)
        if s is None and given:
            skipped.append((str(f), "cannot tell its survey from its name; pass --survey"))
        elif s is None or (survey != "auto" and s != survey):
            ext = "".join(f.suffixes) or "(none)"
            ignored[ext] = ignored.get(ext, 0) + 1
        else:
            files.setdefault(s, []).append(f)

    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise FileNotFoundError(f"--input {item}: no such file or directory")
        if is_shard_directory(p):
            shard_units += _shard_units(p, split, shard_block, skipped)
        elif p.is_dir():
            for d, dirs, names in os.walk(p):
                d = Path(d)
                if (d / shards.MANIFEST).exists():
                    shard_units += _shard_units(d, split, shard_block, skipped)
                    dirs[:] = []
                    continue
                dirs.sort()
                for n in sorted(names):
                    add_file(d / n, given=False)
        else:
            add_file(p, given=True)
    units: list = []
    for s in sorted(files):
        found = files[s]
        made = READERS[s].units(found)
        used = {Path(f) for u in made for f in u}
        skipped += [(str(f), f"not part of any {s} unit (e.g. a redrock file without its "
                     "coadd)") for f in sorted(set(found) - used)]
        units += [FileUnit(s, tuple(str(f) for f in u)) for u in made]
    if ignored:  # not errors, but never silent: say what was passed over
        asked = "survey" if survey == "auto" else survey
        print(f"spectrax: {sum(ignored.values())} file(s) in the searched directories are not "
              f"{asked} files by their names and were not read ("
              + ", ".join(f"{n} {ext}" for ext, n in sorted(ignored.items())) + ")",
              file=sys.stderr, flush=True)
    return Discovery(units + shard_units, skipped, sorted(files), ignored)


def _shard_units(directory: Path, split: str | None, block: int,
                 skipped: list[tuple[str, str]]) -> list[ShardUnit]:
    """ShardUnits of a shard directory; a shard file that cannot be opened goes to
    ``skipped`` with the reason."""
    manifest = shards.read_manifest(directory)
    names = [split] if split else list(manifest.splits)
    out = []
    for s in names:
        if s not in manifest.splits:
            raise SpectrumError(f"{directory}: no split '{s}' (has {sorted(manifest.splits)})")
        entry = manifest.splits[s]
        known = entry.get("file_counts") or [None] * len(entry["files"])
        for name, n in zip(entry["files"], known):
            path = str(directory / name)
            try:
                n = shards.num_records(path) if n is None else int(n)
            except SpectrumError as e:
                skipped.append((path, str(e)))
                continue
            out += [ShardUnit(str(directory), s, path, a, min(a + block, n))
                    for a in range(0, n, block)]
    return out


def blocks(units: Sequence[Any], spectra: int) -> list[list[Any]]:
    """Consecutive units in blocks of about ``spectra`` spectra each (by ``size_hint``); a
    block closes once it holds at least that many. Deterministic in the unit list."""
    out, current, size = [], [], 0
    for u in units:
        current.append(u)
        size += u.size_hint()
        if size >= spectra:
            out.append(current)
            current, size = [], 0
    if current:
        out.append(current)
    return out


# ----------------------------------------------------------------------------------------------
# Records a model can take
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LengthPolicy:
    """The pixel length a record of ``n`` pixels is padded to for a model, or a refusal.

    Attributes:
      buckets: length buckets in pixels (``config.data.buckets``); when given, a record goes to
        the smallest bucket that holds it (:func:`bucket_index`, the rule training batches
        by, so inference pads exactly as training did) and a longer one is refused.
      length: without buckets, the fixed batch length in pixels; None: each record at its own
        length (one compilation per distinct length).
      exact: with ``length``, only records of exactly that length are accepted (models on a
        fixed grid); False pads any shorter record to it.
    """

    buckets: tuple[int, ...] = ()
    length: int | None = None
    exact: bool = True

    def __post_init__(self):
        object.__setattr__(self, "buckets", tuple(sorted(int(b) for b in self.buckets)))

    @classmethod
    def for_model(cls, data_cfg, *, exact: bool = True) -> "LengthPolicy":
        """A config's policy: its buckets; else ``data.length`` pixels (exactly, or at most
        with ``exact=False``; default 7781, the DESI grid, when exact and unset); else each
        record at its own length."""
        if tuple(data_cfg.buckets):
            return cls(buckets=tuple(data_cfg.buckets))
        if exact:
            return cls(length=int(data_cfg.length or 7781), exact=True)
        return cls(length=int(data_cfg.length) if data_cfg.length else None, exact=False)

    def target(self, n: int) -> int | None:
        """The padded length for a record of ``n`` pixels; None when it cannot be used."""
        if self.buckets:
            if n > self.buckets[-1]:
                return None
            return self.buckets[int(bucket_index([n], self.buckets)[0])]
        if self.length is None:
            return int(n)
        if n == self.length or (not self.exact and n < self.length):
            return int(self.length)
        return None

    def refusal(self, n: int) -> str:
        """Why a record of ``n`` pixels is refused (for the message naming it)."""
        if self.buckets:
            return (f"spectrum has {n} pixels, more than the largest length bucket "
                    f"({self.buckets[-1]} px); add a larger bucket to config.data.buckets")
        if self.exact:
            return (f"spectrum has {n} pixels; this model expects {self.length} (resample onto "
                    "its grid first)")
        return f"spectrum has {n} pixels, more than config.data.length = {self.length}"


def bucket_index(lengths, buckets: Sequence[int]) -> np.ndarray:
    """[N] index of the smallest of ``buckets`` (sorted) holding each length (len(buckets) when
    none does): the one bucketing rule of training, evaluation and inference."""
    return np.searchsorted(np.asarray(buckets), np.asarray(lengths), side="left")


@dataclasses.dataclass
class ModelRecord:
    """A sanitised record ready to batch: ``record`` (with its wavelength), ``where`` (file and
    row, for messages), the names of its label columns, the padded ``length`` the policy chose
    and ``meta`` (the survey's metadata plus SOURCE, the file, and SPLIT for shard inputs)."""

    record: dict
    where: str
    label_names: tuple[str, ...]
    length: int
    meta: dict


def model_records(units: Sequence[Any], policy: LengthPolicy, counts: dict[str, int],
                  refuse: Callable[[str], None]) -> Iterator[ModelRecord]:
    """The records of ``units`` a model can take, in order.

    Bad pixels are masked (:func:`spectrax.spectra.sanitize_record`) and counted in ``counts``
    by reason; a unit that cannot be read, a record that cannot be used or does not fit the
    policy is passed to ``refuse`` with a message naming it (and counted as
    ``refused_files`` / ``refused_records``); ``refuse`` may raise to stop at the first one."""
    for unit in units:
        try:
            opened = unit.open()
        except Exception as e:  # any failure of one input's files: skip it, name it, go on
            refuse(f"{unit.name}: cannot be read ({type(e).__name__}: {e}); input skipped")
            _bump(counts, "refused_files")
            continue
        grid = grids.grid_f32(opened.grid) if opened.grid else None
        for where, rec in opened.records:
            if rec.get("wavelength") is None and grid is not None:
                rec = {**rec, "wavelength": grid}
            try:
                clean, pix = sanitize_record(rec, where)
            except SpectrumError as e:
                refuse(f"{e}; record skipped")
                _bump(counts, "refused_records")
                continue
            for key in ("nonfinite_flux", "nonfinite_ivar", "nonpositive_ivar", "bad_wavelength"):
                _bump(counts, f"masked_{key}", pix.get(key, 0))
            if pix["valid_pixels"] == 0:  # predicted anyway (one row per spectrum), but flagged
                _bump(counts, "all_pixels_masked")
            n = len(clean["flux"])
            target = policy.target(n)
            if target is None:
                refuse(f"{where}: {policy.refusal(n)}")
                _bump(counts, "refused_records")
                continue
            meta = dict(rec.get("meta") or {})
            meta["SOURCE"] = opened.files[0]
            if opened.split is not None:
                meta["SPLIT"] = opened.split
            yield ModelRecord(clean, where, opened.label_names, target, meta)
        for key, value in opened.counts.items():
            _bump(counts, key, value)
        for message in opened.refused:
            refuse(message)


def _bump(counts: dict[str, int], key: str, by: int = 1) -> None:
    if by:
        counts[key] = counts.get(key, 0) + int(by)
