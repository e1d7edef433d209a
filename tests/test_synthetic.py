"""Tests of the embedded DESI-like galaxy simulator (spectrax.data.synthetic)."""
from __future__ import annotations

import functools

import numpy as np
import pytest

from spectrax.data import synthetic as syn
from spectrax.data.grids import DESI_NPIX, DESI_WAVE_STEP, desi_wavelength

WAVE = desi_wavelength()
N = 192  # three random-stream blocks


@functools.lru_cache(maxsize=None)
def _noisy(sample: str) -> dict:
    return syn.simulate_desi_galaxies(N, sample, seed=7, components=True)


@pytest.fixture(scope="module", params=["bgs", "elg"])
def noisy(request):
    """(sample, noisy spectra with components) for each sample."""
    return request.param, _noisy(request.param)


@pytest.fixture(scope="module")
def bgs_noiseless():
    return syn.simulate_desi_galaxies(512, "bgs", seed=3, noiseless=True, components=True)


@pytest.fixture(scope="module")
def elg_noiseless():
    return syn.simulate_desi_galaxies(N, "elg", seed=3, noiseless=True, components=True)


def _window_sum(values: np.ndarray, centre: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Σ values·Δλ over |λ − centre| < half, per row ([B, L], [B], [B] → [B])."""
    win = np.abs(WAVE[None] - centre[:, None]) < half[:, None]
    return (values * win).sum(1) * DESI_WAVE_STEP


# --------------------------------------------------------------------------------------------
# Shapes, dtypes, validity
# --------------------------------------------------------------------------------------------
def test_shapes_and_dtypes(noisy):
    _, d = noisy
    assert d["flux"].shape == d["ivar"].shape == d["mask"].shape == (N, DESI_NPIX)
    assert d["flux"].dtype == np.float32 and d["ivar"].dtype == np.float32
    assert d["mask"].dtype == np.bool_
    assert d["z"].shape == (N,) and d["z"].dtype == np.float64
    assert d["id"].dtype == np.int64 and len(np.unique(d["id"])) == N
    for key in ("ebv", "d4000", "oii_flux", "halpha_ew", "snr", "rmag"):
        assert d[key].shape == (N,), key


def test_no_nonfinite_values(noisy):
    _, d = noisy
    for key, value in d.items():
        if value.dtype.kind == "f":
            assert np.isfinite(value).all(), key


def test_masked_pixels_are_zero_and_rare(noisy):
    _, d = noisy
    bad = ~d["mask"]
    assert bad.any(), "cosmic rays / bad columns should mask some pixels"
    assert bad.mean() < 0.002
    assert np.all(d["flux"][bad] == 0) and np.all(d["ivar"][bad] == 0)
    assert np.all(d["ivar"][d["mask"]] > 0)


def test_zero_spectra():
    d = syn.simulate_desi_galaxies(0, "elg")
    assert d["flux"].shape == (0, DESI_NPIX) and d["z"].shape == (0,)


@pytest.mark.parametrize("bad", ["qso", "BGS", ""])
def test_invalid_sample_raises(bad):
    with pytest.raises(ValueError, match=repr(bad)):
        syn.simulate_desi_galaxies(4, bad)
    with pytest.raises(ValueError, match=repr(bad)):
        next(syn.iter_desi_galaxies(4, bad))


def test_invalid_n_and_seed_raise():
    with pytest.raises(ValueError, match="n must"):
        syn.simulate_desi_galaxies(-1)
    with pytest.raises(ValueError, match="seed must"):
        syn.simulate_desi_galaxies(2, seed=-3)


# --------------------------------------------------------------------------------------------
# Determinism and chunking
# --------------------------------------------------------------------------------------------
def test_same_seed_same_bytes_different_seed_differs():
    a = syn.simulate_desi_galaxies(70, "bgs", seed=11)
    b = syn.simulate_desi_galaxies(70, "bgs", seed=11)
    c = syn.simulate_desi_galaxies(70, "bgs", seed=12)
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
    assert not np.array_equal(a["flux"], c["flux"])
    assert not np.array_equal(a["z"], c["z"])


def test_iterator_equals_single_call_for_any_chunk_and_batch():
    n = 150
    whole = syn.simulate_desi_galaxies(n, "elg", seed=5, batch=256)
    for chunk in (64, 50):
        parts = list(syn.iter_desi_galaxies(n, "elg", seed=5, chunk=chunk))
        assert [len(p["z"]) for p in parts][0] == chunk
        assert sum(len(p["z"]) for p in parts) == n
        for key in whole:
            joined = np.concatenate([p[key] for p in parts])
            assert joined.tobytes() == whole[key].tobytes(), (chunk, key)
    small_batches = syn.simulate_desi_galaxies(n, "elg", seed=5, batch=1)
    assert small_batches["flux"].tobytes() == whole["flux"].tobytes()
    prefix = syn.simulate_desi_galaxies(20, "elg", seed=5)
    assert prefix["flux"].tobytes() == whole["flux"][:20].tobytes()


def test_noiseless_shares_parameters_with_noisy():
    noisy = syn.simulate_desi_galaxies(64, "bgs", seed=9, components=True)
    clean = syn.simulate_desi_galaxies(64, "bgs", seed=9, noiseless=True)
    for key in ("z", "ivar", "mask", "d4000", "oii_flux"):
        assert np.array_equal(noisy[key], clean[key]), key
    model = np.where(noisy["mask"], noisy["model"], 0)
    assert np.array_equal(clean["flux"], model)


# --------------------------------------------------------------------------------------------
# Redshifts and brightness
# --------------------------------------------------------------------------------------------
def _mode(z: np.ndarray, lo: float, hi: float) -> float:
    counts, edges = np.histogram(z, bins=np.arange(lo, hi + 1e-9, 0.05))
    return 0.5 * (edges[counts.argmax()] + edges[counts.argmax() + 1])


def test_bgs_redshift_distribution():
    z = syn.draw_redshifts(np.random.default_rng(0), 5000, "bgs")
    assert z.min() >= 0.02 and z.max() <= 0.6
    assert 0.2 <= np.median(z) <= 0.3
    assert 0.15 <= _mode(z, 0.0, 0.6) <= 0.3


def test_elg_redshift_distribution():
    z = syn.draw_redshifts(np.random.default_rng(0), 5000, "elg")
    assert z.min() >= 0.6 and z.max() <= 1.6
    assert 0.8 <= np.median(z) <= 1.0
    assert 0.75 <= _mode(z, 0.6, 1.6) <= 0.95
    assert np.mean(z > 1.1) > 0.15  # the tail to 1.6


def test_spectra_redshifts_follow_sampler(noisy):
    sample, d = noisy
    lo, hi = (0.02, 0.6) if sample == "bgs" else (0.6, 1.6)
    assert d["z"].min() >= lo and d["z"].max() <= hi


def test_continuum_signal_to_noise(noisy):
    sample, d = noisy
    snr = np.median(d["snr"])
    if sample == "bgs":
        assert 1.0 < snr < 5.0
    else:
        # ELG continua sit below S/N 1 per pixel (calibrated on the real dark-time coadds)
        assert snr < 1.0 and np.mean(d["snr"] < 1.0) > 0.8


def test_ivar_matches_scatter(noisy):
    _, d = noisy
    pull = (d["flux"] - d["model"]) * np.sqrt(d["ivar"])
    # Away from the sky lines the residual of sky subtraction is negligible.
    inst = syn.instrument()
    near_sky = (np.abs(WAVE[:, None] - inst.line_wave[None]) < 4).any(1)
    valid = d["mask"] & ~near_sky[None]
    assert abs(pull[valid].std() - 1.0) < 0.02
    assert abs(pull[valid].mean()) < 0.02
    # Including the sky lines the pulls stay close to unit variance.
    assert abs(pull[d["mask"]].std() - 1.0) < 0.05


def test_elg_oii_clearly_detected():
    d = _noisy("elg")
    centre, half = 3728.5 * (1 + d["z"]), 4.0 * (1 + d["z"])
    line = _window_sum(np.where(d["mask"], d["flux"] - d["continuum"], 0), centre, half)
    var = _window_sum(np.where(d["mask"], 1 / np.maximum(d["ivar"], 1e-30), 0), centre, half)
    snr = line / np.sqrt(var * DESI_WAVE_STEP)
    assert np.median(snr) > 5
    # and the flux is where the truth says it is
    assert np.median(line / d["oii_flux"]) == pytest.approx(1.0, abs=0.1)


def test_sky_lines_mostly_red():
    wave, flux = syn.sky_lines()
    assert flux[wave > 7000].sum() / flux.sum() == pytest.approx(0.85, abs=1e-9)
    assert flux[wave < 7000].max() == flux[np.argmin(np.abs(wave - 5578.9))]


# --------------------------------------------------------------------------------------------
# Physics in noiseless mode
# --------------------------------------------------------------------------------------------
def test_emission_lines_at_redshifted_rest_wavelength(bgs_noiseless):
    d = bgs_noiseless
    emission = d["model"] - d["continuum"]
    centre = syn.EMISSION_LINES["OIII_5008"] * (1 + d["z"])
    win = np.abs(WAVE[None] - centre[:, None]) < 25.0  # [OIII] 4960 is ≥ 48 Å away
    strong = d["oiii_flux"] > 1.0
    assert strong.sum() > 50
    centroid = (emission * win * WAVE[None]).sum(1) / (emission * win).sum(1)
    assert np.abs(centroid - centre)[strong].max() < 0.05


def test_oii_doublet_at_redshifted_wavelength(elg_noiseless):
    d = elg_noiseless
    emission = d["model"] - d["continuum"]
    lo, hi = syn.EMISSION_LINES["OII_3726"], syn.EMISSION_LINES["OII_3729"]
    win = np.abs(WAVE[None] - 0.5 * (lo + hi) * (1 + d["z"][:, None])) < 12.0
    centroid = (emission * win * WAVE[None]).sum(1) / (emission * win).sum(1) / (1 + d["z"])
    # the flux-weighted doublet centre lies between the two rest wavelengths
    assert np.all((centroid > lo - 0.05) & (centroid < hi + 0.05))
    assert np.allclose(_window_sum(emission, 3728.5 * (1 + d["z"]), np.full(N, 12.0 * 2.6)),
                       d["oii_flux"], rtol=2e-3)


def _dust_ratio(d: dict, line_a: str, line_b: str) -> np.ndarray:
    """Attenuation of line a over line b for each spectrum's nebular E(B−V): [n]."""
    k_a, k_b = syn.calzetti_k(np.array([syn.EMISSION_LINES[line_a], syn.EMISSION_LINES[line_b]]))
    return 10 ** (-0.4 * (k_a - k_b) * d["ebv"])


def test_fixed_doublet_ratios(bgs_noiseless):
    """[OIII] 5008/4960 = 2.98 and [NII] 6585/6550 = 3.05 intrinsically; dust (stronger at the
    bluer line) raises the observed ratios by ≤ 1.2%."""
    d = bgs_noiseless
    emission = d["model"] - d["continuum"]
    half = np.full(len(d["z"]), 20.0)

    def line(name, h=half):
        return _window_sum(emission, syn.EMISSION_LINES[name] * (1 + d["z"]), h)

    ok = d["oiii_flux"] > 1.0
    ratio = line("OIII_5008") / line("OIII_4960")
    expected = 2.98 * _dust_ratio(d, "OIII_5008", "OIII_4960")
    assert ok.sum() > 50
    assert np.allclose(ratio[ok], expected[ok], rtol=2e-3)
    assert np.all(ratio[ok] > 2.98 * 0.998)
    # [NII] sits 15–21 Å from Hα: narrow lines and narrow windows keep the wings out
    on_grid = (syn.EMISSION_LINES["NII_6585"] + 20) * (1 + d["z"]) < WAVE[-1]
    narrow = on_grid & (d["halpha_flux"] > 20) & (d["sigma_gas"] < 60)
    half_n = np.full(len(d["z"]), 5.0)
    r = line("NII_6585", half_n)[narrow] / line("NII_6550", half_n)[narrow]
    expected = 3.05 * _dust_ratio(d, "NII_6585", "NII_6550")[narrow]
    assert narrow.sum() > 10
    assert np.median(r / expected) == pytest.approx(1.0, abs=0.02)


def test_balmer_decrement_follows_dust(bgs_noiseless):
    d = bgs_noiseless
    emission = d["model"] - d["continuum"]
    half = np.full(len(d["z"]), 10.0)
    on_grid = (6600 * (1 + d["z"]) < WAVE[-1]) & (d["halpha_flux"] > 30) & (d["sigma_gas"] < 80)
    ha = _window_sum(emission, 6564.6 * (1 + d["z"]), half)
    hb = _window_sum(emission, 4862.7 * (1 + d["z"]), half)
    k_hb, k_ha = syn.calzetti_k(np.array([4862.7, 6564.6]))
    expected = 2.86 * 10 ** (0.4 * (k_hb - k_ha) * d["ebv"])
    assert on_grid.sum() > 20
    assert np.allclose((ha / hb)[on_grid], expected[on_grid], rtol=0.05)
    assert np.all((ha / hb)[on_grid] >= 2.86 * 0.95)


def test_line_flux_is_conserved_on_grid(bgs_noiseless):
    d = bgs_noiseless
    emission = d["model"] - d["continuum"]
    names = list(syn.EMISSION_LINES)
    rest = np.array([syn.EMISSION_LINES[k] for k in names])
    obs = rest[None] * (1 + d["z"][:, None])
    # lines whose whole window (±30 Å) lies on the grid; the others must be entirely off it
    on = (obs > WAVE[0] + 30) & (obs < WAVE[-1] - 30)
    off = (obs < WAVE[0] - 30) | (obs > WAVE[-1] + 30)
    clean = (on | off).all(1)
    total = emission.sum(1) * DESI_WAVE_STEP
    assert clean.sum() > 100
    expect = (d["line_flux"] * on).sum(1)
    assert np.allclose(total[clean], expect[clean], rtol=1e-4)
    lf = d["line_flux"]
    assert np.allclose(lf[:, names.index("OIII_5008")] / lf[:, names.index("OIII_4960")],
                       2.98 * _dust_ratio(d, "OIII_5008", "OIII_4960"))
    assert np.allclose(lf[:, names.index("NII_6585")] / lf[:, names.index("NII_6550")],
                       3.05 * _dust_ratio(d, "NII_6585", "NII_6550"))
    assert np.allclose(lf[:, names.index("Halpha")], d["halpha_flux"])


def test_d4000_separates_passive_and_star_forming(bgs_noiseless):
    d = bgs_noiseless
    passive = d["passive"]
    assert passive.sum() > 50 and (~passive).sum() > 50
    assert np.median(d["d4000"][passive]) > 1.8
    # post-starbursts (quenched after a recent burst) are passive with a weaker break
    old = passive & ~d["burst"]
    assert np.percentile(d["d4000"][old], 5) > 1.6
    assert np.median(d["d4000"][~passive]) < 1.5
    assert np.percentile(d["d4000"][~passive], 90) < np.percentile(d["d4000"][old], 10)
    # the narrow index's bimodality (Kauffmann et al. 2003: peaks near 1.3 and 1.9)
    assert 1.15 < np.median(d["dn4000"][~passive]) < 1.4
    assert 1.75 < np.median(d["dn4000"][old]) < 2.2


def test_d4000_truth_matches_observed_continuum(bgs_noiseless):
    d = bgs_noiseless
    rest = WAVE[None] / (1 + d["z"][:, None])
    fnu = d["continuum"] * WAVE[None] ** 2
    red = (rest >= 4050) & (rest <= 4250)
    blue = (rest >= 3750) & (rest <= 3950)
    ok = (3750 * (1 + d["z"]) > WAVE[0] + 5) & (4250 * (1 + d["z"]) < WAVE[-1] - 5)
    measured = (fnu * red).sum(1) / red.sum(1) / ((fnu * blue).sum(1) / blue.sum(1))
    assert ok.sum() > 100
    assert np.allclose(measured[ok], d["d4000"][ok], rtol=0.03)


def test_emission_equivalent_widths_in_range(noisy):
    sample, d = noisy
    sf = ~d["passive"]
    if sample == "bgs":
        ew_obs = d["halpha_ew"][sf]
        assert 5 <= np.median(ew_obs) <= 200
    else:
        # SPS + Cloudy: the EW follows from the star-formation history (no drawn EW any more)
        assert np.all((d["oii_ew"] > 5) & (d["oii_ew"] < 400))
        assert 20 < np.median(d["oii_ew"]) < 120
        assert np.all(d["oii_flux"] > 0.5) and np.median(d["oii_flux"]) < 30


def test_calzetti_curve():
    assert syn.calzetti_k(np.array([5500.0]))[0] == pytest.approx(4.05, abs=0.01)
    k = syn.calzetti_k(np.linspace(1300, 12000, 200))
    assert np.all(np.diff(k) < 0) and np.all(k >= 0)
