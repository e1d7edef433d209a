"""Redshift from a spectrum (learned distributions over ln(1+z), or the SpecPT paper heads), and
the redshift metrics every task that predicts z reports."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spectrax import metrics as M
from spectrax import plots, redshift
from spectrax.data import shards
from spectrax.spectra import CLASS_NAMES, SpectrumBatch
from spectrax.tasks.base import Task, forward


class RedshiftTask(Task):
    """Redshifts, as a distribution over ln(1+z) bins or as one regressed number.

    Which one follows from the model:

    * Models with ``outputs_redshift_logits`` (the ``zscan`` learned matched filter) return
      a distribution over the bins of their ``ln1pz_grid``: a mixture of one Gaussian per bin
      ([B, M, 3], :func:`spectrax.redshift.split_output`), trained by the negative
      log-likelihood of the true ln(1+z) (a proper score: probabilities, sub-bin offsets and
      widths are all fitted), or logits only ([B, M]), trained by a cross-entropy against the
      true redshift spread over the two bins around it in proportion to its distance from
      their centres (``target="two_hot"``: the target's mean is exactly ln(1+z_true)) or
      against a Gaussian of ``target_sigma_bins`` bins (``target="gaussian"``). Rows whose
      redshift lies outside the model's bins are left out of the loss and counted
      (``outside_grid_frac``). A fixed tenth
      of the training spectra (:func:`spectrax.redshift.is_holdout`) never enters the
      cross-entropy: on them a pinball loss trains the model's ``zerr_coefficients`` (from
      stop-gradient logits) so that ZERR is the 68.27 % quantile of |Δz| on spectra the model
      has not fitted (``holdout_zerr_coverage`` in the training log). Predictions: Z, ZERR,
      DELTACHI2, ZWARN and candidates for the χ² refinement, read off the distribution by
      :func:`spectrax.redshift.summarise_logits`.
    * Other models (the SpecPT paper heads) return z [B]. Loss: the SpecPT NMAD loss,
      mean(|z_pred − z_true|) / norm over labelled valid rows, with norm = std(z_true) of the
      batch (``norm="std"``, clamped at 1e-8) or median(|z − median z|) (``norm="mad"``). They
      give no uncertainty: their catalogue's ZERR and DELTACHI2 are NaN.

    State (checkpointed): the redshift range of the training split, ``z_train_range``, below or
    above which a prediction gets ZWARN's OUTSIDE_TRAINED_RANGE bit, and for distribution
    models ``zerr_calibration``: after the last training step the ZERR the model gives is
    recalibrated against S/N (:func:`spectrax.redshift.fit_zerr_calibration`) on the validation
    split and the held-out tenth of the training split, because the in-model calibration (one
    scale for all S/N, fitted by SGD on ~3 held-out spectra per batch) left the coverage
    drifting with S/N (0.55 at S/N 1–2, 0.75 at 10–20 on simulated BGS). Predictions carry each
    spectrum's ``median_snr``; the catalogue's and the metrics' ZERR is :meth:`zerr`.
    """

    label_names = ("z",)
    TARGETS = ("two_hot", "gaussian")

    def __init__(self, norm: str = "std", target: str = "two_hot",
                 target_sigma_bins: float = 1.0, n_candidates: int = 3):
        if norm not in ("std", "mad"):
            raise ValueError(f"redshift norm must be 'std' or 'mad', got {norm!r}")
        if target not in self.TARGETS:
            raise ValueError(f"redshift target must be one of {self.TARGETS}, got {target!r}")
        if n_candidates < 2:
            raise ValueError("n_candidates must be ≥ 2 (the runner-up gives DELTACHI2)")
        self.norm = norm
        self.target = target
        self.target_sigma_bins = float(target_sigma_bins)
        self.n_candidates = int(n_candidates)
        self.z_train_range: tuple[float, float] | None = None
        self.zerr_calibration: dict | None = None

    # -- state: the trained redshift range --------------------------------------------------
    def fit_state(self, label_stats: dict, data_dir=None) -> None:
        """Reads the redshift range of the train split (one pass over its labels)."""
        if data_dir is None:
            return
        manifest = shards.read_manifest(data_dir)
        if "z" not in manifest.label_names:
            return
        j = manifest.label_names.index("z")
        lo, hi = math.inf, -math.inf
        for rec in shards.iter_records(data_dir, "train"):
            v = float(rec["labels"][j])
            if math.isfinite(v):
                lo, hi = min(lo, v), max(hi, v)
        if lo <= hi:
            self.z_train_range = (lo, hi)

    def state(self) -> dict:
        return {"z_train_range": list(self.z_train_range) if self.z_train_range else None,
                "zerr_calibration": self.zerr_calibration}

    def load_state(self, state) -> None:
        if state and state.get("z_train_range"):
            self.z_train_range = tuple(float(v) for v in state["z_train_range"])
        if state:
            self.zerr_calibration = state.get("zerr_calibration")

    # -- post-training ZERR calibration -------------------------------------------------------
    def calibration_splits(self, model) -> tuple[str, ...]:
        return ("val", "train") if self._is_distribution(model) else ()

    def calibrate(self, outputs: dict[str, dict]) -> None:
        """Fits ``zerr_calibration`` on the validation split and the held-out tenth of the
        training split (:func:`spectrax.redshift.is_holdout`: never in the model's loss), for
        distribution models (their predictions carry ``median_snr``); others keep None."""
        parts = []
        for split, out in outputs.items():
            if "median_snr" not in out:
                return
            v = out["valid"] & out["label_mask"][:, 0] & np.isfinite(out["z_err"])
            if split == "train":
                v &= np.asarray(redshift.is_holdout(out["labels"][:, 0]))
            parts.append((out["labels"][v, 0], out["z_pred"][v], out["z_err"][v],
                          out["median_snr"][v]))
        if not parts or sum(len(p[0]) for p in parts) < 30:
            return
        self.zerr_calibration = redshift.fit_zerr_calibration(
            *(np.concatenate([p[i] for p in parts]) for i in range(4)), per_group=150)

    def zerr(self, out) -> np.ndarray:
        """[N] ZERR of predictions ``out``: the model's, through ``zerr_calibration`` when the
        task has one."""
        if self.zerr_calibration is None or "median_snr" not in out:
            return np.asarray(out["z_err"], np.float64)
        return redshift.calibrate_zerr(out["z_pred"], out["z_err"], self.zerr_calibration,
                                       out["median_snr"])

    # -- loss ---------------------------------------------------------------------------------
    def _target(self, batch):
        w = (batch.label_mask[:, 0] & batch.valid).astype(jnp.float32)
        return batch.labels[:, 0], w

    @staticmethod
    def _is_distribution(model) -> bool:
        return bool(getattr(model, "outputs_redshift_logits", False))

    def _bin_targets(self, grid: np.ndarray, z):
        """[B, M] target distribution over the bins and [B] in-grid flags for true z [B]."""
        m = grid.size
        dlog = float((grid[-1] - grid[0]) / (m - 1))
        pos = (jnp.log1p(jnp.maximum(z, -0.999)) - grid[0]) / dlog     # fractional bin
        inside = (pos >= 0) & (pos <= m - 1) & jnp.isfinite(pos)
        pos = jnp.clip(jnp.where(inside, pos, 0.0), 0.0, m - 1)
        bins = jnp.arange(m)[None]
        if self.target == "two_hot":
            lo = jnp.floor(pos)
            frac = (pos - lo)[:, None]
            t = jnp.where(bins == lo[:, None], 1.0 - frac, 0.0) + jnp.where(
                bins == lo[:, None] + 1, frac, 0.0)
        else:
            t = jax.nn.softmax(-0.5 * ((bins - pos[:, None]) / self.target_sigma_bins) ** 2, -1)
        return t, inside

    def loss(self, model, batch: SpectrumBatch, *, train: bool, rng=None):
        z, w = self._target(batch)
        if self._is_distribution(model):
            return self._distribution_loss(model, batch, z, w, train)
        z_pred = forward(model, batch, train=train).astype(jnp.float32)
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

    def _distribution_loss(self, model, batch, z, w, train: bool):
        """Cross-entropy over the bins on the training rows, plus the ZERR calibration's
        pinball loss on the held-out rows (:func:`spectrax.redshift.is_holdout`)."""
        output = forward(model, batch, train=train).astype(jnp.float32)
        grid = model.ln1pz_grid
        dlog = float((grid[-1] - grid[0]) / (grid.size - 1))
        t, inside = self._bin_targets(grid, z)
        w_in = w * inside
        held = redshift.is_holdout(z).astype(jnp.float32)
        w_main = w_in * (1.0 - held)
        if output.ndim == 3:      # sub-bin mixture: the likelihood of the true position
            position = jnp.clip((jnp.log1p(jnp.maximum(z, -0.999)) - grid[0]) / dlog, 0.0,
                                grid.size - 1)
            per_row = redshift.mixture_nll(output, position)
        else:
            per_row = -jnp.sum(t * jax.nn.log_softmax(output, -1), axis=-1)
        loss = jnp.sum(jnp.where(w_main > 0, per_row, 0.0)) / jnp.maximum(w_main.sum(), 1.0)
        aux = {"outside_grid_frac": jnp.sum(w * (1 - inside)) / jnp.maximum(w.sum(), 1.0)}
        frozen = jax.lax.stop_gradient(output)
        s = redshift.summarise_logits(frozen, grid, n_candidates=2)
        frac = jnp.abs(s["z"] - z) / (1.0 + z)
        aux["mean_abs_dz_1pz"] = jnp.sum(jnp.where(w_in > 0, frac, 0.0)) / jnp.maximum(
            w_in.sum(), 1.0)
        coefficients = getattr(model, "zerr_coefficients", None)
        if coefficients is not None:
            # |Δ ln(1+z)| in bins of the held-out spectra against the calibrated radius: the
            # pinball loss makes the radius the 68.27 % quantile of |Δ| given the raw radius.
            y = jnp.abs(jnp.log1p(z) - jnp.log1p(s["z"])) / dlog
            r = redshift.calibrated_radius(coefficients[...],
                                           redshift.calibration_features(s["radius_raw"]))
            w_cal = w * held
            n_cal = jnp.maximum(w_cal.sum(), 1.0)
            loss = loss + jnp.sum(w_cal * redshift.pinball(y, r)) / n_cal
            aux["holdout_zerr_coverage"] = jnp.sum(w_cal * (y < r)) / n_cal
        return loss, aux

    # -- predictions --------------------------------------------------------------------------
    def predict(self, model, batch: SpectrumBatch) -> dict[str, Any]:
        """[B] ``z_pred``, ``z_err``, ``delta_chi2``, ``zwarn`` (int32) and, for distribution
        models, ``z_candidates`` / ``candidate_ok`` / ``candidate_chi2`` [B, K] and
        ``peak_prob``."""
        nodata = ~jnp.any(batch.mask & (batch.ivar > 0), axis=-1)
        if self._is_distribution(model):
            logits = forward(model, batch, train=False).astype(jnp.float32)
            coefficients = getattr(model, "zerr_coefficients", None)
            s = redshift.summarise_logits(
                logits, model.ln1pz_grid, n_candidates=self.n_candidates,
                zerr_coefficients=None if coefficients is None else coefficients[...])
            z, z_err, dchi2 = s["z"], s["z_err"], s["delta_chi2"]
            small, at_limit = dchi2 < redshift.SMALL_DELTA_CHI2, s["at_edge"]
            extra = {"z_candidates": s["z_candidates"], "candidate_ok": s["candidate_ok"],
                     "candidate_chi2": s["candidate_chi2"], "peak_prob": s["peak_prob"],
                     "median_snr": redshift.batch_snr(batch.flux, batch.ivar, batch.mask)}
        else:
            z = forward(model, batch, train=False).astype(jnp.float32)
            z_err = dchi2 = jnp.full_like(z, jnp.nan)
            small = at_limit = jnp.zeros_like(nodata)
            extra = {}
        outside = redshift.outside_range(z, self.z_train_range)
        bits = redshift.ZWarn
        zwarn = (jnp.where(nodata, bits.NODATA, 0) | jnp.where(small, bits.SMALL_DELTA_CHI2, 0)
                 | jnp.where(at_limit, bits.Z_FITLIMIT, 0)
                 | jnp.where(outside, bits.OUTSIDE_TRAINED_RANGE, 0)).astype(jnp.int32)
        return {"z_pred": z, "z_err": z_err, "delta_chi2": dchi2, "zwarn": zwarn, **extra}

    def metrics(self, out) -> dict[str, Any]:
        v = out["valid"] & out["label_mask"][:, 0]
        if not v.any():
            return {"n": 0}
        zerr = self.zerr(out)[v]
        zerr = zerr if np.isfinite(zerr).all() else None
        return redshift_report(out, v, out["labels"][v, 0], out["z_pred"][v], zerr=zerr,
                               zwarn=out["zwarn"][v])

    def figures(self, out, examples, workdir: Path, n: int) -> list[Path]:
        v = out["valid"] & out["label_mask"][:, 0]
        z, zp = out["labels"][v, 0], out["z_pred"][v]
        paths = [plots.redshift_scatter(z, zp, workdir / "z_pred_vs_true.png"),
                 plots.redshift_residuals(z, zp, workdir / "z_residuals.png")]
        zerr = self.zerr(out)[v]
        zerr = zerr if np.isfinite(zerr).all() else None
        table = success_table(out, v, z, zp, zerr)
        if table is not None:
            paths.append(write_success_table(table, workdir))
        return paths

    def catalogue(self, out) -> dict[str, np.ndarray]:
        """Redrock's columns (:mod:`spectrax.redshift`): Z, ZERR, ZWARN, DELTACHI2, SPECTYPE."""
        z = np.asarray(out["z_pred"], np.float64)
        return {"Z": z, "ZERR": self.zerr(out),
                "ZWARN": np.asarray(out["zwarn"], np.int32),
                "DELTACHI2": np.asarray(out["delta_chi2"], np.float64),
                "SPECTYPE": np.full(z.shape, "GALAXY")}


def redshift_report(out, rows, z_true, z_pred, *, zerr=None, zwarn=None) -> dict[str, Any]:
    """The redshift metrics of ``rows`` (shared by the redshift task and regression of a label
    named "z"): NMAD, η, R², RMSE, n; with the evaluation's ``snr`` context the success rate and
    the per-S/N table (:func:`spectrax.metrics.success_by_snr`, with the ZERR coverage per bin
    when ``zerr`` is given); with ``zerr`` the fraction of |Δz| < ZERR (``zerr_coverage``,
    0.683 when calibrated); with ``zwarn`` the fraction with ZWARN = 0 and NMAD, η and success
    of those."""
    res: dict[str, Any] = M.redshift_metrics(z_true, z_pred)
    table = success_table(out, rows, z_true, z_pred, zerr)
    if table is not None:
        res["success"], res["success_by_snr"] = table[-1]["success"], table
    else:
        res["success"] = M.redshift_success_rate(z_true, z_pred, np.zeros(len(z_true), bool))
    if zerr is not None:
        res["zerr_coverage"] = M.zerr_coverage(z_true, z_pred, zerr)
    if zwarn is not None:
        good = np.asarray(zwarn) == 0
        res["zwarn0_frac"] = float(good.mean())
        if good.any():
            res["zwarn0_nmad"] = M.nmad(z_true[good], z_pred[good])
            res["zwarn0_eta"] = M.outlier_fraction(z_true[good], z_pred[good])
            res["zwarn0_success"] = M.redshift_success_rate(
                z_true[good], z_pred[good], np.zeros(int(good.sum()), bool))
        for name in ("SMALL_DELTA_CHI2", "Z_FITLIMIT", "NODATA", "OUTSIDE_TRAINED_RANGE"):
            res[f"zwarn_{name.lower()}_frac"] = float(
                np.mean((np.asarray(zwarn) & getattr(redshift.ZWarn, name)) != 0))
    return res


def success_table(out, rows, z_true, z_pred, zerr=None):
    """The per-S/N-bin success table of the redshift predictions of ``rows`` (None without the
    evaluation's ``snr`` context). QSOs (class id 1, from ``context_class``) get the 3000 km/s
    threshold; without a class column every spectrum is judged by the 1000 km/s one."""
    if "snr" not in out or not np.any(rows):
        return None
    cls = out.get("context_class")
    is_qso = (np.nan_to_num(cls[rows], nan=-1) == CLASS_NAMES.index("QSO")) if cls is not None \
        else np.zeros(int(np.sum(rows)), bool)
    return M.success_by_snr(z_true, z_pred, is_qso, out["snr"][rows], zerr=zerr)


def write_success_table(table, workdir: Path) -> Path:
    """Writes :func:`success_table`'s rows as ``workdir/z_success_by_snr.md``."""
    path = workdir / "z_success_by_snr.md"
    note = ("; zerr_coverage: fraction with |Δz| < ZERR (0.683 when calibrated)"
            if "zerr_coverage" in table[0] else "")
    path.write_text("Redshift success per median-S/N bin (|Δz| < 1000 km/s·(1+z), 3000 km/s "
                    f"for QSOs){note}\n\n" + M.format_table(table))
    return path
