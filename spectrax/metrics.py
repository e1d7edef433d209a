"""Evaluation metrics with the exact definitions of SPECS.md section 5.

All functions take numpy (or JAX, via ``np.asarray``) arrays of shape [N] and return Python
floats (or small numpy arrays for per-class results). They are host-side: call them on the
gathered predictions of an evaluation, not inside jitted code.

Shared rules, applied by every function:
- ``valid``: optional [N] bool array; False rows (e.g. batch padding) are excluded before
  anything else, so NaN in excluded rows is fine.
- Empty input (after ``valid``) raises ValueError naming the function.
- NaN or ±inf in the remaining rows raises ValueError saying how many: a metric that silently
  skipped them would report a number for a different sample than the one asked for.
- Redshift metrics use Δz = z_true − z_pred, normalised by (1 + z_true).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

# Scale of the normalised median absolute deviation. SPECS/SpecPT use 1.48; 1.4826 (= 1/Φ⁻¹(3/4))
# is the exact Gaussian consistency factor used by astroNN / Leung & Bovy.
NMAD_SCALE = 1.48
GAUSSIAN_MAD_SCALE = 1.4826
# Redshift success thresholds: 1000 km/s and 3000 km/s in units of c, times (1 + z).
GALAXY_DZ_TOLERANCE = 0.00334
QSO_DZ_TOLERANCE = 0.01001
OUTLIER_THRESHOLD = 0.15


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------

def _select(name: str, arrays: dict[str, Any], valid: Any = None,
            dtype: Any = np.float64) -> list[np.ndarray]:
    """Returns the named arrays as 1-D ``dtype`` arrays restricted to ``valid`` rows.

    Raises ValueError (naming ``name``) on differing shapes, non-1-D input, a non-bool
    ``valid``, no rows left, or non-finite values in the rows kept.
    """
    arrs = {k: np.asarray(v) for k, v in arrays.items()}
    shapes = {k: a.shape for k, a in arrs.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(f"{name}: inputs must be 1-D arrays of equal length, got {shapes}")
    if valid is not None:
        valid = np.asarray(valid)
        if valid.dtype != bool or valid.shape != first:
            raise ValueError(f"{name}: valid must be a bool array of shape {first}, got "
                             f"{valid.dtype} {valid.shape}")
        arrs = {k: a[valid] for k, a in arrs.items()}
    n = next(iter(arrs.values())).shape[0]
    if n == 0:
        raise ValueError(f"{name}: empty input (no valid rows)")
    out = []
    for key, arr in arrs.items():
        arr = arr.astype(dtype) if dtype is not None else arr
        if arr.dtype.kind == "f":
            bad = int((~np.isfinite(arr)).sum())
            if bad:
                raise ValueError(f"{name}: {bad} of {n} values of '{key}' are NaN or inf; "
                                 "exclude them with valid= or fix the input")
        out.append(arr)
    return out


def _labels(name: str, y: Any, yhat: Any, valid: Any,
            num_classes: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Integer class ids in [0, num_classes) (num_classes inferred as max id + 1 if None)."""
    y, yhat = _select(name, {"y": y, "yhat": yhat}, valid)
    for key, arr in (("y", y), ("yhat", yhat)):
        if np.any(arr != np.round(arr)) or np.any(arr < 0):
            raise ValueError(f"{name}: '{key}' must hold non-negative integer class ids")
    y, yhat = y.astype(np.int64), yhat.astype(np.int64)
    top = int(max(y.max(), yhat.max()))
    if num_classes is None:
        num_classes = top + 1
    elif top >= num_classes:
        raise ValueError(f"{name}: class id {top} is outside [0, {num_classes})")
    return y, yhat, num_classes


# ----------------------------------------------------------------------------------------------
# Redshift
# ----------------------------------------------------------------------------------------------

def _scaled_dz(z_true: np.ndarray, z_pred: np.ndarray) -> np.ndarray:
    """|Δz| / (1 + z_true), [N]."""
    return np.abs(z_true - z_pred) / (1.0 + z_true)


def nmad(z_true: Any, z_pred: Any, scale: float = NMAD_SCALE, valid: Any = None) -> float:
    """Normalised median absolute deviation: ``scale · median(|Δz| / (1 + z_true))``.

    ``scale`` is 1.48 as in SPECS/SpecPT; some codes use 1.4826 (pass ``GAUSSIAN_MAD_SCALE``).
    Note this is the median of |Δz| itself, not of |Δz − median Δz|: a constant bias counts.

    Args:
      z_true, z_pred: [N] redshifts (dimensionless). valid: optional [N] bool.
    """
    zt, zp = _select("nmad", {"z_true": z_true, "z_pred": z_pred}, valid)
    return float(scale * np.median(_scaled_dz(zt, zp)))


def outlier_fraction(z_true: Any, z_pred: Any, threshold: float = OUTLIER_THRESHOLD,
                     valid: Any = None) -> float:
    """η: fraction of objects with |Δz| / (1 + z_true) > ``threshold`` (strict), in [0, 1]."""
    zt, zp = _select("outlier_fraction", {"z_true": z_true, "z_pred": z_pred}, valid)
    return float(np.mean(_scaled_dz(zt, zp) > threshold))


def redshift_success_rate(z_true: Any, z_pred: Any, is_qso: Any, valid: Any = None) -> float:
    """Fraction with |Δz| < tol·(1 + z_true): tol 0.00334 (1000 km/s) for galaxies and stars,
    0.01001 (3000 km/s) for QSOs (``is_qso`` [N] bool)."""
    zt, zp, qso = _select("redshift_success_rate",
                          {"z_true": z_true, "z_pred": z_pred, "is_qso": is_qso}, valid,
                          dtype=None)
    zt, zp = zt.astype(np.float64), zp.astype(np.float64)
    tol = np.where(qso.astype(bool), QSO_DZ_TOLERANCE, GALAXY_DZ_TOLERANCE)
    return float(np.mean(np.abs(zt - zp) < tol * (1.0 + zt)))


# S/N bins of the per-bin success table: edges of median per-pixel S/N (last bin open).
SNR_BIN_EDGES = (0.0, 3.0, 5.0, 10.0, 20.0, 50.0, np.inf)


def median_snr(flux: Any, ivar: Any, mask: Any) -> np.ndarray:
    """Median per-pixel S/N (flux · sqrt(ivar)) over each spectrum's valid pixels, as SDSS's
    SN_MEDIAN. flux, ivar, mask: [N, L]; returns [N] float64, NaN for a spectrum without valid
    pixels."""
    flux, ivar = np.asarray(flux, np.float64), np.asarray(ivar, np.float64)
    ok = np.asarray(mask, bool) & (ivar > 0) & np.isfinite(flux) & np.isfinite(ivar)
    snr = np.where(ok, flux * np.sqrt(np.where(ok, ivar, 0.0)), np.nan)
    out = np.full(snr.shape[0], np.nan)
    has = ok.any(axis=1)
    if has.any():
        out[has] = np.nanmedian(snr[has], axis=1)
    return out


def zerr_coverage(z_true: Any, z_pred: Any, zerr: Any, valid: Any = None) -> float:
    """Fraction of objects with |z_true − z_pred| < zerr: 0.683 for calibrated 1σ errors
    (catastrophic failures count as not covered). zerr: [N], ≥ 0."""
    zt, zp, ze = _select("zerr_coverage", {"z_true": z_true, "z_pred": z_pred, "zerr": zerr},
                         valid)
    if np.any(ze < 0):
        raise ValueError(f"zerr_coverage: {int((ze < 0).sum())} values of 'zerr' are < 0")
    return float(np.mean(np.abs(zt - zp) < ze))


def success_by_snr(z_true: Any, z_pred: Any, is_qso: Any, snr: Any,
                   edges: tuple[float, ...] = SNR_BIN_EDGES,
                   zerr: Any = None) -> list[dict[str, Any]]:
    """The per-S/N-bin redshift table (SPECS.md §2): for each bin [lo, hi) of median S/N, the
    count, the success rate (|Δz| < 1000 km/s·(1+z) for galaxies and stars, 3000 km/s for
    QSOs, see :func:`redshift_success_rate`), NMAD and outlier fraction, and with ``zerr`` [N]
    the ZERR coverage (:func:`zerr_coverage`); a last row "all". Spectra whose S/N is NaN (no
    valid pixel) only count in "all". Empty bins are listed with n = 0 and None rates, so every
    table has the same rows."""
    arrays = {"z_true": z_true, "z_pred": z_pred, "is_qso": is_qso, "snr": snr}
    if zerr is not None:
        arrays["zerr"] = zerr
    selected = _select("success_by_snr", arrays, dtype=None)
    zt, zp, qso, sn = selected[:4]
    ze = selected[4].astype(np.float64) if zerr is not None else None
    zt, zp = zt.astype(np.float64), zp.astype(np.float64)
    sn = sn.astype(np.float64)
    if not (np.isfinite(zt).all() and np.isfinite(zp).all()):
        raise ValueError("success_by_snr: non-finite redshifts; select valid rows first")
    rows = []
    bins = [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])] + [(None, None)]
    for lo, hi in bins:
        sel = np.ones_like(zt, bool) if lo is None else (sn >= lo) & (sn < hi)
        n = int(sel.sum())
        label = "all" if lo is None else (f"{lo:g}-{hi:g}" if np.isfinite(hi) else f">={lo:g}")
        row = {"snr_bin": label, "n": n, "n_qso": int(qso[sel].astype(bool).sum()),
               "success": None, "nmad": None, "eta": None}
        if ze is not None:
            row["zerr_coverage"] = None
        if n:
            row.update(success=redshift_success_rate(zt[sel], zp[sel], qso[sel].astype(bool)),
                       nmad=nmad(zt[sel], zp[sel]), eta=outlier_fraction(zt[sel], zp[sel]))
            if ze is not None:
                row["zerr_coverage"] = zerr_coverage(zt[sel], zp[sel], ze[sel])
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A list of equal-keyed dicts as a markdown table (floats to 4 significant digits)."""
    keys = list(rows[0])
    fmt = lambda v: ("n/a" if v is None else f"{v:.4g}" if isinstance(v, float)  # noqa: E731
                     else str(v))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def redshift_metrics(z_true: Any, z_pred: Any, valid: Any = None) -> dict[str, float]:
    """{"nmad", "eta", "r2", "rmse", "n"} for one set of redshift predictions (n is an int)."""
    zt, zp = _select("redshift_metrics", {"z_true": z_true, "z_pred": z_pred}, valid)
    return {"nmad": nmad(zt, zp), "eta": outlier_fraction(zt, zp), "r2": r2(zt, zp),
            "rmse": rmse(zt, zp), "n": int(zt.shape[0])}


# ----------------------------------------------------------------------------------------------
# Regression
# ----------------------------------------------------------------------------------------------

def r2(y: Any, yhat: Any, valid: Any = None) -> float:
    """Coefficient of determination ``1 − Σ(y − ŷ)² / Σ(y − ȳ)²``.

    When y is constant the denominator is 0 and R² is undefined: this returns ``nan`` (not an
    error, so a degenerate evaluation batch does not crash a training run; check for it).
    """
    y, yhat = _select("r2", {"y": y, "yhat": yhat}, valid)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot == 0.0:
        return float("nan")
    return float(1.0 - np.sum((y - yhat) ** 2) / ss_tot)


def rmse(y: Any, yhat: Any, valid: Any = None) -> float:
    """Root mean squared error ``sqrt(mean((y − ŷ)²))``, in the unit of y."""
    y, yhat = _select("rmse", {"y": y, "yhat": yhat}, valid)
    return float(np.sqrt(np.mean((y - yhat) ** 2)))


def scaled_mad(y: Any, yhat: Any, valid: Any = None) -> float:
    """Leung & Bovy scaled MAD: ``1.4826 · median(|r − median r|)``, r = y − ŷ (unit of y)."""
    y, yhat = _select("scaled_mad", {"y": y, "yhat": yhat}, valid)
    r = y - yhat
    return float(GAUSSIAN_MAD_SCALE * np.median(np.abs(r - np.median(r))))


def scatter(y: Any, yhat: Any, valid: Any = None) -> float:
    """SpectraFM's "scatter": ``median(|y − ŷ|)``, unscaled and not bias-removed (unit of y)."""
    y, yhat = _select("scatter", {"y": y, "yhat": yhat}, valid)
    return float(np.median(np.abs(y - yhat)))


_erf = np.vectorize(math.erf, otypes=[np.float64])


def crps_gaussian(y: Any, mu: Any, sigma: Any, valid: Any = None) -> float:
    """Mean CRPS of Gaussian predictions N(μ, σ²) at observations y (unit of y; lower is better).

    Per sample ``σ [z (2Φ(z) − 1) + 2φ(z) − 1/√π]`` with ``z = (y − μ)/σ`` (closed form of
    ∫ (F(x) − 1{x ≥ y})² dx for a Gaussian F). σ must be > 0 everywhere (ValueError otherwise).
    """
    y, mu, sigma = _select("crps_gaussian", {"y": y, "mu": mu, "sigma": sigma}, valid)
    if np.any(sigma <= 0):
        raise ValueError(f"crps_gaussian: {int((sigma <= 0).sum())} values of 'sigma' are <= 0")
    z = (y - mu) / sigma
    cdf = 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    crps = sigma * (z * (2.0 * cdf - 1.0) + 2.0 * pdf - 1.0 / math.sqrt(math.pi))
    return float(np.mean(crps))


# ----------------------------------------------------------------------------------------------
# Classification (integer class ids, e.g. spectrax.spectra.CLASS_IDS)
# ----------------------------------------------------------------------------------------------

def confusion_matrix(y: Any, yhat: Any, num_classes: int | None = None,
                     valid: Any = None) -> np.ndarray:
    """[C, C] int64 counts; rows are true classes, columns predicted classes.

    ``num_classes`` defaults to the largest id seen + 1; pass it so that the shape does not
    depend on which classes happen to occur.
    """
    return _confusion("confusion_matrix", y, yhat, num_classes, valid)


def _confusion(name: str, y: Any, yhat: Any, num_classes: int | None, valid: Any) -> np.ndarray:
    """:func:`confusion_matrix` with errors attributed to the public function ``name``."""
    y, yhat, c = _labels(name, y, yhat, valid, num_classes)
    cm = np.zeros((c, c), np.int64)
    np.add.at(cm, (y, yhat), 1)
    return cm


def accuracy(y: Any, yhat: Any, valid: Any = None) -> float:
    """Fraction of exactly matching class ids."""
    y, yhat, _ = _labels("accuracy", y, yhat, valid, None)
    return float(np.mean(y == yhat))


def per_class_recall(y: Any, yhat: Any, num_classes: int | None = None,
                     valid: Any = None) -> np.ndarray:
    """[C] float64 recall TP / (TP + FN) per true class; NaN for a class with no true samples."""
    cm = _confusion("per_class_recall", y, yhat, num_classes, valid)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / support, np.nan)


def macro_f1(y: Any, yhat: Any, num_classes: int | None = None, valid: Any = None) -> float:
    """Unweighted mean over classes of F1 = 2TP / (2TP + FP + FN).

    The mean runs over classes that occur in y or ŷ (scikit-learn's default); a class present
    in neither has no defined F1 and is left out rather than counted as 0 or 1.
    """
    cm = _confusion("macro_f1", y, yhat, num_classes, valid)
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    present = (tp + fp + fn) > 0
    return float(np.mean(2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])))
