r"""Survey files or the embedded simulator -> ArrayRecord shards: ``python -m spectrax.prepare``.

Real DESI data (coadd + redrock FITS, matched by file name)::

    python -m spectrax.prepare --survey=desi --input=path/to/coadds --output=data/my_desi \
        --cuts=bgs

reads every ``coadd-*.fits`` under ``--input`` (files or directories), joins the matching
``redrock-*.fits`` (same suffix) by TARGETID, applies the quality cuts, assigns each spectrum
to train/val/test by a hash of its TARGETID, and writes shards plus a manifest whose ``report``
says how many spectra every cut and every reader rule removed. Train on it with
``python -m spectrax.train --config=configs/specpt_redshift_bgs.py --config.data.path=data/my_desi``.

Other surveys (``--survey`` = any key of :data:`spectrax.data.readers.READERS`: sdss, lamost,
apogee, galah, mmu) keep each spectrum on its NATIVE grid::

    python -m spectrax.prepare --survey=apogee --input=path/to/aspcapStar --output=data/apogee

Their records carry their own ``wavelength`` (the manifest's ``grid`` is None), the label names
come from the reader, and the split is the same hash of the id; no quality cuts are applied.

The embedded simulator needs no command: training configs call :func:`ensure_data`, which
generates and caches the shards the first time (``data/`` by default).
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from absl import app, flags
from tqdm import tqdm

from spectrax.data import grids, shards
from spectrax.data.readers import READERS
from spectrax.spectra import SpectrumError, sanitize_record

SIM_VERSION = 2  # bump when the simulator's output changes so caches are regenerated
DEFAULT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}
DESI_GRID = {"kind": "linear", "start": grids.DESI_WAVE_MIN, "step": grids.DESI_WAVE_STEP,
             "n": grids.DESI_NPIX}


# ==============================================================================================
# Shared: finishing a shard directory
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


def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(final.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, final: Path) -> Path:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)  # the manifest only ever appears complete
    return final


# ==============================================================================================
# The embedded simulator
# ==============================================================================================
SHUFFLE_BUFFER = 1024  # records held back to mix a simulated mixture's components on disk
SIMULATORS = {"desi_bgs": ("bgs",), "desi_elg": ("elg",)}


def simulated_dir(data_cfg) -> Path:
    key = json.dumps({"sim": data_cfg.simulator, "n": [data_cfg.n_train, data_cfg.n_val,
                      data_cfg.n_test], "seed": data_cfg.sim_seed, "v": SIM_VERSION})
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return Path(data_cfg.cache_dir) / f"{data_cfg.simulator}-{digest}"


def simulate_to_shards(data_cfg, out: Path, *, chunk: int = 512) -> Path:
    """Simulates train/val/test splits with independent seeds into ``out``."""
    from spectrax.data import mixture, synthetic

    if data_cfg.simulator in mixture.MIXTURES or data_cfg.simulator in mixture.APOGEE_SETS:
        return simulate_mixture_to_shards(data_cfg, out)
    if data_cfg.simulator not in SIMULATORS:
        raise ValueError(f"config.data.simulator={data_cfg.simulator!r}; known: "
                         f"{sorted(SIMULATORS) + sorted(mixture.MIXTURES) + sorted(mixture.APOGEE_SETS)} (or set "
                         "config.data.path to a shard directory)")
    (sample,) = SIMULATORS[data_cfg.simulator]
    tmp = _atomic_dir(out)
    splits, train_z = {}, []
    sizes = {"train": data_cfg.n_train, "val": data_cfg.n_val, "test": data_cfg.n_test}
    total = sum(sizes.values())
    bar = tqdm(total=total, desc=f"simulating {data_cfg.simulator}", unit="spec")
    for k, (split, n) in enumerate(sizes.items()):
        if n <= 0:
            continue
        num_shards = max(1, n // 4096)
        writer = shards.ShardWriter(tmp, split, num_shards)
        # Splits get disjoint seeds and id ranges, so no spectrum is in two splits.
        for part in synthetic.iter_desi_galaxies(n, sample, seed=data_cfg.sim_seed * 10 + k,
                                                 chunk=chunk):
            for i in range(len(part["z"])):
                writer.write({"flux": part["flux"][i], "ivar": part["ivar"][i],
                              "mask": part["mask"][i], "labels": [part["z"][i]],
                              "id": (k + 1) * 10**9 + int(part["id"][i])})
            if split == "train":
                train_z.append(part["z"])
            bar.update(len(part["z"]))
        splits[split] = writer.close()
    bar.close()
    z = np.concatenate(train_z)[:, None] if train_z else np.zeros((0, 1))
    shards.write_manifest(tmp, shards.Manifest(
        label_names=["z"], splits=splits, grid=DESI_GRID, stats={"labels": label_stats(z, ["z"])},
        report={"simulated": total}, source={"simulator": data_cfg.simulator, "sample": sample,
                                              "seed": data_cfg.sim_seed, "version": SIM_VERSION}))
    return _publish(tmp, out)


def simulate_mixture_to_shards(data_cfg, out: Path) -> Path:
    """Simulates a multi-survey mixture (:mod:`spectrax.data.mixture`) into ``out``: records on
    their native grids, label columns :data:`spectrax.data.mixture.LABELS`."""
    from spectrax.data import mixture

    name = data_cfg.simulator
    if name in mixture.APOGEE_SETS:
        source, label_names = mixture.iter_apogee, mixture.apogee_label_names()
        components = {"apogee/STAR": data_cfg.n_train}
    else:
        source, label_names = mixture.iter_mixture, list(mixture.LABELS)
        components = {f"{c.survey}/{c.cls}": n for c, n in zip(
            mixture.mixture(name), mixture.component_counts(name, data_cfg.n_train))}
    tmp = _atomic_dir(out)
    sizes = {"train": data_cfg.n_train, "val": data_cfg.n_val, "test": data_cfg.n_test}
    splits, train_labels = {}, []
    bar = tqdm(total=sum(sizes.values()), desc=f"simulating {data_cfg.simulator}", unit="spec")
    for k, (split, n) in enumerate(sizes.items()):
        if n <= 0:
            continue
        writer = shards.ShardWriter(tmp, split, max(1, n // 4096))
        # Splits get disjoint seeds, so no spectrum is in two splits. Chunks of the components
        # arrive interleaved and pass a shuffle buffer, so any run of records (an evaluation
        # batch, the examples drawn in figures) mixes surveys and classes.
        rng = np.random.default_rng([data_cfg.sim_seed, k])
        buffer: list[dict] = []

        def emit(rec):
            rec["id"] = (k + 1) * 10**14 + rec["id"]
            writer.write(rec)
            if split == "train":
                train_labels.append(rec["labels"])

        for records in source(name, n, seed=data_cfg.sim_seed * 10 + k):
            buffer.extend(records)
            while len(buffer) > SHUFFLE_BUFFER:
                emit(buffer.pop(int(rng.integers(len(buffer)))))
            bar.update(len(records))
        for j in rng.permutation(len(buffer)):
            emit(buffer[j])
        splits[split] = writer.close()
    bar.close()
    labels = np.stack(train_labels) if train_labels else np.zeros((0, len(label_names)))
    shards.write_manifest(tmp, shards.Manifest(
        label_names=label_names, splits=splits, grid=None,
        stats={"labels": label_stats(labels, label_names)},
        report={"simulated": sum(sizes.values()), "components": components},
        source={"simulator": data_cfg.simulator, "seed": data_cfg.sim_seed,
                "version": SIM_VERSION}))
    return _publish(tmp, out)


_SELECT = re.compile(r"^\s*(\w+)\s*(<=|>=|<|>|==)\s*([-+0-9.eE]+)\s*$")


def parse_selection(select: str) -> tuple[str, str, float] | None:
    """``"FE_H > -1"`` -> ("FE_H", ">", -1.0); "" -> None; anything else: ValueError."""
    if not select:
        return None
    m = _SELECT.match(select)
    if not m:
        raise ValueError(f"config.data.train_select={select!r}: expected '<LABEL> <op> <number>' "
                         "with op one of < <= > >= ==")
    return m.group(1), m.group(2), float(m.group(3))


def train_subset(src: Path, select: str, limit: int) -> Path:
    """A shard directory whose train split is the first ``limit`` train records of ``src`` that
    satisfy ``select`` (e.g. SpectraFM's 100 iron-rich stars); its other splits are ``src``'s
    files, referenced, not copied. Label statistics are recomputed on the subset."""
    import operator

    ops = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
           "==": operator.eq}
    manifest = shards.read_manifest(src)
    sel = parse_selection(select)
    if sel and sel[0] not in manifest.label_names:
        raise ValueError(f"config.data.train_select names label {sel[0]!r}; {src} has "
                         f"{manifest.label_names}")
    key = hashlib.sha1(json.dumps([select, limit]).encode()).hexdigest()[:8]
    out = src.parent / f"{src.name}-subset-{key}"
    if (out / shards.MANIFEST).exists():
        return out
    tmp = _atomic_dir(out)
    writer = shards.ShardWriter(tmp, "train", 1)
    kept = []
    for rec in shards.iter_records(src, "train"):
        if sel:
            j = manifest.label_names.index(sel[0])
            value = rec["labels"][j]
            if not (np.isfinite(value) and ops[sel[1]](value, sel[2])):
                continue
        writer.write(rec)
        kept.append(rec["labels"])
        if limit and len(kept) >= limit:
            break
    if not kept:
        raise ValueError(f"{src}: no train spectrum satisfies {select!r}")
    splits = {"train": writer.close()}
    for name, entry in manifest.splits.items():
        if name != "train":  # paths relative to the new directory
            splits[name] = {**entry, "files": [f"../{src.name}/{f}" for f in entry["files"]]}
            if entry.get("lengths_file"):
                splits[name]["lengths_file"] = f"../{src.name}/{entry['lengths_file']}"
    shards.write_manifest(tmp, shards.Manifest(
        label_names=manifest.label_names, splits=splits, grid=manifest.grid,
        stats={"labels": label_stats(np.stack(kept), manifest.label_names)},
        report={**manifest.report, "train_subset": {"select": select, "limit": limit,
                                                    "kept": len(kept)}},
        source={**manifest.source, "subset_of": str(src)}))
    return _publish(tmp, out)


def ensure_data(data_cfg) -> Path:
    """The shard directory a config trains on: ``data.path`` if set, else the simulator's cache
    (generated on first use; in multi-process runs only process 0 writes it), restricted to
    ``data.train_select`` / ``data.train_limit`` when those are set."""
    base = _ensure_base(data_cfg)
    select = data_cfg.get("train_select", "")
    limit = int(data_cfg.get("train_limit", 0))
    if not select and not limit:
        return base
    import jax
    from jax.experimental import multihost_utils

    out = None
    if jax.process_index() == 0:
        out = train_subset(base, select, limit)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("spectrax train subset")
    return out or train_subset(base, select, limit)


def _ensure_base(data_cfg) -> Path:
    if data_cfg.path:
        path = Path(data_cfg.path)
        shards.read_manifest(path)  # a clear error if it is not a shard directory
        return path
    out = simulated_dir(data_cfg)
    import jax
    from jax.experimental import multihost_utils

    if jax.process_index() == 0 and not (out / shards.MANIFEST).exists():
        simulate_to_shards(data_cfg, out)
    # Every process joins the barrier, whether or not it found the data already there: one
    # that skipped it would leave process 0 waiting forever.
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"spectrax simulated data {out}")
    return out


# ==============================================================================================
# DESI files
# ==============================================================================================
def find_desi_pairs(inputs: Iterable[str]) -> list[tuple[Path, Path | None]]:
    """(coadd, redrock-or-None) pairs from files and directories; redrock matched by suffix."""
    coadds: list[Path] = []
    redrocks: dict[str, Path] = {}
    for item in inputs:
        p = Path(item)
        files = sorted(p.rglob("*.fits")) if p.is_dir() else [p]
        if not p.exists():
            raise FileNotFoundError(f"--input {item}: no such file or directory")
        for f in files:
            if f.name.startswith("coadd"):
                coadds.append(f)
            elif f.name.startswith(("redrock", "zbest")):
                redrocks[f.name.split("-", 1)[-1]] = f
    if not coadds:
        raise FileNotFoundError(f"no coadd*.fits among --input {list(inputs)}")
    return [(c, redrocks.get(c.name.split("-", 1)[-1])) for c in coadds]


# Redrock redshifts outside this range are fitting failures, not galaxies: a label there would
# teach the model garbage. Such labels are masked (set NaN) and counted as 'absurd_redshift';
# with require_redshift (the default) the spectrum is then dropped and also counted in
# 'no_redshift', otherwise it is kept unlabelled (usable for autoencoding).
DESI_Z_RANGE = (-0.01, 10.0)


def mask_absurd_redshift(record: dict, counts: Counter) -> dict:
    """Sets the redshift label of ``record`` to NaN when it lies outside DESI_Z_RANGE."""
    z = np.asarray(record["labels"], np.float32)
    absurd = np.isfinite(z) & ((z < DESI_Z_RANGE[0]) | (z > DESI_Z_RANGE[1]))
    if absurd.any():
        counts["absurd_redshift"] += 1
        record = {**record, "labels": np.where(absurd, np.nan, z).astype(np.float32)}
    return record


def prepare_desi(inputs: Sequence[str], output: str | Path, *, cuts: str = "bgs",
                 fractions: dict[str, float] | None = None, seed: int = 0,
                 require_redshift: bool = True) -> dict[str, Any]:
    """Reads DESI coadd(+redrock) files into a shard directory; returns the report."""
    from spectrax.data.readers import desi

    fractions = fractions or DEFAULT_FRACTIONS
    cut_fn = {"bgs": desi.bgs_quality_cuts, "elg": desi.elg_quality_cuts, "none": None}
    if cuts not in cut_fn:
        raise ValueError(f"--cuts={cuts!r}; use one of {sorted(cut_fn)}")
    report: dict[str, Any] = {"files": [], "reader": Counter(), "cuts": Counter(),
                              "cuts_skipped": set()}
    records: list[dict] = []
    for coadd, redrock in find_desi_pairs(inputs):
        result = desi.read_desi_coadd(coadd, redrock)
        report["files"].append({"coadd": coadd.name, "redrock": redrock.name if redrock else None,
                                "records": len(result.records)})
        report["reader"].update(result.counts)
        recs = [mask_absurd_redshift(r, report["reader"]) for r in result.records]
        if require_redshift:
            has_z = [r for r in recs if np.isfinite(np.asarray(r["labels"])).all()]
            report["reader"]["no_redshift"] += len(recs) - len(has_z)
            recs = has_z
        if cut_fn[cuts] is not None and recs:
            keep, cut_report = cut_fn[cuts](recs)
            report["cuts"].update(cut_report)  # removed per cut, applied in order
            report["cuts_skipped"].update(getattr(cut_report, "skipped", ()))
            recs = [r for r, k in zip(recs, keep) if k]
        records.extend(recs)
    ids = np.array([r["id"] for r in records], np.int64)
    dup = len(ids) - len(np.unique(ids))
    if dup:  # the same target in two files: keep the first, count the rest
        _, first = np.unique(ids, return_index=True)
        records = [records[i] for i in sorted(first)]
        ids = ids[sorted(first)]
        report["reader"]["duplicate_targetid_across_files"] += dup
    out = Path(output)
    tmp = _atomic_dir(out)
    split_of = shards.assign_split(ids, fractions, seed) if len(ids) else np.array([])
    splits = {}
    for split in fractions:
        chosen = [r for r, s in zip(records, split_of) if s == split]
        splits[split] = shards.write_split(tmp, split, chosen)
    train_z = np.array([r["labels"] for r, s in zip(records, split_of) if s == "train"],
                       np.float64).reshape(-1, 1)
    report = {"files": report["files"], "reader": dict(report["reader"]),
              "cuts": dict(report["cuts"]), "cuts_skipped": sorted(report["cuts_skipped"]),
              "kept": len(records), "splits": {k: v["count"] for k, v in splits.items()}}
    shards.write_manifest(tmp, shards.Manifest(
        label_names=["z"], splits=splits, grid=DESI_GRID,
        stats={"labels": label_stats(train_z, ["z"])}, report=report,
        source={"survey": "desi", "cuts": cuts, "inputs": [str(i) for i in inputs]}))
    _publish(tmp, out)
    return report


# ==============================================================================================
# Native-grid surveys (SDSS, LAMOST, APOGEE, GALAH, Multimodal Universe)
# ==============================================================================================
def find_survey_files(inputs: Iterable[str], pattern: str = "*.fits") -> list[Path]:
    """Files from files and directories (directories searched recursively for ``pattern``)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise FileNotFoundError(f"--input {item}: no such file or directory")
        files.extend(sorted(p.rglob(pattern)) if p.is_dir() else [p])
    if not files:
        raise FileNotFoundError(f"no {pattern} among --input {list(inputs)}")
    return files


def _dedup_by_id(records: list[dict], report: Counter) -> tuple[list[dict], np.ndarray]:
    """Keeps the first record of each id (the same object in two files), counting the rest."""
    ids = np.array([r["id"] for r in records], np.int64)
    _, first = np.unique(ids, return_index=True)
    keep = sorted(first)
    if len(keep) < len(records):
        report["duplicate_id_across_files"] += len(records) - len(keep)
    return [records[i] for i in keep], ids[keep]


def prepare_survey(survey: str, inputs: Sequence[str], output: str | Path, *,
                   fractions: dict[str, float] | None = None, seed: int = 0) -> dict[str, Any]:
    """Reads a native-grid survey's files into a shard directory; returns the report.

    Records keep their own wavelength arrays (manifest ``grid`` None); label names come from
    the reader (e.g. ``["z", "class"]`` for SDSS/LAMOST); the split is the id hash of
    :func:`shards.assign_split`, as for DESI.
    """
    if survey == "desi":
        raise ValueError("use prepare_desi for --survey=desi (it applies the DESI cuts)")
    if survey not in READERS:
        raise ValueError(f"--survey={survey!r}; known: {sorted(READERS)}")
    reader = READERS[survey]
    fractions = fractions or DEFAULT_FRACTIONS
    files = find_survey_files(inputs, reader.pattern)
    result = reader(files)
    reader_counts = Counter(result.counts)
    records, ids = _dedup_by_id(result.records, reader_counts)
    label_names = list(result.label_names)
    out = Path(output)
    tmp = _atomic_dir(out)
    split_of = shards.assign_split(ids, fractions, seed) if len(ids) else np.array([])
    splits = {split: shards.write_split(tmp, split, [r for r, s in zip(records, split_of)
                                                     if s == split])
              for split in fractions}
    train = np.array([r["labels"] for r, s in zip(records, split_of) if s == "train"],
                     np.float64).reshape(-1, len(label_names))
    report = {"files": [{"file": f.name} for f in files], "reader": dict(reader_counts),
              "cuts": {}, "cuts_skipped": [], "kept": len(records),
              "splits": {k: v["count"] for k, v in splits.items()}}
    shards.write_manifest(tmp, shards.Manifest(
        label_names=label_names, splits=splits, grid=None,
        stats={"labels": label_stats(train, label_names)}, report=report,
        source={"survey": survey, "inputs": [str(i) for i in inputs]}))
    _publish(tmp, out)
    return report


def print_report(report: dict[str, Any]) -> None:
    print("files:")
    for f in report["files"]:
        if "coadd" in f:
            print(f"  {f['coadd']} (+ {f['redrock']}): {f['records']} spectra read")
        else:
            print(f"  {f['file']}")
    print("reader (spectra skipped / pixels masked):")
    for k, v in sorted(report["reader"].items()):
        print(f"  {k:<36}{v:>10,}")
    print("quality cuts (spectra removed, applied in order):")
    for k, v in report["cuts"].items():
        print(f"  {k:<36}{v:>10,}")
    if report["cuts_skipped"]:
        print(f"  skipped (column missing): {', '.join(report['cuts_skipped'])}")
    print(f"kept {report['kept']:,} spectra: " +
          ", ".join(f"{k} {v:,}" for k, v in report["splits"].items()))


FLAGS = flags.FLAGS
flags.DEFINE_enum("survey", "desi", sorted(READERS),
                  "Survey format of --input (desi: 7781-pixel grid; others: native grids).")
flags.DEFINE_list("input", [], "Files or directories to read.")
flags.DEFINE_string("output", None, "Shard directory to write.")
flags.DEFINE_enum("cuts", "bgs", ["bgs", "elg", "none"],
                  "Quality cuts (SPECS.md section 1; DESI only).")
flags.DEFINE_list("fractions", ["0.7", "0.15", "0.15"], "train,val,test fractions.")
flags.DEFINE_integer("seed", 0, "Seed of the TARGETID-hash split assignment.")
flags.DEFINE_bool("require_redshift", True, "Drop (and count) spectra without a redshift.")


def main(argv):
    del argv
    if not FLAGS.input or not FLAGS.output:
        raise app.UsageError("--input and --output are required")
    fr = [float(x) for x in FLAGS.fractions]
    if len(fr) != 3:
        raise app.UsageError("--fractions needs three numbers: train,val,test")
    try:
        fractions = dict(zip(("train", "val", "test"), fr))
        if FLAGS.survey == "desi":
            report = prepare_desi(FLAGS.input, FLAGS.output, cuts=FLAGS.cuts,
                                  fractions=fractions, seed=FLAGS.seed,
                                  require_redshift=FLAGS.require_redshift)
        else:
            report = prepare_survey(FLAGS.survey, FLAGS.input, FLAGS.output,
                                    fractions=fractions, seed=FLAGS.seed)
    except (SpectrumError, FileNotFoundError, ValueError) as e:
        print(f"spectrax.prepare: error: {e}", file=sys.stderr)
        sys.exit(2)
    print_report(report)
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
