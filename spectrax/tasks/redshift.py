"""Redshift from a spectrum, and the redshift metrics every task that predicts z reports."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from spectrax import metrics as M
from spectrax import plots
from spectrax.spectra import CLASS_NAMES, SpectrumBatch
from spectrax.tasks.base import Task, model_inputs


class RedshiftTask(Task):
    """Redshift regression with the SpecPT NMAD loss.

    loss = mean(|z_pred − z_true|) / norm over labelled valid rows, with norm = std(z_true) of
    the batch (``norm="std"``, clamped at 1e-8) or median(|z − median z|) (``norm="mad"``).
    """

    label_names = ("z",)

    def __init__(self, norm: str = "std"):
        if norm not in ("std", "mad"):
            raise ValueError(f"redshift norm must be 'std' or 'mad', got {norm!r}")
        self.norm = norm

    def _target(self, batch):
        w = (batch.label_mask[:, 0] & batch.valid).astype(jnp.float32)
        return batch.labels[:, 0], w

    def loss(self, model, batch: SpectrumBatch, *, train: bool, rng=None):
        flux_n, _, _, _ = model_inputs(batch)
        z_pred = model(flux_n, batch.mask, batch.wavelength, train=train).astype(jnp.float32)
        z, w = self._target(batch)
        n = jnp.maximum(w.sum(), 1.0)
        mae = jnp.sum(jnp.abs(z_pred - z) * w) / n
        if self.norm == "std":
            mean = jnp.sum(z * w) / n
            norm = jnp.sqrt(jnp.sum((z - mean) ** 2 * w) / n)
        else:
            zm = jnp.where(w > 0, z, jnp.nan)
            med = jnp.nanmedian(zm)
            norm = jnp.nanmedian(jnp.abs(zm - med))
            norm = jnp.where(jnp.isfinite(norm), norm, 0.0)
        loss = mae / jnp.maximum(norm, 1e-8)
        frac = jnp.abs(z_pred - z) / (1.0 + z)
        batch_nmad_proxy = jnp.sum(frac * w) / n
        return loss, {"mae": mae, "mean_abs_dz_1pz": batch_nmad_proxy}

    def predict(self, model, batch: SpectrumBatch) -> dict[str, Any]:
        flux_n, _, _, _ = model_inputs(batch)
        return {"z_pred": model(flux_n, batch.mask, batch.wavelength,
                                train=False).astype(jnp.float32)}

    def metrics(self, out) -> dict[str, float]:
        v = out["valid"] & out["label_mask"][:, 0]
        if not v.any():
            return {"n": 0}
        return redshift_metrics_and_table(out, v, out["labels"][v, 0], out["z_pred"][v])

    def figures(self, out, examples, workdir: Path, n: int) -> list[Path]:
        v = out["valid"] & out["label_mask"][:, 0]
        z, zp = out["labels"][v, 0], out["z_pred"][v]
        paths = [plots.redshift_scatter(z, zp, workdir / "z_pred_vs_true.png"),
                 plots.redshift_residuals(z, zp, workdir / "z_residuals.png")]
        table = success_table(out, v, z, zp)
        if table is not None:
            paths.append(write_success_table(table, workdir))
        return paths

    def catalogue(self, out) -> dict[str, np.ndarray]:
        return {"Z_PRED": out["z_pred"]}


def redshift_metrics_and_table(out, rows, z_true, z_pred) -> dict[str, Any]:
    """NMAD, η, R², RMSE, n (:func:`spectrax.metrics.redshift_metrics`) and, with the
    evaluation's S/N context, ``success`` and ``success_by_snr`` (:func:`success_table`) of the
    predictions ``z_pred`` [n] of the evaluation rows ``rows`` ([N] bool, n true), whose true
    redshifts are ``z_true`` [n]. Every task that predicts a redshift reports these."""
    res: dict[str, Any] = M.redshift_metrics(z_true, z_pred)
    table = success_table(out, rows, z_true, z_pred)
    if table is not None:
        res["success"], res["success_by_snr"] = table[-1]["success"], table
    return res


def success_table(out, rows, z_true, z_pred):
    """The per-S/N-bin success table of the redshift predictions of ``rows`` (None without the
    evaluation's ``snr`` context). QSOs (class id 1, from ``context_class``) get the 3000 km/s
    threshold; without a class column every spectrum is judged by the 1000 km/s one."""
    if "snr" not in out or not np.any(rows):
        return None
    cls = out.get("context_class")
    is_qso = (np.nan_to_num(cls[rows], nan=-1) == CLASS_NAMES.index("QSO")) if cls is not None \
        else np.zeros(int(np.sum(rows)), bool)
    return M.success_by_snr(z_true, z_pred, is_qso, out["snr"][rows])


def write_success_table(table, workdir: Path) -> Path:
    """Writes :func:`success_table`'s rows as ``workdir/z_success_by_snr.md``."""
    path = workdir / "z_success_by_snr.md"
    path.write_text("Redshift success per median-S/N bin (|Δz| < 1000 km/s·(1+z), 3000 km/s "
                    "for QSOs)\n\n" + M.format_table(table))
    return path
