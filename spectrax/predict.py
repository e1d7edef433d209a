r"""Batch inference to a FITS catalogue: ``python -m spectrax.predict``.

    python -m spectrax.predict --config=configs/specpt_redshift_bgs.py \
        --checkpoint=runs/specpt_redshift_bgs-tokens --input=data/my_desi \
        --output=catalog.fits

``--input`` takes shard directories (all splits, or ``--split``) and/or DESI coadd FITS files
(``redrock-*.fits`` beside them are joined when present, to report the known redshift). The
catalogue has one row per input spectrum: TARGETID, the task's predictions (Z_PRED for the
redshift task), the known label where there is one (Z) and the survey metadata the reader found.

From Python, the same jitted function::

    from spectrax.predict import Predictor
    predictor = Predictor.from_checkpoint(config, "runs/specpt_redshift_bgs-tokens")
    out = predictor(batch)            # batch: a SpectrumBatch; returns {"z_pred": [B], ...}
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from spectrax.spectra import SpectrumBatch, SpectrumError, pad_batch_rows, stack_records


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
        state, _, _ = ckpt.restore(trainer.abstract_with_shardings())
        ckpt.close()
        return cls(trainer, {"params": state["params"], "other": state["other"]}, step)

    def __call__(self, batch: SpectrumBatch) -> dict[str, np.ndarray]:
        b = self.trainer.batch_sharding
        from spectrax.data.pipeline import to_global
        out = self._fn(self.state, to_global(batch, b))
        return {k: np.asarray(v) for k, v in out.items()}


# ==============================================================================================
# Inputs: shard directories and DESI files -> (host batch, per-row metadata)
# ==============================================================================================
def _records_from_input(item: str, split: str | None, counts: dict) -> Iterator[dict]:
    from spectrax.data import shards

    p = Path(item)
    if p.is_dir() and (p / shards.MANIFEST).exists():
        manifest = shards.read_manifest(p)
        grid = manifest.grid_array()
        for s in ([split] if split else list(manifest.splits)):
            for rec in shards.iter_records(p, s):
                if rec.get("wavelength") is None and grid is not None:
                    rec["wavelength"] = grid.astype(np.float32)
                rec.setdefault("meta", {})["SPLIT"] = s
                rec["meta"]["SOURCE"] = p.name
                yield rec
        return
    if p.is_file() and p.suffix.lower() in (".fits", ".fit", ".fz"):
        from spectrax.data.readers import desi

        redrock = p.with_name(p.name.replace("coadd", "redrock", 1))
        result = desi.read_desi_coadd(p, redrock if redrock.exists() and redrock != p else None)
        for k, v in result.counts.items():
            counts[f"{p.name}:{k}"] = v
        for rec in result.records:
            rec["wavelength"] = result.wavelength.astype(np.float32)
            rec.setdefault("meta", {})["SOURCE"] = p.name
            yield rec
        return
    raise SpectrumError(f"--input {item}: neither a shard directory (with manifest.json) nor a "
                        "FITS file")


def iter_batches(inputs: Sequence[str], batch_size: int, length: int, label_names: Sequence[str],
                 split: str | None = None, counts: dict | None = None
                 ) -> Iterator[tuple[SpectrumBatch, list[dict]]]:
    """Host batches (last one padded with invalid rows) with each real row's metadata."""
    counts = {} if counts is None else counts
    buf: list[dict] = []
    for item in inputs:
        for rec in _records_from_input(item, split, counts):
            if len(rec["flux"]) != length:
                raise SpectrumError(
                    f"{item}: spectrum {rec.get('id')} has {len(rec['flux'])} pixels; this model "
                    f"expects {length} (resample onto its grid first)")
            buf.append(rec)
            if len(buf) == batch_size:
                yield _stack(buf, batch_size, length, label_names), [r.get("meta", {}) for r in buf]
                buf = []
    if buf:
        yield _stack(buf, batch_size, length, label_names), [r.get("meta", {}) for r in buf]


def _stack(records, batch_size, length, label_names):
    k = len(label_names)
    for r in records:
        lab = np.atleast_1d(np.asarray(r.get("labels", []), np.float32))
        r["labels"] = lab[:k] if lab.size >= k else np.full(k, np.nan, np.float32)
    return pad_batch_rows(stack_records(records, k, length=length), batch_size)


# ==============================================================================================
# Catalogue
# ==============================================================================================
def run(config, checkpoint: str, inputs: Sequence[str], output: str | Path, *,
        batch_size: int = 64, split: str | None = None) -> dict[str, Any]:
    """Predicts every spectrum of ``inputs`` and writes a FITS catalogue; returns a summary."""
    from astropy.table import Table

    predictor = Predictor.from_checkpoint(config, checkpoint)
    task = predictor.task
    length = config.data.length or 7781
    if batch_size % jax.device_count():
        batch_size = jax.device_count() * max(1, batch_size // jax.device_count())
    columns: dict[str, list] = {}
    metas: list[dict] = []
    counts: dict[str, int] = {}
    n, t_run, t0 = 0, 0.0, None
    for batch, meta in tqdm(iter_batches(inputs, batch_size, length, task.label_names, split,
                                         counts), desc="predict", unit="batch"):
        t = time.perf_counter()
        out = predictor(batch)
        if t0 is None:
            t0 = t  # exclude the first call (compilation) from the throughput
        else:
            t_run += time.perf_counter() - t
            n += int(batch.valid.sum())
        v = batch.valid
        cols = {"TARGETID": batch.ids[v], **{k: np.asarray(val)[v] for k, val in
                                             task.catalogue({**out, "valid": v}).items()}}
        for j, name in enumerate(task.label_names):
            cols[name.upper()] = np.where(batch.label_mask[v, j], batch.labels[v, j], np.nan)
        for k, val in cols.items():
            columns.setdefault(k, []).append(val)
        metas.extend(meta)
    if not columns:
        raise SpectrumError(f"no spectra found in --input {list(inputs)}")
    table = Table({k: np.concatenate(v) for k, v in columns.items()})
    _add_meta_columns(table, metas)
    table.meta["SPXCONF"] = config.name
    table.meta["SPXSTEP"] = predictor.step
    table.meta["SPXMODEL"] = f"{config.model.name}:{config.model.variant}"
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    table.write(output, overwrite=True)
    summary = {"rows": len(table), "output": str(output), "reader_counts": counts,
               "spectra_per_s": n / t_run if t_run > 0 else None}
    return summary


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


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The config the checkpoint was trained with.",
                                lock_config=True)
flags.DEFINE_string("checkpoint", None, "Run directory (or its checkpoints/ folder).")
flags.DEFINE_list("input", [], "Shard directories and/or DESI coadd FITS files.")
flags.DEFINE_string("output", "catalog.fits", "FITS catalogue to write.")
flags.DEFINE_integer("batch_size", 64, "Spectra per jitted call.")
flags.DEFINE_string("split", None, "Only this split of shard inputs (default: all).")


def main(argv):
    del argv
    if FLAGS.config is None or not FLAGS.checkpoint or not FLAGS.input:
        raise app.UsageError("--config, --checkpoint and --input are required")
    try:
        summary = run(FLAGS.config, FLAGS.checkpoint, FLAGS.input, FLAGS.output,
                      batch_size=FLAGS.batch_size, split=FLAGS.split)
    except (SpectrumError, FileNotFoundError) as e:
        print(f"spectrax.predict: error: {e}", file=sys.stderr)
        sys.exit(2)
    rate = summary["spectra_per_s"]
    print(f"wrote {summary['rows']:,} rows to {summary['output']}"
          + (f" ({rate:,.1f} spectra/s after compilation)" if rate else ""))
    for k, v in summary["reader_counts"].items():
        if v:
            print(f"  {k}: {v}")


if __name__ == "__main__":
    app.run(main)
