"""Autoencoding: reproduce the median-normalised flux at every valid pixel (SpecPT)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from spectrax import plots
from spectrax.spectra import SpectrumBatch
from spectrax.tasks.base import Task, model_inputs


class ReconstructionTask(Task):
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

    def loss(self, model, batch: SpectrumBatch, *, train: bool, rng=None):
        flux_n, _, _, fallback = model_inputs(batch)
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
        flux_n, ivar_n, scale, fallback = model_inputs(batch)
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

    def figures(self, out, examples, workdir: Path, n: int) -> list[Path]:
        batch, pred = examples[0]
        return [plots.reconstructions(batch, pred["reconstruction"],
                                      workdir / "reconstructions.png", n)]

    def catalogue(self, out) -> dict[str, np.ndarray]:
        return {"RECON_L1": out["recon_l1"], "RECON_CHI2": out["recon_chi2_per_pixel"],
                "NORM_SCALE": out["norm_scale"]}
