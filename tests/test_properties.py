"""Property-based tests (hypothesis): preprocessing, the DESI camera merge, SpecPT token blocks,
record sanitising, every metric and the task losses hold their promises for any input, not only
for the examples someone thought of. Example counts are modest so the file runs in seconds."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from spectrax import metrics as M
from spectrax import tasks
from spectrax.data.grids import desi_wavelength
from spectrax.data.preprocess import masked_median, median_normalise
from spectrax.data.readers.desi import merge_cameras
from spectrax.models import specpt
from spectrax.spectra import (SpectrumError, pad_batch_rows, sanitize_record, sanitize_rows,
                              stack_records)

SETTINGS = settings(max_examples=40, deadline=None)
FEW = settings(max_examples=15, deadline=None)  # for properties that call jitted JAX code

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
anything = st.floats(width=32)  # NaN and ±inf included
# Survey-like values: bounded finite flux plus non-finite junk. Valid |flux| near 1e19 makes
# float32 squares overflow in normalisation and losses; no survey has such values.
messy = st.one_of(st.floats(-1e6, 1e6, width=32), st.sampled_from([np.nan, np.inf, -np.inf]))
shapes = st.tuples(st.integers(1, 4), st.integers(1, 48))


@st.composite
def spectra(draw, values=finite):
    """(flux, ivar, mask) of shape [B, L]; some rows may be entirely masked."""
    b, n = draw(shapes)
    flux = draw(hnp.arrays(np.float32, (b, n), elements=values))
    ivar = draw(hnp.arrays(np.float32, (b, n), elements=st.floats(0, 100, width=32)))
    mask = draw(hnp.arrays(bool, (b, n)))
    return flux, ivar, mask


# ----------------------------------------------------------------------------------------------
# median_normalise
# ----------------------------------------------------------------------------------------------
@FEW
@given(spectra(), st.floats(0.1, 10.0))
def test_median_normalise_is_scale_equivariant(data, c):
    flux, ivar, mask = data
    for row, m in zip(flux, mask):  # keep away from the fallback thresholds, which scaling moves
        valid = row[m]
        if valid.size:
            med, mean_abs = np.median(valid), np.abs(valid).mean()
            assume(abs(med) > 1e-3 and (med > 0 or mean_abs > 1e-3))
    a, _, _, _ = median_normalise(jnp.asarray(flux), jnp.asarray(ivar), jnp.asarray(mask))
    b, _, _, _ = median_normalise(jnp.asarray(flux * np.float32(c)), jnp.asarray(ivar),
                                  jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=1e-6)


@FEW
@given(spectra(values=anything))
@example((np.array([[7.22685e-40]], np.float32), np.zeros((1, 1), np.float32),
          np.ones((1, 1), bool)))                          # a subnormal median (see below)
def test_masked_median_equals_nanmedian_exactly(data):
    """The sort-free median is jnp.nanmedian's value to the bit (ties, ±inf, NaN under the
    mask or not, rows with no valid entry -> NaN), and the float64 numpy median's value."""
    flux, _, mask = data
    got = np.asarray(jax.jit(masked_median)(jnp.asarray(flux), jnp.asarray(mask)))
    ref = np.asarray(jnp.nanmedian(jnp.where(jnp.asarray(mask), jnp.asarray(flux), jnp.nan),
                                   axis=-1))
    # XLA:CPU computes with subnormals flushed to zero, so nanmedian's mean of the two middle
    # values turns a subnormal median (e.g. 7.2e-40, found by hypothesis) into 0, while the
    # sort-free median returns the value itself (what the float64 check below asks for).
    tiny = np.finfo(np.float32).tiny
    flush = lambda x: np.where(np.abs(x) < tiny, np.float32(0), x)  # noqa: E731
    np.testing.assert_array_equal(flush(got), flush(ref))
    for row, m, g in zip(flux, mask, got):
        valid = row[m & ~np.isnan(row)].astype(np.float64)
        if valid.size and np.all(np.isfinite(valid)):
            assert g == np.float32(np.median(valid)) or abs(g - np.median(valid)) <= 1e-6 * max(
                abs(np.median(valid)), 1e-30)


@FEW
@given(spectra(values=anything))
def test_median_normalise_never_returns_nan(data):
    flux, ivar, mask = data
    # The batch convention (sanitize_record): valid pixels have finite flux and ivar > 0;
    # anything may sit under the mask. |flux| is kept below 1e15 because scale² overflows
    # float32 beyond ~1.8e19 (ivar·scale² then becomes inf, or 0·inf = NaN).
    mask = mask & np.isfinite(flux) & (np.abs(flux) < 1e15) & (ivar > 0)
    out = median_normalise(jnp.asarray(flux), jnp.asarray(ivar), jnp.asarray(mask))
    for arr in out[:3]:
        assert np.all(np.isfinite(np.asarray(arr)))
    assert np.all(np.asarray(out[0])[~mask] == 0)


# ----------------------------------------------------------------------------------------------
# DESI camera merge
# ----------------------------------------------------------------------------------------------
@st.composite
def cameras(draw):
    """2-3 overlapping cameras on the DESI grid with NaN/inf, ivar <= 0 and flagged pixels."""
    n_rows = draw(st.integers(1, 3))
    waves, fluxes, ivars, masks, spans = {}, {}, {}, {}, {}
    for cam in ("B", "R", "Z")[:draw(st.integers(2, 3))]:
        start, size = draw(st.integers(0, 40)), draw(st.integers(1, 30))
        spans[cam] = np.arange(start, start + size)
        waves[cam] = desi_wavelength()[spans[cam]]
        fluxes[cam] = draw(hnp.arrays(np.float32, (n_rows, size), elements=anything))
        ivars[cam] = draw(hnp.arrays(np.float32, (n_rows, size),
                                     elements=st.one_of(st.floats(-1, 100, width=32),
                                                        st.just(np.nan))))
        masks[cam] = draw(hnp.arrays(np.int32, (n_rows, size), elements=st.sampled_from(
            [0, 0, 0, 1, 1024])))
    return waves, fluxes, ivars, masks, spans


@SETTINGS
@given(cameras())
def test_merge_never_invents_flux_stays_between_inputs_and_sums_ivar(cams):
    waves, fluxes, ivars, masks, spans = cams
    flux, ivar, good = merge_cameras(waves, fluxes, ivars, masks)
    n_rows = flux.shape[0]
    lo = np.full((n_rows, flux.shape[1]), np.inf)
    hi = np.full_like(lo, -np.inf)
    total = np.zeros_like(lo)
    for cam in waves:
        f = fluxes[cam].astype(np.float64)
        iv = ivars[cam].astype(np.float64)
        ok = np.isfinite(f) & np.isfinite(iv) & (iv > 0) & (masks[cam] == 0)
        idx = spans[cam]
        lo[:, idx] = np.where(ok, np.minimum(lo[:, idx], f), lo[:, idx])
        hi[:, idx] = np.where(ok, np.maximum(hi[:, idx], f), hi[:, idx])
        total[:, idx] += np.where(ok, iv, 0.0)
    contributes = np.isfinite(lo)
    np.testing.assert_array_equal(good, contributes)           # valid iff some camera is
    assert np.all(flux[~good] == 0) and np.all(ivar[~good] == 0)  # nothing invented
    tol = 1e-5 * np.maximum(np.abs(lo), np.abs(hi))
    assert np.all(flux[good] >= lo[good] - tol[good] - 1e-30)
    assert np.all(flux[good] <= hi[good] + tol[good] + 1e-30)
    np.testing.assert_allclose(ivar[good], total[good], rtol=1e-6)
    assert np.all(np.isfinite(flux)) and np.all(np.isfinite(ivar))
    # the output already obeys sanitize_record's rules: the DESI reader relies on it
    f2, i2, g2, counts = sanitize_rows(flux, ivar, good)
    np.testing.assert_array_equal(g2, good)
    np.testing.assert_array_equal(f2, flux)
    np.testing.assert_array_equal(i2, ivar)
    assert not any(counts[k].any() for k in ("nonfinite_flux", "nonfinite_ivar",
                                              "nonpositive_ivar"))


# ----------------------------------------------------------------------------------------------
# SpecPT token blocks and token masks
# ----------------------------------------------------------------------------------------------
CFG = specpt.VARIANTS["tiny"]


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 200), st.integers(0, 2**31 - 1))
def test_token_blocks_round_trip(b, n, seed):
    x = np.random.default_rng(seed).normal(size=(b, n)).astype(np.float32)
    blocks = specpt.token_blocks(CFG, jnp.asarray(x), -7.0)
    assert blocks.shape[1] * blocks.shape[2] >= n
    np.testing.assert_array_equal(np.asarray(specpt.untoken_blocks(blocks, n)), x)
    assert np.all(np.asarray(blocks).reshape(b, -1)[:, n:] == -7.0)  # fill only past L


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 200), st.integers(0, 2**31 - 1),
       st.floats(0.0, 1.0))
def test_token_is_valid_iff_more_than_half_its_in_range_pixels_are(b, n, seed, p_valid):
    mask = np.random.default_rng(seed).random((b, n)) < p_valid
    got = np.asarray(specpt.token_mask(CFG, jnp.asarray(mask)))
    _, size = specpt.stem_token_geometry(CFG)
    for t in range(got.shape[1]):
        block = mask[:, t * size:min((t + 1) * size, n)]
        expected = 2 * block.sum(-1) > block.shape[1]
        np.testing.assert_array_equal(got[:, t], expected, err_msg=f"token {t}")


# ----------------------------------------------------------------------------------------------
# sanitize_record
# ----------------------------------------------------------------------------------------------
# Survey arrays are float32: values beyond its range (|x| > 3.4e38) would overflow to inf when
# sanitize_record casts to float32, so the property is stated for float32 inputs.
@SETTINGS
@given(st.integers(1, 64).flatmap(lambda n: st.tuples(
    hnp.arrays(np.float32, n, elements=anything),
    hnp.arrays(np.float32, n, elements=anything),
    hnp.arrays(bool, n),
    st.one_of(st.none(), hnp.arrays(np.float32, n, elements=anything)))))
def test_sanitize_record_gives_no_nan_and_counts_add_up(arrays):
    flux, ivar, mask, wave = arrays
    rec = {"flux": flux, "ivar": ivar, "mask": mask, "labels": [np.nan]}
    if wave is not None:
        rec["wavelength"] = wave
        known = wave[np.isfinite(wave) & (wave > 0)]
        if np.any(np.diff(known.astype(np.float64)) <= 0):  # out of order: refused by name
            with pytest.raises(SpectrumError, match="prop: 'wavelength' is not strictly"):
                sanitize_record(rec, "prop")
            return
    clean, counts = sanitize_record(rec, "prop")
    for key in ("flux", "ivar") + (("wavelength",) if wave is not None else ()):
        assert np.all(np.isfinite(clean[key])), key
    bad = ~mask | ~np.isfinite(flux) | ~np.isfinite(ivar) | (ivar <= 0)
    if wave is not None:
        bad |= ~np.isfinite(wave) | (wave <= 0)
    n = flux.size
    assert counts["valid_pixels"] == clean["mask"].sum() == n - bad.sum()
    assert counts["flagged"] == (~mask).sum()
    rule_counts = sum(v for k, v in counts.items() if k != "valid_pixels")
    assert rule_counts >= n - counts["valid_pixels"]  # every masked pixel is counted somewhere
    # Pixels masked by a flux/ivar/mask rule carry 0. (Pixels masked only for a bad wavelength
    # keep their flux and ivar: spectra.py does not zero them; they are masked all the same.)
    zeroed = bad & ~(mask & np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0))
    assert np.all(clean["flux"][zeroed] == 0) and np.all(clean["ivar"][zeroed] == 0)


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------
def _regression_pairs(draw, n):
    z = draw(hnp.arrays(np.float64, n, elements=st.floats(0.0, 5.0)))
    zp = draw(hnp.arrays(np.float64, n, elements=st.floats(-0.5, 6.0)))
    return z, zp


@st.composite
def regression(draw):
    n = draw(st.integers(2, 40))
    z, zp = _regression_pairs(draw, n)
    sigma = draw(hnp.arrays(np.float64, n, elements=st.floats(0.01, 3.0)))
    valid = draw(hnp.arrays(bool, n))
    assume(valid.any())
    return z, zp, sigma, valid, draw(st.permutations(range(n)))


REGRESSION = {
    "nmad": lambda y, p, s, v=None: M.nmad(y, p, valid=v),
    "outlier_fraction": lambda y, p, s, v=None: M.outlier_fraction(y, p, valid=v),
    "r2": lambda y, p, s, v=None: M.r2(y, p, valid=v),
    "scaled_mad": lambda y, p, s, v=None: M.scaled_mad(y, p, valid=v),
    "crps": lambda y, p, s, v=None: M.crps_gaussian(y, p, s, valid=v),
}


def _close(a, b):
    return (np.isnan(a) and np.isnan(b)) or np.isclose(a, b, rtol=1e-9, atol=1e-12)


@SETTINGS
@given(regression())
def test_regression_metrics_permutation_invariant_and_masks_equal_dropping(data):
    z, zp, sigma, valid, perm = data
    perm = np.asarray(perm)
    for name, fn in REGRESSION.items():
        whole = fn(z, zp, sigma)
        assert _close(whole, fn(z[perm], zp[perm], sigma[perm])), name
        masked = fn(z, zp, sigma, valid)
        assert _close(masked, fn(z[valid], zp[valid], sigma[valid])), name


@SETTINGS
@given(regression(), st.integers(1, 10))
def test_nmad_and_eta_ignore_added_invalid_rows(data, extra):
    z, zp, _, _, _ = data
    junk = np.full(extra, np.nan)  # even NaN is fine in rows that valid= excludes
    z2, zp2 = np.concatenate([z, junk]), np.concatenate([zp, junk])
    valid = np.r_[np.ones(z.size, bool), np.zeros(extra, bool)]
    assert M.nmad(z2, zp2, valid=valid) == M.nmad(z, zp)
    assert M.outlier_fraction(z2, zp2, valid=valid) == M.outlier_fraction(z, zp)


@st.composite
def classes(draw):
    n = draw(st.integers(1, 40))
    y = draw(hnp.arrays(np.int64, n, elements=st.integers(0, 2)))
    yhat = draw(hnp.arrays(np.int64, n, elements=st.integers(0, 2)))
    valid = draw(hnp.arrays(bool, n))
    assume(valid.any())
    return y, yhat, valid, np.asarray(draw(st.permutations(range(n))))


@SETTINGS
@given(classes())
def test_classification_metrics_permutation_invariant_and_masks_equal_dropping(data):
    y, yhat, valid, perm = data
    for fn in (M.accuracy, M.macro_f1):
        assert np.isclose(fn(y, yhat), fn(y[perm], yhat[perm]))
        assert np.isclose(fn(y, yhat, valid=valid), fn(y[valid], yhat[valid]))


# ----------------------------------------------------------------------------------------------
# Task losses: never NaN, whatever a batch holds
# ----------------------------------------------------------------------------------------------
@st.composite
def messy_batches(draw):
    """Host batches through the real record path: NaN/inf pixels, all-masked spectra, unknown
    (NaN) labels and invalid padding rows."""
    n_real, n_pix = draw(st.integers(1, 4)), draw(st.integers(4, 40))
    records = []
    for i in range(n_real):
        flux = draw(hnp.arrays(np.float32, n_pix, elements=messy))
        ivar = draw(hnp.arrays(np.float32, n_pix, elements=st.floats(-1, 10, width=32)))
        mask = draw(hnp.arrays(bool, n_pix)) & draw(st.booleans())  # some all-masked
        z = draw(st.one_of(st.just(np.nan), st.floats(0.0, 3.0)))
        clean, _ = sanitize_record({"flux": flux, "ivar": ivar, "mask": mask, "labels": [z]})
        records.append({**clean, "id": i, "wavelength": 3600.0 + np.arange(n_pix)})
    batch = stack_records(records, 1, length=n_pix)
    return pad_batch_rows(batch, n_real + draw(st.integers(0, 3))).for_device()


def _fake_redshift_model(a):
    return lambda flux, mask, wavelength, train: a * jnp.sum(flux * mask, -1) + 0.1


def _fake_autoencoder(a):
    return lambda flux, mask, wavelength, train: a * flux + 0.01 * wavelength / 1e4


@FEW
@given(messy_batches())
def test_task_losses_and_gradients_are_finite_on_messy_batches(batch):
    batch = jax.tree.map(jnp.asarray, batch)
    cases = [(tasks.RedshiftTask("std"), _fake_redshift_model),
             (tasks.RedshiftTask("mad"), _fake_redshift_model),
             (tasks.ReconstructionTask("l1"), _fake_autoencoder),
             (tasks.ReconstructionTask("nmad"), _fake_autoencoder)]
    for task, make in cases:
        loss_fn = lambda a: task.loss(make(a), batch, train=True)[0]
        loss, grad = jax.value_and_grad(loss_fn)(jnp.float32(0.5))
        assert np.isfinite(float(loss)), type(task).__name__
        assert np.isfinite(float(grad)), type(task).__name__
        _, aux = task.loss(make(0.5), batch, train=False)
        for k, v in aux.items():
            assert np.isfinite(float(v)), k
