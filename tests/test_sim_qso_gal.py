"""Tests of the grid-generic quasar and galaxy simulators (spectrax.data.sim_quasars,
spectrax.data.sim_galaxies)."""
from __future__ import annotations

import functools

import numpy as np
import pytest

from spectrax.data import sim_galaxies as sg
from spectrax.data.sps import calzetti_k
from spectrax.data import sim_quasars as sq
from spectrax.data.synthetic import sky_lines

SDSS = 10 ** (3.5563 + 1e-4 * np.arange(4600))           # 3600–10350 Å, log-linear
LAMOST = 10 ** (3.5682 + 1e-4 * np.arange(3900))         # 3700–9050 Å, log-linear
DESI = 3600.0 + 0.8 * np.arange(7781)                    # linear 0.8 Å
R_SDSS = 2000.0
N = 128  # two random-stream blocks


def _simulate(kind: str, n: int, seed: int, **kw) -> dict:
    kw.setdefault("resolving_power", R_SDSS)
    wave = kw.pop("wave", SDSS)
    fn = sq.simulate_quasars if kind == "qso" else sg.simulate_galaxies
    return fn(n, wave, seed, **kw)


@functools.lru_cache(maxsize=None)
def _noisy(kind: str) -> dict:
    return _simulate(kind, N, 7, components=True)


@pytest.fixture(scope="module", params=["qso", "gal"])
def noisy(request):
    """(kind, noisy spectra with components on the SDSS-like grid)."""
    return request.param, _noisy(request.param)


@functools.lru_cache(maxsize=None)
def _noiseless(kind: str, seed: int = 3, **kw) -> dict:
    return _simulate(kind, 256, seed, noiseless=True, components=True, **kw)


def _pix_width(wave: np.ndarray) -> np.ndarray:
    edges = np.concatenate([[1.5 * wave[0] - 0.5 * wave[1]], 0.5 * (wave[1:] + wave[:-1]),
                            [1.5 * wave[-1] - 0.5 * wave[-2]]])
    return np.diff(edges)


def _window_integral(wave, values, centre, half):
    """Σ values·Δλ over |λ − centre| < half per row ([B, L], [B], [B] → [B])."""
    win = np.abs(wave[None] - centre[:, None]) < half[:, None]
    return (values * win * _pix_width(wave)[None]).sum(1)


# --------------------------------------------------------------------------------------------
# Shapes, dtypes, validity
# --------------------------------------------------------------------------------------------
def test_shapes_dtypes_finite(noisy):
    kind, d = noisy
    L = SDSS.size
    assert d["flux"].shape == d["ivar"].shape == d["mask"].shape == (N, L)
    assert d["flux"].dtype == np.float32 and d["ivar"].dtype == np.float32
    assert d["mask"].dtype == np.bool_
    assert d["z"].shape == (N,) and d["z"].dtype == np.float64
    assert d["id"].dtype == np.int64 and len(np.unique(d["id"])) == N
    assert d["snr"].shape == (N,)
    if kind == "qso":
        assert d["alpha"].shape == (N,)
        assert d["line_flux"].shape == (N, len(sq.LINE_NAMES))
    for key, value in d.items():
        if value.dtype.kind == "f":
            assert np.isfinite(value).all(), key


def test_masked_pixels_zero_and_rare(noisy):
    _, d = noisy
    bad = ~d["mask"]
    assert bad.any(), "cosmic rays / bad columns should mask some pixels"
    assert bad.mean() < 0.005
    assert np.all(d["flux"][bad] == 0) and np.all(d["ivar"][bad] == 0)
    assert np.all(d["ivar"][d["mask"]] > 0)


def test_zero_rows_and_other_grids():
    for fn in (sq.simulate_quasars, sg.simulate_galaxies):
        empty = fn(0, SDSS, 1, resolving_power=R_SDSS)
        assert empty["flux"].shape == (0, SDSS.size) and empty["z"].shape == (0,)
        # per-pixel R on a linear grid, scalar R on a LAMOST-like grid
        r_desi = np.interp(DESI, [3600, 9824], [2000, 5000])
        a = fn(5, DESI, 1, resolving_power=r_desi)
        b = fn(5, LAMOST, 1, resolving_power=1800)
        assert a["flux"].shape == (5, DESI.size) and b["flux"].shape == (5, LAMOST.size)
        assert np.isfinite(a["flux"]).all() and np.isfinite(b["flux"]).all()
        # the physical parameters do not depend on the grid
        assert np.array_equal(a["z"], b["z"])


@pytest.mark.parametrize("fn", [sq.simulate_quasars, sg.simulate_galaxies])
def test_invalid_arguments_raise(fn):
    with pytest.raises(ValueError, match="n must"):
        fn(-1, SDSS, 0, resolving_power=2000)
    with pytest.raises(ValueError, match="seed must"):
        fn(2, SDSS, -1, resolving_power=2000)
    with pytest.raises(ValueError, match="increasing"):
        fn(2, SDSS[::-1], 0, resolving_power=2000)
    with pytest.raises(ValueError, match="resolving_power"):
        fn(2, SDSS, 0, resolving_power=np.ones(7))
    with pytest.raises(ValueError, match="resolving_power"):
        fn(2, SDSS, 0, resolving_power=-5.0)
    with pytest.raises(ValueError, match="snr_range"):
        fn(2, SDSS, 0, resolving_power=2000, snr_range=(5, 1))


# --------------------------------------------------------------------------------------------
# Determinism and chunking
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["qso", "gal"])
def test_deterministic_and_chunk_independent(kind):
    n = 100
    a = _simulate(kind, n, 11)
    b = _simulate(kind, n, 11)
    c = _simulate(kind, n, 12)
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
    assert not np.array_equal(a["flux"], c["flux"]) and not np.array_equal(a["z"], c["z"])
    prefix = _simulate(kind, 30, 11)
    middle = _simulate(kind, 50, 11, start=40, batch=64)
    for key in a:
        assert prefix[key].tobytes() == a[key][:30].tobytes(), key
        assert middle[key].tobytes() == a[key][40:90].tobytes(), key


@pytest.mark.parametrize("kind", ["qso", "gal"])
def test_noiseless_shares_everything_but_the_noise(kind):
    noisy = _simulate(kind, 64, 9, components=True)
    clean = _simulate(kind, 64, 9, noiseless=True)
    for key in ("z", "ivar", "mask", "snr"):
        assert np.array_equal(noisy[key], clean[key]), key
    assert np.array_equal(clean["flux"], np.where(noisy["mask"], noisy["model"], 0))
    assert not np.array_equal(clean["flux"], noisy["flux"])


# --------------------------------------------------------------------------------------------
# Redshifts and signal to noise
# --------------------------------------------------------------------------------------------
def test_redshift_ranges():
    rng = np.random.default_rng(0)
    zq = sq.draw_qso_redshifts(rng, 20000)
    assert zq.min() >= 0.5 and zq.max() <= 3.5
    assert 1.6 <= np.median(zq) <= 2.2 and np.mean(zq > 2.1) > 0.3
    lrg = rng.random(20000) < 0.15
    zg = sg.draw_galaxy_redshifts(rng, 20000, lrg)
    assert zg[~lrg].min() >= 0.02 and zg[~lrg].max() <= 0.4
    assert zg[lrg].min() >= 0.15 and zg[lrg].max() <= 0.7
    hist, edges = np.histogram(zg[~lrg], bins=np.arange(0.0, 0.41, 0.025))
    assert 0.075 <= edges[hist.argmax()] <= 0.125           # main-sample peak near 0.1
    assert 0.35 <= np.median(zg[lrg]) <= 0.55
    # the simulators use these distributions and honour their options
    assert _noisy("qso")["z"].min() >= 0.5 and _noisy("qso")["z"].max() <= 3.5
    g = _noisy("gal")
    assert g["z"].min() >= 0.02 and g["z"].max() <= 0.7
    assert g["z"][~g["lrg"]].max() <= 0.4 and g["passive"][g["lrg"]].all()
    assert _simulate("gal", 64, 2, lrg_fraction=0.0)["z"].max() <= 0.4
    zr = _simulate("qso", 64, 2, z_range=(2.0, 2.2))["z"]
    assert zr.min() >= 2.0 and zr.max() <= 2.2


def test_signal_to_noise_matches_drawn_value(noisy):
    kind, d = noisy
    lo, hi = (2.0, 20.0) if kind == "qso" else (3.0, 30.0)
    assert d["snr"].min() >= lo and d["snr"].max() <= hi
    measured = np.array([np.median((f * np.sqrt(iv))[m])
                         for f, iv, m in zip(d["flux"], d["ivar"], d["mask"])])
    ratio = measured / d["snr"]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.05)
    assert np.mean(np.abs(ratio - 1) < 0.15) > 0.9
    # fainter objects get lower S/N
    mag = d["mag"] if kind == "qso" else d["rmag"]
    assert np.corrcoef(mag, np.log(d["snr"]))[0, 1] < -0.5


def test_ivar_matches_scatter(noisy):
    _, d = noisy
    pull = (d["flux"] - d["model"]) * np.sqrt(d["ivar"])
    lw, _ = sky_lines()
    near_sky = (np.abs(SDSS[:, None] - lw[None]) < 8).any(1)
    valid = d["mask"] & ~near_sky[None]
    assert abs(pull[valid].std() - 1.0) < 0.02
    assert abs(pull[valid].mean()) < 0.02


# --------------------------------------------------------------------------------------------
# Quasar physics
# --------------------------------------------------------------------------------------------
def test_qso_broad_lines_at_redshifted_rest_wavelength():
    d = _noiseless("qso")
    emission = d["model"] - d["continuum"] * d["transmission"]
    for name in ("MgII", "CIV", "Hbeta"):
        i = sq.LINE_NAMES.index(name)
        shift = 1 - d["blueshift"] / sq.C_KMS if name == "CIV" else 1.0
        centre = sq.QSO_LINES[name][0] * (1 + d["z"]) * shift
        on = (centre > SDSS[0] + 200) & (centre < SDSS[-1] - 200)
        assert on.sum() > 20, name
        half = 0.02 * centre                                  # ±6000 km/s: the line
        flux = _window_integral(SDSS, emission, centre, half)[on]
        truth = d["line_flux"][on, i]
        # CIV has He II and Si IV within reach; Hβ has [O III]: loose upper bound there
        assert np.all(flux > 0.8 * truth), name
        assert np.median(flux / truth) == pytest.approx(1.0, abs=0.02 if name == "MgII" else 0.3)
        # the emission peaks at the expected wavelength (within 0.3% ≈ 900 km/s); the search
        # window (±1.5%) excludes [O III] 5008, which is 3% redward of Hβ and often higher
        win = np.abs(SDSS[None] - centre[:, None]) < 0.015 * centre[:, None]
        peak = SDSS[np.argmax(np.where(win, emission, -np.inf), axis=1)]
        assert np.median(np.abs(peak[on] / centre[on] - 1)) < 0.003, name


def test_qso_mgii_excess_in_high_snr_noisy_spectra():
    d = _simulate("qso", 64, 21, snr_range=(40.0, 50.0), z_range=(0.6, 1.6), components=True)
    resid = np.where(d["mask"], d["flux"] - d["continuum"], 0.0)
    centre = 2799.12 * (1 + d["z"])
    half = 0.005 * centre                                      # ±1500 km/s: the core
    line = _window_integral(SDSS, resid, centre, half)
    off = _window_integral(SDSS, resid, 3300.0 * (1 + d["z"]), half)  # no line at 3300 Å
    cont = _window_integral(SDSS, d["continuum"], centre, half)
    assert np.all(line > 0.03 * cont)
    assert np.median(np.abs(off) / cont) < 0.01


def test_lya_forest_mean_transmission():
    wave_abs = SDSS / sq.LYA - 1  # absorber redshift of each pixel
    means = {}
    for z_abs, z_qso in ((2.5, (2.7, 3.0)), (3.5, (3.7, 4.0))):
        # Quasars a little beyond z_abs so these pixels lie between their Lyβ and Lyα.
        d = _noiseless("qso", seed=4, z_range=z_qso)
        sel = np.abs(wave_abs - z_abs) < 0.1
        means[z_abs] = d["transmission"][:, sel].mean()
        # transmission is 1 redward of Lyα (apart from absorber tails right at the line)
        red = SDSS[None] > 1225.0 * (1 + d["z"][:, None])
        assert d["transmission"][red].min() > 0.999
        # the noiseless model is (continuum + lines) × transmission: the forest is visible
        rest = SDSS[None] / (1 + d["z"][:, None])
        forest = (rest > 1070) & (rest < 1170)
        ratio = d["model"] / d["continuum"]
        assert ratio[forest].mean() < 0.9 * ratio[(rest > 1290) & (rest < 1350)].mean()
    assert means[2.5] == pytest.approx(0.80, abs=0.03)
    assert means[3.5] == pytest.approx(0.60, abs=0.03)
    assert means[3.5] < means[2.5] - 0.1


def test_qso_continuum_power_law():
    d = _noiseless("qso")
    assert np.mean(d["alpha"]) == pytest.approx(-0.5, abs=0.08)
    assert np.std(d["alpha"]) == pytest.approx(0.3, abs=0.08)
    # continuum slope redward of the forest at z > 2 (no host, weak Balmer continuum)
    hi = d["z"] > 2.0
    rest = SDSS[None] / (1 + d["z"][hi, None])
    c = d["continuum"][hi]
    sel_a, sel_b = (rest > 1320) & (rest < 1340), (rest > 1440) & (rest < 1460)
    fa = np.array([row[s].mean() for row, s in zip(c, sel_a)])
    fb = np.array([row[s].mean() for row, s in zip(c, sel_b)])
    slope = np.log(fb / fa) / np.log(1450 / 1330)            # f_λ ∝ λ^(−2−α)
    assert np.median(np.abs(slope - (-2 - d["alpha"][hi]))) < 0.15


# --------------------------------------------------------------------------------------------
# Galaxy physics
# --------------------------------------------------------------------------------------------
def test_galaxy_oiii_doublet_ratio_and_flux():
    d = _noiseless("gal")
    emission = d["model"] - d["continuum"]
    z = d["z"]
    strong = d["oiii_flux"] > 2.0
    assert strong.sum() > 30
    half = np.full(z.size, 12.0) * (1 + z)                      # [O III] lines are 48 Å apart
    f5008 = _window_integral(SDSS, emission, 5008.2 * (1 + z), half)[strong]
    f4960 = _window_integral(SDSS, emission, 4960.3 * (1 + z), half)[strong]
    assert np.median(f5008 / f4960) == pytest.approx(2.98, rel=0.01)
    # dust (Calzetti, nebular E(B−V) up to 1) raises the observed ratio by up to ~4%
    k4960, k5008 = calzetti_k(np.array([4960.3, 5008.2]))
    expected = 2.98 * 10 ** (0.4 * (k4960 - k5008) * d["ebv"][strong])
    assert np.all(np.abs(f5008 / f4960 / expected - 1) < 0.01)
    assert np.median(f5008 / d["oiii_flux"][strong]) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("resolving_power", [1500.0, 5000.0])
def test_galaxy_line_width_follows_resolution(resolving_power):
    d = _noiseless("gal", resolving_power=resolving_power)
    emission = d["model"] - d["continuum"]
    z = d["z"]
    centre = 5008.2 * (1 + z)
    strong = d["oiii_flux"] > 2.0
    win = np.abs(SDSS[None] - centre[:, None]) < 12.0 * (1 + z[:, None])
    w = emission * win * _pix_width(SDSS)[None]
    mean = (w * SDSS).sum(1) / w.sum(1)
    sigma = np.sqrt((w * (SDSS[None] - mean[:, None]) ** 2).sum(1) / w.sum(1))
    dl = np.interp(centre, SDSS, _pix_width(SDSS))
    expect = np.sqrt((centre * d["sigma_gas"] / sq.C_KMS) ** 2
                     + (centre / (2.3548 * resolving_power)) ** 2 + dl**2 / 12)
    assert np.median(np.abs(sigma[strong] / expect[strong] - 1)) < 0.02


def test_galaxy_continuum_d4000_separates_populations():
    d = _noiseless("gal")
    assert np.median(d["d4000"][d["lrg"]]) > 1.8
    assert np.median(d["d4000"][~d["passive"]]) < 1.5
