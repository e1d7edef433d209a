r"""Batch inference to one FITS catalogue: ``python -m spectrax.predict``.

    python -m spectrax.predict --config=configs/specpt_redshift_bgs.py \
        --checkpoint=runs/specpt_redshift_bgs-zscan --input=data/my_desi \
        --output=catalog.fits

``--input`` takes what ``spectrax.prepare`` takes, and shard directories: raw files of any
survey (``--survey``, default ``auto``: from the file names, see
:func:`spectrax.data.readers.detect_survey`), directories of them (searched recursively) and
shard directories (all splits, or ``--split``); repeat the flag or separate paths with commas.
The catalogue has one row per usable input spectrum: TARGETID, the task's predictions (e.g.
Z, ZERR, ZWARN, DELTACHI2 for redshift models), the labels the input carries as
``LABEL_<NAME>`` (a redrock file's values arrive as ``REDROCK_Z``, ``REDROCK_ZWARN``, ...:
input values never share a name with a prediction),
NPIX_VALID (usable pixels; 0 means the prediction saw no data), the survey metadata the
reader found, SOURCE (the file) and SPLIT (shard inputs).

Redshift models that output a distribution (``zscan``) write Redrock's columns Z, ZERR, ZWARN,
DELTACHI2, SPECTYPE (:mod:`spectrax.redshift`). ``--refine`` adds the learned-proposal + χ²
mode: the model's candidate redshifts are refined by a χ² template fit over narrow windows
(:func:`spectrax.redshift.refine_columns`; templates fitted on the config's training split and
the refined ZERR's calibration fitted on its validation split, cached in the run directory as
``refine_templates.npz`` and ``refine_zerr.json``), so Z, ZERR, ZWARN and DELTACHI2 hold
the refined values (CHI2 added) and the learned ones move to Z_LEARNED, ZERR_LEARNED,
ZWARN_LEARNED and DELTACHI2_LEARNED. The refinement needs spectra on the training data's
instrument grid (DESI coadds, the simulated shards).

Scale. Inputs are read in blocks of about ``--block_spectra`` spectra by a background thread
that reads, cleans and batches the next spectra while the devices compute; each batch is
split over every device of the process. Several processes (``jax.distributed``: SLURM,
OpenMPI, TPU pods, or ``SPECTRAX_COORDINATOR``) each predict a disjoint share of the blocks,
then process 0 merges every part into one catalogue.

Resumable. Each finished block is written atomically to ``<output>.parts/`` and listed in its
process's ledger; rerun the same command after an interruption and finished blocks are
skipped (``--restart`` predicts everything again). Bad pixels are masked and counted; a record
or file that cannot be used is skipped with a message naming it, the others go through, and
the exit status is 1 so that scripts notice.

Pixel length of the batches (:class:`spectrax.data.inputs.LengthPolicy`): a config with length
buckets pads each record to the smallest bucket that holds it, as training does (one
compilation per bucket); without buckets a model predicts on exactly ``config.data.length``
pixels (7781, the DESI grid, when unset) and refuses records of another length.

From Python, the same model: :class:`spectrax.inference.InferenceModel`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import queue
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from absl import app, flags
from astropy.table import Table, vstack
from jax.experimental import multihost_utils
from tqdm import tqdm

from spectrax import embeddings, redshift, runtime, sharding
from spectrax.data import inputs, pipeline
from spectrax.inference import InferenceModel
from spectrax.prepare import ensure_data
from spectrax.spectra import SpectrumError

BLOCK_SPECTRA = 4096  # spectra per resumable part (and per read-ahead unit of work)
REFINED_COLUMNS = ("Z", "ZERR", "ZWARN", "DELTACHI2")  # replaced by --refine, learned kept


class Refiner:
    """The ``--refine`` mode on one batch: the redshift task's predictions -> χ²-refined
    Redrock columns (:func:`spectrax.redshift.refine_columns`).

    Args:
      model: a restored redshift model whose predictions carry ``z_candidates``.
      templates: the χ² basis (:func:`spectrax.redshift.templates_for`).
      half_window: fine steps (1e-4 in ln(1+z)) each side of a candidate.
      zerr_calibration: the refined ZERR's calibration
        (:func:`spectrax.redshift.fit_zerr_calibration`); None: Redrock's χ² + 1 error.
    """

    def __init__(self, model: InferenceModel, templates, half_window: int = 1,
                 zerr_calibration: dict | None = None):
        self.model, self.templates, self.half_window = model, templates, half_window
        self.zerr_calibration = zerr_calibration
        self.z_train_range = getattr(model.task, "z_train_range", None)

    @classmethod
    def for_run(cls, config, checkpoint: str | Path, model: InferenceModel, *,
                n_templates: int = 2000, half_window: int = 1) -> Refiner:
        """Templates from the first ``n_templates`` spectra of the config's training split and
        the ZERR calibration fitted on spectra they were not fitted on
        (:meth:`fit_zerr_calibration`), cached in the run directory (``refine_templates.npz``,
        ``refine_zerr.json``)."""

        if not getattr(model.model(), "outputs_redshift_logits", False):
            raise ValueError(f"--refine needs a redshift model that outputs a distribution "
                             f"(zscan); {config.model.name!r} does not")
        path = Path(checkpoint)
        run_dir = path.parent if path.name == "checkpoints" else path
        data_dir = ensure_data(config.data)
        templates = redshift.templates_for(data_dir, n_train=n_templates,
                                           cache=run_dir / redshift.TEMPLATE_CACHE)
        refiner = cls(model, templates, half_window)
        cache = run_dir / redshift.ZERR_CALIBRATION_CACHE
        key = {"step": model.step, "half_window": half_window, "n_templates": n_templates,
               "candidate_prior": True, "refine": "walking windows, binned pixels",
               "zerr": "S/N-dependent scale, val + unused train spectra"}
        cached = json.loads(cache.read_text()) if cache.exists() else {}
        if cached.get("key") == key:
            refiner.zerr_calibration = cached["calibration"]
        else:
            # As many further training spectra as the templates took (2,000 by default).
            refiner.zerr_calibration = refiner.fit_zerr_calibration(data_dir, n_templates,
                                                                    n_train=n_templates)
            cache.write_text(json.dumps({"key": key,
                                         "calibration": refiner.zerr_calibration}))
        return refiner

    def fit_zerr_calibration(self, data_dir: str | Path, n_templates: int = 2000,
                             n_train: int = 2000, batch_size: int = 64) -> dict[str, Any]:
        """Refines the validation split and up to ``n_train`` training spectra the templates were
        not fitted on (those after the first ``n_templates``; the refined Z is the χ²'s, which
        has not seen them) and fits the refined ZERR's S/N-dependent scale and floor on them
        (:func:`spectrax.redshift.fit_zerr_calibration`)."""

        j = list(self.model.task.label_names).index("z")
        parts: dict[str, list] = {"z_true": [], "z": [], "zerr": [], "snr": []}
        batch_size = sharding.round_up_batch(batch_size, self.model.local_devices)
        skip = -(-n_templates // batch_size)            # train batches holding template spectra
        train = itertools.islice(pipeline.eval_batches(str(data_dir), "train",
                                                       batch_size=batch_size),
                                 skip, skip + -(-n_train // batch_size))
        val = pipeline.eval_batches(str(data_dir), "val", batch_size=batch_size)
        for batch in itertools.chain(val, train):
            out = self.model(batch)
            cols = redshift.refine_columns(batch, out, self.templates,
                                           z_train_range=self.z_train_range,
                                           half_window=self.half_window)
            v = batch.valid & batch.label_mask[:, j]
            parts["z_true"].append(batch.labels[v, j])
            parts["z"].append(cols["Z"][v])
            parts["zerr"].append(cols["ZERR"][v])
            parts["snr"].append(out["median_snr"][v])   # computed inside the jitted predict
        return redshift.fit_zerr_calibration(*(np.concatenate(parts[k]) for k in
                                               ("z_true", "z", "zerr", "snr")))

    def __call__(self, batch, out: dict) -> dict[str, np.ndarray]:
        """[B] refined columns (Z, ZERR, ZWARN, DELTACHI2, CHI2, ...) of every row."""
        return redshift.refine_columns(batch, out, self.templates,
                                       z_train_range=self.z_train_range,
                                       half_window=self.half_window,
                                       zerr_calibration=self.zerr_calibration)


# ==============================================================================================
# Resumable runs: one part per block, a ledger per process, the catalogue assembled at the end
# ==============================================================================================
class PartStore:
    """``<output>.parts/``: one FITS table per finished block plus one ledger per process.

    Each part is written to a temporary file and renamed (``os.replace`` is atomic), and the
    process's ledger is rewritten the same way after it, so a kill at any moment leaves only
    complete parts; a rerun skips the blocks the ledgers list. The ledgers also record the
    model (config, checkpoint step): parts made by another model are discarded, not mixed in.
    """

    def __init__(self, output: str | Path, model_key: dict, restart: bool = False,
                 process: int = 0):
        self.directory = Path(str(output) + ".parts")
        if restart and process == 0 and self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.model_key = model_key
        self.process = process
        self.entries = self._read_ledgers()
        self.mine = {k: v for k, v in self.entries.items() if v.get("process") == process}

    def _ledger(self, process: int) -> Path:
        return self.directory / f"ledger-{process:05d}.json"

    def _read_ledgers(self) -> dict:
        entries: dict[str, dict] = {}
        for path in sorted(self.directory.glob("ledger-*.json")):
            try:
                ledger = json.loads(path.read_text())
            except json.JSONDecodeError:
                continue
            if ledger.get("model") != self.model_key:
                print(f"spectrax.predict: {path} holds results of another model "
                      f"({ledger.get('model')}); ignored", file=sys.stderr, flush=True)
                continue
            entries.update(ledger["blocks"])
        return entries

    @staticmethod
    def key(block: Sequence[Any]) -> str:
        """A stable name for a block of units (from their names)."""
        text = json.dumps([u.name for u in block])
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def done(self, key: str) -> dict | None:
        """The ledger entry of a finished block whose part file exists (None if not)."""
        entry = self.entries.get(key)
        if entry is None or (entry["rows"] and not (self.directory / f"{key}.fits").exists()):
            return None
        return entry

    def write(self, key: str, table, counts: dict, refused: list[str]) -> dict:
        if table is not None:
            part = self.directory / f"{key}.fits"
            tmp = part.with_name(part.name + ".tmp")
            table.write(tmp, format="fits", overwrite=True)
            os.replace(tmp, part)
        entry = {"rows": 0 if table is None else len(table), "counts": counts,
                 "refused": refused, "process": self.process}
        self.entries[key] = self.mine[key] = entry
        ledger = self._ledger(self.process)
        tmp = ledger.with_name(ledger.name + ".tmp")
        tmp.write_text(json.dumps({"model": self.model_key, "blocks": self.mine}, indent=1))
        os.replace(tmp, ledger)
        return entry

    def read(self, key: str) -> Table:
        return Table.read(self.directory / f"{key}.fits", format="fits")

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


# ==============================================================================================
# Prediction
# ==============================================================================================
@dataclasses.dataclass
class Timing:
    """Seconds in the jitted predict calls (after each length's first, compiling, call) and
    the spectra they covered; the wall time of the whole prediction from its first call."""

    step_seconds: float = 0.0
    step_spectra: int = 0
    wall_start: float | None = None
    wall_spectra: int = 0
    compiled: set = dataclasses.field(default_factory=set)


def _read_ahead(model: InferenceModel, blocks: list[tuple[str, list]], batch_size: int,
                policy: inputs.LengthPolicy, strict: bool, out: queue.Queue) -> None:
    """Background reader: for each block, its batches (placed on the devices, which overlaps
    the host-to-device copy with compute too), then an end marker with the block's counts and
    refusals. Errors travel to the consumer, which raises them."""
    try:
        for key, block in blocks:
            counts: dict[str, int] = {}
            refused: list[str] = []

            def refuse(message: str) -> None:
                if strict:
                    raise SpectrumError(message)
                refused.append(message)

            rows = inputs.model_records(block, policy, counts, refuse)
            for batch, group in pipeline.batches_by_length(rows, batch_size,
                                                           model.task.label_names):
                out.put(("batch", key, batch, model.device_batch(batch), group))
            out.put(("end", key, counts, refused))
        out.put(("done",))
    except BaseException as e:  # handed over: the consumer raises it with its traceback
        out.put(("error", e))


def _columns(model: InferenceModel, batch, group, out: dict,
             refined: dict | None = None) -> dict[str, np.ndarray]:
    """Catalogue columns of one batch's valid rows (``refined``: :class:`Refiner` columns of
    every row; they take Redrock's names, the learned values get the _LEARNED suffix)."""
    v = batch.valid
    cols = {"TARGETID": batch.ids[v]}
    cols.update({k: np.asarray(val)[v] for k, val in
                 model.task.catalogue({**out, "valid": v}).items()})
    if refined is not None:
        for k in REFINED_COLUMNS:
            cols[f"{k}_LEARNED"] = cols.pop(k)
        cols.update({k: np.asarray(val)[v] for k, val in refined.items()
                     if k != "Z_LEARNED"})
    for j, name in enumerate(model.task.label_names):
        cols[f"LABEL_{name.upper()}"] = np.where(batch.label_mask[v, j], batch.labels[v, j],
                                                 np.nan)
    cols["NPIX_VALID"] = batch.mask[v].sum(-1).astype(np.int32)
    metas = [r.meta for r in group]
    for k in sorted({k for m in metas for k in m}):
        name = k.upper()
        if name in cols:
            name = f"{name}_INPUT"
        vals = [m.get(k) for m in metas]
        if all(isinstance(x, (bool, int, float, np.number)) or x is None for x in vals):
            cols[name] = np.array([np.nan if x is None else x for x in vals], np.float64)
        else:
            cols[name] = np.array(["" if x is None else _ascii(x) for x in vals])
    return cols


def _ascii(value) -> str:
    """``value`` as FITS-writable text. FITS strings are ASCII: one non-ASCII metadata value
    (the GALAH reader's wavelength_medium "air→vacuum", a file name with an accent) would make
    the write of the block's part raise UnicodeEncodeError and stop the run, so such characters
    are kept as escapes ("air\\u2192vacuum")."""
    return str(value).encode("ascii", "backslashreplace").decode("ascii")


def predict_blocks(model: InferenceModel, blocks: list[tuple[str, list]], store: PartStore, *,
                   batch_size: int, policy: inputs.LengthPolicy, strict: bool = False,
                   progress: bool = True, refiner: Refiner | None = None) -> Timing:
    """Predicts every block (with read-ahead, see :func:`_read_ahead`) into ``store``; with a
    ``refiner`` the χ² refinement runs on each batch too, after the next batch's predictions
    are dispatched, so an accelerator computes them beside the host's refinement (on a 2-core
    CPU, where both share the cores, this measured no gain). The step time is the loop's own
    (dispatch, fetch, refinement), without waiting for the reader."""
    timing = Timing()
    q: queue.Queue = queue.Queue(maxsize=4)
    reader = threading.Thread(target=_read_ahead, args=(model, blocks, batch_size, policy,
                                                        strict, q), daemon=True)
    reader.start()
    columns: dict[str, list] = {}
    total = sum(sum(u.size_hint() for u in b) for _, b in blocks)
    bar = tqdm(total=total, desc="predict", unit="spectrum", dynamic_ncols=True,
               disable=not progress, file=sys.stderr)
    pending = None   # (key, host batch, group, dispatched predictions, seconds spent so far)

    def finish(key, batch, group, dispatched, seconds):
        t = time.perf_counter()
        out = model.fetch(dispatched)
        refined = refiner(batch, out) if refiner is not None else None
        elapsed = seconds + time.perf_counter() - t
        n = int(batch.valid.sum())
        if batch.num_pixels in timing.compiled:  # a length's first call compiles: not a rate
            timing.step_seconds += elapsed
            timing.step_spectra += n
            timing.wall_spectra += n
        else:
            timing.compiled.add(batch.num_pixels)
            timing.wall_start = time.perf_counter()  # the wall clock restarts after a compile
            timing.wall_spectra = 0
        columns.setdefault(key, []).append(_columns(model, batch, group, out, refined))
        bar.update(n)

    while True:
        item = q.get()
        if item[0] == "error":
            raise item[1]
        if item[0] in ("done", "end") and pending is not None:
            finish(*pending)
            pending = None
        if item[0] == "done":
            break
        if item[0] == "end":
            _, key, counts, refused = item
            parts = columns.pop(key, [])
            store.write(key, _stack_tables([Table(p) for p in parts]) if parts else None,
                        counts, refused)
            continue
        _, key, batch, device_batch, group = item
        t = time.perf_counter()
        dispatched = model.dispatch(device_batch)
        seconds = time.perf_counter() - t
        if pending is not None:
            finish(*pending)
        pending = (key, batch, group, dispatched, seconds)
    bar.close()
    reader.join()
    return timing


def run(config, checkpoint: str, input_paths: Sequence[str], output: str | Path, *,
        batch_size: int = 64, split: str | None = None, survey: str = "auto",
        restart: bool = False, strict: bool = False, block_spectra: int = BLOCK_SPECTRA,
        progress: bool = True, refine: bool = False, refine_templates: int = 2000,
        half_window: int = 1) -> dict[str, Any]:
    """Predicts every spectrum of ``input_paths`` and writes a FITS catalogue; returns a
    summary (rows, output, reader_counts, refused messages, blocks_resumed, spectra_per_s
    with reading and step_spectra_per_s of the jitted calls alone, with ``refine`` the χ²
    refinement included).

    ``refine``: the learned-proposal + χ² mode (module docstring, :class:`Refiner`) with
    templates of ``refine_templates`` training spectra and windows of ±``half_window`` fine
    steps.

    Several processes: each predicts blocks ``process_index::process_count``; process 0
    waits for all and writes the catalogue (the others return rows=None).
    """
    sharding.initialize_distributed()
    pi, pc = jax.process_index(), jax.process_count()
    model = InferenceModel.from_checkpoint(config, checkpoint)
    policy = inputs.LengthPolicy.for_model(config.data, exact=True)
    refiner = (Refiner.for_run(config, checkpoint, model, n_templates=refine_templates,
                               half_window=half_window) if refine else None)
    batch_size = sharding.round_up_batch(batch_size, model.local_devices)
    found = inputs.discover(input_paths, survey=survey, split=split)
    blocks = [(PartStore.key(b), b) for b in inputs.blocks(found.units, block_spectra)]
    store = PartStore(output, {"config": config.name, "step": model.step,
                               "model": f"{config.model.name}:{config.model.variant}",
                               **({"refine": half_window} if refine else {})},
                      restart, process=pi)
    if pc > 1:  # process 0 may have cleared the parts (--restart) before the others read them
        multihost_utils.sync_global_devices("spectrax predict parts")
        store = PartStore(output, store.model_key, False, process=pi)
    mine = blocks[pi::pc]
    todo = [(k, b) for k, b in mine if store.done(k) is None]
    timing = predict_blocks(model, todo, store, batch_size=batch_size, policy=policy,
                            strict=strict, progress=progress and pi == 0, refiner=refiner)
    wall = time.perf_counter() - timing.wall_start if timing.wall_start else 0.0
    summary = {"rows": None, "output": str(output), "blocks": len(blocks),
               "blocks_resumed": len(mine) - len(todo), "skipped": found.skipped,
               "spectra_per_s": timing.wall_spectra / wall if wall > 0 else None,
               "step_spectra_per_s": (timing.step_spectra / timing.step_seconds
                                      if timing.step_seconds > 0 else None)}
    if pc > 1:
        multihost_utils.sync_global_devices("spectrax predict done")
    if pi != 0:
        return summary
    store = PartStore(output, store.model_key, False, process=pi)  # every process's ledger
    entries = [(k, store.done(k)) for k, _ in blocks]
    missing = [k for k, e in entries if e is None]
    if missing:
        raise SpectrumError(f"{len(missing)} block(s) of the inputs have no finished part in "
                            f"{store.directory}; rerun the same command to complete them")
    counts: dict[str, int] = {}
    refused = [f"{f}: {r}" for f, r in found.skipped]
    for _, e in entries:
        for k, v in e["counts"].items():
            counts[k] = counts.get(k, 0) + v
        refused += e["refused"]
    tables = [store.read(k) for k, e in entries if e["rows"]]
    if not tables:
        raise SpectrumError(f"no spectra found in --input {list(map(str, input_paths))}"
                            + (": " + "; ".join(refused[:5]) if refused else ""))
    table = _stack_tables(tables)
    table.meta["SPXCONF"] = config.name
    table.meta["SPXSTEP"] = model.step
    table.meta["SPXMODEL"] = f"{config.model.name}:{config.model.variant}"
    table.meta["SPXMODE"] = "learned+chi2" if refine else "learned"
    _write_atomically(table, Path(output))
    store.remove()  # the catalogue now holds every part
    return {**summary, "rows": len(table), "reader_counts": counts, "refused": refused}


def _stack_tables(tables: list):
    """Rows of all parts; a column missing from some parts is NaN / '' / -1 there."""
    table = vstack(tables, join_type="outer", metadata_conflicts="silent")
    for name in table.colnames:
        col = table[name]
        if getattr(col, "mask", None) is not None and np.any(col.mask):
            fill = {"f": np.nan, "U": "", "S": b""}.get(col.dtype.kind, -1)
            table[name] = col.filled(fill)
    return table


def _write_atomically(table, output: Path) -> None:
    """Writes ``output`` via a temporary file: readers never see half a catalogue."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    table.write(tmp, format="fits", overwrite=True)
    os.replace(tmp, output)


# ==============================================================================================
# Command line
# ==============================================================================================
FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags; called only when run as a program.

    Not at import: spectrax.prepare defines --input/--output and spectrax.train --config, and
    absl refuses a flag defined by two modules, so importing them side by side (as tests and
    notebooks do) would fail. --config is train's own flag (the config the checkpoint was
    trained with), shared rather than defined twice.
    """
    import spectrax.train  # noqa: F401  defines --config

    flags.DEFINE_string("checkpoint", None, "Run directory (or its checkpoints/ folder).")
    flags.DEFINE_multi_string("input", [], "Files, directories and shard directories (repeat "
                              "the flag, or separate paths with commas).")
    flags.DEFINE_string("survey", "auto", "Survey of raw input files (a reader name, or auto: "
                        "from the file names).")
    flags.DEFINE_string("output", "catalog.fits", "FITS catalogue to write.")
    flags.DEFINE_integer("batch_size", 64, "Spectra per jitted call (rounded up to a multiple "
                         "of the local devices).")
    flags.DEFINE_string("split", None, "Only this split of shard inputs (default: all).")
    flags.DEFINE_integer("block_spectra", BLOCK_SPECTRA, "Spectra per resumable part.")
    flags.DEFINE_bool("restart", False, "Ignore the parts a previous, interrupted run left in "
                      "<output>.parts/ and predict every input again.")
    flags.DEFINE_bool("strict", False, "Stop at the first file or record that cannot be used.")
    flags.DEFINE_bool("refine", False, "Redshift distribution models: refine the learned "
                      "candidates by a χ² template fit over narrow windows (Z, ZERR, ZWARN, "
                      "DELTACHI2 refined; the learned ones kept as *_LEARNED).")
    flags.DEFINE_integer("refine_templates", 2000, "With --refine: training spectra the χ² "
                         "templates are fitted on (cached in the run directory).")
    flags.DEFINE_integer("half_window", 1, "With --refine: fine steps (1e-4 in ln(1+z)) each "
                         "side of a candidate.")
    flags.DEFINE_string("embeddings", None, "Write the tokenizer's embeddings (token sequences "
                        "and mean-pooled vectors, see spectrax.embeddings) to this HDF5 file "
                        "INSTEAD of the catalogue; tokenizer models only.")
    flags.DEFINE_bool("embeddings_tokens", True, "With --embeddings: also store every token "
                      "sequence (false: mean-pooled vectors only, ~N times smaller).")
    flags.DEFINE_enum("embeddings_dtype", "float32", ["float32", "float16"],
                      "With --embeddings: storage type of the token sequences.")


def _report(summary: dict, what: str) -> None:
    for k, v in sorted(summary["reader_counts"].items()):
        if v:
            print(f"  {k}: {v:,}")
    for message in summary["refused"]:
        print(f"spectrax.predict: refused: {message}", file=sys.stderr)
    if summary["refused"]:
        print(f"{len(summary['refused'])} record(s)/file(s) refused (named on stderr); the "
              f"{what} holds the rest")
        sys.exit(1)  # written, but a script should notice what is missing


def main(argv):
    del argv
    paths = [p for v in FLAGS.input for p in v.split(",") if p]
    if FLAGS.config is None or not FLAGS.checkpoint or not paths:
        raise app.UsageError("--config, --checkpoint and --input are required")
    try:
        if FLAGS.embeddings:
            summary = embeddings.export_embeddings(
                FLAGS.config, FLAGS.checkpoint, paths, FLAGS.embeddings,
                batch_size=FLAGS.batch_size, split=FLAGS.split, survey=FLAGS.survey,
                tokens=FLAGS.embeddings_tokens, token_dtype=FLAGS.embeddings_dtype)
            print(f"wrote embeddings of {summary['rows']:,} spectra ({summary['tokens']:,} "
                  f"tokens of width {summary['d_model']}) to {summary['output']}")
            _report(summary, "file")
            return
        summary = run(FLAGS.config, FLAGS.checkpoint, paths, FLAGS.output,
                      batch_size=FLAGS.batch_size, split=FLAGS.split, survey=FLAGS.survey,
                      restart=FLAGS.restart, strict=FLAGS.strict,
                      block_spectra=FLAGS.block_spectra, refine=FLAGS.refine,
                      refine_templates=FLAGS.refine_templates, half_window=FLAGS.half_window)
    except (SpectrumError, FileNotFoundError, ValueError) as e:
        print(f"spectrax.predict: error: {e}", file=sys.stderr)
        sys.exit(2)
    if summary["rows"] is None:  # not process 0: process 0 writes the catalogue
        return
    rate, step = summary["spectra_per_s"], summary["step_spectra_per_s"]
    print(f"wrote {summary['rows']:,} rows to {summary['output']}"
          + (f" ({rate:,.1f} spectra/s with reading; the jitted step alone {step:,.1f})"
             if rate and step else "")
          + (f"; {summary['blocks_resumed']} block(s) reused from an interrupted run"
             if summary["blocks_resumed"] else ""))
    _report(summary, "catalogue")


if __name__ == "__main__":
    runtime.configure()  # XLA:CPU flag and log levels, before any computation
    define_flags()
    app.run(main)
