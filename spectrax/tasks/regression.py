"""Regression of standardised labels (stellar parameters, or z with the redshift metrics)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from spectrax import metrics as M
from spectrax import plots
from spectrax.models.spectrafm import IRON_POOR_FE_H
from spectrax.tasks.base import Task, forward, valid_rows
from spectrax.tasks.redshift import redshift_report, success_table, write_success_table


class RegressionTask(Task):
    """Regression of K labels (e.g. ``("teff", "logg", "feh")`` or ``("z",)``), standardised by
    the TRAIN split's mean and std (not divided by a maximum, which breaks for negative [Fe/H]):
    loss = mean over known (row, label) of (ŷ − y)² in standardised units. The statistics are
    part of the task's checkpointed state. The model returns [B, K] standardised values.

    Metrics per label: scaled MAD, RMSE, bias, R² and Gaussian CRPS with the global residual σ
    (SPECS.md §2); NMAD / outlier fraction for a label named ``z``.
    """

    def __init__(self, labels: tuple[str, ...] = ("teff", "logg", "feh")):
        self.label_names = tuple(labels)
        self.mean = None
        self.std = None

    def fit_state(self, label_stats: dict, data_dir=None) -> None:
        missing = [n for n in self.label_names if n not in label_stats]
        if missing:
            raise ValueError(f"the train split has no statistics for labels {missing}; "
                             "re-prepare the shards (spectrax.prepare writes them)")
        self.mean = [float(label_stats[n]["mean"]) for n in self.label_names]
        self.std = [max(float(label_stats[n]["std"]), 1e-12) for n in self.label_names]

    def state(self) -> dict:
        return {"label_names": list(self.label_names), "mean": self.mean, "std": self.std}

    def load_state(self, state) -> None:
        if state and state.get("mean") is not None:
            if tuple(state["label_names"]) != self.label_names:
                raise ValueError(f"checkpoint was trained on labels {state['label_names']}, "
                                 f"the config asks for {list(self.label_names)}")
            self.mean, self.std = state["mean"], state["std"]

    def _stats(self):
        if self.mean is None:
            raise RuntimeError("RegressionTask used before fit_state/load_state gave it label "
                               "statistics")
        return jnp.asarray(self.mean, jnp.float32), jnp.asarray(self.std, jnp.float32)

    def loss(self, model, batch, *, train: bool, rng=None):
        mean, std = self._stats()
        pred = forward(model, batch, train=train).astype(jnp.float32).reshape(
            batch.labels.shape[0], -1)
        w = (batch.label_mask & batch.valid[:, None]).astype(jnp.float32)
        target = (batch.labels - mean) / std
        n = jnp.maximum(w.sum(), 1.0)
        mse = jnp.sum((pred - target) ** 2 * w) / n
        return mse, {"mae_std_units": jnp.sum(jnp.abs(pred - target) * w) / n}

    def predict(self, model, batch) -> dict[str, Any]:
        mean, std = self._stats()
        pred = forward(model, batch, train=False).astype(jnp.float32).reshape(
            batch.labels.shape[0], -1)
        return {"pred": pred * std + mean}

    def metrics(self, out) -> dict[str, float]:
        res: dict[str, float] = {}
        for k, name in enumerate(self.label_names):
            v = valid_rows(out) & out["label_mask"][:, k]
            if not v.any():
                continue
            y, yp = out["labels"][v, k].astype(np.float64), out["pred"][v, k].astype(np.float64)
            sigma = max(float(np.std(y - yp)), 1e-12)
            res.update({f"{name}_scaled_mad": M.scaled_mad(y, yp), f"{name}_rmse": M.rmse(y, yp),
                        f"{name}_bias": float(np.mean(yp - y)), f"{name}_r2": M.r2(y, yp),
                        f"{name}_crps": M.crps_gaussian(y, yp, np.full_like(y, sigma)),
                        f"n_{name}": int(v.sum())})
            if name == "z":
                z_metrics = redshift_report(out, v, y, yp)
                res.update({f"z_{key}": value for key, value in z_metrics.items()})
            if name.lower() in ("feh", "fe_h"):  # SpectraFM's stage-3 evaluation
                poor = y < IRON_POOR_FE_H
                if poor.any():
                    res[f"{name}_rmse_iron_poor"] = M.rmse(y[poor], yp[poor])
                    res["n_iron_poor"] = int(poor.sum())
        return res

    def figures(self, out, examples, workdir: Path, n: int) -> list[Path]:
        v = valid_rows(out)[:, None] & out["label_mask"]
        paths = [plots.label_scatter(out["labels"], out["pred"], v, self.label_names,
                                     workdir / "labels_pred_vs_true.png")]
        if "z" in self.label_names:
            k = self.label_names.index("z")
            rows = valid_rows(out) & out["label_mask"][:, k]
            table = success_table(out, rows, out["labels"][rows, k], out["pred"][rows, k])
            if table is not None:
                paths.append(write_success_table(table, workdir))
        return paths

    def catalogue(self, out) -> dict[str, np.ndarray]:
        return {f"{name.upper()}_PRED": out["pred"][:, k]
                for k, name in enumerate(self.label_names)}
