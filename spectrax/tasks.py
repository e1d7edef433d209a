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

Optional hooks (defaults below in :class:`Task`): ``bind_labels(available)`` lets a task use
labels only when the shards have them (e.g. the survey of each spectrum); ``fit_state(stats, data_dir)``
takes what the task needs from the train split's statistics (label standardisation), and
``state()`` / ``load_state()`` carry it through checkpoints, so fine-tunes and inference reuse the
statistics the model was trained with.

Models are called as ``model(flux, mask, wavelength, train=bool)`` on median-normalised flux,
except models with ``takes_raw_spectra = True`` (the tokenizer family), which normalise inside
and are called as ``model(flux, mask, wavelength, ivar=ivar, train=bool)`` on raw flux.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spectrax import metrics as M
from spectrax.data.preprocess import median_normalise
from spectrax.spectra import CLASS_NAMES, SURVEY_NAMES, SpectrumBatch


class Task:
    """Defaults of the optional hooks (see the module docstring)."""

    label_names: tuple[str, ...] = ()

    def bind_labels(self, available) -> None:
        """Called with the shards' label names before training or prediction."""

    def fit_state(self, label_stats: dict, data_dir=None) -> None:
        """Called with the train split's per-label statistics (``manifest.stats['labels']``)
        and the shard directory (for statistics a task computes itself)."""

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict | None) -> None:
        """Restores what :meth:`state` returned (from a checkpoint's metadata)."""


def forward(model, batch: SpectrumBatch, *, train: bool):
    """Calls ``model`` on ``batch`` with the inputs its family expects (module docstring)."""
    if getattr(model, "takes_raw_spectra", False):
        return model(batch.flux, batch.mask, batch.wavelength, ivar=batch.ivar, train=train)
    flux_n, _, _, _ = median_normalise(batch.flux, batch.ivar, batch.mask)
    return model(flux_n, batch.mask, batch.wavelength, train=train)


def _model_inputs(batch: SpectrumBatch):
    """Median-normalised model inputs; bad pixels are 0 and masked."""
    flux_n, ivar_n, scale, fallback = median_normalise(batch.flux, batch.ivar, batch.mask)
    return flux_n, ivar_n, scale, fallback


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

    def figures(self, out, examples, workdir: Path, n: int) -> list[Path]:
        from spectrax import plots
        batch, pred = examples[0]
        return [plots.reconstructions(batch, pred["reconstruction"],
                                      workdir / "reconstructions.png", n)]

    def catalogue(self, out) -> dict[str, np.ndarray]:
        return {"RECON_L1": out["recon_l1"], "RECON_CHI2": out["recon_chi2_per_pixel"],
                "NORM_SCALE": out["norm_scale"]}


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
    above which a prediction gets ZWARN's OUTSIDE_TRAINED_RANGE bit.
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

    # -- state: the trained redshift range --------------------------------------------------
    def fit_state(self, label_stats: dict, data_dir=None) -> None:
        """Reads the redshift range of the train split (one pass over its labels)."""
        if data_dir is None:
            return
        from spectrax.data import shards
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
        return {"z_train_range": list(self.z_train_range) if self.z_train_range else None}

    def load_state(self, state) -> None:
        if state and state.get("z_train_range"):
            self.z_train_range = tuple(float(v) for v in state["z_train_range"])

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

    def loss(self, model, batch: SpectrumBatch, *, train: bool):
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
        from spectrax import redshift
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
        from spectrax import redshift
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
                     "candidate_chi2": s["candidate_chi2"], "peak_prob": s["peak_prob"]}
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
        zerr = out["z_err"][v] if np.isfinite(out["z_err"][v]).all() else None
        return redshift_report(out, v, out["labels"][v, 0], out["z_pred"][v], zerr=zerr,
                               zwarn=out["zwarn"][v])

    def figures(self, out, examples, workdir: Path, n: int) -> list[Path]:
        from spectrax import plots
        v = out["valid"] & out["label_mask"][:, 0]
        z, zp = out["labels"][v, 0], out["z_pred"][v]
        paths = [plots.redshift_scatter(z, zp, workdir / "z_pred_vs_true.png"),
                 plots.redshift_residuals(z, zp, workdir / "z_residuals.png")]
        zerr = out["z_err"][v] if np.isfinite(out["z_err"][v]).all() else None
        table = _success_table(out, v, z, zp, zerr)
        if table is not None:
            paths.append(_write_success_table(table, workdir))
        return paths

    def catalogue(self, out) -> dict[str, np.ndarray]:
        """Redrock's columns (:mod:`spectrax.redshift`): Z, ZERR, ZWARN, DELTACHI2, SPECTYPE."""
        z = np.asarray(out["z_pred"], np.float64)
        return {"Z": z, "ZERR": np.asarray(out["z_err"], np.float64),
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
    table = _success_table(out, rows, z_true, z_pred, zerr)
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
                np.mean((np.asarray(zwarn) & getattr(_zwarn_bits(), name)) != 0))
    return res


def _zwarn_bits():
    from spectrax.redshift import ZWarn
    return ZWarn


def _success_table(out, rows, z_true, z_pred, zerr=None):
    """The per-S/N-bin success table of the redshift predictions of ``rows`` (None without the
    evaluation's ``snr`` context). QSOs (class id 1, from ``context_class``) get the 3000 km/s
    threshold; without a class column every spectrum is judged by the 1000 km/s one."""
    if "snr" not in out or not np.any(rows):
        return None
    cls = out.get("context_class")
    is_qso = (np.nan_to_num(cls[rows], nan=-1) == CLASS_NAMES.index("QSO")) if cls is not None \
        else np.zeros(int(np.sum(rows)), bool)
    return M.success_by_snr(z_true, z_pred, is_qso, out["snr"][rows], zerr=zerr)


def _write_success_table(table, workdir: Path) -> Path:
    """Writes :func:`_success_table`'s rows as ``workdir/z_success_by_snr.md``."""
    path = workdir / "z_success_by_snr.md"
    note = ("; zerr_coverage: fraction with |Δz| < ZERR (0.683 when calibrated)"
            if "zerr_coverage" in table[0] else "")
    path.write_text("Redshift success per median-S/N bin (|Δz| < 1000 km/s·(1+z), 3000 km/s "
                    f"for QSOs){note}\n\n" + M.format_table(table))
    return path


def _valid_rows(out) -> np.ndarray:
    return np.asarray(out["valid"], bool)


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

    def loss(self, model, batch: SpectrumBatch, *, train: bool):
        from spectrax.models.tokenizer import gaussian_nll
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
        v = _valid_rows(out) & (out["valid_pixels"] > 0)
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
        from spectrax import plots
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


class ClassificationTask(Task):
    """Classes GALAXY=0, QSO=1, STAR=2 (:data:`spectrax.spectra.CLASS_IDS`) from the ``class``
    label column; cross-entropy over labelled valid rows. The model returns logits [B, C]."""

    def __init__(self, label: str = "class", class_names: tuple[str, ...] = CLASS_NAMES):
        self.label_names = (label,)
        self.class_names = tuple(class_names)

    def _target(self, batch):
        w = (batch.label_mask[:, 0] & batch.valid)
        y = jnp.clip(batch.labels[:, 0].astype(jnp.int32), 0, len(self.class_names) - 1)
        return y, w

    def loss(self, model, batch, *, train: bool):
        logits = forward(model, batch, train=train).astype(jnp.float32)
        y, w = self._target(batch)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]
        wf = w.astype(jnp.float32)
        n = jnp.maximum(wf.sum(), 1.0)
        acc = jnp.sum((jnp.argmax(logits, -1) == y) * wf) / n
        return jnp.sum(ce * wf) / n, {"accuracy": acc}

    def predict(self, model, batch) -> dict[str, Any]:
        logits = forward(model, batch, train=False).astype(jnp.float32)
        return {"class_pred": jnp.argmax(logits, -1), "class_prob": jax.nn.softmax(logits)}

    def _selected(self, out):
        v = _valid_rows(out) & out["label_mask"][:, 0]
        return out["labels"][v, 0].astype(int), out["class_pred"][v].astype(int)

    def metrics(self, out) -> dict[str, Any]:
        y, yp = self._selected(out)
        c = len(self.class_names)
        if not len(y):
            return {"n": 0}
        recall = M.per_class_recall(y, yp, c)
        res = {"accuracy": M.accuracy(y, yp), "macro_f1": M.macro_f1(y, yp, c), "n": len(y),
               "confusion_matrix": M.confusion_matrix(y, yp, c).tolist()}
        for k, name in enumerate(self.class_names):
            res[f"recall_{name}"] = float(recall[k])
        return res

    def figures(self, out, examples, workdir: Path, n: int) -> list[Path]:
        from spectrax import plots
        y, yp = self._selected(out)
        if not len(y):
            return []
        cm = M.confusion_matrix(y, yp, len(self.class_names))
        return [plots.confusion(cm, self.class_names, workdir / "confusion_matrix.png")]

    def catalogue(self, out) -> dict[str, np.ndarray]:
        names = np.array(self.class_names)
        return {"CLASS_PRED": names[out["class_pred"].astype(int)],
                **{f"PROB_{c}": out["class_prob"][:, k] for k, c in enumerate(self.class_names)}}


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

    def loss(self, model, batch, *, train: bool):
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
            v = _valid_rows(out) & out["label_mask"][:, k]
            if not v.any():
                continue
            y, yp = out["labels"][v, k].astype(np.float64), out["pred"][v, k].astype(np.float64)
            sigma = max(float(np.std(y - yp)), 1e-12)
            res.update({f"{name}_scaled_mad": M.scaled_mad(y, yp), f"{name}_rmse": M.rmse(y, yp),
                        f"{name}_bias": float(np.mean(yp - y)), f"{name}_r2": M.r2(y, yp),
                        f"{name}_crps": M.crps_gaussian(y, yp, np.full_like(y, sigma)),
                        f"n_{name}": int(v.sum())})
            if name == "z":
                res.update({f"z_{k2}": v2 for k2, v2 in redshift_report(out, v, y, yp).items()})
            if name.lower() in ("feh", "fe_h"):  # SpectraFM's stage-3 evaluation
                poor = y < -1.0
                if poor.any():
                    res[f"{name}_rmse_iron_poor"] = M.rmse(y[poor], yp[poor])
                    res["n_iron_poor"] = int(poor.sum())
        return res

    def figures(self, out, examples, workdir: Path, n: int) -> list[Path]:
        from spectrax import plots
        v = _valid_rows(out)[:, None] & out["label_mask"]
        paths = [plots.label_scatter(out["labels"], out["pred"], v, self.label_names,
                                     workdir / "labels_pred_vs_true.png")]
        if "z" in self.label_names:
            k = self.label_names.index("z")
            rows = _valid_rows(out) & out["label_mask"][:, k]
            table = _success_table(out, rows, out["labels"][rows, k], out["pred"][rows, k])
            if table is not None:
                paths.append(_write_success_table(table, workdir))
        return paths

    def catalogue(self, out) -> dict[str, np.ndarray]:
        return {f"{name.upper()}_PRED": out["pred"][:, k]
                for k, name in enumerate(self.label_names)}


TASKS = {"reconstruction": ReconstructionTask, "redshift": RedshiftTask,
         "tokenizer_reconstruction": TokenizerReconstructionTask,
         "classification": ClassificationTask, "regression": RegressionTask}


def _spectrafm_task(**kwargs):
    from spectrax.tasks_spectrafm import SpectraFMTask  # imports this module: load on demand
    return SpectraFMTask(**kwargs)


TASKS["spectrafm"] = _spectrafm_task


def get_task(name: str, **kwargs):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name](**kwargs)
