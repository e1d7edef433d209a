"""The universal tokenizer's self-supervised objective (Gaussian-likelihood reconstruction)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from spectrax import plots
from spectrax.models.tokenizer import gaussian_nll
from spectrax.spectra import SURVEY_NAMES, SpectrumBatch
from spectrax.tasks.base import Task, valid_rows


class TokenizerReconstructionTask(Task):
    """The tokenizer's self-supervised objective: Gaussian NLL of the reconstruction over valid
    pixels, L = (1/N_valid) Σ m (y − ŷ)² / σ² in median-normalised units (SPECS.md §3).

    Uses the ``survey`` label column when the shards have one, to report the loss per survey
    and draw reconstructions per survey. ``batch_mean``: "pixels" (the paper's 1/N_valid over the
    whole batch) — the only option, kept explicit for the record.
    """

    SURVEY = "survey"

    def __init__(self):
        self.label_names: tuple[str, ...] = ()

    def bind_labels(self, available) -> None:
        self.label_names = (self.SURVEY,) if self.SURVEY in available else ()

    def state(self) -> dict:
        return {"label_names": list(self.label_names)}

    def load_state(self, state) -> None:
        if state and "label_names" in state:
            self.label_names = tuple(state["label_names"])

    def _output(self, model, batch, train):
        out = model(batch.flux, batch.mask, batch.wavelength, ivar=batch.ivar, train=train)
        return out, out.pixel_mask & batch.valid[:, None]

    def loss(self, model, batch: SpectrumBatch, *, train: bool, rng=None):
        out, w = self._output(model, batch, train)
        loss = gaussian_nll(out.reconstruction, out.flux, out.sigma, w)
        return loss, {"valid_pixel_frac": w.sum() / jnp.maximum(
            (batch.wavelength > 0).sum(), 1), "valid_token_frac": out.token_mask.mean()}

    def predict(self, model, batch: SpectrumBatch) -> dict[str, Any]:
        out, w = self._output(model, batch, False)
        wf = w.astype(jnp.float32)
        r2 = jnp.where(w, (out.reconstruction - out.flux) ** 2 / jnp.where(
            w, out.sigma, 1.0) ** 2, 0.0)
        n = wf.sum(-1)
        return {"nll_per_pixel": r2.sum(-1) / jnp.maximum(n, 1.0), "valid_pixels": n,
                "norm_scale": out.scale,
                "reconstruction": out.reconstruction * out.scale[:, None]}

    def _surveys(self, out) -> np.ndarray | None:
        if self.SURVEY not in self.label_names:
            return None
        j = self.label_names.index(self.SURVEY)
        return np.where(out["label_mask"][:, j], out["labels"][:, j], -1).astype(int)

    def metrics(self, out) -> dict[str, float]:
        v = valid_rows(out) & (out["valid_pixels"] > 0)
        # Pixel-weighted, as the loss: Σ (y − ŷ)²/σ² / Σ N_valid.
        def pooled(sel):
            return float(np.sum(out["nll_per_pixel"][sel] * out["valid_pixels"][sel])
                         / max(np.sum(out["valid_pixels"][sel]), 1))
        res = {"nll_per_pixel": pooled(v), "nll_per_pixel_median": float(
            np.median(out["nll_per_pixel"][v])) if v.any() else float("nan"), "n": int(v.sum())}
        surveys = self._surveys(out)
        if surveys is not None:
            for k, name in enumerate(SURVEY_NAMES):
                sel = v & (surveys == k)
                if sel.any():
                    res[f"nll_per_pixel_{name}"] = pooled(sel)
                    res[f"n_{name}"] = int(sel.sum())
        return res

    def figures(self, out, examples, workdir: Path, n: int) -> list[Path]:
        paths, j = [], (self.label_names.index(self.SURVEY) if self.label_names else None)
        groups: dict[str, list] = {}
        for batch, pred in examples:
            for i in np.flatnonzero(np.asarray(batch.valid)):
                name = "all"
                if j is not None and batch.label_mask[i, j]:
                    name = SURVEY_NAMES[int(batch.labels[i, j])]
                groups.setdefault(name, []).append((batch, pred, i))
        for name, rows in groups.items():
            rows = rows[:n]
            if not rows:  # num_figures = 0
                continue
            paths.append(plots.reconstruction_rows(
                rows, workdir / f"reconstructions_{name}.png", title=f"{name}: Gaussian-NLL "
                "reconstruction (normalised units × scale)"))
        return paths

    def catalogue(self, out) -> dict[str, np.ndarray]:
        return {"NLL_PER_PIXEL": out["nll_per_pixel"], "NORM_SCALE": out["norm_scale"]}
