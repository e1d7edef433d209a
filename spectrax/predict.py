r"""Batch inference to a FITS catalogue: ``python -m spectrax.predict``.

    python -m spectrax.predict --config=configs/specpt_redshift_bgs.py \
        --checkpoint=runs/specpt_redshift_bgs-tokens --input=data/my_desi \
        --output=catalog.fits

``--input`` takes shard directories (all splits, or ``--split``) and/or DESI coadd FITS files
(``redrock-*.fits`` beside them are joined when present, to report the known redshift). The
catalogue has one row per input spectrum: TARGETID, the task's predictions (Z_PRED for the
redshift task), the known label where there is one (Z), NPIX_VALID (usable pixels; 0 means the
prediction saw no data) and the survey metadata the reader found.

Pixel length of the batches: a config with length buckets (``config.data.buckets``, the
tokenizer configs, whose inputs are spectra on their native grids) pads each record to the
smallest bucket that holds it, as training does (:func:`spectrax.data.pipeline.bucket_plan`),
and each batch holds records of one bucket (one compilation per bucket; within an input the
catalogue rows are grouped by bucket). A record longer than the largest bucket is refused. A
config without buckets predicts on ``config.data.length`` pixels (7781, the DESI grid, when
unset) and refuses records of another length.

Embeddings instead of a catalogue: with ``--embeddings=emb.h5`` (tokenizer models only) the
command writes the tokenizer's per-spectrum token sequences and mean-pooled vectors to an HDF5
file and no catalogue (see :mod:`spectrax.embeddings`)::

    python -m spectrax.predict --config=configs/tokenizer_pretrain.py \
        --checkpoint=runs/tokenizer_pretrain-small --input=data/mine --embeddings=emb.h5

Many files, days of compute: the run is resumable. Each finished input is written atomically
to ``<output>.parts/`` and listed in a ledger; rerun the same command after an interruption and
finished inputs are skipped (``--restart`` predicts everything again). Bad pixels are masked and
counted; a record or file that cannot be used is skipped with a message naming it, the others go
through, and the exit status is 1 so that scripts notice.

From Python, the same jitted function::

    from spectrax.predict import Predictor
    predictor = Predictor.from_checkpoint(config, "runs/specpt_redshift_bgs-tokens")
    out = predictor(batch)            # batch: a SpectrumBatch; returns {"z_pred": [B], ...}
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import jax
import numpy as np
from absl import app, flags
from tqdm import tqdm

from spectrax.spectra import (SpectrumBatch, SpectrumError, pad_batch_rows, sanitize_record,
                              stack_records)


class Predictor:
    """A restored model plus its task's jitted ``predict``; call it on SpectrumBatches."""

    def __init__(self, trainer, state, step: int):
        self.trainer, self.state, self.step = trainer, state, step
        self.task = trainer.task
        self._fn = jax.jit(lambda st, b: trainer.task.predict(trainer.model(st), b))

    @classmethod
    def from_checkpoint(cls, config, checkpoint: str | Path) -> "Predictor":
        """Restores the latest checkpoint of a run directory (or its checkpoints/ folder)."""
        from spectrax import checkpoint as ckpt_lib
        from spectrax import sharding
        from spectrax.train import Trainer

        path = Path(checkpoint)
        if path.name == "checkpoints":
            path = path.parent
        mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
        trainer = Trainer(config, mesh, config.num_steps)
        ckpt = ckpt_lib.Checkpointer(path)
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"--checkpoint {checkpoint}: no complete checkpoint in "
                                    f"{ckpt.directory}")
        state, _, meta = ckpt.restore(trainer.abstract_with_shardings())
        ckpt.close()
        # The task's statistics and label columns as trained (label standardisation, ...).
        trainer.task.load_state(meta.get("task_state"))
        return cls(trainer, {"params": state["params"], "other": state["other"]}, step)

    def __call__(self, batch: SpectrumBatch) -> dict[str, np.ndarray]:
        b = self.trainer.batch_sharding
        from spectrax.data.pipeline import to_global
        out = self._fn(self.state, to_global(batch, b))
        return {k: np.asarray(v) for k, v in out.items()}


# ==============================================================================================
# Inputs: shard directories and DESI files -> records (bad ones masked and counted, or refused)
# ==============================================================================================
class Refusals:
    """Collects what could not be predicted, one message per record or file, naming both.

    With ``strict`` the first refusal raises SpectrumError instead (what :func:`iter_batches`
    does, so a library caller sees problems at once); :func:`run` collects them, carries on
    with the good records and reports them at the end.
    """

    def __init__(self, strict: bool):
        self.strict = strict
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        if self.strict:
            raise SpectrumError(message)
        self.messages.append(message)


def _bump(counts: dict, key: str, by: int = 1) -> None:
    if by:
        counts[key] = counts.get(key, 0) + by


def _shard_records(p: Path, split: str | None, counts: dict, refusals: Refusals
                   ) -> Iterator[dict]:
    """Records of a shard directory; a corrupt record or shard file is refused, not fatal."""
    from array_record.python.array_record_module import ArrayRecordReader

    from spectrax.data import shards

    manifest = shards.read_manifest(p)
    grid = manifest.grid_array()
    for s in ([split] if split else list(manifest.splits)):
        for path in shards.split_paths(p, s):
            try:
                reader = ArrayRecordReader(path)
                n = reader.num_records()
            except Exception as e:  # the C++ reader raises several types on corruption
                refusals.add(f"{path}: cannot open ArrayRecord shard ({e}); file skipped")
                _bump(counts, f"{p.name}:refused_files")
                continue
            for i in range(n):
                try:
                    rec = shards.decode_record(reader.read([i])[0], where=f"{path} record {i}")
                except Exception as e:
                    refusals.add(f"{path} record {i}: unreadable ({e}); record skipped")
                    _bump(counts, f"{p.name}:refused_records")
                    continue
                if rec.get("wavelength") is None and grid is not None:
                    rec["wavelength"] = grid.astype(np.float32)
                rec.setdefault("meta", {})["SPLIT"] = s
                rec["meta"]["SOURCE"] = p.name
                # Labels are picked by name (_stack): the manifest's columns need not start
                # with the task's (multi-survey shards: z, class, ..., survey).
                rec["_label_names"] = tuple(manifest.label_names)
                rec["_where"] = f"{path} record {i} (id {int(rec['id'])})"
                yield rec
            try:
                reader.close()
            except Exception as e:  # a truncated file is only detected when closing
                refusals.add(f"{path}: corrupt or truncated ArrayRecord shard ({e}); records "
                             "after the damage are missing")
                _bump(counts, f"{p.name}:refused_files")


# The label vector of DESI reader records: the redrock redshift (NaN when unknown).
DESI_LABEL_NAMES = ("z",)


def _desi_records(p: Path, counts: dict) -> Iterator[dict]:
    """Records of a DESI coadd (+ the redrock file beside it, when there is one)."""
    from spectrax.data.readers import desi

    redrock = p.with_name(p.name.replace("coadd", "redrock", 1))
    result = desi.read_desi_coadd(p, redrock if redrock.exists() and redrock != p else None)
    for k, v in result.counts.items():
        _bump(counts, f"{p.name}:{k}", v)
    for row, rec in enumerate(result.records):
        rec["wavelength"] = result.wavelength.astype(np.float32)
        rec.setdefault("meta", {})["SOURCE"] = p.name
        rec["_label_names"] = DESI_LABEL_NAMES
        rec["_where"] = f"{p} record {row} (TARGETID {int(rec['id'])})"
        yield rec


def _records_from_input(item: str, split: str | None, counts: dict,
                        refusals: Refusals | None = None) -> Iterator[dict]:
    """Sanitized records of one input (a shard directory or a DESI coadd FITS file).

    Pixels that cannot be used (NaN/inf, ivar <= 0) are masked and counted per input; a record
    that cannot be used at all is refused (see :class:`Refusals`).
    """
    refusals = refusals or Refusals(strict=True)
    p = Path(item)
    if p.is_dir() and (p / "manifest.json").exists():
        raw = _shard_records(p, split, counts, refusals)
    elif p.is_file() and p.suffix.lower() in (".fits", ".fit", ".fz"):
        raw = _desi_records(p, counts)
    else:
        raise SpectrumError(f"--input {item}: neither a shard directory (with manifest.json) "
                            "nor a FITS file")
    for rec in raw:
        where = rec.pop("_where")
        try:
            clean, pix = sanitize_record(rec, where)
        except SpectrumError as e:
            refusals.add(f"{e}; record skipped")
            _bump(counts, f"{p.name}:refused_records")
            continue
        for key in ("nonfinite_flux", "nonfinite_ivar", "nonpositive_ivar", "bad_wavelength"):
            _bump(counts, f"{p.name}:masked_{key}", pix.get(key, 0))
        if pix["valid_pixels"] == 0:  # predicted anyway (one row per spectrum), but flagged
            _bump(counts, f"{p.name}:all_pixels_masked")
        clean["_where"] = where
        yield clean


@dataclasses.dataclass(frozen=True)
class LengthPolicy:
    """The pixel length a record of ``n`` pixels is padded to for the model, or a refusal.

    Attributes:
      buckets: length buckets in pixels (``config.data.buckets``); when given, a record goes to
        the smallest bucket that holds it (the rule of :func:`spectrax.data.pipeline.bucket_plan`,
        so inference pads exactly as training did) and a longer one is refused.
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
    def for_catalogue(cls, config) -> "LengthPolicy":
        """Buckets when the config has them, else exactly ``config.data.length`` (default 7781,
        the DESI coadd grid): the rule of the catalogue path (module docstring)."""
        buckets = tuple(config.data.buckets)
        if buckets:
            return cls(buckets=buckets)
        return cls(length=int(config.data.length or 7781), exact=True)

    def target(self, n: int) -> int | None:
        """The padded length for a record of ``n`` pixels; None when it cannot be used."""
        if self.buckets:
            if n > self.buckets[-1]:
                return None
            from spectrax.data.pipeline import bucket_plan
            return self.buckets[int(bucket_plan([n], self.buckets).assignment[0])]
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


def _policy(length: "int | LengthPolicy") -> LengthPolicy:
    return length if isinstance(length, LengthPolicy) else LengthPolicy(length=int(length))


def _fitting_records(item: str, split: str | None, length: "int | LengthPolicy", counts: dict,
                     refusals: Refusals) -> Iterator[dict]:
    """:func:`_records_from_input` minus the records the model cannot take; each kept record
    carries the pixel length it is batched at in ``_length`` (see :class:`LengthPolicy`; an
    int ``length`` means exactly that many pixels)."""
    policy = _policy(length)
    for rec in _records_from_input(item, split, counts, refusals):
        where = rec.pop("_where")
        target = policy.target(len(rec["flux"]))
        if target is None:
            refusals.add(f"{where}: {policy.refusal(len(rec['flux']))}")
            _bump(counts, f"{Path(item).name}:refused_records")
            continue
        rec["_length"] = target
        yield rec


def _grouped(records: Iterable[dict], batch_size: int, length: "int | LengthPolicy"
             ) -> Iterator[tuple[int, list[dict]]]:
    """(pixel length, up to ``batch_size`` records) groups, each of ONE padded length.

    A record's length is its ``_length`` (set by :func:`_fitting_records`), else what the
    policy says. Each length fills its own group and is emitted when full; the partial groups
    follow at the end, shortest length first. So jit compiles once per length and rows are in
    read order within a length, not across lengths.
    """
    policy = _policy(length)
    groups: dict[int, list[dict]] = {}
    for rec in records:
        n = rec.get("_length") or policy.target(len(rec["flux"]))
        if n is None:
            raise SpectrumError(f"record {rec.get('id')}: {policy.refusal(len(rec['flux']))}")
        group = groups.setdefault(int(n), [])
        group.append(rec)
        if len(group) == batch_size:
            yield int(n), group
            groups[int(n)] = []
    for n in sorted(groups):
        if groups[n]:
            yield n, groups[n]


def _batched(records: Iterable[dict], batch_size: int, length: "int | LengthPolicy",
             label_names: Sequence[str]) -> Iterator[tuple[SpectrumBatch, list[dict]]]:
    """Host batches of one pixel length each (see :func:`_grouped`; a batch's last rows are
    invalid padding when it is not full) with each real row's metadata."""
    for n, group in _grouped(records, batch_size, length):
        yield _stack(group, batch_size, n, label_names), [r.get("meta", {}) for r in group]


def iter_batches(inputs: Sequence[str], batch_size: int, length: "int | LengthPolicy",
                 label_names: Sequence[str], split: str | None = None,
                 counts: dict | None = None) -> Iterator[tuple[SpectrumBatch, list[dict]]]:
    """Host batches over all ``inputs``; raises SpectrumError at the first unusable record.
    ``length``: an int (exactly that many pixels) or a :class:`LengthPolicy` (buckets)."""
    counts = {} if counts is None else counts
    strict = Refusals(strict=True)
    records = (r for item in inputs
               for r in _fitting_records(item, split, length, counts, strict))
    yield from _batched(records, batch_size, length, label_names)


def select_labels(record: dict, label_names: Sequence[str]) -> np.ndarray:
    """[K] float32: the record's values of ``label_names``, NaN where it has no such label.

    Records that say which labels they hold (``_label_names``: the shard manifest's columns,
    or ("z",) for DESI files) are matched by name; others positionally (the first K values).
    """
    k = len(label_names)
    lab = np.atleast_1d(np.asarray(record.get("labels", []), np.float32))
    names = record.get("_label_names")
    if names is not None:
        names = list(names)
        return np.array([lab[names.index(n)] if n in names and names.index(n) < lab.size
                         else np.nan for n in label_names], np.float32)
    return lab[:k] if lab.size >= k else np.full(k, np.nan, np.float32)


def _stack(records, batch_size, length, label_names):
    for r in records:
        r["labels"] = select_labels(r, label_names)
    return pad_batch_rows(stack_records(records, len(label_names), length=length), batch_size)


# ==============================================================================================
# Resumable runs: one part file per input, a ledger, and the catalogue assembled at the end
# ==============================================================================================
class PartStore:
    """``<output>.parts/``: one FITS table per finished input plus ``ledger.json``.

    Each part is written to a temporary file and renamed (``os.replace`` is atomic), and the
    ledger is rewritten the same way after it, so a kill at any moment leaves only complete
    parts; a rerun skips the inputs the ledger lists. The ledger also records the model
    (config name and checkpoint step): parts made by another model are discarded, not mixed in.
    """

    LEDGER = "ledger.json"

    def __init__(self, output: str | Path, model_key: dict, restart: bool = False):
        self.directory = Path(str(output) + ".parts")
        if restart and self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.model_key = model_key
        self.ledger = self._read_ledger()

    def _read_ledger(self) -> dict:
        path = self.directory / self.LEDGER
        try:
            ledger = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {"model": self.model_key, "inputs": {}}
        if ledger.get("model") != self.model_key:
            print(f"spectrax.predict: {self.directory} holds results of another model "
                  f"({ledger.get('model')}); starting afresh", flush=True)
            return {"model": self.model_key, "inputs": {}}
        return ledger

    @staticmethod
    def key(item: str, split: str | None) -> str:
        """A stable name for one input (its absolute path and the split asked for)."""
        text = json.dumps([str(Path(item).absolute()), split])
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def done(self, key: str) -> dict | None:
        """The ledger entry of a finished input whose part file exists, else None."""
        entry = self.ledger["inputs"].get(key)
        if entry is None or not (self.directory / f"{key}.fits").exists():
            return None
        return entry

    def write(self, key: str, item: str, table, counts: dict, refused: list[str]) -> None:
        part = self.directory / f"{key}.fits"
        tmp = part.with_name(part.name + ".tmp")
        table.write(tmp, format="fits", overwrite=True)
        os.replace(tmp, part)
        self.ledger["inputs"][key] = {"input": item, "rows": len(table), "counts": counts,
                                      "refused": refused}
        ledger = self.directory / self.LEDGER
        tmp = ledger.with_name(ledger.name + ".tmp")
        tmp.write_text(json.dumps(self.ledger, indent=1))
        os.replace(tmp, ledger)

    def read(self, key: str):
        from astropy.table import Table
        return Table.read(self.directory / f"{key}.fits", format="fits")

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _predict_input(predictor, item: str, split: str | None, batch_size: int,
                   length: "int | LengthPolicy", refusals: Refusals, counts: dict,
                   timing: dict):
    """Predicts every usable spectrum of one input; returns its table (None if it has none)."""
    from astropy.table import Table

    task = predictor.task
    columns: dict[str, list] = {}
    metas: list[dict] = []
    records = _fitting_records(item, split, length, counts, refusals)
    for batch, meta in _batched(records, batch_size, length, task.label_names):
        t = time.perf_counter()
        out = predictor(batch)
        compiled = timing.setdefault("lengths", set())
        if batch.num_pixels in compiled:  # a length's first call compiles: not in the rate
            timing["seconds"] += time.perf_counter() - t
            timing["spectra"] += int(batch.valid.sum())
        compiled.add(batch.num_pixels)
        timing["calls"] += 1
        v = batch.valid
        cols = {"TARGETID": batch.ids[v], **{k: np.asarray(val)[v] for k, val in
                                             task.catalogue({**out, "valid": v}).items()}}
        for j, name in enumerate(task.label_names):
            cols[name.upper()] = np.where(batch.label_mask[v, j], batch.labels[v, j], np.nan)
        cols["NPIX_VALID"] = batch.mask[v].sum(-1).astype(np.int32)
        for k, val in cols.items():
            columns.setdefault(k, []).append(val)
        metas.extend(meta)
    if not columns:
        return None
    table = Table({k: np.concatenate(v) for k, v in columns.items()})
    _add_meta_columns(table, metas)
    return table


def _stack_tables(tables: list):
    """Rows of all parts; a column missing from some parts is NaN / '' / -1 there."""
    from astropy.table import vstack

    table = vstack(tables, join_type="outer", metadata_conflicts="silent")
    for name in table.colnames:
        col = table[name]
        if getattr(col, "mask", None) is not None and np.any(col.mask):
            fill = {"f": np.nan, "U": "", "S": b""}.get(col.dtype.kind, -1)
            table[name] = col.filled(fill)
    return table


def run(config, checkpoint: str, inputs: Sequence[str], output: str | Path, *,
        batch_size: int = 64, split: str | None = None, restart: bool = False
        ) -> dict[str, Any]:
    """Predicts every spectrum of ``inputs`` and writes a FITS catalogue; returns a summary.

    Resumable: each finished input is kept in ``<output>.parts/``; rerun after an interruption
    and finished inputs are skipped (``restart=True`` ignores them). The catalogue, written
    atomically at the end, has one row per usable input spectrum. Bad pixels are masked and
    counted (``reader_counts``); records or files that cannot be used are skipped with a
    message naming them (``refused``), the rest go through.
    """
    predictor = Predictor.from_checkpoint(config, checkpoint)
    length = LengthPolicy.for_catalogue(config)  # buckets, or exactly data.length pixels
    if batch_size % jax.device_count():
        batch_size = jax.device_count() * max(1, batch_size // jax.device_count())
    store = PartStore(output, {"config": config.name, "step": predictor.step,
                               "model": f"{config.model.name}:{config.model.variant}"}, restart)
    counts: dict[str, int] = {}
    refused: list[str] = []
    keys, resumed = [], 0
    timing = {"calls": 0, "seconds": 0.0, "spectra": 0}
    for item in tqdm(inputs, desc="predict", unit="input", disable=len(inputs) < 2):
        key = store.key(item, split)
        entry = store.done(key)
        if entry is None:
            entry = _predict_and_store(predictor, store, key, item, split, batch_size, length,
                                       timing)
        else:
            resumed += 1
        for k, v in entry["counts"].items():
            _bump(counts, k, v)
        refused.extend(entry["refused"])
        if entry["rows"]:
            keys.append(key)
    if not keys:
        raise SpectrumError(f"no spectra found in --input {list(inputs)}"
                            + (": " + "; ".join(refused[:5]) if refused else ""))
    table = _stack_tables([store.read(k) for k in keys])
    table.meta["SPXCONF"] = config.name
    table.meta["SPXSTEP"] = predictor.step
    table.meta["SPXMODEL"] = f"{config.model.name}:{config.model.variant}"
    _write_atomically(table, Path(output))
    store.remove()  # the catalogue now holds every part
    return {"rows": len(table), "output": str(output), "reader_counts": counts,
            "refused": refused, "inputs_resumed": resumed,
            "spectra_per_s": (timing["spectra"] / timing["seconds"]
                              if timing["seconds"] > 0 else None)}


def _predict_and_store(predictor, store: PartStore, key: str, item: str, split: str | None,
                       batch_size: int, length: "int | LengthPolicy", timing: dict
                       ) -> dict | None:
    """Predicts one input into its part; returns its ledger entry (None: nothing usable, not
    stored, so a rerun retries it)."""
    counts: dict[str, int] = {}
    refusals = Refusals(strict=False)
    try:
        table = _predict_input(predictor, item, split, batch_size, length, refusals, counts,
                               timing)
    except SpectrumError as e:  # the whole file is unusable (truncated, wrong layout, ...)
        refusals.add(f"{e}; input skipped")
        _bump(counts, f"{Path(item).name}:refused_files")
        table = None
    for message in refusals.messages:
        print(f"spectrax.predict: refused: {message}", file=sys.stderr, flush=True)
    if table is None:  # not stored: a rerun tries this input again
        return {"input": item, "rows": 0, "counts": counts, "refused": refusals.messages}
    store.write(key, item, table, counts, refusals.messages)
    return store.ledger["inputs"][key]


def _add_meta_columns(table, metas: list[dict]) -> None:
    """Survey metadata (RA, DEC, ZWARN, SPECTYPE, split, source file, …) as extra columns."""
    keys = sorted({k for m in metas for k in m})
    for k in keys:
        name = k.upper()
        if name in table.colnames:
            name = f"{name}_INPUT"
        vals = [m.get(k) for m in metas]
        if all(isinstance(x, (int, float, np.number)) or x is None for x in vals):
            table[name] = np.array([np.nan if x is None else x for x in vals], np.float64)
        else:
            table[name] = np.array(["" if x is None else str(x) for x in vals])


def _write_atomically(table, output: Path) -> None:
    """Writes ``output`` via a temporary file: readers never see half a catalogue."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    table.write(tmp, format="fits", overwrite=True)
    os.replace(tmp, output)


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
    flags.DEFINE_list("input", [], "Shard directories and/or DESI coadd FITS files.")
    flags.DEFINE_string("output", "catalog.fits", "FITS catalogue to write.")
    flags.DEFINE_integer("batch_size", 64, "Spectra per jitted call.")
    flags.DEFINE_string("split", None, "Only this split of shard inputs (default: all).")
    flags.DEFINE_bool("restart", False, "Ignore the per-input results a previous, interrupted "
                      "run left in <output>.parts/ and predict every input again.")
    flags.DEFINE_string("embeddings", None, "Write the tokenizer's embeddings (token sequences "
                        "and mean-pooled vectors, see spectrax.embeddings) to this HDF5 file "
                        "INSTEAD of the catalogue; tokenizer models only.")
    flags.DEFINE_bool("embeddings_tokens", True, "With --embeddings: also store every token "
                      "sequence (false: mean-pooled vectors only, ~N times smaller).")
    flags.DEFINE_enum("embeddings_dtype", "float32", ["float32", "float16"],
                      "With --embeddings: storage type of the token sequences.")


def _main_embeddings():
    """``--embeddings``: the HDF5 export of :mod:`spectrax.embeddings` (no catalogue)."""
    from spectrax.embeddings import EmbeddingsError, export_embeddings
    try:
        summary = export_embeddings(FLAGS.config, FLAGS.checkpoint, FLAGS.input,
                                    FLAGS.embeddings, batch_size=FLAGS.batch_size,
                                    split=FLAGS.split, tokens=FLAGS.embeddings_tokens,
                                    token_dtype=FLAGS.embeddings_dtype)
    except (EmbeddingsError, SpectrumError, FileNotFoundError) as e:
        print(f"spectrax.predict: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote embeddings of {summary['rows']:,} spectra ({summary['tokens']:,} tokens of "
          f"width {summary['d_model']}) to {summary['output']}")
    for k, v in summary["reader_counts"].items():
        if v:
            print(f"  {k}: {v}")
    if summary["refused"]:
        print(f"{len(summary['refused'])} record(s)/file(s) refused (see the messages above)")
        sys.exit(1)


def main(argv):
    del argv
    if FLAGS.config is None or not FLAGS.checkpoint or not FLAGS.input:
        raise app.UsageError("--config, --checkpoint and --input are required")
    if FLAGS.embeddings:
        _main_embeddings()
        return
    try:
        summary = run(FLAGS.config, FLAGS.checkpoint, FLAGS.input, FLAGS.output,
                      batch_size=FLAGS.batch_size, split=FLAGS.split, restart=FLAGS.restart)
    except (SpectrumError, FileNotFoundError) as e:
        print(f"spectrax.predict: error: {e}", file=sys.stderr)
        sys.exit(2)
    rate = summary["spectra_per_s"]
    print(f"wrote {summary['rows']:,} rows to {summary['output']}"
          + (f" ({rate:,.1f} spectra/s after compilation)" if rate else "")
          + (f"; {summary['inputs_resumed']} input(s) reused from an interrupted run"
             if summary["inputs_resumed"] else ""))
    for k, v in summary["reader_counts"].items():
        if v:
            print(f"  {k}: {v}")
    if summary["refused"]:
        print(f"{len(summary['refused'])} record(s)/file(s) refused (see the messages above)")
        sys.exit(1)  # the catalogue is written, but a script should notice what is missing


if __name__ == "__main__":
    define_flags()
    app.run(main)
