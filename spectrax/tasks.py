"""Tasks: what a model is asked to do, its loss, its metrics and what a prediction is.

The training loop knows only this interface:

- ``label_names``: which manifest labels the task needs (checked against the shard manifest);
- ``loss(model, batch, train) -> (loss, aux)``: a scalar fp32 loss and a dict of scalar
  diagnostics, computed only over valid rows / pixels / labels;
- ``predict(model, batch) -> dict[str, [B, ...]]``: what the model says about each spectrum;
- ``metrics(outputs) -> dict``: host-side metrics over a whole split, where ``outputs`` holds
  the concatenated predictions plus ``labels``, ``label_mask``, ``valid`` (and ``ids``);
- ``figures(outputs, batch_examples, workdir) -> list[path]``;
- ``catalogue(outputs) -> dict[column, array]`` for the FITS catalogue of ``spectrax.predict``.

Models are called as ``model(flux, mask, wavelength, train=bool)`` on median-normalised flux.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spectrax import metrics as M
from spectrax.data.preprocess import median_normalise
from spectrax.spectra import SpectrumBatch


def _model_inputs(batch: SpectrumBatch):
    """Median-normalised model inputs; bad pixels are 0 and masked."""
    flux_n, ivar_n, scale, fallback = median_normalise(batch.flux, batch.ivar, batch.mask)
    return flux_n, ivar_n, scale, fallback


class ReconstructionTask:
    """Autoencoding: reproduce the normalised flux at every valid pixel.

    ``loss_type``: ``"l1"`` (mean |Δ| over valid pixels, the reference's L1-type loss) or
    ``"nmad"`` (mean |Δ| divided by the std of the target flux of the batch, the reference
    successor's form of the same loss).
    """

    label_names: tuple[str, ...] = ()

    def __init__(self, loss_type: str = "l1"):
        if loss_type not in ("l1", "nmad"):
            raise ValueError(f"reconstruction loss_type must be 'l1' or 'nmad', got {loss_type!r}")
        self.loss_type = loss_type

    def _weights(self, batch):
        return (batch.mask & batch.valid[:, None]).astype(jnp.float32)

    def loss(self, model, batch: SpectrumBatch, *, train: bool):
        flux_n, _, _, fallback = _model_inputs(batch)
        recon = model(flux_n, batch.mask, batch.wavelength, train=train).astype(jnp.float32)
        w = self._weights(batch)
        n = jnp.maximum(w.sum(), 1.0)
        l1 = jnp.sum(jnp.abs(recon - flux_n) * w) / n
        if self.loss_type == "nmad":
            mean = jnp.sum(flux_n * w) / n
            std = jnp.sqrt(jnp.sum(((flux_n - mean) ** 2) * w) / n)
            loss = l1 / jnp.maximum(std, 1e-8)
        else:
            loss = l1
        rows = jnp.maximum(batch.valid.sum(), 1)
        return loss, {"l1": l1, "median_fallback_frac": jnp.sum(fallback & batch.valid) / rows}

    def predict(self, model, batch: SpectrumBatch) -> dict[str, Any]:
        flux_n, ivar_n, scale, fallback = _model_inputs(batch)
        recon = model(flux_n, batch.mask, batch.wavelength, train=False).astype(jnp.float32)
        w = self._weights(batch)
        per_spec_l1 = jnp.sum(jnp.abs(recon - flux_n) * w, -1) / jnp.maximum(w.sum(-1), 1.0)
        chi2 = jnp.sum((recon - flux_n) ** 2 * ivar_n * w, -1) / jnp.maximum(w.sum(-1), 1.0)
        return {"recon_l1": per_spec_l1, "recon_chi2_per_pixel": chi2, "norm_scale": scale,
                "median_fallback": fallback, "reconstruction": recon * scale[:, None]}

    def metrics(self, out: dict[str, np.ndarray]) -> dict[str, float]:
        v = out["valid"]
        return {"recon_l1": float(np.mean(out["recon_l1"][v])),
                "recon_l1_median": float(np.median(out["recon_l1"][v])),
                "recon_chi2_per_pixel_median": float(np.median(out["recon_chi2_per_pixel"][v])),
                "median_fallback_frac": float(np.mean(out["median_fallback"][v])),
                "n": int(v.sum())}

    def figures(self, out, examples: SpectrumBatch, workdir: Path, n: int) -> list[Path]:
        from spectrax import plots
        return [plots.reconstructions(examples, out["reconstruction"], workdir / "reconstructions.png", n)]

    def catalogue(self, out) -> dict[str, np.ndarray]:
        return {"RECON_L1": out["recon_l1"], "RECON_CHI2": out["recon_chi2_per_pixel"],
                "NORM_SCALE": out["norm_scale"]}


class RedshiftTask:
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

    def loss(self, model, batch: SpectrumBatch, *, train: bool):
        flux_n, _, _, _ = _model_inputs(batch)
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
        flux_n, _, _, _ = _model_inputs(batch)
        return {"z_pred": model(flux_n, batch.mask, batch.wavelength,
                                train=False).astype(jnp.float32)}

    def metrics(self, out) -> dict[str, float]:
        v = out["valid"] & out["label_mask"][:, 0]
        if not v.any():
            return {"n": 0}
        return M.redshift_metrics(out["labels"][:, 0], out["z_pred"], valid=v)

    def figures(self, out, examples, workdir: Path, n: int) -> list[Path]:
        from spectrax import plots
        v = out["valid"] & out["label_mask"][:, 0]
        z, zp = out["labels"][v, 0], out["z_pred"][v]
        return [plots.redshift_scatter(z, zp, workdir / "z_pred_vs_true.png"),
                plots.redshift_residuals(z, zp, workdir / "z_residuals.png")]

    def catalogue(self, out) -> dict[str, np.ndarray]:
        return {"Z_PRED": out["z_pred"]}


TASKS = {"reconstruction": ReconstructionTask, "redshift": RedshiftTask}


def get_task(name: str, **kwargs):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name](**kwargs)
