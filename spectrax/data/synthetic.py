"""Simulated DESI-like galaxy spectra: the embedded default data of spectrax.

Everything is numpy (no jax) and deterministic from ``(seed, sample)``. Spectra are drawn in
blocks of :data:`BLOCK` rows whose random streams come from
``SeedSequence([seed, sample_code, block_index])``, so row ``i`` depends only on
``(seed, sample, i)``: any chunking or batching gives the same bytes, and the first ``m`` rows
of ``n`` spectra equal ``m`` spectra.

Physics model (vacuum wavelengths in Å; flux densities in 1e-17 erg/s/cm²/Å; line fluxes in
1e-17 erg/s/cm²; velocities in km/s):

Grid and redshift
  The observed grid is the merged DESI coadd grid (3600–9824 Å, 0.8 Å, 7781 px,
  :func:`spectrax.data.grids.desi_wavelength`). Everything is evaluated directly on it:
  λ_obs = λ_rest (1+z). ``bgs``: p(z) ∝ z² exp(−(z/0.19)^1.5) on 0.02–0.6 (peak 0.23).
  ``elg``: split normal with mode 0.85, σ 0.12 below and 0.35 above, on 0.6–1.6.

Stellar continuum (rest frame, smooth part)
  Two old templates (blackbody 4600 K times a logistic 4000 Å break, width 15 Å, tuned so the
  line-free D4000 is 1.8 and 2.3) and one young template (blackbody 14000 K with a weak
  break, line-free D4000 ≈ 1.05). A spectrum is ``(1−f_young)·old + f_young·young``, with the
  old part a per-spectrum mixture of the two old templates; templates are normalised at
  5500 Å, so f_young is the young fraction of the 5500 Å light. D4000 = <f_ν>(4050–4250) /
  <f_ν>(3750–3950) (Bruzual 1983 bands).

Stellar absorption
  Each population carries its own Gaussian optical-depth features, continuum·exp(−τ), with
  ∫τ dλ equal to the rest equivalent width (×(1+z) observed). Old: Ca II K/H, G band, Mg b
  triplet, Fe 5270/5335, Na D, Ca II triplet, weak Balmer; strength scaled by a metallicity
  factor 0.7–1.3. Young: H9…Hα Balmer series and weak Ca II K; strength scaled by a factor
  0.3–1.5 (post-starburst spectra are at the top). Widths: intrinsic width (1+z) ⊕ stellar
  velocity dispersion σ* (50–300 km/s) ⊕ instrument ⊕ pixel.

Nebular emission
  Lines at the rest wavelengths of ``EMISSION_LINES``. One driver line sets the flux scale from
  its observed rest-frame equivalent width against the smooth attenuated continuum: Hα for
  ``bgs`` (star-forming 5–200 Å, median 25; passive 0–3 Å with LINER-like ratios), the [OII]
  doublet for ``elg`` (10–100 Å, median 40). Intrinsic ratios to Hβ: case B Balmer series
  (Hα/Hβ = 2.86, Hγ 0.468, Hδ 0.259), HeI 0.1, [OIII]5008/Hβ and [NII]6585/Hα drawn on an
  anticorrelated BPT-like sequence, fixed doublets [OIII] 5008/4960 = 2.98 and [NII]
  6585/6550 = 3.05, [NeIII] = 0.08·[OIII]5008, [OII] 3729/3726 = 0.35–1.5, [SII] 6718/6733 =
  0.8–1.4. Gas dispersion σ_gas 30–150 km/s.

Dust
  Calzetti et al. (2000) curve k(λ), attenuation 10^(−0.4 k E). Lines use the nebular
  E(B−V) (0–0.5, truth key ``ebv``); the stellar continuum uses 0.44·E(B−V) (Calzetti 2000).

Flux scale
  The continuum is scaled so its mean over observed 5600–6900 Å equals the flux density of a
  drawn fibre r magnitude (AB, λ_eff 6250 Å): ``bgs`` 18.0–20.5, ``elg`` 22.0–23.6 (number
  counts rising to the faint end).

Instrument
  Resolving power linear in λ within each camera (b 2000→3200, r 3200→4100, z 4100→5000),
  throughput-weighted in the camera overlaps; line σ gets λ/(2.3548 R) added in quadrature.
  Gaussians are evaluated at pixel centres with the pixel's top-hat variance Δλ²/12 added to σ²
  (σ ≥ ~1 px, so the pixel sums conserve line flux to < 1e-6). Total throughput follows a
  smooth DESI-like curve (low at 3600 and 9824 Å) times a cosine taper over the last 60 Å of
  each camera at the dichroic overlaps; coadded counts are the sum over cameras.

Sky and noise
  Sky (per fibre, before subtraction) = continuum ∝ (λ/5500)^1.5 plus the night-sky lines of
  :func:`sky_lines` (instrumental width, 85% of the line flux redward of 7000 Å), scaled per
  spectrum (bright time for ``bgs``). Per pixel, variance = [(object + sky)·G + n_cam·read²·G²]
  in flux², G = 1/(throughput·counts-per-flux·exposure); ivar = 1/variance. Flux = object +
  sky-subtraction residual (per-line scale errors of ~2%, a common wavelength offset of
  ~0.03 Å, ~0.5% of the sky continuum) + Gaussian noise. Cosmic rays (Poisson, mean 3 per
  spectrum) and fixed bad columns of a fibre's petal are masked pixels: mask False, flux 0,
  ivar 0.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import numpy as np

from spectrax.data.grids import (DESI_CAMERAS, DESI_NPIX, DESI_WAVE_MIN, DESI_WAVE_STEP,
                                  desi_wavelength)

C_KMS = 299792.458
SQRT_2PI = float(np.sqrt(2.0 * np.pi))
FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
BLOCK = 64  # rows per independent random stream; chunking never changes the output

SAMPLES = ("bgs", "elg")

# ---------------------------------------------------------------------------------------------
# Line lists (rest-frame vacuum Å)
# ---------------------------------------------------------------------------------------------
EMISSION_LINES = {
    "OII_3726": 3727.1, "OII_3729": 3729.9, "NeIII_3869": 3870.2, "Hdelta": 4102.9,
    "Hgamma": 4341.7, "Hbeta": 4862.7, "OIII_4960": 4960.3, "OIII_5008": 5008.2,
    "HeI_5877": 5877.3, "OI_6302": 6302.0, "NII_6550": 6549.9, "Halpha": 6564.6,
    "NII_6585": 6585.3, "SII_6718": 6718.3, "SII_6733": 6732.7,
}
_EM_NAMES = tuple(EMISSION_LINES)
_EM_WAVE = np.array([EMISSION_LINES[k] for k in _EM_NAMES])
_EM = {name: i for i, name in enumerate(_EM_NAMES)}
OIII_RATIO = 2.98  # [OIII] 5008/4960, atomic physics
NII_RATIO = 3.05  # [NII] 6585/6550, atomic physics
BALMER_CASE_B = {"Halpha": 2.86, "Hbeta": 1.0, "Hgamma": 0.468, "Hdelta": 0.259}

# (rest λ, rest EW at strength 1, intrinsic σ) in Å. The intrinsic widths stand in for the
# blends and damping wings that make these features broad in integrated galaxy light.
OLD_ABSORPTION = np.array([
    (3934.8, 8.0, 6.0),   # Ca II K
    (3969.6, 7.0, 6.0),   # Ca II H (+ Hε)
    (4102.9, 1.0, 5.0),   # Hδ
    (4305.0, 5.0, 12.0),  # G band (CH)
    (4341.7, 1.0, 5.0),   # Hγ
    (4862.7, 1.5, 5.0),   # Hβ
    (5168.8, 1.5, 2.0), (5174.1, 1.5, 2.0), (5185.0, 1.5, 2.0),  # Mg b triplet
    (5270.0, 2.5, 5.0), (5335.0, 2.0, 5.0),  # Fe 5270, Fe 5335 (Lick)
    (5891.6, 1.8, 1.5), (5897.6, 1.8, 1.5),  # Na D
    (6564.6, 1.0, 4.0),   # Hα
    (8500.4, 1.2, 1.5), (8544.4, 3.0, 1.5), (8664.5, 2.5, 1.5),  # Ca II triplet
])
YOUNG_ABSORPTION = np.array([
    (3836.5, 4.0, 8.0),   # H9
    (3890.2, 5.0, 8.0),   # H8
    (3934.8, 1.0, 4.0),   # Ca II K (weak in A stars)
    (3971.2, 6.0, 8.0),   # Hε
    (4102.9, 7.0, 9.0),   # Hδ
    (4341.7, 7.0, 9.0),   # Hγ
    (4862.7, 7.0, 9.0),   # Hβ
    (6564.6, 5.0, 8.0),   # Hα
])

# Night-sky lines (observed vacuum Å) and relative peak ranks; the OH group is rescaled below so
# that 85% of the line flux lies redward of 7000 Å.
_SKY_BLUE = {5578.9: 1.0, 5891.6: 0.3, 5897.6: 0.3, 6302.0: 1.0, 6365.5: 0.35}
_SKY_OH = {
    7278.0: 0.5, 7318.0: 0.5, 7343.0: 0.5, 7753.0: 0.6, 7916.0: 0.6, 7967.0: 0.6, 7996.0: 0.6,
    8347.0: 0.8, 8401.0: 0.8, 8433.0: 0.8, 8771.0: 0.9, 8781.0: 0.9, 8830.0: 0.9, 8888.0: 0.9,
    8922.0: 0.9, 8961.0: 0.9, 9316.0: 1.0, 9326.0: 1.0, 9379.0: 1.0, 9442.0: 1.0, 9461.0: 1.0,
    9480.0: 1.0, 9522.0: 1.0, 9723.0: 1.0, 9794.0: 1.0,
}
SKY_RED_FRACTION = 0.85


def sky_lines() -> tuple[np.ndarray, np.ndarray]:
    """Night-sky lines: (wavelength [M] Å observed vacuum, relative flux [M]); the OH forest
    (redward of 7000 Å) carries SKY_RED_FRACTION of the total line flux, 5578.9 Å has 1."""
    blue_w = np.array(list(_SKY_BLUE), float)
    blue_f = np.array(list(_SKY_BLUE.values()))
    red_w = np.array(list(_SKY_OH), float)
    red_f = np.array(list(_SKY_OH.values()))
    red_f = red_f * (SKY_RED_FRACTION / (1 - SKY_RED_FRACTION)) * blue_f.sum() / red_f.sum()
    return np.concatenate([blue_w, red_w]), np.concatenate([blue_f, red_f])


# ---------------------------------------------------------------------------------------------
# Sample configuration
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Per-sample distributions and observing conditions (see the module docstring)."""

    code: int                   # enters the seed and the ids
    z_range: tuple[float, float]
    rmag_range: tuple[float, float]
    rmag_slope: float           # dN/dm ∝ 10^(slope·m)
    passive_fraction: float
    ebv_mean: float             # nebular E(B−V): exponential, clipped at EBV_MAX
    driver: str                 # emission line whose EW sets the emission scale
    sky_level: float            # sky continuum at 5500 Å, 1e-17 erg/s/cm²/Å per fibre
    counts_per_flux: float      # detected counts per (1e-17 erg/s/cm²/Å) per pixel, throughput 1


BGS = SampleConfig(code=1, z_range=(0.02, 0.6), rmag_range=(18.0, 20.5), rmag_slope=0.4,
                   passive_fraction=0.4, ebv_mean=0.15, driver="Halpha", sky_level=5.0,
                   counts_per_flux=15.0)
ELG = SampleConfig(code=2, z_range=(0.6, 1.6), rmag_range=(22.0, 23.6), rmag_slope=0.3,
                   passive_fraction=0.0, ebv_mean=0.1, driver="OII", sky_level=1.5,
                   counts_per_flux=40.0)
_CONFIGS = {"bgs": BGS, "elg": ELG}

EBV_MAX = 0.5
STELLAR_TO_NEBULAR_EBV = 0.44  # Calzetti (2000)
SIGMA_STAR_RANGE = (50.0, 300.0)
SIGMA_GAS_RANGE = (30.0, 150.0)
READ_NOISE = 3.0  # counts per pixel per camera
R_BAND = (5600.0, 6900.0)
R_BAND_EFF = 6250.0
SKY_LINE_SCALE = 15.0  # line flux (Å·flux units) of a unit-rank sky line per unit sky level


def _config(sample: str) -> SampleConfig:
    """The SampleConfig of ``sample``; ValueError naming the bad value otherwise."""
    if sample not in _CONFIGS:
        raise ValueError(f"unknown sample {sample!r}; expected one of {SAMPLES}")
    return _CONFIGS[sample]


# ---------------------------------------------------------------------------------------------
# Physics helpers
# ---------------------------------------------------------------------------------------------
def calzetti_k(wave_rest: np.ndarray) -> np.ndarray:
    """Calzetti et al. (2000) attenuation curve k(λ) (R_V = 4.05) for λ in Å (rest); ≥ 0.

    Extrapolated with the same polynomials outside 1200–22000 Å and clipped at 0."""
    lam = np.asarray(wave_rest, np.float64) / 1e4
    inv = 1.0 / lam
    blue = 2.659 * (-2.156 + 1.509 * inv - 0.198 * inv**2 + 0.011 * inv**3) + 4.05
    red = 2.659 * (-1.857 + 1.040 * inv) + 4.05
    return np.maximum(np.where(lam < 0.63, blue, red), 0.0)


def _blackbody_flambda(wave: np.ndarray, temperature: float) -> np.ndarray:
    """Planck f_λ shape (arbitrary units) at λ [Å]; the exponent is capped (no overflow)."""
    x = np.minimum(1.438777e8 / (wave * temperature), 700.0)  # hc/(λ k T), λ in Å
    return wave**-5.0 / np.expm1(x)


def _logistic_break(wave: np.ndarray, depth: float, centre: float = 4000.0,
                    width: float = 15.0) -> np.ndarray:
    """Multiplicative break: 1 redward of ``centre``, 1/depth blueward, smooth over ``width`` Å."""
    blue = 0.5 * (1.0 + np.tanh((centre - wave) / (2.0 * width)))
    return 1.0 - (1.0 - 1.0 / depth) * blue


def d4000(wave: np.ndarray, flam: np.ndarray) -> np.ndarray:
    """D4000 = mean f_ν over 4050–4250 / mean f_ν over 3750–3950 (rest Å).

    Args: wave [L] rest Å; flam [..., L] f_λ. Returns [...]. f_ν ∝ f_λ λ²."""
    fnu = flam * wave**2
    red = (wave >= 4050) & (wave <= 4250)
    blue = (wave >= 3750) & (wave <= 3950)
    return fnu[..., red].mean(-1) / fnu[..., blue].mean(-1)


@dataclasses.dataclass(frozen=True)
class Templates:
    """Rest-frame continuum templates on a uniform ln λ grid, each 1 at 5500 Å.

    ln_wave0, dln: grid start and step in ln(λ/Å); old_a/old_b/young: [G] f_λ; kdust: [G]
    Calzetti k(λ)."""

    ln_wave0: float
    dln: float
    old_a: np.ndarray
    old_b: np.ndarray
    young: np.ndarray
    kdust: np.ndarray

    @property
    def wave(self) -> np.ndarray:
        return np.exp(self.ln_wave0 + self.dln * np.arange(self.young.size))


def _break_template(wave: np.ndarray, temperature: float, target_d4000: float) -> np.ndarray:
    """Blackbody × 4000 Å break whose line-free D4000 equals ``target_d4000`` (bisection)."""
    base = _blackbody_flambda(wave, temperature)
    lo, hi = 0.2, 10.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if d4000(wave, base * _logistic_break(wave, mid)) < target_d4000:
            lo = mid
        else:
            hi = mid
    flam = base * _logistic_break(wave, 0.5 * (lo + hi))
    return flam / np.interp(5500.0, wave, flam)


@functools.lru_cache(maxsize=None)
def templates() -> Templates:
    """The three continuum templates (cached; 900–12500 Å rest, Δln λ = 2e-4)."""
    ln0, dln = np.log(900.0), 2e-4
    wave = np.exp(ln0 + dln * np.arange(int(np.log(12500.0 / 900.0) / dln) + 2))
    return Templates(
        ln_wave0=ln0, dln=dln,
        old_a=_break_template(wave, 4600.0, 1.8), old_b=_break_template(wave, 4600.0, 2.3),
        young=_break_template(wave, 14000.0, 1.05), kdust=calzetti_k(wave))


@dataclasses.dataclass(frozen=True)
class Instrument:
    """Per-pixel instrument model on the DESI grid ([L] arrays).

    wave: Å; resolution: R; throughput: coadded total throughput (sum over cameras);
    n_cameras: cameras covering each pixel (read noise adds per camera);
    sky_continuum: sky continuum shape (1 at 5500 Å); sky_lines: unit sky-line spectrum
    (flux density per unit sky level, flux units); line_wave/line_flux/line_sigma: [M] (Å,
    Å × flux units per unit sky level, Å)."""

    wave: np.ndarray
    resolution: np.ndarray
    throughput: np.ndarray
    n_cameras: np.ndarray
    sky_continuum: np.ndarray
    sky_lines: np.ndarray
    line_wave: np.ndarray
    line_flux: np.ndarray
    line_sigma: np.ndarray


_CAMERA_R = {"b": (2000.0, 3200.0), "r": (3200.0, 4100.0), "z": (4100.0, 5000.0)}
# Smooth DESI-like total throughput (atmosphere + telescope + spectrograph + CCD).
_THROUGHPUT_KNOTS = ((3600, 0.15), (3700, 0.22), (3800, 0.27), (4200, 0.38), (5000, 0.45),
                     (6500, 0.5), (8000, 0.48), (9000, 0.35), (9500, 0.25), (9824, 0.17))
_CAMERA_TAPER = 60.0  # Å over which each camera's throughput falls at its edges


def _camera_taper(wave: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Camera response [L]: 1 inside, falling (cosine) to 0 over the last _CAMERA_TAPER Å at
    edges shared with another camera (the dichroic overlaps), 0 outside. The outer ends of the
    grid fall with the total-throughput knots instead."""
    d_lo = (wave - lo) / _CAMERA_TAPER if lo > DESI_WAVE_MIN else np.inf
    d_hi = (hi - wave) / _CAMERA_TAPER if hi < max(h for _, h in DESI_CAMERAS.values()) else np.inf
    d = np.minimum(d_lo, d_hi)
    taper = np.sin(0.5 * np.pi * np.clip(d, 0.0, 1.0)) ** 2
    return np.where((wave >= lo - 1e-6) & (wave <= hi + 1e-6), taper, 0.0)


@functools.lru_cache(maxsize=None)
def instrument() -> Instrument:
    """The DESI instrument model on the merged coadd grid (cached)."""
    wave = desi_wavelength()
    knots = np.array(_THROUGHPUT_KNOTS, float)
    base = np.interp(wave, knots[:, 0], knots[:, 1])
    throughput = np.zeros_like(wave)
    r_weighted = np.zeros_like(wave)
    n_cam = np.zeros_like(wave)
    for cam, (lo, hi) in DESI_CAMERAS.items():
        t = base * _camera_taper(wave, lo, hi)
        r_lo, r_hi = _CAMERA_R[cam]
        r_cam = r_lo + (r_hi - r_lo) * (wave - lo) / (hi - lo)
        throughput += t
        r_weighted += t * r_cam
        n_cam += t > 0
    resolution = r_weighted / throughput
    lw, lf = sky_lines()
    ls = np.sqrt((lw * FWHM_TO_SIGMA / np.interp(lw, wave, resolution)) ** 2
                 + DESI_WAVE_STEP**2 / 12.0)
    profile = _gaussian_sum(DESI_WAVE_MIN, DESI_WAVE_STEP, DESI_NPIX, lw[None], ls[None],
                            (SKY_LINE_SCALE * lf)[None], _half_width(ls.max()))[0]
    return Instrument(wave=wave, resolution=resolution, throughput=throughput, n_cameras=n_cam,
                      sky_continuum=(wave / 5500.0) ** 1.5, sky_lines=profile,
                      line_wave=lw, line_flux=SKY_LINE_SCALE * lf, line_sigma=ls)


def _half_width(max_sigma, step: float = DESI_WAVE_STEP) -> np.ndarray:
    """Window half-width(s) in pixels covering ±5.5 σ of the widest possible line(s)."""
    return (np.ceil(5.5 * np.asarray(max_sigma) / step) + 1).astype(np.int64)


def _gaussian_sum(start: float, step: float, npix: int, centers: np.ndarray, sigmas: np.ndarray,
                  weights: np.ndarray, half_width) -> np.ndarray:
    """Σ_m weights[b, m] · N(λ; centers[b, m], sigmas[b, m]) on a uniform grid.

    Each Gaussian is unit-area in λ (so ``weights`` are integrated fluxes or equivalent widths)
    and evaluated at pixel centres within ±half_width[m] pixels of its centre. The windows of all
    lines are laid side by side (ragged, one flat axis) and all B×Σ windows are scattered in one
    np.bincount, so the cost is O(B·Σ_m half_width[m]) plus one [B, npix] buffer.
    ``half_width`` must not depend on the batch (it decides which tails are kept).

    Args: start, step: grid λ0 and Δλ (Å); npix: grid length; centers, sigmas, weights: [B, M]
    (Å, Å, any); half_width: int or [M] ints. Returns [B, npix] float64.
    """
    b, m = centers.shape
    hw = np.broadcast_to(np.asarray(half_width, np.int64), (m,))
    # Each output row is padded on both sides so that every window lands inside its own row:
    # no per-element clipping or masking, and the padding is simply dropped at the end.
    kmax = int(hw.max())
    pad = 2 * kmax + 1
    width = npix + 2 * pad
    line = np.repeat(np.arange(m), 2 * hw + 1)                          # [W] line of each slot
    offsets = np.concatenate([np.arange(-h, h + 1) for h in hw])        # [W]
    centre_pix = np.clip(np.rint((centers - start) / step), -kmax - 1, npix + kmax)
    idx = centre_pix.astype(np.int64)[:, line] + offsets                # [B, W]
    x = (start + step * idx - centers[:, line]) * (1.0 / sigmas)[:, line]
    vals = (weights / (sigmas * SQRT_2PI))[:, line] * np.exp(-0.5 * x * x)
    flat = (np.arange(b) * width + pad)[:, None] + idx
    out = np.bincount(flat.ravel(), weights=vals.ravel(), minlength=b * width)
    return out.reshape(b, width)[:, pad:pad + npix]


# ---------------------------------------------------------------------------------------------
# Random draws (one block of BLOCK spectra per random stream)
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _redshift_cdf(sample: str) -> tuple[np.ndarray, np.ndarray]:
    """(z grid, normalised CDF) of the sample's redshift distribution (see module docstring)."""
    cfg = _config(sample)
    z = np.linspace(cfg.z_range[0], cfg.z_range[1], 4001)
    if sample == "bgs":
        pdf = z**2 * np.exp(-((z / 0.19) ** 1.5))
    else:
        sig = np.where(z < 0.85, 0.12, 0.35)
        pdf = np.exp(-0.5 * ((z - 0.85) / sig) ** 2)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (pdf[1:] + pdf[:-1]) * np.diff(z))])
    return z, cdf / cdf[-1]


def draw_redshifts(rng: np.random.Generator, n: int, sample: str) -> np.ndarray:
    """[n] float64 redshifts of ``sample`` by inverse-CDF sampling."""
    z, cdf = _redshift_cdf(sample)
    return np.interp(rng.random(n), cdf, z)


def _log_uniform(rng: np.random.Generator, lo, hi, n: int) -> np.ndarray:
    """[n] draws uniform in log between ``lo`` and ``hi`` (scalars or [n])."""
    return np.exp(rng.uniform(np.log(lo), np.log(hi), n))


def _truncated_exp_mag(rng: np.random.Generator, lo: float, hi: float, slope: float,
                       n: int) -> np.ndarray:
    """[n] magnitudes with dN/dm ∝ 10^(slope·m) on [lo, hi] (inverse CDF)."""
    a = slope * np.log(10.0)
    u = rng.random(n)
    return np.log(np.exp(a * lo) + u * (np.exp(a * hi) - np.exp(a * lo))) / a


def _draw_line_ratios(rng: np.random.Generator, passive: np.ndarray, sample: str) -> np.ndarray:
    """[n, M] intrinsic (dust-free) emission-line fluxes relative to Hβ.

    Star-forming galaxies sit on an anticorrelated [OIII]/Hβ – [NII]/Hα sequence (position
    x ∈ [0, 1]); passive ones get LINER-like ratios. Fixed doublet ratios are imposed exactly."""
    n = passive.size
    x = rng.random(n)
    if sample == "elg":
        log_o3, log_n2 = -0.3 + 0.9 * x, -0.7 - 0.6 * x
    else:
        log_o3, log_n2 = -0.6 + 1.0 * x, -0.3 - 0.8 * x
    o3_hb = np.where(passive, rng.uniform(1.0, 3.0, n), 10**log_o3)
    n2_ha = np.where(passive, rng.uniform(0.8, 2.0, n), 10**log_n2)
    o1_ha = np.where(passive, rng.uniform(0.1, 0.3, n), rng.uniform(0.02, 0.06, n))
    s2_ha = np.where(passive, rng.uniform(0.4, 0.8, n), rng.uniform(0.15, 0.4, n))
    o2_hb = np.where(passive, rng.uniform(2.0, 5.0, n), _log_uniform(rng, 1.5, 4.0, n))
    o2_ratio = rng.uniform(0.35, 1.5, n)   # 3729/3726, density dependent
    s2_ratio = rng.uniform(0.8, 1.4, n)    # 6718/6733, density dependent

    ha = BALMER_CASE_B["Halpha"]
    r = np.zeros((n, len(_EM_NAMES)))
    for name in ("Halpha", "Hbeta", "Hgamma", "Hdelta"):
        r[:, _EM[name]] = BALMER_CASE_B[name]
    r[:, _EM["OII_3726"]] = o2_hb / (1 + o2_ratio)
    r[:, _EM["OII_3729"]] = o2_hb * o2_ratio / (1 + o2_ratio)
    r[:, _EM["OIII_5008"]] = o3_hb
    r[:, _EM["OIII_4960"]] = o3_hb / OIII_RATIO
    r[:, _EM["NeIII_3869"]] = 0.08 * o3_hb
    r[:, _EM["HeI_5877"]] = 0.1
    r[:, _EM["OI_6302"]] = o1_ha * ha
    r[:, _EM["NII_6585"]] = n2_ha * ha
    r[:, _EM["NII_6550"]] = n2_ha * ha / NII_RATIO
    r[:, _EM["SII_6718"]] = s2_ha * ha * s2_ratio / (1 + s2_ratio)
    r[:, _EM["SII_6733"]] = s2_ha * ha / (1 + s2_ratio)
    return r


def _draw_block(sample: str, seed: int, block: int) -> tuple[dict, np.random.Generator]:
    """Physical and observing parameters of one block of BLOCK spectra.

    Returns (params, noise_rng): ``params`` holds [BLOCK] arrays (plus ``line_ratio`` [BLOCK, M],
    ``sky_eps`` [BLOCK, S] and the bad-pixel coordinates ``bad_rows``/``bad_cols``);
    ``noise_rng`` is a separate stream used only for the pixel noise, so the noiseless and the
    noisy versions of a spectrum share every physical parameter."""
    cfg = _config(sample)
    param_ss, noise_ss = np.random.SeedSequence([seed, cfg.code, block]).spawn(2)
    rng = np.random.default_rng(param_ss)
    n = BLOCK
    passive = rng.random(n) < cfg.passive_fraction
    if sample == "elg":
        f_young = rng.uniform(0.7, 1.0, n)
        driver_ew = np.clip(np.exp(rng.normal(np.log(40.0), 0.6, n)), 10.0, 100.0)
    else:
        f_young = np.where(passive, rng.uniform(0.0, 0.05, n), rng.uniform(0.35, 1.0, n))
        driver_ew = np.where(passive, rng.uniform(0.0, 3.0, n),
                             np.clip(np.exp(rng.normal(np.log(25.0), 0.8, n)), 5.0, 200.0))
    ebv = np.minimum(rng.exponential(cfg.ebv_mean, n) * np.where(passive, 0.3, 1.0), EBV_MAX)
    params = {
        "z": draw_redshifts(rng, n, sample),
        "passive": passive,
        "f_young": f_young,
        "w_strong_break": np.where(passive, rng.uniform(0.3, 1.0, n), rng.uniform(0.0, 0.6, n)),
        "metal": rng.uniform(0.7, 1.3, n),
        "balmer": rng.uniform(0.3, 1.5, n),
        "sigma_star": np.where(passive, _log_uniform(rng, 120.0, SIGMA_STAR_RANGE[1], n),
                               _log_uniform(rng, SIGMA_STAR_RANGE[0], 150.0, n)),
        "sigma_gas": _log_uniform(rng, *SIGMA_GAS_RANGE, n),
        "ebv": ebv,
        "rmag": _truncated_exp_mag(rng, *cfg.rmag_range, cfg.rmag_slope, n),
        "driver_ew": driver_ew,
        "line_ratio": _draw_line_ratios(rng, passive, sample),
        "sky_scale": cfg.sky_level * np.exp(rng.normal(0.0, 0.25, n)),
        "exposure": rng.uniform(0.8, 1.25, n),
        "sky_eps": rng.normal(0.0, 0.02, (n, instrument().line_wave.size)),
        "sky_shift": rng.normal(0.0, 0.03, n),
        "sky_cont_eps": rng.normal(0.0, 0.005, n),
    }
    # Masked pixels: cosmic rays anywhere, plus the bad columns of the fibre's petal.
    n_cr = rng.poisson(3.0, n)
    cr_rows = np.repeat(np.arange(n), n_cr)
    cr_cols = rng.integers(0, DESI_NPIX, cr_rows.size)
    petal = rng.integers(0, 10, n)
    cols_by_petal = _bad_columns()
    bc_rows = np.concatenate([np.full(cols_by_petal[p].size, i) for i, p in enumerate(petal)])
    bc_cols = np.concatenate([cols_by_petal[p] for p in petal])
    params["bad_rows"] = np.concatenate([cr_rows, bc_rows]).astype(np.int64)
    params["bad_cols"] = np.concatenate([cr_cols, bc_cols]).astype(np.int64)
    return params, np.random.default_rng(noise_ss)


@functools.lru_cache(maxsize=None)
def _bad_columns() -> tuple[np.ndarray, ...]:
    """Fixed bad columns of the 10 DESI petals (0–2 runs of 1–2 pixels each), independent of
    the user's seed because they belong to the instrument."""
    rng = np.random.default_rng(20191214)
    out = []
    for _ in range(10):
        starts = rng.integers(0, DESI_NPIX - 2, rng.integers(0, 3))
        out.append(np.concatenate([s + np.arange(rng.integers(1, 3)) for s in starts]
                                  + [np.zeros(0, np.int64)]).astype(np.int64))
    return tuple(out)


def _concat_params(blocks: list[dict]) -> dict:
    """Stacks block parameter dicts; bad-pixel rows are offset to batch row numbers."""
    out = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0] if k != "bad_rows"}
    out["bad_rows"] = np.concatenate([b["bad_rows"] + i * BLOCK for i, b in enumerate(blocks)])
    return out


# ---------------------------------------------------------------------------------------------
# Rendering a batch on the DESI grid
# ---------------------------------------------------------------------------------------------
def _instrument_var(obs_wave: np.ndarray) -> np.ndarray:
    """Instrumental + pixel variance (Å²) of a line centred at ``obs_wave`` (any shape, Å)."""
    inst = instrument()
    sig = obs_wave * FWHM_TO_SIGMA / np.interp(obs_wave, inst.wave, inst.resolution)
    return sig**2 + DESI_WAVE_STEP**2 / 12.0


def _line_half_widths(rest: np.ndarray, sigma_rest: np.ndarray, sigma_kms: float,
                      sample: str) -> np.ndarray:
    """Fixed window half-widths [F] (pixels) for lines at ``rest`` [F] Å: the widest each can be
    in ``sample`` (z_max, intrinsic σ ``sigma_rest`` [F] Å × (1+z), velocity σ ``sigma_kms``,
    R = 2000, pixel). Lines that never reach the DESI grid get a 0 half-width (one pixel).
    Depends only on the sample, never on the batch, so the output is batch independent."""
    z_lo, z_hi = _config(sample).z_range
    obs = rest * (1 + z_hi)
    var = ((sigma_rest * (1 + z_hi)) ** 2 + (obs * sigma_kms / C_KMS) ** 2
           + (obs * FWHM_TO_SIGMA / 2000.0) ** 2 + DESI_WAVE_STEP**2 / 12.0)
    hw = _half_width(np.sqrt(var))
    margin = hw * DESI_WAVE_STEP
    on_grid = (obs + margin > DESI_WAVE_MIN) & (
        rest * (1 + z_lo) - margin < DESI_WAVE_MIN + DESI_WAVE_STEP * (DESI_NPIX - 1))
    return np.where(on_grid, hw, 0)


def _optical_depth(table: np.ndarray, sample: str, z: np.ndarray, sigma_star: np.ndarray,
                   strength: np.ndarray) -> np.ndarray:
    """τ(λ_obs) [B, L] of one population's absorption features on the DESI grid.

    Args: table [F, 3] (rest λ, EW at strength 1, intrinsic σ; Å); z, sigma_star (km/s),
    strength: [B]."""
    rest, ew, sig_int = table[:, 0], table[:, 1], table[:, 2]
    obs = rest[None] * (1 + z[:, None])                              # [B, F]
    var = ((sig_int[None] * (1 + z[:, None])) ** 2 + (obs * sigma_star[:, None] / C_KMS) ** 2
           + _instrument_var(obs))
    weights = ew[None] * strength[:, None] * (1 + z[:, None])      # observed-frame EW
    half_width = _line_half_widths(rest, sig_int, SIGMA_STAR_RANGE[1], sample)
    return _gaussian_sum(DESI_WAVE_MIN, DESI_WAVE_STEP, DESI_NPIX, obs, np.sqrt(var), weights,
                         half_width)


@functools.lru_cache(maxsize=None)
def _template_tables() -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """(values, slope to the next node) float32 [G] pairs for old_a, old_b, young, k_dust."""
    t = templates()
    out = []
    for arr in (t.old_a, t.old_b, t.young, t.kdust):
        v = arr.astype(np.float32)
        out.append((v, np.diff(v, append=v[-1:])))
    return tuple(out)


def _rest_templates(ln_rest: np.ndarray) -> tuple[np.ndarray, ...]:
    """(old_a, old_b, young, k_dust) [B, L] float32, linearly interpolated at rest ln λ [B, L].

    Separate 1-D gathers from small float32 tables (value + slope) are several times faster
    than one gather of stacked tables."""
    t = templates()
    pos = (ln_rest - t.ln_wave0) / t.dln
    i0 = np.clip(pos.astype(np.int64), 0, t.young.size - 2)
    frac = np.clip(pos - i0, 0.0, 1.0).astype(np.float32)
    return tuple(v[i0] + frac * s[i0] for v, s in _template_tables())


def _dust(k: np.ndarray, ebv: np.ndarray) -> np.ndarray:
    """Transmission 10^(−0.4 k E(B−V)); ``ebv`` broadcasts against ``k``; dtype of ``k``."""
    return np.exp(k * (-0.4 * np.log(10.0) * ebv).astype(k.dtype))


def _template_at(rest_wave: np.ndarray, p: dict) -> np.ndarray:
    """Smooth (line-free) attenuated continuum shape [B, M] at rest wavelengths [M], before the
    flux scale; same mixture as the rendered continuum."""
    t = templates()
    w = t.wave
    oa, ob, yg, k = (np.interp(rest_wave, w, a) for a in (t.old_a, t.old_b, t.young, t.kdust))
    ws, fy = p["w_strong_break"][:, None], p["f_young"][:, None]
    old = (1 - ws) * oa + ws * ob
    return ((1 - fy) * old + fy * yg) * _dust(k, STELLAR_TO_NEBULAR_EBV * p["ebv"][:, None])


def _rmag_to_flambda(rmag: np.ndarray) -> np.ndarray:
    """AB magnitude → f_λ at R_BAND_EFF, in 1e-17 erg/s/cm²/Å."""
    fnu = 10.0 ** (-0.4 * (rmag + 48.6))
    return fnu * (C_KMS * 1e13) / R_BAND_EFF**2 * 1e17


def _continuum(p: dict, sample: str) -> tuple[np.ndarray, np.ndarray]:
    """Observed stellar continuum with absorption and dust, and its flux scale.

    Returns (continuum [B, L] in 1e-17 erg/s/cm²/Å, scale [B]) where ``scale`` multiplies the
    template mixture (normalised at 5500 Å rest) to reach the drawn r magnitude."""
    z = p["z"]
    ln_rest = np.log(instrument().wave)[None] - np.log1p(z)[:, None]
    old_a, old_b, young, k = _rest_templates(ln_rest)
    ws, fy = p["w_strong_break"][:, None], p["f_young"][:, None]
    tau_old = _optical_depth(OLD_ABSORPTION, sample, z, p["sigma_star"], p["metal"])
    tau_young = _optical_depth(YOUNG_ABSORPTION, sample, z, p["sigma_star"], p["balmer"])
    ws, fy = ws.astype(np.float32), fy.astype(np.float32)
    old = ((1 - ws) * old_a + ws * old_b) * np.exp(-tau_old.astype(np.float32))
    cont = ((1 - fy) * old + fy * young * np.exp(-tau_young.astype(np.float32))) * _dust(
        k, STELLAR_TO_NEBULAR_EBV * p["ebv"][:, None])
    wave = instrument().wave
    band = (wave >= R_BAND[0]) & (wave <= R_BAND[1])
    scale = _rmag_to_flambda(p["rmag"]) / cont[:, band].mean(axis=1, dtype=np.float64)
    return cont * scale[:, None].astype(np.float32), scale


def _line_fluxes(p: dict, scale: np.ndarray, sample: str) -> np.ndarray:
    """Observed (attenuated) emission-line fluxes [B, M] in 1e-17 erg/s/cm².

    The driver line's flux is its rest EW × (1+z) × the smooth attenuated continuum at the line;
    it fixes intrinsic Hβ, the intrinsic ratios give every other line, and nebular dust
    attenuates each line at its own wavelength."""
    z, ebv = p["z"], p["ebv"][:, None]
    ratio = p["line_ratio"]
    line_dust = _dust(calzetti_k(_EM_WAVE)[None], ebv)                 # [B, M]
    if _config(sample).driver == "OII":
        idx = [_EM["OII_3726"], _EM["OII_3729"]]
    else:
        idx = [_EM["Halpha"]]
    driver_wave = np.array([np.mean(_EM_WAVE[idx])])
    cont_at_driver = scale * _template_at(driver_wave, p)[:, 0]
    driver_obs = p["driver_ew"] * (1 + z) * cont_at_driver               # attenuated flux
    driver_intrinsic_per_hb = (ratio[:, idx] * line_dust[:, idx]).sum(1)  # attenuated / Hβ_int
    hbeta_int = driver_obs / driver_intrinsic_per_hb
    return hbeta_int[:, None] * ratio * line_dust


def _emission(p: dict, fluxes: np.ndarray, sample: str) -> np.ndarray:
    """Nebular emission spectrum [B, L] (1e-17 erg/s/cm²/Å) from line fluxes [B, M]."""
    obs = _EM_WAVE[None] * (1 + p["z"][:, None])
    sig = np.sqrt((obs * p["sigma_gas"][:, None] / C_KMS) ** 2 + _instrument_var(obs))
    half_width = _line_half_widths(_EM_WAVE, np.zeros_like(_EM_WAVE), SIGMA_GAS_RANGE[1], sample)
    return _gaussian_sum(DESI_WAVE_MIN, DESI_WAVE_STEP, DESI_NPIX, obs, sig, fluxes, half_width)

# Rest-frame grid on which the true D4000 is measured (no instrument, no noise).
_D4000_GRID = (3700.0, 0.5, 1201)


def _true_d4000(p: dict) -> np.ndarray:
    """D4000 [B] of the attenuated stellar continuum (with absorption, σ*), rest frame."""
    start, step, npix = _D4000_GRID
    wave = start + step * np.arange(npix)
    t = templates()
    oa, ob, yg, k = (np.interp(wave, t.wave, a) for a in (t.old_a, t.old_b, t.young, t.kdust))
    ws, fy = p["w_strong_break"][:, None], p["f_young"][:, None]
    taus = []
    for table, strength in ((OLD_ABSORPTION, p["metal"]), (YOUNG_ABSORPTION, p["balmer"])):
        # only features that can reach the 3750–4250 Å bands matter
        table = table[(table[:, 0] > start - 100) & (table[:, 0] < wave[-1] + 100)]
        centers = np.broadcast_to(table[None, :, 0], (fy.shape[0], table.shape[0]))
        sig = np.sqrt(table[None, :, 2] ** 2 + (centers * p["sigma_star"][:, None] / C_KMS) ** 2)
        taus.append(_gaussian_sum(start, step, npix, centers, sig,
                                  table[None, :, 1] * strength[:, None],
                                  _half_width(np.hypot(table[:, 2], 4400 * SIGMA_STAR_RANGE[1]
                                                       / C_KMS), step)))
    cont = ((1 - fy) * ((1 - ws) * oa + ws * ob) * np.exp(-taus[0])
            + fy * yg * np.exp(-taus[1])) * _dust(k, STELLAR_TO_NEBULAR_EBV * p["ebv"][:, None])
    return d4000(wave, cont)


def _sky_residual(p: dict) -> np.ndarray:
    """Sky-subtraction residual [B, L]: per-line scale errors, a common wavelength offset, and a
    small continuum scale error (sky model minus truth, in flux units)."""
    inst = instrument()
    s = p["sky_scale"][:, None]
    centers = inst.line_wave[None] + np.zeros_like(s)
    shifted = centers + p["sky_shift"][:, None]
    sig = np.broadcast_to(inst.line_sigma[None], centers.shape)
    flux = inst.line_flux[None] * s
    lines = _gaussian_sum(DESI_WAVE_MIN, DESI_WAVE_STEP, DESI_NPIX,
                          np.concatenate([shifted, centers], 1), np.concatenate([sig, sig], 1),
                          np.concatenate([flux * (1 + p["sky_eps"]), -flux], 1),
                          _half_width(inst.line_sigma.max()))
    return lines + (p["sky_cont_eps"][:, None] * s) * inst.sky_continuum[None]


def _variance(model: np.ndarray, p: dict, sample: str) -> np.ndarray:
    """Per-pixel flux variance [B, L] float32 (flux units²): photon noise of object + sky, and
    the read noise of each camera covering the pixel, through throughput × exposure factor.

    Args: model [B, L] noiseless object flux (1e-17 erg/s/cm²/Å)."""
    inst = instrument()
    inv_gain = (1.0 / (_config(sample).counts_per_flux * inst.throughput)).astype(np.float32)
    inv_exp = (1.0 / p["exposure"]).astype(np.float32)[:, None]
    sky_shape = (inst.sky_continuum + inst.sky_lines).astype(np.float32)
    sky = p["sky_scale"].astype(np.float32)[:, None] * sky_shape
    read = (inst.n_cameras * READ_NOISE**2).astype(np.float32) * inv_gain**2
    return (np.maximum(model, 0.0) + sky) * (inv_gain * inv_exp) + read * inv_exp**2


def _render(p: dict, noise_rngs: list, sample: str, noiseless: bool,
            components: bool) -> dict[str, np.ndarray]:
    """Turns the parameters of a batch (whole blocks) into the output dict (see
    :func:`simulate_desi_galaxies`)."""
    b = p["z"].size
    cont, scale = _continuum(p, sample)
    fluxes = _line_fluxes(p, scale, sample)
    model = cont + _emission(p, fluxes, sample).astype(np.float32)
    var = _variance(model, p, sample)
    ivar = (1.0 / var).astype(np.float32)
    mask = np.ones((b, DESI_NPIX), bool)
    mask[p["bad_rows"], p["bad_cols"]] = False
    if noiseless:
        flux = model.astype(np.float32)
    else:
        noise = np.concatenate([r.standard_normal((BLOCK, DESI_NPIX), dtype=np.float32)
                                for r in noise_rngs])
        flux = (model + _sky_residual(p)).astype(np.float32) + np.sqrt(var).astype(
            np.float32) * noise
    snr = np.median(cont * np.sqrt(ivar), axis=1)
    flux[~mask] = 0.0
    ivar[~mask] = 0.0

    cont_ha = scale * _template_at(np.array([EMISSION_LINES["Halpha"]]), p)[:, 0]
    cont_oii = scale * _template_at(np.array([3728.5]), p)[:, 0]
    oii = fluxes[:, _EM["OII_3726"]] + fluxes[:, _EM["OII_3729"]]
    out = {
        "flux": flux, "ivar": ivar, "mask": mask, "z": p["z"].astype(np.float64),
        "ebv": p["ebv"], "d4000": _true_d4000(p), "oii_flux": oii,
        "oii_ew": oii / (cont_oii * (1 + p["z"])),
        "halpha_flux": fluxes[:, _EM["Halpha"]],
        "halpha_ew": fluxes[:, _EM["Halpha"]] / (cont_ha * (1 + p["z"])),
        "oiii_flux": fluxes[:, _EM["OIII_5008"]], "line_flux": fluxes,
        "snr": snr, "rmag": p["rmag"], "passive": p["passive"], "f_young": p["f_young"],
        "sigma_star": p["sigma_star"], "sigma_gas": p["sigma_gas"],
    }
    if components:
        out["model"] = model.astype(np.float32)
        out["continuum"] = cont.astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def _check_args(n: int, sample: str, seed: int) -> SampleConfig:
    """Validates public arguments; returns the sample's config."""
    cfg = _config(sample)
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return cfg


def _simulate_rows(start: int, stop: int, sample: str, seed: int, batch: int, noiseless: bool,
                   components: bool) -> dict[str, np.ndarray]:
    """Rows [start, stop) of the (infinite) simulated sample, rendered ``batch`` rows at a time
    (rounded up to whole blocks); the result does not depend on ``batch``."""
    cfg = _config(sample)
    blocks_per_batch = max(1, -(-int(batch) // BLOCK))
    first, last = start // BLOCK, -(-stop // BLOCK)
    parts = []
    for b0 in range(first, last, blocks_per_batch):
        block_ids = range(b0, min(b0 + blocks_per_batch, last))
        drawn = [_draw_block(sample, seed, blk) for blk in block_ids]
        out = _render(_concat_params([d[0] for d in drawn]), [d[1] for d in drawn], sample,
                      noiseless, components)
        rows = np.arange(b0 * BLOCK, (b0 + len(block_ids)) * BLOCK)
        keep = (rows >= start) & (rows < stop)
        out = {k: v[keep] for k, v in out.items()}
        out["id"] = (cfg.code * 10**15 + (seed % 10**6) * 10**9 + rows[keep]).astype(np.int64)
        parts.append(out)
    if not parts:
        return {k: v[:0] for k, v in _simulate_rows(0, 1, sample, seed, BLOCK, noiseless,
                                                    components).items()}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def simulate_desi_galaxies(n: int, sample: str = "bgs", seed: int = 0, *, batch: int = 256,
                           noiseless: bool = False,
                           components: bool = False) -> dict[str, np.ndarray]:
    """Simulates ``n`` DESI-like galaxy spectra on the DESI coadd grid (see module docstring).

    Args:
      n: number of spectra.
      sample: "bgs" (bright galaxies, 0.02 < z < 0.6) or "elg" (emission-line galaxies,
        0.6 < z < 1.6).
      seed: non-negative integer; row i depends only on (seed, sample, i).
      batch: spectra rendered at once (rounded up to a multiple of BLOCK); memory only.
      noiseless: flux is the noiseless object model (no noise, no sky residual); every other
        output (ivar, mask, truth) is identical to the noisy version.
      components: also return "model" (noiseless object) and "continuum" (stellar continuum
        with absorption and dust), both [n, 7781] float32.

    Returns:
      dict with "flux" [n, 7781] float32 (1e-17 erg/s/cm²/Å, 0 where masked), "ivar"
      [n, 7781] float32 (0 where masked), "mask" [n, 7781] bool (True = valid), "z" [n] float64,
      "id" [n] int64, and per-spectrum truth [n]: "ebv" (nebular E(B−V)), "d4000", "oii_flux",
      "halpha_flux", "oiii_flux" (5008; 1e-17 erg/s/cm², attenuated), "line_flux" [n, 15]
      (every line of EMISSION_LINES, in its order, attenuated), "oii_ew", "halpha_ew" (rest Å,
      against the smooth attenuated continuum), "snr" (median continuum S/N per pixel), "rmag"
      (fibre r, AB), "passive" (bool), "f_young", "sigma_star", "sigma_gas" (km/s).
      Wavelengths: :func:`spectrax.data.grids.desi_wavelength`.

    Raises:
      ValueError: unknown ``sample``, negative ``n`` or ``seed``.
    """
    _check_args(n, sample, seed)
    return _simulate_rows(0, int(n), sample, int(seed), batch, noiseless, components)


def iter_desi_galaxies(n: int, sample: str = "bgs", seed: int = 0, chunk: int = 512, *,
                       batch: int = 256, noiseless: bool = False,
                       components: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Yields the spectra of :func:`simulate_desi_galaxies` ``chunk`` rows at a time.

    Concatenating the chunks gives exactly ``simulate_desi_galaxies(n, sample, seed)``; only
    one chunk is in memory at a time. Chunks that are multiples of BLOCK (64) waste no work."""
    _check_args(n, sample, seed)
    if int(chunk) != chunk or chunk <= 0:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    for start in range(0, int(n), int(chunk)):
        yield _simulate_rows(start, min(start + int(chunk), int(n)), sample, int(seed),
                             min(batch, chunk), noiseless, components)


def desi_galaxy_rows(start: int, stop: int, sample: str = "bgs", seed: int = 0
                     ) -> dict[str, np.ndarray]:
    """Rows ``[start, stop)`` of :func:`simulate_desi_galaxies` (same keys): any worker can
    simulate any chunk of a sample, and the chunks concatenate to the whole."""
    _check_args(stop, sample, seed)
    if not 0 <= start <= stop:
        raise ValueError(f"rows [{start}, {stop}) are not a valid range")
    return _simulate_rows(int(start), int(stop), sample, int(seed), 256, False, False)
