r"""Survey files or the embedded simulator -> ArrayRecord shards: ``python -m spectrax.prepare``.

Any number of files of any supported survey, on one machine with every core::

    python -m spectrax.prepare --survey=desi --input=path/to/coadds --output=data/my_desi \
        --cuts=bgs [--workers=N]

``--input`` takes files and directories (searched recursively; repeat the flag or separate
paths with commas). ``--survey`` is a key of :data:`spectrax.data.readers.READERS` (desi, sdss,
lamost, apogee, galah, mmu) or ``auto`` (each file's survey from its name; one survey per
run). DESI coadds are joined with the ``redrock-*`` / ``zbest-*`` file beside them, merged onto
the 7781-pixel grid and cut (``--cuts``, SPECS.md section 1); other surveys keep each spectrum
on its NATIVE grid. Each spectrum goes to train/val/test by a hash of its id, so adding files
never moves a test spectrum into training. The manifest's ``report`` says how many spectra
every reader rule and every cut removed, which files were skipped and why, and how many
duplicates were dropped. Train on it with
``python -m spectrax.train --config=configs/specpt_redshift_bgs.py --config.data.path=data/my_desi``.

The work is an Apache Beam pipeline (:mod:`spectrax.data.preparation`): memory does not grow
with the number of spectra, the output is the same for any ``--workers``, a file that cannot
be read is skipped (named on stderr and in the report; the exit status is then 1, and
``--strict`` stops at the first one instead), and a killed run leaves no half-written output
directory: run the same command again and it completes. Beam pipeline options are passed
through, so the same command runs on a cluster::

    python -m spectrax.prepare --survey=desi --input=/shared/desi/healpix --output=/shared/out \
        --runner=FlinkRunner --flink_master=HEAD:8081 --environment_type=EXTERNAL ...

(launch/prepare_flink_slurm.sh is a worked example on a SLURM cluster).

The embedded simulator needs no command: training configs call :func:`ensure_data`, which
generates and caches the shards the first time (``data/`` by default), through the same
pipeline run in-process.
"""
from __future__ import annotations

import hashlib
import json
import operator
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import jax
from absl import app, flags
from jax.experimental import multihost_utils

from spectrax import runtime
from spectrax.data import inputs, mixture, preparation, shards
from spectrax.data.readers import READERS
from spectrax.spectra import SpectrumError

SIM_VERSION = 3  # bump when the simulator's output changes so caches are regenerated


# ==============================================================================================
# Survey files
# ==============================================================================================
def prepare(input_paths: Sequence[str], output: str | Path, *, survey: str = "auto",
            cuts: str = "none", fractions: dict[str, float] | None = None, seed: int = 0,
            require_redshift: bool | None = None, workers: int = 1,
            pipeline_args: Sequence[str] | None = None, strict: bool = False,
            spectra_per_group: int = 2048, use_beam: bool | None = None) -> dict[str, Any]:
    """Prepares survey files into the shard directory ``output``; returns its report.

    Args:
      input_paths: files and directories (module docstring).
      survey: a key of READERS, or "auto" (from file names; all files must be of one survey).
      cuts: DESI quality cuts ``bgs`` / ``elg`` / ``none``.
      fractions: {split: fraction} of the id-hash split (default 0.7 / 0.15 / 0.15).
      require_redshift: DESI only: drop (and count) spectra without a redshift (default True).
      workers: local worker processes; ``pipeline_args``: Beam options (``--runner=...``).
      use_beam: run on Beam (True) or in this process (False); default: on Beam when there
        are several workers or pipeline options. The output is the same either way.
      strict: stop at the first unreadable file instead of skipping it.

    Raises:
      FileNotFoundError: an input path does not exist, or no survey file was found.
      ValueError / SpectrumError: a bad argument, several surveys at once, or (strict) a bad
        file, each named.
    """
    found = inputs.discover(input_paths, survey=survey)
    if len(found.surveys) > 1:
        raise ValueError(f"--input holds files of several surveys ({', '.join(found.surveys)});"
                         " prepare one survey at a time (or pass --survey)")
    units = [u for u in found.units if isinstance(u, inputs.FileUnit)]
    if not units and not found.skipped:
        raise FileNotFoundError(f"no {survey if survey != 'auto' else 'survey'} files among "
                                f"--input {list(map(str, input_paths))}")
    name = found.surveys[0] if found.surveys else survey
    is_desi = name == "desi"
    settings = preparation.Settings(
        output=str(output),
        splits=tuple((fractions or dict(preparation.DEFAULT_FRACTIONS)).items()), seed=seed,
        cuts=cuts if is_desi else "none",
        require_redshift=is_desi and require_redshift is not False,
        strict=strict, spectra_per_group=spectra_per_group,
        skipped_inputs=tuple(found.skipped),
        source=json.dumps({"survey": name, "cuts": cuts if is_desi else "none",
                           "inputs": [str(i) for i in input_paths]}))
    plan = preparation.make_plan(units, settings)
    if use_beam or (use_beam is None and (workers > 1 or pipeline_args)):
        return preparation.run_beam(plan, pipeline_args or (), workers)
    return preparation.run_local(plan)


# ==============================================================================================
# The embedded simulator
# ==============================================================================================
def simulated_dir(data_cfg) -> Path:
    key = json.dumps({"sim": data_cfg.simulator, "n": [data_cfg.n_train, data_cfg.n_val,
                      data_cfg.n_test], "seed": data_cfg.sim_seed, "v": SIM_VERSION})
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return Path(data_cfg.cache_dir) / f"{data_cfg.simulator}-{digest}"


def simulate_to_shards(data_cfg, out: Path, *, workers: int = 1) -> Path:
    """Simulates train/val/test splits (independent seeds and ids) into ``out`` through the
    preparation pipeline (in this process with one worker, on Beam with more)."""
    sizes = {"train": data_cfg.n_train, "val": data_cfg.n_val, "test": data_cfg.n_test}
    units = inputs.simulated_units(data_cfg.simulator, sizes, data_cfg.sim_seed)
    total = sum(sizes.values())
    settings = preparation.Settings(
        output=str(out), splits=tuple((k, v / max(total, 1)) for k, v in sizes.items()),
        shuffle=data_cfg.simulator in mixture.MIXTURES,
        source=json.dumps({"simulator": data_cfg.simulator, "seed": data_cfg.sim_seed,
                           "sizes": sizes, "version": SIM_VERSION}))
    plan = preparation.make_plan(units, settings)
    if workers > 1:
        preparation.run_beam(plan, (), workers)
    else:
        preparation.run_local(plan)
    return out


_SELECT = re.compile(r"^\s*(\w+)\s*(<=|>=|<|>|==)\s*([-+0-9.eE]+)\s*$")
_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
        "==": operator.eq}


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
    manifest = shards.read_manifest(src)
    sel = parse_selection(select)
    if sel and sel[0] not in manifest.label_names:
        raise ValueError(f"config.data.train_select names label {sel[0]!r}; {src} has "
                         f"{manifest.label_names}")
    key = hashlib.sha1(json.dumps([select, limit]).encode()).hexdigest()[:8]
    out = src.parent / f"{src.name}-subset-{key}"
    if (out / shards.MANIFEST).exists():
        return out
    tmp = out.with_name(out.name + preparation.PARTIAL)
    if tmp.exists():
        shutil.rmtree(tmp)
    writer = shards.ShardWriter(tmp, "train", 1)
    kept = []
    for rec in shards.iter_records(src, "train"):
        if sel:
            j = manifest.label_names.index(sel[0])
            value = rec["labels"][j]
            if not (np.isfinite(value) and _OPS[sel[1]](value, sel[2])):
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
        stats={"labels": preparation.label_stats(np.stack(kept), manifest.label_names)},
        report={**manifest.report, "train_subset": {"select": select, "limit": limit,
                                                    "kept": len(kept)}},
        source={**manifest.source, "subset_of": str(src)}))
    tmp.rename(out)
    return out


def ensure_data(data_cfg) -> Path:
    """The shard directory a config trains on: ``data.path`` if set, else the simulator's cache
    (generated on first use; in multi-process runs only process 0 writes it), restricted to
    ``data.train_select`` / ``data.train_limit`` when those are set."""
    base = _ensure_base(data_cfg)
    select = data_cfg.get("train_select", "")
    limit = int(data_cfg.get("train_limit", 0))
    if not select and not limit:
        return base
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
    if jax.process_index() == 0 and not (out / shards.MANIFEST).exists():
        simulate_to_shards(data_cfg, out)
    # Every process joins the barrier, whether or not it found the data already there: one
    # that skipped it would leave process 0 waiting forever.
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"spectrax simulated data {out}")
    return out


# ==============================================================================================
# Command line
# ==============================================================================================
def print_report(report: dict[str, Any]) -> None:
    print("files:")
    for f in report["files"]:
        extra = f" (+ {', '.join(f['companions'])})" if f.get("companions") else ""
        print(f"  {f['file']}{extra}: {f['records']} spectra kept")
    print("reader (spectra skipped / pixels masked):")
    for k, v in sorted(report["reader"].items()):
        print(f"  {k:<36}{v:>10,}")
    if report["cuts"] or report["cuts_skipped"]:
        print("quality cuts (spectra removed, applied in order):")
        for k, v in report["cuts"].items():
            print(f"  {k:<36}{v:>10,}")
        if report["cuts_skipped"]:
            print(f"  skipped (column missing): {', '.join(report['cuts_skipped'])}")
    if report.get("duplicates"):
        print(f"duplicate ids across files (kept the highest S/N²): {report['duplicates']:,}")
    if report["skipped"]:
        print(f"files skipped: {len(report['skipped'])} (see stderr and the manifest's report)")
    if report["refused"]:
        print(f"records refused: {len(report['refused'])}")
    print(f"kept {report['kept']:,} spectra: " +
          ", ".join(f"{k} {v:,}" for k, v in report["splits"].items()))


FLAGS = flags.FLAGS
SURVEY_CHOICES = ["auto", *sorted(READERS)]  # --survey


def define_flags() -> None:
    """The command line's flags (defined by :func:`run` only, so importing this module
    defines none: other entry points import :func:`ensure_data`)."""
    flags.DEFINE_enum("survey", "auto", SURVEY_CHOICES,
                      "Survey of --input (desi: 7781-pixel grid; others: native grids; auto: from "
                      "the file names).")
    flags.DEFINE_multi_string("input", [], "Files or directories to read (repeat the flag, or "
                              "separate paths with commas).")
    flags.DEFINE_string("output", None, "Shard directory to write.")
    flags.DEFINE_enum("cuts", "bgs", ["bgs", "elg", "none"],
                      "Quality cuts (SPECS.md section 1; DESI only).")
    flags.DEFINE_list("fractions", ["0.7", "0.15", "0.15"], "train,val,test fractions.")
    flags.DEFINE_integer("seed", 0, "Seed of the id-hash split assignment.")
    flags.DEFINE_bool("require_redshift", True,
                      "DESI: drop (and count) spectra without a redshift.")
    flags.DEFINE_integer("workers", os.cpu_count() or 1,
                         "Local worker processes (Beam DirectRunner); ignored with --runner.")
    flags.DEFINE_bool("strict", False, "Stop at the first file that cannot be read (default: skip "
                      "it, name it, exit with status 1 at the end).")
    flags.DEFINE_integer("spectra_per_group", 2048, "About how many spectra one pipeline element "
                         "(and one shard file per split) holds.")


def split_inputs(values: Sequence[str]) -> list[str]:
    """Repeated flags and comma-separated lists alike, empty items dropped."""
    return [p for v in values for p in v.split(",") if p]


def main(argv):
    pipeline_args = argv[1:]  # what absl did not recognise: Beam's options
    paths = split_inputs(FLAGS.input)
    if not paths or not FLAGS.output:
        raise app.UsageError("--input and --output are required")
    fr = [float(x) for x in FLAGS.fractions]
    if len(fr) != 3:
        raise app.UsageError("--fractions needs three numbers: train,val,test")
    try:
        report = prepare(paths, FLAGS.output, survey=FLAGS.survey, cuts=FLAGS.cuts,
                         fractions=dict(zip(("train", "val", "test"), fr)), seed=FLAGS.seed,
                         require_redshift=FLAGS.require_redshift, workers=FLAGS.workers,
                         pipeline_args=pipeline_args, strict=FLAGS.strict,
                         spectra_per_group=FLAGS.spectra_per_group)
    except (SpectrumError, FileNotFoundError, ValueError) as e:
        print(f"spectrax.prepare: error: {e}", file=sys.stderr)
        sys.exit(2)
    for s in report["skipped"]:
        print(f"spectrax.prepare: skipped {s['file']}: {s['reason']}", file=sys.stderr)
    for message in report["refused"]:
        print(f"spectrax.prepare: refused: {message}", file=sys.stderr)
    print_report(report)
    print(f"wrote {FLAGS.output}")
    if report["skipped"] or report["refused"]:
        sys.exit(1)


def run() -> None:
    """Entry point: absl flags, the rest of the command line left to Beam."""
    define_flags()
    app.run(main, flags_parser=lambda argv: FLAGS(argv, known_only=True))


if __name__ == "__main__":
    # XLA:CPU flag and log levels, before any computation; freed memory goes back to the system
    # (prepare streams groups of spectra in bounded memory, a worker at a time).
    runtime.configure(keep_freed_memory=False)
    run()
