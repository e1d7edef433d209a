"""The Redrock-style χ² template-fitting baseline (spectrax.baselines.template_fit).

Kept small for 2 loaded CPU cores: one simulated BGS set (templates from 300 training spectra,
128 test spectra in chunks of 64, so every fit reuses one compiled shape) and one hand-built
template case.
"""
from __future__ import annotations

import numpy as np
import pytest

from spectrax import metrics
from spectrax.baselines import template_fit as tf
from spectrax.data import grids

CHUNK = 64


@pytest.fixture(scope="module")
def bgs():
    train = tf.simulated_split(300, seed=11)
    test = tf.simulated_split(128, seed=12)
    # Mask 5 % more pixels at random (values left in place), so masking is exercised throughout.
    test["mask"] &= ~(np.random.default_rng(1).random(test["mask"].shape) < 0.05)
    templates = tf.fit_templates(train["flux"], train["ivar"], train["mask"],
                                 train["wavelength"], train["z"], n_components=6)
    res = tf.fit_redshifts(templates, test["flux"], test["ivar"], test["mask"],
                           test["wavelength"], chunk=CHUNK)
    return templates, test, res


def test_recovers_simulated_bgs_redshifts(bgs):
    templates, test, res = bgs
    z_true, z_pred = test["z"], res["z"]
    # The PCA basis explains the rest-frame training spectra far better than their mean alone.
    assert templates.report["chi2_per_pixel_full"] < 0.5 * templates.report[
        "chi2_per_pixel_mean_only"]
    # Measured: NMAD ≈ 6e-5 (a tenth of SpecPT's paper figure on real DESI BGS). A broken fit
    # (wrong interpolation direction, a sign, masked pixels leaking in) lands at 1e-2 or worse.
    assert metrics.nmad(z_true, z_pred) < 5e-4
    # Spectra whose true z lies outside what 300 training spectra cover in the rest frame cannot
    # be fitted; inside that range catastrophic failures must be rare.
    lo, hi = templates.z_limits(test["wavelength"])
    inside = (z_true > lo) & (z_true < hi)
    assert inside.mean() > 0.9
    assert metrics.outlier_fraction(z_true, z_pred, valid=inside) <= 0.01
    # Redrock-style confidence: a typical spectrum's best minimum beats the runner-up clearly.
    assert np.median(res["delta_chi2"]) > 100
    assert np.all(res["npix"] > 0) and np.all(np.isfinite(res["chi2"]))


def _rest_model(wave_rest: np.ndarray) -> np.ndarray:
    """A galaxy-like rest spectrum: a 4000 Å break, absorption and emission lines (Å)."""
    cont = 1.0 + 0.8 / (1.0 + np.exp(-(wave_rest - 4000.0) / 20.0))
    absorption = sum(d * np.exp(-0.5 * ((wave_rest - c) / 4.0) ** 2)
                     for c, d in ((3934.8, 0.5), (3969.6, 0.4), (5175.4, 0.3), (5895.6, 0.3)))
    emission = sum(a * np.exp(-0.5 * ((wave_rest - c) / 2.0) ** 2)
                   for c, a in ((3728.5, 3.0), (4862.7, 2.0), (5008.2, 4.0), (6564.6, 5.0)))
    return cont - absorption + emission


def test_known_template_recovers_redshift_within_one_step():
    rest = np.exp(np.log(2300.0) + 1e-4 * np.arange(int(np.log(9800 / 2300) / 1e-4) + 1))

    def tilt(wave_rest):  # −1 … 1, linear in ln λ over the rest grid
        return -1.0 + 2.0 * np.log(wave_rest / 2300.0) / np.log(9800.0 / 2300.0)

    # Two basis vectors, the model and a tilt: the fit must also find the right combination.
    templates = tf.Templates(rest, np.stack([_rest_model(rest), tilt(rest)]))
    wave = grids.desi_wavelength()
    z0 = np.array([0.05, 0.2, 0.3217, 0.4831, 0.3])
    rng = np.random.default_rng(0)
    sigma = 0.3
    flux = np.stack([4.0 * _rest_model(wave / (1 + z)) + 0.5 * tilt(wave / (1 + z))
                     for z in z0]) + sigma * rng.standard_normal((z0.size, wave.size))
    ivar = np.full_like(flux, 1 / sigma**2)
    mask = np.ones(flux.shape, bool)
    mask[-1] = False                      # the last spectrum has no valid pixel at all
    res = tf.fit_redshifts(templates, flux, ivar, mask, wave, z_min=0.01, z_max=0.55)
    good = slice(0, 4)
    step = 1e-4                           # the fine grid step in ln(1+z)
    assert np.all(np.abs(np.log1p(res["z"][good]) - np.log1p(z0[good])) <= step)
    assert np.all(res["delta_chi2"][good] > 100)
    assert np.all(res["zwarn"][good] == 0)
    # χ² per pixel ≈ 1 at the truth: the model, not just the redshift, was found.
    assert np.all(np.abs(res["chi2"][good] / wave.size - 1) < 0.1)
    assert res["npix"][-1] == 0 and res["zwarn"][-1] & tf.ZWARN_NODATA
    with pytest.raises(ValueError, match="do not cover"):
        tf.fit_redshifts(templates, flux, ivar, mask, wave, z_min=0.0, z_max=1.0)


def test_masked_pixels_have_no_influence(bgs):
    templates, test, ref = bgs
    rows = slice(0, CHUNK)                  # exactly the fixture's first chunk
    flux, ivar, mask = test["flux"][rows].copy(), test["ivar"][rows].copy(), test["mask"][rows]
    bad = ~mask
    rng = np.random.default_rng(2)
    flux[bad] = rng.choice(np.array([np.nan, np.inf, -np.inf, 1e30, -1e30], np.float32),
                           size=int(bad.sum()))
    ivar[bad] = rng.choice(np.array([np.nan, 1e30, 5.0, -1.0], np.float32), size=int(bad.sum()))
    out = tf.fit_redshifts(templates, flux, ivar, mask, test["wavelength"], chunk=CHUNK)
    for key in ("z", "chi2", "delta_chi2", "npix", "zwarn"):
        np.testing.assert_array_equal(out[key], ref[key][rows], err_msg=key)
    # The masked values would have mattered: the same garbage left unmasked changes χ².
    i, z = 0, np.array([test["z"][0], test["z"][0] + 0.01])
    finite_garbage = np.nan_to_num(flux[i:i + 1], posinf=1e30, neginf=-1e30)
    pos_ivar = np.abs(np.nan_to_num(ivar[i:i + 1]))
    masked = tf.chi2_grid(templates, finite_garbage, pos_ivar, mask[i:i + 1],
                          test["wavelength"], z)
    unmasked = tf.chi2_grid(templates, finite_garbage, pos_ivar, np.ones_like(mask[i:i + 1]),
                            test["wavelength"], z)
    assert np.all(np.isfinite(masked)) and not np.allclose(masked, unmasked)


def _numpy_chi2(templates, flux, ivar, mask, wave, z) -> float:
    """Float64 reference: basis interpolated linearly in ln λ at λ/(1+z), weighted least squares."""
    ln_rest = np.log(templates.rest_wavelength)
    m = np.stack([np.interp(np.log(wave / (1 + z)), ln_rest, b.astype(np.float64))
                  for b in templates.basis], axis=1)
    valid = mask & np.isfinite(flux) & (ivar > 0)
    w, f, m = ivar[valid].astype(np.float64), flux[valid].astype(np.float64), m[valid]
    coef = np.linalg.solve(m.T @ (w[:, None] * m), m.T @ (w * f))
    return float(np.sum(w * (f - m @ coef) ** 2))


def test_chi2_matches_float64_numpy(bgs):
    templates, test, res = bgs
    i = 3
    args = (test["flux"][i], test["ivar"][i], test["mask"][i], test["wavelength"])
    one = (test["flux"][i:i + 1], test["ivar"][i:i + 1], test["mask"][i:i + 1], test["wavelength"])
    z_true = float(test["z"][i])
    z_try = np.array([z_true, z_true + 0.01])
    ref = [_numpy_chi2(templates, *args, z) for z in z_try]
    # The residual-form χ² (float32 in jax) at the true redshift and off it ...
    exact = tf.chi2_grid(templates, *one, z_try)
    np.testing.assert_allclose(exact[0], ref, rtol=1e-4)
    assert exact[0, 1] > exact[0, 0]
    # ... the coarse scan's normal-equation form, good to ~1e-5 at BGS S/N ...
    scan = tf.chi2_grid(templates, *one, z_try, exact=False)
    np.testing.assert_allclose(scan[0], ref, rtol=1e-3)
    # ... and the refined χ² that fit_redshifts reports at its best z.
    assert res["chi2"][i] == pytest.approx(_numpy_chi2(templates, *args, res["z"][i]), rel=1e-4)


# --- refinement of given candidates (the learned-proposal + χ² mode) --------------------------
def test_refine_from_nearby_candidates_equals_the_full_fit(bgs):
    templates, test, ref = bgs
    rows = slice(0, CHUNK)
    rng = np.random.default_rng(5)
    # A proposal within the window (±3 fine steps off the full fit's z) and a wrong one.
    s = np.log1p(ref["z"][rows]) + rng.uniform(-3e-4, 3e-4, CHUNK)
    cands = np.stack([np.expm1(s), ref["z"][rows] + 0.1], axis=1)
    out = tf.refine_redshifts(templates, test["flux"][rows], test["ivar"][rows],
                              test["mask"][rows], test["wavelength"], cands, chunk=CHUNK)
    # The same χ² minimum, sampled on a grid offset by a fraction of a step: the redshifts agree
    # far below the fit's own NMAD (6e-5) and, where the χ² surface has one clean minimum, the
    # χ² values within 1 (statistically the same point: χ² + 1 is the 1σ contour). The others
    # are ragged surfaces where the walk from a candidate 3 steps off stops in a neighbouring
    # local minimum a few steps from the full fit's (measured on the SPS simulator, SIM_VERSION
    # 3: 1 of 64 beyond 1.5e-4, at 2.4e-4). A χ² valley so flat that the walk's last point is
    # still its lowest is not bracketed, and the refinement says so (window_edge, ZWARN
    # BAD_MINFIT) instead of reporting it as a clean minimum.
    dz = np.abs(out["z"] - ref["z"][rows]) / (1 + ref["z"][rows])
    edge = out["window_edge"]
    assert np.median(dz) < 1e-5 and np.mean(dz[~edge] < 1.5e-4) >= 0.95
    assert dz[~edge].max() < 5e-4
    assert edge.sum() <= 2 and np.all(out["zwarn"][edge] & tf.ZWARN_BAD_MINFIT)
    assert np.all(out["chi2"][edge] <= ref["chi2"][rows][edge] + 1.0)
    # The refinement's vertex is the parabola's through the χ² of pixel pairs (its windows run
    # on pairs merged by inverse variance), so the full-resolution χ² there sits a little above
    # the full fit's (median 0.39, 72 % within 1, measured), and the ragged surfaces above add
    # their local minima's χ².
    dchi = np.abs(out["chi2"] - ref["chi2"][rows])
    assert np.median(dchi) < 0.5 and np.mean(dchi < 1.0) >= 0.65
    assert np.all(out["delta_chi2"] > 0)
    # Order of the candidates does not matter; a lone candidate has no runner-up.
    swapped = tf.refine_redshifts(templates, test["flux"][rows], test["ivar"][rows],
                                  test["mask"][rows], test["wavelength"], cands[:, ::-1],
                                  chunk=CHUNK)
    np.testing.assert_array_equal(swapped["z"], out["z"])
    alone = tf.refine_redshifts(templates, test["flux"][rows], test["ivar"][rows],
                                test["mask"][rows], test["wavelength"], cands[:, :1],
                                chunk=CHUNK)
    assert np.all(alone["delta_chi2"] == np.inf)


def test_refine_walks_to_a_minimum_beyond_its_window_and_flags_one_it_cannot_reach():
    rest = np.exp(np.log(2300.0) + 1e-4 * np.arange(int(np.log(9800 / 2300) / 1e-4) + 1))
    templates = tf.Templates(rest, _rest_model(rest)[None])
    wave = grids.desi_wavelength()
    flux = np.stack([4.0 * _rest_model(wave / 1.3)] * 3)
    ivar = np.full_like(flux, 100.0)
    mask = np.ones(flux.shape, bool)
    # On target; 5 fine steps off (beyond the ±1 window: found by walking); 20 steps off
    # (beyond the walk's reach of half_window·(1 + max_walks) = 8 steps).
    cands = np.array([[0.3], [1.3 * np.exp(5e-4) - 1], [1.3 * np.exp(2e-3) - 1]])
    out = tf.refine_redshifts(templates, flux, ivar, mask, wave, cands)
    assert np.all(np.abs(out["z"][:2] - 0.3) < 1e-5)
    assert np.all(out["zwarn"][:2] & tf.ZWARN_BAD_MINFIT == 0)
    assert out["window_edge"][2] and out["zwarn"][2] & tf.ZWARN_BAD_MINFIT
    # Without walks the window is ±half_window steps: 5 steps off is not bracketed either.
    fixed = tf.refine_redshifts(templates, flux, ivar, mask, wave, cands, max_walks=0,
                                half_window=4)
    assert abs(fixed["z"][0] - 0.3) < 1e-5 and not fixed["window_edge"][0]
    assert fixed["window_edge"][1] and fixed["window_edge"][2]


def test_zerr_from_the_chi2_curvature_is_the_scatter_over_noise_draws():
    """ZERR (Δχ² = 1) against the spread of best-fit redshifts over 200 noise realisations."""
    rest = np.exp(np.log(2300.0) + 1e-4 * np.arange(int(np.log(9800 / 2300) / 1e-4) + 1))
    templates = tf.Templates(rest, np.stack([_rest_model(rest), np.ones_like(rest)]))
    wave = grids.desi_wavelength()
    z0, sigma, n = 0.2345, 4.0, 200
    rng = np.random.default_rng(7)
    flux = 2.0 * _rest_model(wave / (1 + z0))[None] + sigma * rng.standard_normal((n, wave.size))
    ivar = np.full_like(flux, 1 / sigma**2)
    out = tf.refine_redshifts(templates, flux, ivar, np.ones(flux.shape, bool), wave,
                              np.full((n, 1), z0), chunk=100)
    scatter = np.std(out["z"] - z0)
    assert np.median(out["zerr"]) == pytest.approx(scatter, rel=0.15)
    assert np.mean(np.abs(out["z"] - z0) < out["zerr"]) == pytest.approx(0.683, abs=0.07)


def test_candidate_penalty_acts_as_a_prior_on_the_choice_only(bgs):
    templates, test, ref = bgs
    rows = slice(0, 16)
    cands = np.stack([ref["z"][rows], ref["z"][rows] + 0.1], axis=1)
    args = (templates, test["flux"][rows], test["ivar"][rows], test["mask"][rows],
            test["wavelength"], cands)
    plain = tf.refine_redshifts(*args, chunk=CHUNK)
    # A prior against the right candidate larger than any χ² gap makes the other one win; the
    # reported χ² is the winner's own (without the prior), Δχ² includes the prior.
    pen = np.zeros_like(cands)
    pen[:, 0] = 1e9
    moved = tf.refine_redshifts(*args, chunk=CHUNK, candidate_penalty=pen)
    # (the wrong candidate's z moves at most as far as its window walks: 8 steps of 1e-4)
    np.testing.assert_allclose(moved["z"], cands[:, 1], atol=8.5e-4 * (1 + cands[:, 1].max()))
    assert np.all(moved["chi2"] > plain["chi2"]) and np.all(moved["chi2"] < 1e8)
    assert np.all(moved["delta_chi2"] > 1e8)
    # A zero prior changes nothing.
    same = tf.refine_redshifts(*args, chunk=CHUNK, candidate_penalty=np.zeros_like(cands))
    np.testing.assert_array_equal(same["z"], plain["z"])
