"""Simulated DESI galaxy spectra: the embedded default data of spectrax.

Everything is numpy (no jax) and deterministic from ``(seed, sample)``. Spectra are drawn in
blocks of :data:`BLOCK` rows whose random streams come from
``SeedSequence([seed, sample_code, block_index])``, so row ``i`` depends only on
``(seed, sample, i)``: any chunking or batching gives the same bytes, and the first ``m`` rows
of ``n`` spectra equal ``m`` spectra.

Units: vacuum wavelengths in Å; flux densities in 1e-17 erg/s/cm²/Å (the DESI coadd unit);
line fluxes in 1e-17 erg/s/cm²; velocities in km/s; effective times in s.

Galaxies (:mod:`spectrax.data.galaxy_pop`, :mod:`spectrax.data.sps`)
  Stellar population synthesis: a star-formation history (delayed-τ, with bursts, quenching
  and post-starbursts) integrated over the Bruzual & Charlot (2003) SSPs computed with the
  MILES stellar library at the galaxy's metallicity; nebular lines and continuum from the
  Cloudy grids of the stars formed in the last 10 Myr, at the galaxy's ionisation parameter;
  Calzetti (2000) dust (stars 0.44 × the nebular E(B−V)); stellar velocity dispersion and the
  DESI resolution applied per pixel (precomputed broadening levels); gas lines as Gaussians of
  σ_gas ⊕ instrument ⊕ pixel evaluated at pixel centres (line flux conserved). Quiescent
  galaxies carry weak LINER-like emission. The rest-frame model is redshifted onto the merged
  DESI coadd grid (3600–9824 Å, 0.8 Å, 7781 px, :func:`spectrax.data.grids.desi_wavelength`)
  and scaled so its mean over observed 5600–6900 Å is the flux of the drawn spectroscopic r
  magnitude (``rmag``; the DESI coadd is calibrated for a point source, so a galaxy's spectrum
  holds its fibre flux / 0.78 — Δ below).

Populations matched to the DESI samples (published figures; values recalled from the papers —
no internet here — so only coarse, robust features are matched; :mod:`benchmarks.realism`
measures each against the simulator)
  ``bgs`` (Hahn et al. 2023, AJ 165, 253, DESI BGS target selection and SV validation):
    redshifts p(z) ∝ z² exp(−(z/0.16)^1.5) on 0.02–0.6 (mode 0.19, median 0.22; BGS Bright
    n(z) peaks near z ≈ 0.2 and has a tail to 0.6); total r < 19.5 (BGS Bright, 80%) and
    19.5–20.175 (BGS Faint, 20%) with counts d log N / dm = 0.4, spectrum r = total r + Δ, Δ ~
    N(1.25 − 1.6 z, 0.25) on 0.2–2.0 (fibre losses fall with z); colour bimodality: 40%
    quiescent, giving a red sequence at rest g − r ≈ 0.75 and a blue cloud at ≈ 0.45
    (SDSS/GAMA-like bimodality, Blanton & Moustakas 2009, which the BGS shares) and ≈ 60% of
    galaxies with EW(Hα) > 3 Å (emission-line galaxies; the retired/LINER-like rest below).
  ``elg`` (Raichoor et al. 2023, AJ 165, 126, DESI ELG target selection; DESI Collaboration
    2016, arXiv:1611.00036): split-normal p(z) with mode 0.85 (σ 0.12 below, 0.35 above) on
    0.6–1.6 (ELG_LOP prioritises 1.1 < z < 1.6 and its n(z) is broad, 0.6–1.6, peaking near
    0.8–1.0); spectrum r 22.0–23.6; all star-forming with high sSFR, giving integrated [OII]
    fluxes of a few 1e-17 to a few 1e-16 erg/s/cm² (the FDR's design threshold for a
    redshift is ≈ 8e-17).
  S/N: the DESI noise model below, at effective times of the DESI programmes (bright: 180 s
  goal per tile, dark: 1000 s; DESI Collaboration 2023, SV overview; the EDR coadds combine
  several tiles, hence the long tail): ``bgs`` log-normal median 180 s (σ_ln 0.45, 100–3000
  s), ``elg`` median 1000 s (σ_ln 0.3, 500–4000 s). Check: a simulated star-forming galaxy
  with the DESI fixture's z, spectrum r and t_eff gets the fixture's noise σ within 7% in
  every camera window (benchmarks/realism.py); its median S/N differs by its colour.

Instrument
  Resolving power linear in λ within each camera (b 2000→3200, r 3200→4100, z 4100→5000),
  throughput-weighted in the camera overlaps. Total throughput follows a smooth DESI-like
  curve (low at 3600 and 9824 Å) times a cosine taper over the last 60 Å of each camera at
  the dichroic overlaps.

Noise (calibrated on the real DESI coadds of ../shared/fixtures)
  Per pixel, variance = [V(λ)·ε + (max(object, 0) + sky lines) / (C(λ) T(λ))] / t_eff,
  where t_eff is the effective time, C(λ) = A λ Δλ / (hc) the detected counts per second per
  flux unit at throughput 1 (A = 8.65 m²), T the throughput, ε a per-spectrum log-normal
  factor (σ_ln 0.15; observing conditions), and V(λ) the background variance rate
  (flux² · s) MEASURED on the real coadds: the median of 1/ivar × t_eff, less the target's
  own photon noise (median flux / (C T)), in 27 windows of the DESI fixture galaxy (TARGETID
  39633345008634465, bright time, t_eff = 0.14 × TSNR2_BGS = 3,095 s) for ``bgs`` and of the
  two SV3 dark-time targets (t_eff = 8.6 × TSNR2_ELG) for ``elg`` (:data:`BACKGROUND_RATE`;
  rising steeply to the blue, where the moonlit bright sky and read noise dominate; V holds
  the coadds' read noise and sky continuum). The night-sky lines of :func:`sky_lines` at the
  instrument's width add photon noise. ivar = 1/variance. Flux = object + sky-subtraction
  residual (per-line scale errors of ~2%, a common wavelength offset of ~0.03 Å, ~0.5% of the
  sky continuum) + Gaussian noise. Cosmic rays (Poisson, mean 3 per spectrum) and fixed bad
  columns of a fibre's petal are masked pixels: mask False, flux 0, ivar 0.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import numpy as np

from spectrax.data import galaxy_pop, sps
from spectrax.data.grids import (DESI_CAMERAS, DESI_NPIX, DESI_WAVE_MIN, DESI_WAVE_STEP,
                                  desi_wavelength)
from spectrax.data.sps import calzetti_k  # noqa: F401  (public here for older callers)
from threadpoolctl import ThreadpoolController

C_KMS = 299792.458
SQRT_2PI = float(np.sqrt(2.0 * np.pi))
FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
BLOCK = 64  # rows per independent random stream; chunking never changes the output

SAMPLES = ("bgs", "elg")

# ---------------------------------------------------------------------------------------------
# Line lists (rest-frame vacuum Å): every nebular line the SPS model renders
# ---------------------------------------------------------------------------------------------
EMISSION_LINES = {name: float(w) for name, w in zip(galaxy_pop.LINE_NAMES, galaxy_pop.LINE_WAVE)}
_EM_NAMES = tuple(EMISSION_LINES)
_EM_WAVE = np.array([EMISSION_LINES[k] for k in _EM_NAMES])
_EM = {name: i for i, name in enumerate(_EM_NAMES)}
OIII_RATIO = 2.98  # [OIII] 5008/4960, atomic physics
NII_RATIO = 3.05  # [NII] 6585/6550, atomic physics

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
    population: str             # galaxy_pop.POPULATIONS key
    z_range: tuple[float, float]
    rmag_range: tuple[float, float]   # total r (bgs) or spectrum r (elg)
    rmag_slope: float           # dN/dm ∝ 10^(slope·m)
    efftime: tuple[float, float, float, float]  # median, σ_ln, min, max (s)
    sky_level: float            # night-sky line scale (flux units per unit line rank)
    background: str             # key of BACKGROUND_RATE


BGS = SampleConfig(code=1, population="bgs", z_range=(0.02, 0.6), rmag_range=(16.0, 19.5),
                   rmag_slope=0.4, efftime=(180.0, 0.45, 100.0, 3000.0), sky_level=5.0,
                   background="bright")
ELG = SampleConfig(code=2, population="elg", z_range=(0.6, 1.6), rmag_range=(22.0, 23.6),
                   rmag_slope=0.3, efftime=(1000.0, 0.3, 500.0, 4000.0), sky_level=1.5,
                   background="dark")
_CONFIGS = {"bgs": BGS, "elg": ELG}
BGS_FAINT = (19.5, 20.175, 0.2)   # BGS Faint: total r range and fraction of the sample
BGS_Z_SCALE = 0.16   # p(z) ∝ z² exp(−(z/s)^1.5): mode (4/3)^(2/3) s = 0.19

# Background variance rate V(λ) (flux² · s): median 1/ivar × t_eff of the real DESI coadds in
# ../shared/fixtures/real/desi minus the target's own photon noise (its median flux × 1/(C T)),
# in windows centred at BACKGROUND_WAVE (Å); see the module docstring. tests/test_realism.py
# re-measures it from the files.
BACKGROUND_WAVE = (3650, 3750, 3900, 4125, 4375, 4625, 4875, 5125, 5375, 5625, 5875, 6125,
                   6375, 6625, 6875, 7125, 7375, 7625, 7875, 8125, 8375, 8625, 8875, 9125,
                   9375, 9625, 9787)
BACKGROUND_RATE = {
    "bright": (11744.1, 3770.1, 1741.8, 1039.0, 597.8, 451.0, 317.6, 262.8, 214.0, 198.8, 123.4,
               92.3, 74.0, 61.1, 57.1, 47.9, 47.7, 50.5, 34.9, 26.7, 23.3, 19.6, 21.1, 19.7,
               40.2, 42.6, 44.6),
    "dark": (9886.6, 3368.8, 1309.1, 690.4, 455.2, 314.1, 220.1, 188.8, 177.4, 185.4, 150.0,
             111.9, 94.1, 76.2, 66.5, 65.4, 74.7, 73.3, 55.3, 42.4, 38.2, 37.4, 41.4, 34.6,
             97.9, 100.1, 102.9),
}
EFFTIME_PER_TSNR2 = {"bgs": 0.14, "elg": 8.6}  # desispec: EFFTIME = k × TSNR2_<tracer> (s)
COLLECTING_AREA = 8.65e4   # cm², DESI primary (3.8 m, obstructed)
HC = 1.98644586e-8         # erg Å
NOISE_SCATTER = 0.15       # σ_ln of the per-spectrum background factor ε
EBV_MAX = galaxy_pop.EBV_MAX
STELLAR_TO_NEBULAR_EBV = galaxy_pop.STELLAR_TO_NEBULAR_EBV
SIGMA_GAS_MAX = 150.0      # km/s, widest gas line (window half-widths)
R_BAND = (5600.0, 6900.0)
R_BAND_EFF = 6250.0
SKY_LINE_SCALE = 15.0  # line flux (Å·flux units) of a unit-rank sky line per unit sky level
PSF_TO_FIBER = 0.78    # DESI coadds are point-source calibrated: galaxy spectrum = fibre / 0.78


def _config(sample: str) -> SampleConfig:
    """The SampleConfig of ``sample``; ValueError naming the bad value otherwise."""
    if sample not in _CONFIGS:
        raise ValueError(f"unknown sample {sample!r}; expected one of {SAMPLES}")
    return _CONFIGS[sample]


# ---------------------------------------------------------------------------------------------
# Continuum templates of the earlier analytic model (kept: the quasar simulator's host galaxy)
# ---------------------------------------------------------------------------------------------
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
        pdf = z**2 * np.exp(-((z / BGS_Z_SCALE) ** 1.5))
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


def draw_block(sample: str, seed: int, block: int) -> tuple[dict, np.random.Generator]:
    """Physical and observing parameters of one block of BLOCK spectra.

    Returns (params, noise_rng): ``params`` holds [BLOCK] arrays (plus ``coeff`` [BLOCK, K],
    ``line_lum`` and ``liner_ratio`` [BLOCK, M], ``sky_eps`` [BLOCK, S] and the bad-pixel
    coordinates ``bad_rows``/``bad_cols``); ``noise_rng`` is a separate stream used only for
    the pixel noise, so the noiseless and the noisy versions of a spectrum share every physical
    parameter."""
    cfg = _config(sample)
    param_ss, noise_ss = np.random.SeedSequence([seed, cfg.code, block]).spawn(2)
    rng = np.random.default_rng(param_ss)
    n = BLOCK
    z = draw_redshifts(rng, n, sample)
    params = galaxy_pop.draw_physical(rng, z, cfg.population)
    if sample == "bgs":
        faint = rng.random(n) < BGS_FAINT[2]
        total = np.where(faint,
                         _truncated_exp_mag(rng, BGS_FAINT[0], BGS_FAINT[1], cfg.rmag_slope, n),
                         _truncated_exp_mag(rng, *cfg.rmag_range, cfg.rmag_slope, n))
        offset = np.clip(rng.normal(1.25 - 1.6 * z, 0.25), 0.2, 2.0)
        rmag = total + offset
    else:
        rmag = _truncated_exp_mag(rng, *cfg.rmag_range, cfg.rmag_slope, n)
    med, sig, lo, hi = cfg.efftime
    params.update({
        "z": z,
        "rmag": rmag,
        "efftime": np.clip(med * np.exp(rng.normal(0.0, sig, n)), lo, hi),
        "noise_eps": np.exp(rng.normal(0.0, NOISE_SCATTER, n)),
        "sky_scale": cfg.sky_level * np.exp(rng.normal(0.0, 0.25, n)),
        "sky_eps": rng.normal(0.0, 0.02, (n, instrument().line_wave.size)),
        "sky_shift": rng.normal(0.0, 0.03, n),
        "sky_cont_eps": rng.normal(0.0, 0.005, n),
    })
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


def _rmag_to_flambda(rmag: np.ndarray) -> np.ndarray:
    """AB magnitude → f_λ at R_BAND_EFF, in 1e-17 erg/s/cm²/Å."""
    fnu = 10.0 ** (-0.4 * (rmag + 48.6))
    return fnu * (C_KMS * 1e13) / R_BAND_EFF**2 * 1e17


@functools.lru_cache(maxsize=None)
def _inst_sigma_ln() -> np.ndarray:
    """[L] instrumental + pixel Gaussian σ in ln λ on the DESI grid."""
    inst = instrument()
    return np.sqrt(_instrument_var(inst.wave)) / inst.wave


def _emission(p: dict, fluxes: np.ndarray, sample: str) -> np.ndarray:
    """Nebular line spectrum [B, L] (1e-17 erg/s/cm²/Å) from line fluxes [B, M]."""
    obs = _EM_WAVE[None] * (1 + p["z"][:, None])
    sig = np.sqrt((obs * p["sigma_gas"][:, None] / C_KMS) ** 2 + _instrument_var(obs))
    half_width = _line_half_widths(_EM_WAVE, np.zeros_like(_EM_WAVE), SIGMA_GAS_MAX, sample)
    return _gaussian_sum(DESI_WAVE_MIN, DESI_WAVE_STEP, DESI_NPIX, obs, sig, fluxes, half_width)


def _model(p: dict, sample: str) -> dict[str, np.ndarray]:
    """Noiseless object of a batch: continuum [B, L] (stars + nebular continuum, attenuated),
    line fluxes [B, M], the flux scale and the rest-frame truth of galaxy_pop.truth."""
    z = p["z"]
    inst = instrument()
    with _one_blas_thread():
        cont = galaxy_pop.render_continuum(p, z, np.log(inst.wave), _inst_sigma_ln())
        tr = galaxy_pop.truth(p)
    band = (inst.wave >= R_BAND[0]) & (inst.wave <= R_BAND[1])
    # rest-frame L☉/Å per M☉ → observed f_λ: the scale absorbs 1/(4π d_L² (1+z)); line fluxes
    # (no 1/(1+z) stretch) take (1+z) × it.
    scale = _rmag_to_flambda(p["rmag"]) / cont[:, band].mean(axis=1, dtype=np.float64)
    cont = cont * scale[:, None].astype(np.float32)
    fluxes = tr["line_lum"] * (scale * (1 + z))[:, None]
    return {"continuum": cont, "line_flux": fluxes, "scale": scale, "truth": tr}


@functools.lru_cache(maxsize=None)
def _blas() -> ThreadpoolController:
    """The process's BLAS thread pools (inspected once; cheap to limit afterwards)."""
    return ThreadpoolController()


def _one_blas_thread():
    """Limits BLAS to one thread while rendering: the matrix products here are small
    ([≲256, 26] × [26, ~15k]) and a multi-threaded BLAS spends more time synchronising than
    computing them (×5 slower on a loaded 2-core machine, measured)."""
    return _blas().limit(limits=1, user_api="blas")


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


@functools.lru_cache(maxsize=None)
def _noise_tables(background: str) -> tuple[np.ndarray, np.ndarray]:
    """(V(λ) [L] flux²·s, 1/(C T) [L] flux·s) on the grid, float32 (module docstring). V is
    measured on real coadds, so it already holds their read noise and sky continuum."""
    inst = instrument()
    wave = inst.wave
    rate = np.exp(np.interp(wave, BACKGROUND_WAVE, np.log(BACKGROUND_RATE[background])))
    counts_per_s = COLLECTING_AREA * 1e-17 * wave * DESI_WAVE_STEP / HC     # per flux unit, T=1
    inv_gain = 1.0 / (counts_per_s * inst.throughput)
    return rate.astype(np.float32), inv_gain.astype(np.float32)


def _variance(model: np.ndarray, p: dict, sample: str) -> np.ndarray:
    """Per-pixel flux variance [B, L] float32 (flux units²): background rate × conditions and
    photon noise of the object and the sky lines, over the effective time.

    Args: model [B, L] noiseless object flux (1e-17 erg/s/cm²/Å)."""
    inst = instrument()
    rate, inv_gain = _noise_tables(_config(sample).background)
    inv_t = (1.0 / p["efftime"]).astype(np.float32)[:, None]
    sky = p["sky_scale"].astype(np.float32)[:, None] * inst.sky_lines.astype(np.float32)
    eps = p["noise_eps"].astype(np.float32)[:, None]
    return (eps * rate + (np.maximum(model, 0.0) + sky) * inv_gain) * inv_t


def render_block(p: dict, noise_rngs: list, sample: str, noiseless: bool,
                 components: bool) -> dict[str, np.ndarray]:
    """Turns the parameters of a batch (whole blocks) into the output dict (see
    :func:`simulate_desi_galaxies`)."""
    b = p["z"].size
    m = _model(p, sample)
    cont, fluxes, tr = m["continuum"], m["line_flux"], m["truth"]
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
        flux = (model + _sky_residual(p)).astype(np.float32) + np.sqrt(var) * noise
    snr = np.median(cont * np.sqrt(ivar), axis=1)
    flux[~mask] = 0.0
    ivar[~mask] = 0.0

    z = p["z"]
    cont_obs = m["scale"] * (1 + z)     # rest continuum (L☉/Å per M☉) → observed, per rest Å
    oii = fluxes[:, _EM["OII_3726"]] + fluxes[:, _EM["OII_3729"]]
    ha = fluxes[:, _EM["Halpha"]]
    out = {
        "flux": flux, "ivar": ivar, "mask": mask, "z": z.astype(np.float64),
        "ebv": p["ebv"], "d4000": tr["d4000"], "dn4000": tr["dn4000"], "gr": tr["gr"],
        "oii_flux": oii, "oii_ew": oii / (tr["cont_oii"] * cont_obs),
        "halpha_flux": ha, "halpha_ew": ha / (tr["cont_halpha"] * cont_obs),
        "oiii_flux": fluxes[:, _EM["OIII_5008"]], "line_flux": fluxes,
        "snr": snr, "rmag": p["rmag"], "efftime": p["efftime"], "passive": p["passive"],
        "burst": p["burst"], "log_z": p["log_z"], "log_u": p["log_u"], "ssfr": p["ssfr"],
        "age_mw": p["age_mw"], "sigma_star": p["sigma_star"], "sigma_gas": p["sigma_gas"],
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
        drawn = [draw_block(sample, seed, blk) for blk in block_ids]
        out = render_block(_concat_params([d[0] for d in drawn]), [d[1] for d in drawn], sample,
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
