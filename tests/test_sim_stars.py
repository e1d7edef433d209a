"""Tests of the simulated survey grids (spectrax.data.survey_grids) and the stellar simulators
(spectrax.data.sim_stars): shapes, determinism, grids, and physics responses that can fail."""
from __future__ import annotations

import functools

import numpy as np
import pytest

from spectrax.data import grids
from spectrax.data import sim_stars as ss
from spectrax.data import survey_grids as sg

SDSS = sg.sdss_wavelength()
APOGEE = sg.apogee_wavelength()
N_OPT = 96   # two random-stream blocks, the second partial
N_APO = 96


@functools.lru_cache(maxsize=None)
def _optical(survey: str = "sdss", n: int = N_OPT, seed: int = 4, **kw) -> dict:
    return ss.simulate_optical_stars(n, None, seed, survey=survey, components=True, **kw)


@functools.lru_cache(maxsize=None)
def _pair(n: int = N_APO, seed: int = 9) -> dict:
    return ss.simulate_apogee_pair(n, seed, components=True)


def _ew(wave: np.ndarray, flux: np.ndarray, centre: float, half: float) -> np.ndarray:
    """Equivalent width (Å) of normalised spectra [B, L] within |λ − centre| < half."""
    m = np.abs(wave - centre) < half
    return ((1.0 - flux[:, m]) * np.gradient(wave)[m]).sum(1)


# --------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------
def test_apogee_grid():
    assert APOGEE.shape == (7514,) and APOGEE.dtype == np.float64
    assert APOGEE[0] == pytest.approx(15152.2, abs=1.0)
    assert APOGEE[-1] == pytest.approx(16943.5, abs=1.0)
    assert np.all(np.diff(APOGEE) > 0)
    assert [b - a for a, b in sg.contiguous_segments(APOGEE)] == [3028, 2495, 1991]
    step = np.diff(np.log10(APOGEE))
    assert np.allclose(step[step < 1e-4], 6e-6, rtol=1e-6)


def test_sdss_and_lamost_grids():
    for w in (SDSS, sg.lamost_wavelength()):
        np.testing.assert_allclose(np.diff(np.log10(w)), 1e-4, rtol=1e-6)
        # loglam on the survey-wide grid: integer multiples of 1e-4
        k = np.log10(w) / 1e-4
        np.testing.assert_allclose(k, np.round(k), atol=1e-6)
    assert SDSS[0] == pytest.approx(3600.0, abs=5) and 4500 < SDSS.size < 4700
    lam = sg.lamost_wavelength()
    assert lam.size == 3909 and lam[0] == pytest.approx(3700.0, abs=1)
    rng = np.random.default_rng(0)
    sizes = [sg.sdss_wavelength(rng).size for _ in range(40)]
    assert min(sizes) >= 3800 and max(sizes) <= 4650 and len(set(sizes)) > 5
    ends = [sg.sdss_wavelength(rng, spectrograph="boss")[-1] for _ in range(10)]
    assert all(10290 <= e <= 10400 for e in ends)
    assert all(3890 <= sg.lamost_wavelength(rng).size <= 3909 for _ in range(10))
    with pytest.raises(ValueError):
        sg.sdss_wavelength(spectrograph="hst")


@pytest.mark.parametrize("ppc", [4096, 1024])
def test_galah_grid(ppc):
    w = sg.galah_wavelength(ppc)
    assert w.shape == (4 * ppc,) and np.all(np.diff(w) > 0)
    segs = sg.contiguous_segments(w)
    assert len(segs) == 4
    for (a, b), (lo, hi) in zip(segs, sg.GALAH_CCDS):
        assert (b - a) == ppc and w[a] == lo and w[b - 1] == hi
        np.testing.assert_allclose(np.diff(w[a:b]), (hi - lo) / (ppc - 1), rtol=1e-9)


def test_survey_table_and_lsf():
    np.testing.assert_array_equal(sg.desi_wavelength(), grids.desi_wavelength())
    assert set(sg.SURVEYS) == {"sdss", "lamost", "desi", "galah", "apogee"}
    for name, inst in sg.SURVEYS.items():
        w = inst.wavelength(None)
        r = inst.resolution(w)
        assert r.shape == w.shape and np.all(r >= 1000) and np.all(r <= 40000), name
        lo, hi = inst.snr_range
        assert 0 < lo < hi
        np.testing.assert_allclose(inst.lsf_sigma(w), w / (2.3548200450309493 * r), rtol=1e-9)
    assert sg.get_survey("APOGEE").resolution(np.array([16000.0]))[0] == 22500
    assert sg.lsf_sigma(5000.0, 2000.0) == pytest.approx(5000 / 2000 / 2.35482, rel=1e-5)
    with pytest.raises(ValueError, match="unknown survey"):
        sg.get_survey("gaia")


# --------------------------------------------------------------------------------------------
# Optical stars: shapes, validity, determinism
# --------------------------------------------------------------------------------------------
def test_optical_shapes_and_validity():
    d = _optical()
    L = SDSS.size
    assert d["flux"].shape == d["ivar"].shape == d["mask"].shape == (N_OPT, L)
    assert d["flux"].dtype == np.float32 and d["ivar"].dtype == np.float32
    assert d["mask"].dtype == np.bool_ and d["id"].dtype == np.int64
    assert len(np.unique(d["id"])) == N_OPT
    np.testing.assert_array_equal(d["wavelength"], SDSS)
    for key, value in d.items():
        if value.dtype.kind == "f":
            assert np.all(np.isfinite(value)), key
    bad = ~d["mask"]
    assert bad.any() and bad.mean() < 0.01
    assert not d["flux"][bad].any() and not d["ivar"][bad].any()
    assert np.all(d["ivar"][d["mask"]] > 0)
    # labels within the documented ranges
    assert np.all((d["teff"] >= ss.TEFF_RANGE[0]) & (d["teff"] <= ss.TEFF_RANGE[1]))
    assert np.all((d["logg"] >= ss.LOGG_RANGE[0]) & (d["logg"] <= ss.LOGG_RANGE[1]))
    assert np.all((d["feh"] >= ss.FEH_RANGE[0]) & (d["feh"] <= ss.FEH_RANGE[1]))
    assert np.all(np.abs(d["rv"]) <= ss.RV_MAX)
    lo, hi = sg.SURVEYS["sdss"].snr_range
    assert np.all((d["snr"] >= lo * 0.999) & (d["snr"] <= hi * 1.001))


def test_optical_label_distribution():
    d = ss.simulate_optical_stars(512, SDSS[::8], seed=2)   # coarse grid: labels only matter
    t, g = d["teff"], d["logg"]
    fgk = (t > 4000) & (t < 7000)
    assert fgk.mean() > 0.5 and (t < 4000).mean() > 0.05 and (t > 10000).mean() < 0.1
    giants = g < 3.5
    assert 0.1 < giants.mean() < 0.4
    assert np.all(t[giants] < 5400)         # giants are cool (giant branch)
    assert np.median(g[(t < 3900) & ~giants]) > 4.5


def test_optical_determinism_and_prefix():
    a = ss.simulate_optical_stars(70, SDSS, seed=13, batch=64)
    b = ss.simulate_optical_stars(70, SDSS, seed=13, batch=256)
    c = ss.simulate_optical_stars(20, SDSS, seed=13)
    d = ss.simulate_optical_stars(10, SDSS, seed=13, start=60)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        if key != "wavelength":
            np.testing.assert_array_equal(a[key][:20], c[key], err_msg=key)
            np.testing.assert_array_equal(a[key][60:], d[key], err_msg=key)
    other = ss.simulate_optical_stars(20, SDSS, seed=14)
    assert not np.array_equal(other["flux"], c["flux"])
    assert ss.simulate_optical_stars(0, SDSS, seed=1)["flux"].shape == (0, SDSS.size)


def test_same_star_in_every_survey():
    sd, la = _optical("sdss"), _optical("lamost")
    for key in ("teff", "logg", "feh", "rv", "id"):
        np.testing.assert_array_equal(sd[key], la[key])
    assert not np.array_equal(sd["snr"], la["snr"])


def test_optical_noise_matches_ivar_and_snr():
    d = _optical()
    m = d["mask"]
    z = (d["flux"] - d["model"]) * np.sqrt(d["ivar"])
    assert np.std(z[m]) == pytest.approx(1.0, abs=0.03)
    cont_snr = np.where(m, d["continuum"] * np.sqrt(d["ivar"]), np.nan)
    np.testing.assert_allclose(np.nanmedian(cont_snr, axis=1), d["snr"], rtol=0.03)
    # lower continuum S/N at the red end of the grid (throughput) than just before it
    snr = np.where(m, d["continuum"] * np.sqrt(d["ivar"]), np.nan)
    edge = np.nanmedian(snr[:, -12:-2], axis=1)
    inner = np.nanmedian(snr[:, -400:-390], axis=1)
    assert np.median(edge / inner) < 0.8


def test_noiseless_shares_everything_but_flux():
    a = ss.simulate_optical_stars(64, SDSS, seed=21, components=True)
    b = ss.simulate_optical_stars(64, SDSS, seed=21, noiseless=True)
    for key in ("ivar", "mask", "teff", "snr"):
        np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_allclose(b["flux"][a["mask"]], a["model"][a["mask"]], rtol=1e-6)


def test_galah_is_normalised_and_resolved():
    w = sg.galah_wavelength(1024)
    d = ss.simulate_optical_stars(64, w, seed=4, survey="galah", components=True)
    assert d["flux"].shape == (64, 4096)
    m = d["mask"]
    assert np.median(d["flux"][m]) == pytest.approx(1.0, abs=0.03)
    assert np.all(np.isfinite(d["flux"])) and np.all(np.isfinite(d["ivar"]))
    lo, hi = sg.SURVEYS["galah"].snr_range
    assert np.all((d["snr"] >= lo * 0.999) & (d["snr"] <= hi * 1.001))
    # R = 28000 vs 2000: the same star's Hβ core is deeper at GALAH resolution
    f_hi, _ = ss.optical_model(w, 6000, 4.3, 0.0, resolving_power=28000)
    f_lo, _ = ss.optical_model(w, 6000, 4.3, 0.0, resolving_power=2000)
    assert f_hi.min() < f_lo.min() - 0.05


def test_ragged_sdss_grids():
    r = ss.simulate_optical_ragged(12, "sdss", seed=4)
    flat = ss.simulate_optical_stars(12, SDSS, seed=4)
    sizes = [w.size for w in r["wavelength"]]
    assert len(set(sizes)) > 3 and all(3800 <= s <= 4650 for s in sizes)
    for w, f, iv, m in zip(r["wavelength"], r["flux"], r["ivar"], r["mask"]):
        assert w.size == f.size == iv.size == m.size
        np.testing.assert_allclose(np.diff(np.log10(w)), 1e-4, rtol=1e-6)
        assert np.all(np.isfinite(f)) and not f[~m].any() and not iv[~m].any()
        assert m.mean() > 0.98
    for key in ("teff", "logg", "feh", "rv", "id"):
        np.testing.assert_array_equal(r[key], flat[key])


def test_bad_arguments():
    with pytest.raises(ValueError, match="not optical"):
        ss.simulate_optical_stars(2, SDSS, survey="apogee")
    with pytest.raises(ValueError):
        ss.simulate_optical_stars(2, SDSS[::-1])
    with pytest.raises(ValueError):
        ss.simulate_optical_stars(-1, SDSS)
    with pytest.raises(ValueError):
        ss.simulate_apogee_stars(2, version="model")


# --------------------------------------------------------------------------------------------
# Optical physics
# --------------------------------------------------------------------------------------------
def test_balmer_strength_peaks_near_9500K():
    f, _ = ss.optical_model(SDSS, [5000.0, 9500.0, 20000.0], 4.0, 0.0)
    for centre in (4862.68, 6564.61):  # Hβ, Hα
        cool, peak, hot = _ew(SDSS, f, centre, 30.0)
        assert peak > 2.0 * cool and peak > 2.0 * hot, centre


def test_metal_lines_grow_with_metallicity_and_coolness():
    f, _ = ss.optical_model(SDSS, 5000.0, 4.5, [-2.0, -1.0, 0.0, 0.5])
    for centre, half in ((3934.78, 15.0), (5271.0, 4.0), (5175.0, 15.0), (5894.0, 10.0)):
        ew = _ew(SDSS, f, centre, half)
        assert np.all(np.diff(ew) > 0), (centre, ew)
    f, _ = ss.optical_model(SDSS, [4500.0, 6000.0, 8000.0], 4.3, 0.0)
    ew = _ew(SDSS, f, 3934.78, 15.0)
    assert ew[0] > ew[1] > ew[2]


def test_pressure_broadened_balmer_wings():
    f, _ = ss.optical_model(SDSS, 9000.0, [1.5, 4.5], -0.5)
    for centre in (4862.68, 4341.68):
        ring = (np.abs(SDSS - centre) > 10) & (np.abs(SDSS - centre) < 40)
        giant, dwarf = (1.0 - f[:, ring]).mean(1)
        assert dwarf > 3.0 * giant and dwarf > 0.02, centre


def test_tio_bands_only_in_m_stars():
    f, _ = ss.optical_model(SDSS, [3300.0, 6000.0], [4.8, 4.4], 0.0)
    red = f[:, (SDSS > 7060) & (SDSS < 7100)].mean(1)
    blue = f[:, (SDSS > 7000) & (SDSS < 7040)].mean(1)
    assert red[0] / blue[0] < 0.7
    assert red[1] / blue[1] > 0.97
    assert np.all(ss.tio_strength(np.array([4100.0, 6000.0]), 4.5, 0.0) == 0)


def test_continuum_colour_and_doppler_shift():
    _, c = ss.optical_model(SDSS, [3500.0, 5800.0, 15000.0], 4.4, 0.0)
    blue_red = c[:, np.abs(SDSS - 4500) < 50].mean(1) / c[:, np.abs(SDSS - 8000) < 50].mean(1)
    assert blue_red[0] < blue_red[1] < blue_red[2]
    f, _ = ss.optical_model(SDSS, 9500.0, 4.0, 0.0, [0.0, 200.0])
    win = np.abs(SDSS - 6564.61) < 20
    lam_min = SDSS[win][np.argmin(f[:, win], axis=1)]
    assert lam_min[1] - lam_min[0] == pytest.approx(6564.61 * 200 / ss.C_KMS, abs=1.6)


# --------------------------------------------------------------------------------------------
# APOGEE
# --------------------------------------------------------------------------------------------
def test_apogee_shapes_labels_and_validity():
    p = _pair()
    for version, d in p.items():
        assert d["flux"].shape == d["flux_err"].shape == d["mask"].shape == (N_APO, 7514)
        assert d["flux"].dtype == np.float32 and d["flux_err"].dtype == np.float32
        np.testing.assert_array_equal(d["wavelength"], APOGEE)
        for key, value in d.items():
            if value.dtype.kind == "f":
                assert np.all(np.isfinite(value)), (version, key)
    c, r = p["clean"], p["real_like"]
    for key in ss.APOGEE_LABELS + ("TEFF_ERR", "O_FE_ERR", "snr", "id", "persist"):
        np.testing.assert_array_equal(c[key], r[key], err_msg=key)
    assert c["mask"].all() and np.all(c["flux_err"] == ss.CLEAN_FLUX_ERR)
    bad = ~r["mask"]
    assert 0 < bad.mean() < 0.02
    assert not r["flux"][bad].any() and not r["ivar"][bad].any() and not r["flux_err"][bad].any()
    assert np.all(r["flux_err"][r["mask"]] > 0)
    lab = {k: c[k] for k in ss.APOGEE_LABELS}
    assert np.all((lab["TEFF"] >= 3500) & (lab["TEFF"] <= 6000))
    assert np.all((lab["LOGG"] >= 0.5) & (lab["LOGG"] <= 5.0))
    assert np.all((lab["FE_H"] >= -2.5) & (lab["FE_H"] <= 0.5))
    for k in ("O_FE", "MG_FE"):
        assert np.all((lab[k] >= ss.APOGEE_ALPHA_RANGE[0]) & (lab[k] <= ss.APOGEE_ALPHA_RANGE[1]))
    assert np.all((c["snr"] >= 50) & (c["snr"] <= 1000))
    for k in ss.APOGEE_LABELS:
        err = c[k + "_ERR"]
        assert np.all(err > 0) and np.all(err < (150 if k == "TEFF" else 0.3)), k
    # clean spectra are normalised: continuum ≈ 1, lines below
    assert np.all(c["flux"] <= 1.0 + 1e-6) and np.median(c["flux"]) > 0.95


def test_apogee_alpha_sequence():
    d = ss.simulate_apogee_stars(640, seed=3, version="clean")
    fe, o, mg = d["FE_H"], d["O_FE"], d["MG_FE"]
    assert np.mean(mg[fe < -1.0]) > 0.2 and np.mean(o[fe < -1.0]) > 0.2
    assert abs(np.mean(mg[fe > -0.1])) < 0.1
    assert np.corrcoef(o, mg)[0, 1] > 0.7
    giants = d["LOGG"] < 3.5
    assert 0.55 < giants.mean() < 0.85
    assert np.all((d["TEFF"][giants] >= 3700) & (d["TEFF"][giants] <= 5300))


def test_apogee_determinism_and_prefix():
    a = ss.simulate_apogee_stars(70, seed=5, batch=64)
    b = ss.simulate_apogee_stars(20, seed=5)
    c = ss.simulate_apogee_pair(70, seed=5, batch=256)["real_like"]
    for key in a:
        np.testing.assert_array_equal(a[key], c[key], err_msg=key)
        if key != "wavelength":
            np.testing.assert_array_equal(a[key][:20], b[key], err_msg=key)
    clean = ss.simulate_apogee_stars(20, seed=5, version="clean")
    np.testing.assert_array_equal(clean["flux"], _pair_prefix_clean())


@functools.lru_cache(maxsize=None)
def _pair_prefix_clean() -> np.ndarray:
    return ss.simulate_apogee_pair(40, seed=5)["clean"]["flux"][:20]


def test_apogee_nan_masked():
    d = ss.simulate_apogee_stars(64, seed=6, nan_masked=True)
    m = d["mask"]
    assert np.all(np.isnan(d["flux"][~m])) and np.all(np.isnan(d["flux_err"][~m]))
    assert np.all(np.isfinite(d["flux"][m])) and not d["ivar"][~m].any()


def test_apogee_line_responses():
    f = ss.apogee_model(4500.0, 2.5, [-1.5, -0.5, 0.0, 0.4], 0.0, 0.0)
    for centre in (15207.5, 16040.7, 15294.6):     # Fe I grows with FE_H
        assert np.all(np.diff(_ew(APOGEE, f, centre, 1.0)) > 0), centre
    f = ss.apogee_model(4500.0, 2.5, 0.0, 0.0, [-0.1, 0.1, 0.3])
    assert np.all(np.diff(_ew(APOGEE, f, 15765.8, 1.0)) > 0)       # Mg I grows with MG_FE
    f = ss.apogee_model(4200.0, 1.8, 0.0, [-0.1, 0.1, 0.3], 0.0)
    assert np.all(np.diff(_ew(APOGEE, f, 15266.2, 0.8)) > 0)       # OH grows with O_FE
    teff = [3900.0, 4300.0, 4800.0, 5800.0]
    f = ss.apogee_model(teff, 2.0, 0.0, 0.0, 0.0)
    oh = _ew(APOGEE, f, 15266.2, 0.8)
    co = _ew(APOGEE, f, 15590.0, 14.0)
    fe = _ew(APOGEE, f, 15207.5, 1.0)
    assert np.all(np.diff(oh) < 0) and np.all(np.diff(co) < 0) and np.all(np.diff(fe) < 0)
    # molecules vanish above 5500 K: the OH line is then no deeper than its neighbourhood
    assert oh[-1] < 0.1 * oh[0]
    # Brackett wings are broader in dwarfs
    f = ss.apogee_model(5800.0, [1.5, 4.5], 0.0, 0.0, 0.0)
    ring = (np.abs(APOGEE - 16811.1) > 3) & (np.abs(APOGEE - 16811.1) < 20)
    giant, dwarf = (1 - f[:, ring]).mean(1)
    assert dwarf > giant + 0.003


def test_real_like_noise_and_continuum_error():
    r, c = _pair()["real_like"], _pair()["clean"]
    m = r["mask"]
    # noise model: flux = model · continuum_error + additive + N(0, flux_err)
    z = (r["flux"] - (r["model"] * r["continuum_error"] + r["additive"])) / np.where(
        m, r["flux_err"], 1.0)
    assert np.std(z[m]) == pytest.approx(1.0, abs=0.03)
    # flux_err ≈ 1/snr at the continuum
    cont_err = np.where(m & (c["flux"] > 0.98), r["flux_err"], np.nan)
    ratio = np.nanmedian(cont_err, axis=1) * r["snr"]
    assert np.all((ratio > 0.9) & (ratio < 1.25))
    # real − clean: a smooth per-chip continuum error plus noise of std ≈ 1/snr
    resid = r["flux"].astype(np.float64) - c["flux"]
    smooth_rms, noise_ratio = [], []
    for i in range(N_APO):
        fit = np.zeros(7514)
        for a, b in sg.contiguous_segments(APOGEE):
            ok = m[i, a:b]
            x = np.linspace(-1, 1, b - a)
            coef = np.polynomial.legendre.legfit(x[ok], resid[i, a:b][ok], 3)
            fit[a:b] = np.polynomial.legendre.legval(x, coef)
        smooth_rms.append(np.sqrt(np.mean(fit**2)))
        hp = (resid[i] - fit)[m[i]]
        robust = 1.4826 * np.median(np.abs(hp - np.median(hp)))
        noise_ratio.append(robust * r["snr"][i])
    smooth_rms, noise_ratio = np.array(smooth_rms), np.array(noise_ratio)
    assert np.median(smooth_rms) > 3e-3                 # continuum errors are there …
    assert np.mean(smooth_rms > 1e-3) > 0.9             # … in (nearly) every star
    # robust high-pass std tracks 1/snr (sqrt(flux) < 1 in lines, chip edges noisier)
    assert 0.8 < np.median(noise_ratio) < 1.3
    robust_std = noise_ratio / r["snr"]
    assert np.corrcoef(np.log(robust_std), np.log(1.0 / r["snr"]))[0, 1] > 0.9
    # persistence lifts the blue chip of flagged stars only
    blue = slice(0, 3028)
    lift = np.array([np.median(r["additive"][i, blue]) for i in range(N_APO)])
    assert np.all(lift[~r["persist"]] < 0.002) and np.all(lift[r["persist"]] > 0.003)


def test_line_list_mismatch_between_versions():
    clean = ss.apogee_model(4500.0, 2.5, 0.0, 0.1, 0.1)
    real = ss.apogee_model(4500.0, 2.5, 0.0, 0.1, 0.1, version="real_like")
    diff = np.abs(real - clean)[0]
    assert np.sqrt(np.mean(diff**2)) > 0.005 and diff.max() > 0.05
    ll = ss.apogee_line_list()
    assert 0.08 < np.std(np.log(ll.perturb)) < 0.2 and ll.extra_wave.size >= 20


def test_synthetic_gap_is_measurable_and_closable():
    """Ridge regression of FE_H on pixels: trained on clean it degrades on real-like spectra;
    trained on real-like it does better there (what fine-tuning exploits)."""
    train, test = ss.simulate_apogee_pair(256, seed=31), ss.simulate_apogee_pair(160, seed=32)

    def design(d):
        return np.where(d["mask"], d["flux"], 1.0).astype(np.float64) - 1.0

    def ridge(x, y, lam=1e-2):
        mu = y.mean()
        alpha = np.linalg.solve(x @ x.T + lam * np.eye(len(y)), y - mu)
        return x.T @ alpha, mu

    y, y_test = train["clean"]["FE_H"].astype(float), test["clean"]["FE_H"].astype(float)

    def rmse(w, mu, d):
        return np.sqrt(np.mean((design(d) @ w + mu - y_test) ** 2))

    w_c, mu_c = ridge(design(train["clean"]), y)
    w_r, mu_r = ridge(design(train["real_like"]), y)
    clean_on_clean = rmse(w_c, mu_c, test["clean"])
    clean_on_real = rmse(w_c, mu_c, test["real_like"])
    real_on_real = rmse(w_r, mu_r, test["real_like"])
    assert clean_on_real > 1.5 * clean_on_clean
    assert real_on_real < 0.8 * clean_on_real
