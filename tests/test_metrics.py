"""spectrax.metrics against hand-computed values, numerical integration and invariances."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectrax import metrics as M


# ---------------------------------------------------------------------------------------------
# Redshift metrics, hand-computed
# ---------------------------------------------------------------------------------------------

Z_TRUE = np.array([0.0, 1.0, 0.5, 1.0])
Z_PRED = np.array([0.01, 1.1, 0.5, 0.6])
# |Δz| = [0.01, 0.1, 0, 0.4]; 1 + z_true = [1, 2, 1.5, 2]
# |Δz|/(1+z) = [0.01, 0.05, 0, 0.2] → sorted [0, 0.01, 0.05, 0.2], median = 0.03


def test_nmad_by_hand():
    assert M.nmad(Z_TRUE, Z_PRED) == pytest.approx(1.48 * 0.03)          # 0.0444
    assert M.nmad(Z_TRUE, Z_PRED, scale=1.4826) == pytest.approx(1.4826 * 0.03)


def test_outlier_fraction_by_hand():
    # only 0.2 > 0.15 → 1/4
    assert M.outlier_fraction(Z_TRUE, Z_PRED) == pytest.approx(0.25)
    # threshold 0.04: 0.05 and 0.2 exceed → 2/4 (the comparison is strict '>')
    assert M.outlier_fraction(Z_TRUE, Z_PRED, threshold=0.04) == pytest.approx(0.5)
    assert M.outlier_fraction(Z_TRUE, Z_PRED, threshold=0.2) == 0.0


def test_redshift_success_rate_by_hand():
    zt = np.array([0.0, 1.0, 1.0, 2.0])
    zp = np.array([0.003, 1.006, 1.006, 2.02])
    qso = np.array([False, False, True, True])
    # galaxy z=0: |Δz|=0.003 < 0.00334·1 ✓; galaxy z=1: 0.006 < 0.00668 ✓;
    # QSO z=1: 0.006 < 0.02002 ✓; QSO z=2: 0.02 < 0.03003 ✓ → 4/4
    assert M.redshift_success_rate(zt, zp, qso) == 1.0
    zp2 = np.array([0.004, 1.007, 1.03, 2.02])
    # 0.004 > 0.00334 ✗; 0.007 > 0.00668 ✗; 0.03 > 0.02002 ✗; 0.02 < 0.03003 ✓ → 1/4
    assert M.redshift_success_rate(zt, zp2, qso) == pytest.approx(0.25)


def test_redshift_metrics_dict():
    out = M.redshift_metrics(Z_TRUE, Z_PRED)
    assert set(out) == {"nmad", "eta", "r2", "rmse", "n"}
    assert out["n"] == 4 and isinstance(out["n"], int)
    assert out["nmad"] == pytest.approx(0.0444) and out["eta"] == pytest.approx(0.25)
    # rmse: squares [1e-4, 1e-2, 0, 0.16] sum 0.1701 / 4 = 0.042525 → sqrt = 0.206216...
    assert out["rmse"] == pytest.approx(math.sqrt(0.042525))
    # r2: mean z_true = 0.625; Σ(y−ȳ)² = 0.390625 + 0.140625 + 0.015625 + 0.140625 = 0.6875
    #     1 − 0.1701 / 0.6875 = 0.752581818...
    assert out["r2"] == pytest.approx(1 - 0.1701 / 0.6875)
    for v in out.values():
        assert type(v) in (float, int)


# ---------------------------------------------------------------------------------------------
# Regression metrics
# ---------------------------------------------------------------------------------------------

def test_r2_by_hand_and_perfect():
    y = np.array([1.0, 2.0, 3.0])
    yhat = np.array([1.0, 2.0, 4.0])
    # ȳ = 2, SS_tot = 1 + 0 + 1 = 2, SS_res = 1 → R² = 0.5
    assert M.r2(y, yhat) == pytest.approx(0.5)
    assert M.r2(y, y) == 1.0
    # predicting the mean gives 0
    assert M.r2(y, np.full(3, 2.0)) == pytest.approx(0.0)


def test_r2_constant_y_is_nan():
    assert math.isnan(M.r2(np.ones(4), np.array([1.0, 2.0, 3.0, 4.0])))


def test_rmse_scaled_mad_scatter_by_hand():
    y = np.array([0.0, 0.0, 0.0, 0.0, 0.0])
    yhat = np.array([-1.0, 0.0, 1.0, 2.0, 6.0])
    # rmse: squares 1, 0, 1, 4, 36 → mean 42/5 = 8.4 → sqrt(8.4)
    assert M.rmse(y, yhat) == pytest.approx(math.sqrt(8.4))
    # r = y − ŷ = [1, 0, −1, −2, −6]; median r = −1; |r − (−1)| = [2, 1, 0, 1, 5] → median 1
    # scaled MAD = 1.4826 × 1
    assert M.scaled_mad(y, yhat) == pytest.approx(1.4826)
    # scatter = median |r| = median [1, 0, 1, 2, 6] = 1
    assert M.scatter(y, yhat) == pytest.approx(1.0)
    # A pure offset: scatter sees it, scaled MAD does not.
    assert M.scaled_mad(y, y + 3.0) == 0.0 and M.scatter(y, y + 3.0) == 3.0


# ---------------------------------------------------------------------------------------------
# CRPS
# ---------------------------------------------------------------------------------------------

def _crps_by_integration(y: float, mu: float, sigma: float) -> float:
    """∫ (F(x) − 1{x ≥ y})² dx on a fine grid (trapezoid), F the Gaussian CDF; numpy + math only.

    The integral is split at x = y, where the indicator jumps, so each piece is smooth and the
    trapezoid rule converges quadratically: ∫_{lo}^{y} F² dx + ∫_{y}^{hi} (1 − F)² dx.
    """
    lo = min(y, mu) - 12 * sigma
    hi = max(y, mu) + 12 * sigma
    erf = np.vectorize(math.erf)
    total = 0.0
    for a, b, step in ((lo, y, 0.0), (y, hi, 1.0)):
        x = np.linspace(a, b, 200_001)
        cdf = 0.5 * (1 + erf((x - mu) / (sigma * math.sqrt(2))))
        integrand = (cdf - step) ** 2
        total += float(np.sum(0.5 * (integrand[1:] + integrand[:-1]) * np.diff(x)))
    return total


def test_crps_standard_normal_at_mean_by_hand():
    # z = 0: σ [0 + 2φ(0) − 1/√π] = 2/√(2π) − 1/√π = (√2 − 1)/√π ≈ 0.233695
    expected = (math.sqrt(2) - 1) / math.sqrt(math.pi)
    assert M.crps_gaussian([0.0], [0.0], [1.0]) == pytest.approx(expected)


@pytest.mark.parametrize("y,mu,sigma", [(0.0, 0.0, 1.0), (1.3, 0.2, 0.5), (-2.0, 1.0, 2.0),
                                        (0.35, 0.36, 0.01)])
def test_crps_matches_numerical_integration(y, mu, sigma):
    assert M.crps_gaussian([y], [mu], [sigma]) == pytest.approx(
        _crps_by_integration(y, mu, sigma), rel=1e-5, abs=1e-9)


def test_crps_mean_over_samples_and_bad_sigma():
    ys, mus, sigmas = np.array([0.0, 1.3]), np.array([0.0, 0.2]), np.array([1.0, 0.5])
    expected = np.mean([_crps_by_integration(*a) for a in zip(ys, mus, sigmas)])
    assert M.crps_gaussian(ys, mus, sigmas) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="sigma"):
        M.crps_gaussian([0.0], [0.0], [0.0])


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------

Y = np.array([0, 0, 0, 1, 1, 2])
YHAT = np.array([0, 0, 1, 1, 2, 2])


def test_confusion_matrix_and_accuracy_by_hand():
    cm = M.confusion_matrix(Y, YHAT, num_classes=3)
    # true 0 → pred 0,0,1; true 1 → pred 1,2; true 2 → pred 2
    np.testing.assert_array_equal(cm, [[2, 1, 0], [0, 1, 1], [0, 0, 1]])
    assert M.accuracy(Y, YHAT) == pytest.approx(4 / 6)
    assert M.confusion_matrix(Y, YHAT, num_classes=4).shape == (4, 4)
    with pytest.raises(ValueError, match="outside"):
        M.confusion_matrix(Y, YHAT, num_classes=2)


def test_per_class_recall_by_hand():
    # class 0: 2/3, class 1: 1/2, class 2: 1/1, class 3: no support → NaN
    rec = M.per_class_recall(Y, YHAT, num_classes=4)
    np.testing.assert_allclose(rec[:3], [2 / 3, 1 / 2, 1.0])
    assert np.isnan(rec[3])


def test_macro_f1_by_hand():
    # class 0: TP 2, FP 0, FN 1 → F1 = 4/5 = 0.8
    # class 1: TP 1, FP 1, FN 1 → F1 = 2/4 = 0.5
    # class 2: TP 1, FP 1, FN 0 → F1 = 2/3
    # macro = (0.8 + 0.5 + 0.666…) / 3 = 0.655555…
    expected = (0.8 + 0.5 + 2 / 3) / 3
    assert M.macro_f1(Y, YHAT) == pytest.approx(expected)
    # An unused 4th class (absent from y and ŷ) is not averaged in.
    assert M.macro_f1(Y, YHAT, num_classes=4) == pytest.approx(expected)
    # Class 2 never predicted: F1 of class 2 = 0 (TP 0, FN 1).
    assert M.macro_f1([0, 2], [0, 0]) == pytest.approx((2 / 3 + 0.0) / 2)


# ---------------------------------------------------------------------------------------------
# Edge cases: empty, NaN, valid masks
# ---------------------------------------------------------------------------------------------

REGRESSION = [M.nmad, M.outlier_fraction, M.r2, M.rmse, M.scaled_mad, M.scatter,
              M.redshift_metrics]


@pytest.mark.parametrize("fn", REGRESSION + [M.accuracy, M.macro_f1, M.confusion_matrix,
                                             M.per_class_recall])
def test_empty_input_names_function(fn):
    with pytest.raises(ValueError, match=fn.__name__):
        fn(np.array([]), np.array([]))


@pytest.mark.parametrize("fn", REGRESSION)
def test_nan_is_reported_with_count_unless_excluded(fn):
    y = np.array([0.1, np.nan, 0.3, np.nan, 0.5])
    yhat = np.array([0.1, 0.2, 0.25, 0.4, 0.6])
    with pytest.raises(ValueError, match=r"2 of 5 values of 'z_true'|2 of 5 values of 'y'"):
        fn(y, yhat)
    valid = np.isfinite(y)
    np.testing.assert_equal(fn(y, yhat, valid=valid), fn(y[valid], yhat[valid]))


def test_valid_excludes_padding_rows_everywhere():
    valid = np.array([True, True, True, True, False, False])
    zt = np.concatenate([Z_TRUE, [np.inf, 5.0]])
    zp = np.concatenate([Z_PRED, [np.nan, 0.0]])
    assert M.redshift_metrics(zt, zp, valid=valid) == M.redshift_metrics(Z_TRUE, Z_PRED)
    assert M.crps_gaussian(zt, zp, np.ones(6), valid=valid) == M.crps_gaussian(
        Z_TRUE, Z_PRED, np.ones(4))
    assert M.redshift_success_rate(zt, zp, np.zeros(6, bool), valid=valid) == \
        M.redshift_success_rate(Z_TRUE, Z_PRED, np.zeros(4, bool))
    y = np.array([0, 1, 2, 0, 9, 9])
    yhat = np.array([0, 1, 1, 0, 0, 3])
    assert M.accuracy(y, yhat, valid=valid) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="bool"):
        M.rmse(zt, zp, valid=valid.astype(int))
    with pytest.raises(ValueError, match="empty"):
        M.rmse(zt, zp, valid=np.zeros(6, bool))


def test_shape_mismatch_and_jax_input():
    import jax.numpy as jnp
    with pytest.raises(ValueError, match="equal length"):
        M.rmse(np.ones(3), np.ones(4))
    assert M.rmse(jnp.array([1.0, 2.0]), jnp.array([1.0, 4.0])) == pytest.approx(math.sqrt(2))
    assert isinstance(M.rmse(jnp.array([1.0]), jnp.array([1.0])), float)


# ---------------------------------------------------------------------------------------------
# Invariances (hypothesis)
# ---------------------------------------------------------------------------------------------

_z = st.floats(min_value=0.0, max_value=5.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(_z, _z, st.floats(0.01, 2.0), st.integers(0, 2), st.integers(0, 2)),
                min_size=2, max_size=30),
       st.randoms(use_true_random=False))
def test_permutation_invariance(rows, rnd):
    zt, zp, sig, cy, cp = (np.array(c) for c in zip(*rows))
    perm = list(range(len(rows)))
    rnd.shuffle(perm)
    p = np.array(perm)
    pairs = [(M.nmad, (zt, zp)), (M.outlier_fraction, (zt, zp)), (M.rmse, (zt, zp)),
             (M.scaled_mad, (zt, zp)), (M.scatter, (zt, zp)), (M.crps_gaussian, (zt, zp, sig)),
             (M.redshift_success_rate, (zt, zp, cy == 1)), (M.accuracy, (cy, cp)),
             (M.macro_f1, (cy, cp))]
    for fn, args in pairs:
        a = fn(*args)
        b = fn(*(x[p] for x in args))
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), fn.__name__
    r_a, r_b = M.r2(zt, zp), M.r2(zt[p], zp[p])
    assert (math.isnan(r_a) and math.isnan(r_b)) or r_a == pytest.approx(r_b, rel=1e-9, abs=1e-9)
    np.testing.assert_array_equal(M.confusion_matrix(cy, cp, 3),
                                  M.confusion_matrix(cy[p], cp[p], 3))


@settings(max_examples=30, deadline=None)
@given(st.lists(_z, min_size=2, max_size=30))
def test_perfect_prediction(z):
    z = np.array(z)
    assert M.nmad(z, z) == 0.0 and M.outlier_fraction(z, z) == 0.0 and M.rmse(z, z) == 0.0
    r = M.r2(z, z)
    # R² is nan exactly when Σ(z − z̄)² is 0 in floating point (constant z, or spreads so tiny,
    # e.g. subnormal, that their squares underflow).
    assert r == 1.0 or (math.isnan(r) and np.sum((z - z.mean()) ** 2) == 0)


def test_success_by_snr_hand_computed():
    # Tolerances: galaxy 0.00334·1.1 = 0.00367 (row 0 passes, row 1 fails); QSO 0.01001·2 =
    # 0.02002 (row 2 passes, row 3 fails).
    zt = np.array([0.1, 0.1, 1.0, 1.0])
    zp = np.array([0.102, 0.104, 1.015, 1.03])
    rows = M.success_by_snr(zt, zp, np.array([False, False, True, True]),
                            np.array([2.0, 8.0, 8.0, 60.0]))
    by = {r["snr_bin"]: r for r in rows}
    assert [r["snr_bin"] for r in rows] == ["0-3", "3-5", "5-10", "10-20", "20-50", ">=50",
                                            "all"]
    assert by["0-3"]["success"] == 1.0 and by["0-3"]["n"] == 1
    assert by["3-5"]["n"] == 0 and by["3-5"]["success"] is None
    assert by["5-10"]["success"] == 0.5 and by["5-10"]["n_qso"] == 1
    assert by[">=50"]["success"] == 0.0
    assert by["all"]["success"] == 0.5 and by["all"]["n"] == 4
    assert "| 5-10 | 2 | 1 | 0.5 |" in M.format_table(rows)


def test_median_snr_uses_valid_pixels_only():
    flux = np.array([[1.0, 2.0, 3.0, 100.0], [1.0, 1.0, 1.0, 1.0]])
    ivar = np.array([[4.0, 4.0, 4.0, 4.0], [1.0, 0.0, 1.0, 1.0]])
    mask = np.array([[True, True, True, False], [False, False, False, False]])
    snr = M.median_snr(flux, ivar, mask)
    assert snr[0] == pytest.approx(4.0)  # median of 2, 4, 6; the masked 100 is ignored
    assert np.isnan(snr[1])
