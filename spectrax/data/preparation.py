"""Survey files or simulator chunks -> a shard directory, in bounded memory, on any number of
workers: the pipeline behind ``python -m spectrax.prepare`` and the simulated-data cache.

The work is cut into *groups*: consecutive input units (:mod:`spectrax.data.inputs`) of about
``spectra_per_group`` spectra, planned from the sorted input list alone, so the plan (and hence
the output) does not depend on how many workers run it.

1. **Group** (one Beam element each, :func:`process_group`): read every unit, mask absurd
   redshifts and apply the survey's quality cuts (DESI), assign each record its split by the id
   hash (:func:`spectrax.data.shards.assign_split`; simulated units carry their own), encode it
   and stream it into the group's own shard file per split, ``<split>-<g>-of-<G>.array_record``
   (ArrayRecord, :data:`spectrax.data.shards.WRITER_OPTIONS`). Only one unit's records are in memory at a time (a whole
   group's when records are shuffled, for simulated multi-survey mixtures). A unit that cannot
   be read is skipped, named with the reason and counted (``strict`` raises instead). The group
   returns a small :class:`GroupSummary` (ids, splits, labels, lengths and S/N² of its records,
   and its reports), also saved beside the shards: a rerun after a kill reuses finished groups.
2. **Finalize** (one element, :func:`finalize`): resolve duplicate ids across groups, combine
   the label statistics, reader and cut counts into ``manifest.json``.
3. **Publish** (:func:`publish`): the directory is built as ``<output>.partial`` and renamed
   to ``<output>`` only when complete, so a killed run never leaves a half-written output;
   running the same command again completes it.

Duplicates (the same id in two units, e.g. a DESI target observed in two programs): the record
with the largest total S/N², Σ flux² · ivar over its valid pixels (the statistic behind DESI's
TSNR2 selection of its primary spectrum, with the observed flux in place of a template), is
kept; ties go to the unit that comes first in sorted input order. The others are removed from
their shard files and counted (``report["duplicates"]``).

Why not ArrayRecord's Beam sink (``array_record.beam.arrayrecordio``): with ``num_shards=0``
its files hold whatever records a runner bundled together (not the same for 1 and 8 workers),
and a fixed ``num_shards`` makes the runner shuffle every record, which Beam's DirectRunner
does in memory. Writing each group's files in the group's own element keeps both properties
the pipeline needs: identical output for any number of workers, and memory that does not grow
with the survey.

Runs on Beam (:func:`run_beam`: DirectRunner over local processes by default, or any runner
with its pipeline options, e.g. Flink or Spark on a cluster whose nodes share the file system,
see launch/prepare_flink_slurm.sh) or in this process (:func:`run_local`, what the training
commands use for the embedded simulator's cache). Both call the same functions: their outputs
are identical (tested).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from tqdm import tqdm

from spectrax.data import inputs, shards
from spectrax.data.readers import desi
from spectrax.spectra import SpectrumError

DEFAULT_FRACTIONS = (("train", 0.7), ("val", 0.15), ("test", 0.15))
PARTIAL = ".partial"
GROUPS_DIR = "_groups"
PLAN_FILE = "_plan.json"

# Redshifts outside this range are fitting failures (redrock's, or another pipeline's), not
# galaxies: a label there would teach the model garbage. Such labels are masked (set NaN) and counted as 'absurd_redshift';
# with require_redshift the spectrum is then dropped and also counted in 'no_redshift',
# otherwise it is kept unlabelled (usable for autoencoding).
DESI_Z_RANGE = (-0.01, 10.0)
CUTS = {"bgs": desi.bgs_quality_cuts, "elg": desi.elg_quality_cuts, "none": None}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to do with the records (everything but the inputs).

    Attributes:
      output: the shard directory to create.
      splits: ((name, fraction), ...) for records split by the id hash; simulated and shard
        units carry their own split, which must be one of these names.
      seed: seed of the id hash.
      cuts: quality cuts of DESI records (``bgs``, ``elg``, ``none``; SPECS.md section 1).
      require_redshift: drop (and count) records without a finite redshift label (DESI).
      shuffle: permute each group's records (seeded by group): simulated mixtures, so that any
        run of records (an evaluation batch, the examples in figures) mixes their components.
      strict: stop at the first unit that cannot be read instead of skipping it.
      spectra_per_group: about how many spectra one group (one shard file per split) holds.
      skipped_inputs: ((path, reason), ...) of inputs found but not usable (e.g. a redrock file
        without its coadd), reported with the units that could not be read.
      source: JSON text stored as the manifest's ``source``.
    """

    output: str
    splits: tuple[tuple[str, float], ...] = DEFAULT_FRACTIONS
    seed: int = 0
    cuts: str = "none"
    require_redshift: bool = False
    shuffle: bool = False
    strict: bool = False
    spectra_per_group: int = 2048
    skipped_inputs: tuple[tuple[str, str], ...] = ()
    source: str = "{}"

    def __post_init__(self):
        if self.cuts not in CUTS:
            raise ValueError(f"--cuts={self.cuts!r}; use one of {sorted(CUTS)}")
        total = sum(f for _, f in self.splits)
        if not np.isclose(total, 1.0):
            raise ValueError(f"split fractions must sum to 1, got {dict(self.splits)}")

    @property
    def split_names(self) -> list[str]:
        return [s for s, _ in self.splits]


@dataclasses.dataclass(frozen=True)
class Plan:
    """The groups of units to prepare, and how (picklable: Beam ships it to workers)."""

    settings: Settings
    groups: tuple[tuple[Any, ...], ...]

    @property
    def partial(self) -> Path:
        return Path(self.settings.output).with_name(Path(self.settings.output).name + PARTIAL)

    def fingerprint(self) -> str:
        """Changes with anything that changes the output (a rerun of another plan starts over)."""
        text = json.dumps([dataclasses.asdict(self.settings),
                           [[repr(u) for u in g] for g in self.groups]])
        return hashlib.sha1(text.encode()).hexdigest()

    def shard_name(self, split: str, g: int) -> str:
        return f"{split}-{g:05d}-of-{len(self.groups):05d}.array_record"


def make_plan(units: Sequence[Any], settings: Settings) -> Plan:
    """Groups ``units`` (in the given, deterministic order) into about
    ``settings.spectra_per_group`` spectra each."""
    groups = inputs.blocks(units, settings.spectra_per_group)
    return Plan(settings, tuple(tuple(g) for g in groups))


# ==============================================================================================
# Group
# ==============================================================================================
@dataclasses.dataclass
class GroupSummary:
    """What one group wrote, for :func:`finalize` (records in write order).

    Attributes:
      group: group index.
      ids: [n] int64; split: [n] int16 index into ``Settings.split_names``; labels: [n, K]
        float32 (NaN = unknown); lengths: [n] int32 pixels; snr2: [n] float64 Σ flux² ivar.
      label_names, grid: of the group's records (grid: shared descriptor or None).
      report: per-unit entries, summed reader and cut counts, skipped units and refused records.
    """

    group: int
    ids: np.ndarray
    split: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    snr2: np.ndarray
    label_names: tuple[str, ...] | None
    grid: dict | None
    report: dict

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        extra = {"group": self.group, "label_names": self.label_names, "grid": self.grid,
                 "report": self.report}
        np.savez(buf, ids=self.ids, split=self.split, labels=self.labels, lengths=self.lengths,
                 snr2=self.snr2, extra=np.array(json.dumps(extra)))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "GroupSummary":
        with np.load(io.BytesIO(data)) as z:
            extra = json.loads(str(z["extra"]))
            names = extra["label_names"]
            return cls(extra["group"], z["ids"], z["split"], z["labels"], z["lengths"], z["snr2"],
                       tuple(names) if names is not None else None, extra["grid"],
                       extra["report"])


class _SplitWriters:
    """One ArrayRecord writer per split of a group, opened on first use, written as ``.tmp``
    and renamed when the group completes."""

    def __init__(self, plan: Plan, g: int):
        self.plan, self.g = plan, g
        self.writers: dict[str, Any] = {}

    def write(self, split: str, data: bytes) -> None:
        w = self.writers.get(split)
        if w is None:
            path = self.plan.partial / (self.plan.shard_name(split, self.g) + ".tmp")
            w = self.writers[split] = ArrayRecordWriter(str(path), shards.WRITER_OPTIONS)
        w.write(data)

    def close(self) -> None:
        for split, w in self.writers.items():
            w.close()
            final = self.plan.partial / self.plan.shard_name(split, self.g)
            os.replace(final.with_name(final.name + ".tmp"), final)


def _summary_path(plan: Plan, g: int) -> Path:
    return plan.partial / GROUPS_DIR / f"{g:05d}.npz"


def process_group(plan: Plan, g: int) -> GroupSummary:
    """Reads, selects, splits and writes the records of group ``g`` (module docstring, step 1);
    returns its summary. A finished group (its summary saved) is not done again."""
    done = _summary_path(plan, g)
    if done.exists():
        return GroupSummary.from_bytes(done.read_bytes())
    st = plan.settings
    names = st.split_names
    writers = _SplitWriters(plan, g)
    rows: dict[str, list] = {k: [] for k in ("ids", "split", "labels", "lengths", "snr2")}
    report = {"units": [], "reader": Counter(), "cuts": Counter(), "cuts_skipped": [],
              "skipped": [], "refused": []}
    label_names, grid = None, None
    pending: list[tuple[str, bytes]] = []  # shuffled groups: written at the end
    for unit in plan.groups[g]:
        try:
            opened = unit.open()
            records = _select(opened, st, report)
        except Exception as e:  # any failure of one unit's files: skip it, name it, go on
            if st.strict:
                raise SpectrumError(f"{unit.name}: {type(e).__name__}: {e} (--strict)") from e
            report["skipped"].append({"file": unit.name, "reason": f"{type(e).__name__}: {e}"})
            continue
        if label_names is None:
            label_names, grid = opened.label_names, opened.grid
        elif (tuple(opened.label_names), opened.grid) != (tuple(label_names), grid):
            raise SpectrumError(
                f"{unit.name}: label columns {opened.label_names} / grid {opened.grid} differ "
                f"from the other inputs' {label_names} / {grid}; prepare them separately")
        kept = 0
        for where, rec, split in _assign_splits(records, opened.split, st):
            if split not in names:
                raise SpectrumError(f"{where}: split '{split}' is not one of {names}")
            data = shards.encode_record(rec)
            if st.shuffle:
                pending.append((split, data))
            else:
                writers.write(split, data)
            flux = rec["flux"]
            rows["ids"].append(int(rec["id"]))
            rows["split"].append(names.index(split))
            rows["labels"].append(np.asarray(rec["labels"], np.float32))
            rows["lengths"].append(len(flux))
            # Σ flux² ivar over valid pixels: records are sanitised, so bad pixels hold 0 in both
            rows["snr2"].append(float(np.dot(flux * flux, rec["ivar"])))
            kept += 1
        report["reader"].update(opened.counts)
        report["refused"] += opened.refused
        report["units"].append({"file": opened.files[0], "companions": opened.files[1:],
                                "records": kept})
    if pending:  # shuffled group: records (and their summary rows) in a seeded order
        order = np.random.default_rng([st.seed, g]).permutation(len(pending))
        rows = {k: [v[i] for i in order] for k, v in rows.items()}
        for i in order:
            writers.write(*pending[i])
    writers.close()
    k = len(label_names or ())
    summary = GroupSummary(
        group=g, ids=np.asarray(rows["ids"], np.int64),
        split=np.asarray(rows["split"], np.int16),
        labels=(np.asarray(rows["labels"], np.float32) if rows["labels"]
                else np.zeros((0, k), np.float32)),
        lengths=np.asarray(rows["lengths"], np.int32),
        snr2=np.asarray(rows["snr2"], np.float64), label_names=label_names, grid=grid,
        report={**report, "reader": dict(report["reader"]), "cuts": dict(report["cuts"])})
    _write_atomically(done, summary.to_bytes())
    return summary


def _select(opened, st: Settings, report: dict) -> list[tuple[str, dict]]:
    """The records of a unit that prepare keeps: absurd redshifts masked (any input with a
    ``z`` label), records without a redshift dropped (``require_redshift``) and the quality
    cuts applied (DESI), each counted in ``report``. Other inputs pass unchanged."""
    rows = list(opened.records)
    if "z" not in opened.label_names:
        return rows
    j = list(opened.label_names).index("z")
    out = []
    for where, rec in rows:
        z = np.asarray(rec["labels"], np.float32).copy()
        if np.isfinite(z[j]) and not DESI_Z_RANGE[0] <= z[j] <= DESI_Z_RANGE[1]:
            report["reader"]["absurd_redshift"] += 1
            z[j] = np.nan
            rec = {**rec, "labels": z}
        if st.require_redshift and not np.isfinite(z[j]):
            report["reader"]["no_redshift"] += 1
            continue
        out.append((where, rec))
    cut = CUTS[st.cuts]
    if cut is None or not out:
        return out
    keep, removed = cut([rec for _, rec in out])
    report["cuts"].update(removed)  # removed per cut, applied in order
    report["cuts_skipped"] = sorted(set(report["cuts_skipped"]) | set(removed.skipped))
    return [row for row, k in zip(out, keep) if k]


def _assign_splits(rows: list[tuple[str, dict]], split: str | None, st: Settings):
    """(where, record, split) for each row: the unit's own split, else the id hash."""
    if split is not None:
        return [(w, r, split) for w, r in rows]
    ids = np.array([int(r["id"]) for _, r in rows], np.int64)
    assigned = shards.assign_split(ids, dict(st.splits), st.seed) if len(ids) else []
    return [(w, r, s) for (w, r), s in zip(rows, assigned)]


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ==============================================================================================
# Finalize
# ==============================================================================================
def label_stats(values: np.ndarray, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean/std/median/MAD of each label over the train split (NaN ignored)."""
    out = {}
    for j, name in enumerate(names):
        v = values[:, j][np.isfinite(values[:, j])]
        if v.size:
            med = float(np.median(v))
            out[name] = {"mean": float(v.mean()), "std": float(v.std()), "median": med,
                         "mad_std": float(1.4826 * np.median(np.abs(v - med))), "n": int(v.size)}
    return out


def duplicate_losers(summaries: Sequence[GroupSummary]) -> dict[int, np.ndarray]:
    """{group: [n_g] bool, True for records dropped as duplicates} by the rule of the module
    docstring (largest S/N², then earliest group and row)."""
    ids = np.concatenate([s.ids for s in summaries]) if summaries else np.zeros(0, np.int64)
    snr2 = np.concatenate([s.snr2 for s in summaries]) if summaries else np.zeros(0)
    group = np.concatenate([np.full(len(s.ids), i) for i, s in enumerate(summaries)]
                           ) if summaries else np.zeros(0, int)
    row = np.concatenate([np.arange(len(s.ids)) for s in summaries]
                         ) if summaries else np.zeros(0, int)
    order = np.lexsort((row, group, -np.nan_to_num(snr2, nan=-1.0), ids))
    first = np.ones(len(ids), bool)
    first[1:] = ids[order][1:] != ids[order][:-1]
    lose = np.zeros(len(ids), bool)
    lose[order[~first]] = True
    out, start = {}, 0
    for s in summaries:
        out[s.group] = lose[start:start + len(s.ids)]
        start += len(s.ids)
    return out


def _rewrite_without(plan: Plan, summary: GroupSummary, lose: np.ndarray) -> dict[str, str]:
    """Writes each split file of a group that holds a dropped duplicate again without it, as
    ``<name>.dedup`` beside the original (idempotent: an interrupted finalize redoes it from the
    untouched original); returns {split: file name} for those splits."""
    names = plan.settings.split_names
    out = {}
    for k in np.unique(summary.split[lose]):
        split = names[int(k)]
        mine = summary.split == k
        drop = lose[mine]  # by position in this split's file
        src = plan.partial / plan.shard_name(split, summary.group)
        dst = src.with_name(src.name.replace(".array_record", ".dedup.array_record"))
        reader = ArrayRecordReader(str(src))
        tmp = dst.with_name(dst.name + ".tmp")
        writer = ArrayRecordWriter(str(tmp), shards.WRITER_OPTIONS)
        for i in range(reader.num_records()):
            if not drop[i]:
                writer.write(reader.read([i])[0])
        writer.close()
        reader.close()
        os.replace(tmp, dst)
        out[split] = dst.name
    return out


def finalize(plan: Plan, summaries: Sequence[GroupSummary]) -> dict[str, Any]:
    """Combines the group summaries into ``manifest.json`` in the partial directory (module
    docstring, step 2); returns the report. Deterministic in the plan: summaries are taken in
    group order whatever order they arrive in."""
    summaries = sorted(summaries, key=lambda s: s.group)
    st = plan.settings
    names = st.split_names
    with_records = [s for s in summaries if s.label_names is not None]
    label_names = with_records[0].label_names if with_records else ()
    grid = with_records[0].grid if with_records else None
    for s in with_records:
        if (s.label_names, s.grid) != (label_names, grid):
            raise SpectrumError(f"groups {with_records[0].group} and {s.group} hold records with "
                                f"different label columns or grids ({label_names} vs "
                                f"{s.label_names}); prepare such inputs separately")
    losers = duplicate_losers(summaries)
    splits: dict[str, dict[str, Any]] = {n: {"files": [], "count": 0, "file_counts": []}
                                         for n in names}
    lengths: dict[str, list[np.ndarray]] = {n: [] for n in names}
    train_labels = []
    for s in summaries:
        lose = losers[s.group]
        rewritten = _rewrite_without(plan, s, lose) if lose.any() else {}
        keep = ~lose
        for k, split in enumerate(names):
            mine = keep & (s.split == k)
            n = int(mine.sum())
            if not n:
                continue
            entry = splits[split]
            entry["files"].append(rewritten.get(split, plan.shard_name(split, s.group)))
            entry["file_counts"].append(n)
            entry["count"] += n
            lengths[split].append(s.lengths[mine])
            if split == "train":
                train_labels.append(s.labels[mine])
    for split, entry in splits.items():
        entry["lengths_file"] = f"{split}-lengths.npy"
        arr = np.concatenate(lengths[split]) if lengths[split] else np.zeros(0, np.int32)
        np.save(plan.partial / entry["lengths_file"], arr.astype(np.int32))
    k = len(label_names)
    train = (np.concatenate(train_labels).astype(np.float64) if train_labels
             else np.zeros((0, k)))
    report = combine_reports([s.report for s in summaries])
    report["skipped"] = [{"file": f, "reason": r} for f, r in st.skipped_inputs] + report["skipped"]
    report["duplicates"] = int(sum(int(l.sum()) for l in losers.values()))
    report["kept"] = int(sum(e["count"] for e in splits.values()))
    report["splits"] = {n: e["count"] for n, e in splits.items()}
    shards.write_manifest(plan.partial, shards.Manifest(
        label_names=list(label_names), splits=splits, grid=grid,
        stats={"labels": label_stats(train, label_names)}, report=report,
        source=json.loads(st.source)))
    return report


def combine_reports(reports: Sequence[dict]) -> dict[str, Any]:
    """Sums per-group reports: files, reader and cut counts (cuts keep their order), skipped
    units and refused records."""
    reader, cuts = Counter(), {}
    files, skipped, refused, cuts_skipped = [], [], [], set()
    for r in reports:
        files += r["units"]
        reader.update(r["reader"])
        for name, n in r["cuts"].items():
            cuts[name] = cuts.get(name, 0) + n
        cuts_skipped |= set(r["cuts_skipped"])
        skipped += r["skipped"]
        refused += r["refused"]
    return {"files": files, "reader": dict(sorted(reader.items())), "cuts": cuts,
            "cuts_skipped": sorted(cuts_skipped), "skipped": skipped, "refused": refused}


# ==============================================================================================
# Publish and run
# ==============================================================================================
def start(plan: Plan) -> None:
    """Prepares ``<output>.partial``: kept when it holds a run of the same plan (its finished
    groups are reused), else emptied."""
    part = plan.partial
    stamp = part / PLAN_FILE
    fp = plan.fingerprint()
    if part.exists() and not (stamp.exists() and stamp.read_text() == fp):
        shutil.rmtree(part)
    (part / GROUPS_DIR).mkdir(parents=True, exist_ok=True)
    if not stamp.exists():
        _write_atomically(stamp, fp.encode())


def publish(plan: Plan) -> Path:
    """Removes what the manifest does not list (summaries, plan stamp, shard files replaced by
    their de-duplicated copies) and renames ``<output>.partial`` to ``<output>``, replacing an
    older directory of that name."""
    part, out = plan.partial, Path(plan.settings.output)
    manifest = shards.read_manifest(part)
    keep = {shards.MANIFEST} | {f for e in manifest.splits.values() for f in e["files"]}
    keep |= {e["lengths_file"] for e in manifest.splits.values()}
    for p in part.iterdir():
        if p.name not in keep:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    if out.exists():
        shutil.rmtree(out)
    part.rename(out)  # the manifest only ever appears complete
    return out


def run_local(plan: Plan, progress: bool = True) -> dict[str, Any]:
    """Runs the plan in this process (no Beam); returns the report."""
    start(plan)
    summaries = [process_group(plan, g) for g in tqdm(
        range(len(plan.groups)), desc="prepare", unit="group", disable=not progress,
        file=sys.stderr)]
    report = finalize(plan, summaries)
    publish(plan)
    return report


def run_beam(plan: Plan, pipeline_args: Sequence[str] = (), workers: int = 1
             ) -> dict[str, Any]:
    """Runs the plan as an Apache Beam pipeline; returns the report.

    Without ``--runner`` in ``pipeline_args`` it runs on Beam's portable local runner
    (FnApiRunner) over ``workers`` local processes (``multi_processing``; one worker runs in
    this process). It is chosen directly, not through ``DirectRunner``, because the latter first
    tries to download the Prism runner binary from the internet. Any other runner takes its own
    options from ``pipeline_args`` (e.g. ``--runner=FlinkRunner --flink_master=...``); the
    output directory must then be on a file system that every worker and this process share.

    Beam's runner and its worker processes log at INFO to standard error; here their output
    goes to ``<output>.partial/_beam.log`` (named in the error when the pipeline fails), and a
    progress bar counts finished groups.
    """
    start(plan)
    log = plan.partial / "_beam.log"
    with _stderr_to(log) as terminal, _GroupProgress(plan, terminal):
        # Imported here: Beam logs warnings about optional cloud clients when imported.
        import apache_beam as beam
        from apache_beam.options.pipeline_options import PipelineOptions
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        args = list(pipeline_args)
        runner = None
        if not any(a.startswith("--runner") for a in args):
            runner = FnApiRunner()
            args += [f"--direct_num_workers={max(1, workers)}", "--direct_running_mode="
                     + ("multi_processing" if workers > 1 else "in_memory")]
        try:
            with beam.Pipeline(runner=runner, options=PipelineOptions(args)) as p:
                _ = (p
                     | "groups" >> beam.Create(list(range(len(plan.groups))))
                     # Without this the runner may fuse every group into the one task that read
                     # the Create; the reshuffle lets it spread groups over its workers.
                     | "spread" >> beam.Reshuffle()
                     | "prepare group" >> beam.Map(lambda g, plan: process_group(plan, g), plan)
                     | "collect" >> beam.combiners.ToList()
                     | "finalize" >> beam.Map(lambda s, plan: finalize(plan, s), plan))
        except Exception as e:
            raise RuntimeError(f"the Beam pipeline failed ({type(e).__name__}: {e}); its log is "
                               f"{log}") from e
    publish(plan)
    return shards.read_manifest(plan.settings.output).report


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[Any]:
    """Points file descriptor 2 (this process's standard error, inherited by the worker
    processes Beam starts) at ``path``; yields a text stream on the original standard error."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1)
    try:
        yield terminal
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        terminal.close()


class _GroupProgress:
    """A progress bar of finished groups (their summaries appearing in ``_groups/``), updated
    by a background thread: works for any runner whose workers share the file system."""

    def __init__(self, plan: Plan, stream):
        self.plan, self.stream = plan, stream
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        directory = self.plan.partial / GROUPS_DIR
        count = lambda: sum(1 for p in directory.glob("*.npz"))
        with tqdm(total=len(self.plan.groups), initial=count(), desc="prepare", unit="group",
                  file=self.stream, dynamic_ncols=True) as bar:
            while not self.stop.wait(0.5):
                if count() > bar.n:
                    bar.update(count() - bar.n)
            bar.update(count() - bar.n)
