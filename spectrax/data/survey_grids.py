"""Native wavelength grids and simple instrument descriptions of the simulated surveys.

All wavelengths are vacuum Å, float64, strictly increasing. Values follow
../shared/SIMULATOR.md ("Instruments") and the survey data models:

=========  ==========================================  ============  ==================
survey     grid                                        pixels        resolving power R
=========  ==========================================  ============  ==================
sdss       log10 λ = 1e-4 · k (integer k; 69 km/s px)  ~3834–4611    1500 → 2500 (linear)
lamost     log10 λ = 1e-4 · k, ≈ 3700–9100 Å           ~3900–3909    1800
desi       linear 0.8 Å, 3600–9824 Å (cameras merged)  7781          b/r/z ramps, 2000–5000
galah      four HERMES CCDs, linear each              4 × 4096      28000
apogee     log10 λ = 4.179 + 6e-6 · k, 3 chips         7514          22500
=========  ==========================================  ============  ==================

SDSS and LAMOST spectra are coadded on a survey-wide log-λ grid (loglam a multiple of 1e-4),
so every spectrum is a contiguous slice of one global grid that starts and ends at slightly
different pixels; :func:`sdss_wavelength` and :func:`lamost_wavelength` draw such slices.

The line-spread function of every instrument is modelled as a Gaussian of
σ = λ / (2.3548 R) (:func:`lsf_sigma`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import numpy as np

from spectrax.data.grids import desi_wavelength
from spectrax.data.synthetic import instrument

__all__ = [
    "APOGEE_CHIPS", "APOGEE_NPIX", "FWHM_TO_SIGMA", "GALAH_CCDS", "LAMOST_LOGLAM_STEP",
    "SDSS_LOGLAM_STEP", "SURVEYS", "SurveyInstrument", "apogee_wavelength",
    "contiguous_segments", "desi_wavelength", "galah_wavelength", "get_survey",
    "lamost_wavelength", "lsf_sigma", "sdss_wavelength",
]

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))  # σ = FWHM / 2.3548

# ---------------------------------------------------------------------------------------------
# SDSS / BOSS: loglam = SDSS_LOGLAM_STEP · k for integer k (vacuum).
# ---------------------------------------------------------------------------------------------
SDSS_LOGLAM_STEP = 1e-4
# BOSS spectrographs (SDSS-III/IV): first pixel ≈ 3600 Å, last ≈ 10300–10400 Å.
_BOSS_K0 = 35560            # 10**3.5560 = 3597.5 Å; a spectrum starts 0–11 pixels later
_BOSS_K0_JITTER = 12
_BOSS_END = (10300.0, 10400.0)
_BOSS_K_END_DEFAULT = 40149  # 10**4.0149 = 10349 Å (deterministic grid: 35563 … 40149)
# SDSS-I/II spectrographs ("legacy"): ≈ 3800–9200 Å, ~3840 pixels.
_LEGACY_K0 = 35797          # 10**3.5797 = 3799.3 Å
_LEGACY_K_END = 39638       # 10**3.9638 = 9200.3 Å
_LEGACY_FRACTION = 0.25     # share of legacy-spectrograph spectra when the spectrograph is drawn


def _loglam_grid(k0: int, k1: int, step: float) -> np.ndarray:
    """10**(step · k) for k = k0 … k1 inclusive: [k1 − k0 + 1] float64, Å."""
    return 10.0 ** (step * np.arange(k0, k1 + 1, dtype=np.float64))


def sdss_wavelength(rng: np.random.Generator | None = None, *,
                    spectrograph: str | None = None) -> np.ndarray:
    """An SDSS coadd grid: log10 λ = 1e-4 · k (integer k), vacuum Å, float64.

    Args:
      rng: None gives the deterministic mid-range BOSS grid (k = 35563 … 40149: 3600.0 …
        10349 Å, 4587 pixels). With a generator, the grid of one spectrum is drawn: the
        spectrograph (unless given; 25% "legacy"), a start 0–11 pixels after the survey's first
        pixel, and (BOSS) an end uniform in 10300–10400 Å; lengths ≈ 4558–4611 (BOSS) and
        3834–3842 (legacy) pixels.
      spectrograph: "boss" (≈3600–10400 Å) or "legacy" (SDSS-I/II, ≈3800–9200 Å); None draws
        one when ``rng`` is given and means "boss" otherwise.

    Returns: [L] float64, Å (vacuum), strictly increasing.
    """
    if spectrograph not in (None, "boss", "legacy"):
        raise ValueError(f"spectrograph must be 'boss' or 'legacy', got {spectrograph!r}")
    if rng is None:
        if spectrograph == "legacy":
            return _loglam_grid(_LEGACY_K0 + 4, _LEGACY_K_END, SDSS_LOGLAM_STEP)
        return _loglam_grid(_BOSS_K0 + 3, _BOSS_K_END_DEFAULT, SDSS_LOGLAM_STEP)
    # The three draws are always made, whatever the spectrograph, so a given generator state
    # always advances the same way (reproducible per-row streams).
    legacy_draw = rng.random() < _LEGACY_FRACTION
    start = int(rng.integers(0, _BOSS_K0_JITTER))
    end_wave = rng.uniform(*_BOSS_END)
    legacy = legacy_draw if spectrograph is None else spectrograph == "legacy"
    if legacy:
        return _loglam_grid(_LEGACY_K0 + start // 2, _LEGACY_K_END - start // 3,
                            SDSS_LOGLAM_STEP)
    k_end = int(np.floor(np.log10(end_wave) / SDSS_LOGLAM_STEP))
    return _loglam_grid(_BOSS_K0 + start, k_end, SDSS_LOGLAM_STEP)


# ---------------------------------------------------------------------------------------------
# LAMOST low resolution: the same log-λ step, ≈ 3700–9100 Å.
# ---------------------------------------------------------------------------------------------
LAMOST_LOGLAM_STEP = 1e-4
_LAMOST_K0 = 35682          # 10**3.5682 = 3700.0 Å (LAMOST COEFF0)
_LAMOST_NPIX = 3909


def lamost_wavelength(rng: np.random.Generator | None = None) -> np.ndarray:
    """A LAMOST low-resolution grid: log10 λ = 1e-4 · k, vacuum Å, float64.

    Args:
      rng: None gives the deterministic grid k = 35682 … 39590 (3700.0 … 9099.1 Å, 3909
        pixels). With a generator the start moves by −3…+3 pixels and 0–9 pixels are dropped at
        the red end (3900–3909 pixels), as between LAMOST plates.

    Returns: [L] float64, Å (vacuum), strictly increasing.
    """
    if rng is None:
        return _loglam_grid(_LAMOST_K0, _LAMOST_K0 + _LAMOST_NPIX - 1, LAMOST_LOGLAM_STEP)
    k0 = _LAMOST_K0 + int(rng.integers(-3, 4))
    npix = _LAMOST_NPIX - int(rng.integers(0, 10))
    return _loglam_grid(k0, k0 + npix - 1, LAMOST_LOGLAM_STEP)


# ---------------------------------------------------------------------------------------------
# GALAH (HERMES): four CCDs, each a linear grid.
# ---------------------------------------------------------------------------------------------
GALAH_CCDS = ((4713.0, 4903.0), (5648.0, 5873.0), (6478.0, 6737.0), (7585.0, 7887.0))
GALAH_PIXELS_PER_CCD = 4096


def galah_wavelength(pixels_per_ccd: int = GALAH_PIXELS_PER_CCD) -> np.ndarray:
    """The four GALAH/HERMES CCD windows, each a linear grid, concatenated (blue → IR).

    The windows are those of SIMULATOR.md, used here as vacuum Å (the HERMES solutions are in
    air; the ≈1.5 Å difference only moves the window edges). ``pixels_per_ccd=4096`` is the
    real sampling (≈0.046–0.074 Å per pixel); fewer pixels (e.g. 1024 for CPU configurations)
    give a coarser "GALAH-like" sampling of the same windows — the simulator still renders the
    lines at R = 28000, so features narrower than ~2 coarse pixels are undersampled.

    Returns: [4 · pixels_per_ccd] float64, Å, strictly increasing (gaps between CCDs).
    """
    if int(pixels_per_ccd) != pixels_per_ccd or pixels_per_ccd < 2:
        raise ValueError(f"pixels_per_ccd must be an integer >= 2, got {pixels_per_ccd!r}")
    return np.concatenate([np.linspace(lo, hi, int(pixels_per_ccd)) for lo, hi in GALAH_CCDS])


# ---------------------------------------------------------------------------------------------
# APOGEE: apStar/aspcapStar log-λ grid with the chip gaps removed.
# ---------------------------------------------------------------------------------------------
APOGEE_LOGLAM0 = 4.179
APOGEE_LOGLAM_STEP = 6e-6
APOGEE_CHIPS = ((246, 3274), (3585, 6080), (6344, 8335))  # [start, stop) apStar pixel index
APOGEE_NPIX = 7514


def apogee_wavelength() -> np.ndarray:
    """APOGEE grid, 10**(4.179 + 6e-6 k) for k in 246…3273, 3585…6079, 6344…8334.

    Returns: [7514] float64, vacuum Å, 15152.2 … 16943.5 (blue chip 3028 px, green 2495 px,
    red 1991 px; two gaps)."""
    k = np.concatenate([np.arange(a, b) for a, b in APOGEE_CHIPS]).astype(np.float64)
    return 10.0 ** (APOGEE_LOGLAM0 + APOGEE_LOGLAM_STEP * k)


# ---------------------------------------------------------------------------------------------
# Instrument helpers
# ---------------------------------------------------------------------------------------------
def lsf_sigma(wave: np.ndarray, resolving_power) -> np.ndarray:
    """Gaussian line-spread σ (Å) = λ / (2.3548 R) at ``wave`` (Å; any shape); ``resolving_power``
    is a scalar or broadcasts against ``wave``."""
    wave = np.asarray(wave, np.float64)
    return wave * FWHM_TO_SIGMA / np.asarray(resolving_power, np.float64)


def contiguous_segments(wave: np.ndarray, gap_factor: float = 5.0) -> list[tuple[int, int]]:
    """[start, stop) pixel ranges of the contiguous pieces of a grid (CCDs, chips).

    A gap is a relative step Δλ/λ larger than ``gap_factor`` × the median relative step, which
    separates the GALAH CCDs and the APOGEE chips and never splits log-linear or DESI grids."""
    wave = np.asarray(wave, np.float64)
    if wave.size < 2:
        return [(0, wave.size)]
    rel = np.diff(wave) / wave[:-1]
    cuts = np.flatnonzero(rel > gap_factor * np.median(rel)) + 1
    edges = np.concatenate([[0], cuts, [wave.size]])
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _r_sdss(wave: np.ndarray) -> np.ndarray:
    """BOSS-like R: 1500 at 3600 Å rising linearly to 2500 at 10400 Å (clipped)."""
    w = np.asarray(wave, np.float64)
    return np.clip(1500.0 + 1000.0 * (w - 3600.0) / 6800.0, 1500.0, 2500.0)


def _r_desi(wave: np.ndarray) -> np.ndarray:
    """The galaxy simulator's DESI R (throughput-weighted b/r/z ramps), interpolated."""
    inst = instrument()
    return np.interp(np.asarray(wave, np.float64), inst.wave, inst.resolution)


@dataclasses.dataclass(frozen=True)
class _ConstantR:
    """A constant resolving power as a callable of λ (picklable, readable repr)."""

    value: float

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        return np.full(np.shape(wave), self.value, np.float64)


def _galah_default(rng: np.random.Generator | None = None) -> np.ndarray:
    return galah_wavelength()


def _apogee_any(rng: np.random.Generator | None = None) -> np.ndarray:
    return apogee_wavelength()


def _desi_any(rng: np.random.Generator | None = None) -> np.ndarray:
    return desi_wavelength()


@dataclasses.dataclass(frozen=True)
class SurveyInstrument:
    """What the simulators need to know about a survey.

    Attributes:
      name: survey key ("sdss", "lamost", "desi", "galah", "apogee").
      code: small integer that enters simulator seeds/ids.
      resolving_power: callable λ [Å, any shape] → R (same shape, float64).
      snr_range: (low, high) typical continuum S/N per pixel of the simulated stars.
      mag_range: (bright, faint) AB magnitude range (r band; H for APOGEE) of the targets.
      wavelength: callable rng|None → [L] float64 vacuum Å; None gives the deterministic grid,
        a generator draws one spectrum's grid (only SDSS and LAMOST grids vary).
      normalized: whether the survey's standard product is continuum-normalised (GALAH,
        APOGEE) rather than fluxed (1e-17 erg/s/cm²/Å).
      band: "optical" or "h".
    """

    name: str
    code: int
    resolving_power: Callable[[np.ndarray], np.ndarray]
    snr_range: tuple[float, float]
    mag_range: tuple[float, float]
    wavelength: Callable[..., np.ndarray]
    normalized: bool
    band: str

    def resolution(self, wave: np.ndarray) -> np.ndarray:
        """R at ``wave`` (Å), float64, same shape."""
        return np.asarray(self.resolving_power(np.asarray(wave, np.float64)), np.float64)

    def lsf_sigma(self, wave: np.ndarray) -> np.ndarray:
        """Gaussian line-spread σ (Å) at ``wave`` (Å)."""
        return lsf_sigma(wave, self.resolution(wave))

    @property
    def varying_grid(self) -> bool:
        """True when spectra of this survey come on different (sliced) grids."""
        return self.name in ("sdss", "lamost")


SURVEYS: dict[str, SurveyInstrument] = {
    "sdss": SurveyInstrument("sdss", 11, _r_sdss, (5.0, 80.0), (14.5, 20.5), sdss_wavelength,
                             False, "optical"),
    "lamost": SurveyInstrument("lamost", 12, _ConstantR(1800.0), (5.0, 150.0), (10.0, 17.5),
                               lamost_wavelength, False, "optical"),
    "desi": SurveyInstrument("desi", 13, _r_desi, (3.0, 60.0), (16.0, 20.0), _desi_any, False,
                             "optical"),
    "galah": SurveyInstrument("galah", 14, _ConstantR(28000.0), (20.0, 200.0), (9.0, 14.0),
                              _galah_default, True, "optical"),
    "apogee": SurveyInstrument("apogee", 15, _ConstantR(22500.0), (50.0, 1000.0), (7.0, 13.8),
                               _apogee_any, True, "h"),
}


def get_survey(name: str) -> SurveyInstrument:
    """The :class:`SurveyInstrument` called ``name``; ValueError naming the valid ones."""
    key = str(name).lower()
    if key not in SURVEYS:
        raise ValueError(f"unknown survey {name!r}; expected one of {tuple(SURVEYS)}")
    return SURVEYS[key]


@functools.lru_cache(maxsize=None)
def union_grid(survey: str) -> np.ndarray:
    """The survey-wide grid [L] (Å) that contains every per-spectrum grid the survey's
    ``wavelength(rng)`` can draw (SDSS/BOSS and LAMOST slices; other surveys have one grid)."""
    if survey == "sdss":
        k1 = int(np.floor(np.log10(_BOSS_END[1]) / SDSS_LOGLAM_STEP))
        return _loglam_grid(_BOSS_K0, k1, SDSS_LOGLAM_STEP)
    if survey == "lamost":
        return _loglam_grid(_LAMOST_K0 - 3, _LAMOST_K0 + 3 + _LAMOST_NPIX - 1,
                            LAMOST_LOGLAM_STEP)
    return get_survey(survey).wavelength(None)
