"""Galaxy populations for the simulators: star-formation histories, metallicities, ionisation,
dust and kinematics drawn per population, rendered with :mod:`spectrax.data.sps` on any observed
grid. Shared by :mod:`spectrax.data.synthetic` (DESI BGS / ELG) and
:mod:`spectrax.data.sim_galaxies` (SDSS-like main sample + LRGs on other survey grids); each of
those owns its redshifts, magnitudes, instrument and noise.

Units: ages in years (lookback from the observed epoch), velocities km/s, wavelengths vacuum Å.
Rendered quantities are rest-frame luminosities for 1 M☉ formed in total (L☉/Å, L☉); callers
scale them to an observed magnitude.

Populations (:data:`POPULATIONS`) — parameter distributions
  Every galaxy is star-forming or quiescent (probability ``quiescent_fraction``).
  * Star-forming: delayed-τ SFH started at a fraction U(0.6, 0.97) of the age of the universe
    at its z before observation, τ log-uniform on ``sf_tau`` Gyr; with probability
    ``burst_prob`` a burst of mass fraction log-uniform on ``burst_frac`` at a lookback age
    log-uniform 10 Myr–1 Gyr. Gas-phase = stellar metallicity log Z/Z☉ ~ N(``sf_logz``,
    ``sf_logz_sigma``) on log 0.2…log 2.5; log U = ``sf_logu`` − 0.8 (log Z − ``sf_logz``) +
    N(0, 0.2) on −3.8…−2.0 (metal-rich HII regions have lower ionisation parameters, U ∝
    Z^−0.8, Dopita et al. 2006; it keeps galaxies on the observed BPT star-forming sequence,
    [NII]/Hα ≈ 0.1–0.5 with [OIII]/Hβ falling as [NII]/Hα rises); nebular E(B−V) exponential
    with mean
    ``sf_ebv`` (≤ 1.0); σ* log-uniform 40–150, σ_gas log-uniform on ``sigma_gas``.
  * Quiescent: delayed-τ with τ log-uniform 0.3–1.5 Gyr started at U(0.75, 0.97) of the age of
    the universe, quenched at a lookback age U(0.15, 0.6) × the start age with e-folding
    0.1–0.5 Gyr; 10% of them are post-starburst (a 5–25% burst 0.15–1.2 Gyr ago, quenched
    right after it). log Z ~ N(0.1, 0.1); stellar E(B−V) small (nebular mean 0.05); σ*
    log-uniform 110–300. Their weak emission is LINER-like (old hot stars, "retired"
    galaxies): rest EW(Hα) log-uniform 0.3–3 Å with [NII]/Hα 0.8–2, [OIII]/Hβ 1–3, [SII]/Hα
    0.4–0.8, [OI]/Hα 0.1–0.3, [OII]/Hβ 2–5 — the Cloudy grids describe HII regions only.
  * Nebular emission of star formation: Cloudy line luminosities of the stars formed in the
    last 10 Myr at (Z, U) (:func:`spectrax.data.sps.line_luminosities`), each galaxy's
    [NII], [SII], [OIII]+[NeIII] and [OII] scaled by log-normal factors (σ 0.12, 0.10, 0.10,
    0.08 dex; N/O and density scatter the grid does not have), the [OII] 3729/3726 and [SII]
    6718/6733 doublet ratios redrawn U(1.0, 1.5) and U(1.1, 1.45) (low density, n_e ≲ 100
    cm⁻³), [OIII] 5008/4960 = 2.98 and [NII] 6585/6550 = 3.05 imposed (atomic data; Cloudy's
    grid has 2.89 and 2.95), the grid's Balmer ratios kept (Hα/Hβ ≈ 2.8–2.9). Lines and nebular continuum use the nebular E(B−V), the
    stars 0.44 × it (Calzetti et al. 2000).

Truth (:func:`truth`): D4000 (Bruzual 1983: f_ν 4050–4250 / 3750–3950) and Dn4000 (Balogh et
al. 1999: 4000–4100 / 3850–3950) of the attenuated stellar continuum; rest EWs of Hα and [OII]
against the mean attenuated continuum in side bands; rest-frame g − r (AB, top-hat bands
4000–5500 and 5600–6900 Å — SDSS-like, not the real filter curves); log sSFR over 100 Myr;
mass-weighted age; log Z; log U.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from spectrax.data import sps

C_KMS = sps.C_KMS
LINE_NAMES = sps.LINE_NAMES
LINE_WAVE = sps.LINE_WAVE
_L = {k: i for i, k in enumerate(LINE_NAMES)}
STELLAR_TO_NEBULAR_EBV = 0.44  # Calzetti et al. (2000)
EBV_MAX = 1.0
SF_START = (0.6, 0.97)  # star-forming galaxies began at this fraction of the cosmic age
OIII_RATIO = 2.98  # [OIII] 5008/4960
NII_RATIO = 3.05   # [NII] 6585/6550
GYR = 1e9


@dataclasses.dataclass(frozen=True)
class Population:
    """Parameter distributions of one galaxy population (module docstring)."""

    quiescent_fraction: float
    sf_tau: tuple[float, float]          # Gyr, log-uniform
    burst_prob: float
    burst_frac: tuple[float, float]      # log-uniform
    sf_logz: float                       # mean log Z/Z☉ of star-forming galaxies
    sf_logz_sigma: float                 # its spread (dex)
    sf_logu: float                       # mean log U
    sf_ebv: float                        # mean nebular E(B−V) of star-forming galaxies
    sigma_gas: tuple[float, float]       # km/s, log-uniform


POPULATIONS = {
    # DESI BGS and the SDSS main sample: bimodal, ~40% quiescent (see synthetic.py's docstring)
    "bgs": Population(quiescent_fraction=0.40, sf_tau=(1.0, 15.0), burst_prob=0.25,
                      burst_frac=(0.003, 0.08), sf_logz=-0.2, sf_logz_sigma=0.25,
                      sf_logu=-3.1, sf_ebv=0.25,
                      sigma_gas=(30.0, 120.0)),
    # DESI ELGs: blue, strongly star-forming, lower Z and higher U at z ~ 1
    "elg": Population(quiescent_fraction=0.0, sf_tau=(3.0, 50.0), burst_prob=0.3,
                      burst_frac=(0.01, 0.10), sf_logz=-0.35, sf_logz_sigma=0.2,
                      sf_logu=-2.8, sf_ebv=0.15,
                      sigma_gas=(30.0, 100.0)),
    # luminous red galaxies (BOSS LOWZ / CMASS-like): all quiescent
    "lrg": Population(quiescent_fraction=1.0, sf_tau=(1.0, 30.0), burst_prob=0.0,
                      burst_frac=(0.01, 0.1), sf_logz=0.0, sf_logz_sigma=0.15,
                      sf_logu=-3.2, sf_ebv=0.2,
                      sigma_gas=(30.0, 120.0)),
}


def _log_uniform(rng: np.random.Generator, lo, hi, n: int) -> np.ndarray:
    return np.exp(rng.uniform(np.log(lo), np.log(hi), n))


def draw_physical(rng: np.random.Generator, z: np.ndarray, population: str) -> dict:
    """Physical parameters of galaxies at redshifts ``z`` [B] (a fixed number of draws from
    ``rng`` per galaxy, so row i depends only on the stream). Returns [B] arrays: passive
    (bool), coeff [B, K], young_mass (M☉ formed in the last 10 Myr per M☉ formed), log_z,
    log_u, ebv (nebular), sigma_star, sigma_gas, ssfr (log yr⁻¹, 100 Myr), age_mw (yr), and
    line_lum [B, M] (attenuated, L☉ per M☉ formed, LINE_NAMES order)."""
    pop = POPULATIONS[population]
    n = z.size
    t_univ = sps.age_of_universe(z)
    passive = rng.random(n) < pop.quiescent_fraction
    # star-forming draws
    sf_start = t_univ * rng.uniform(*SF_START, n)
    sf_tau = _log_uniform(rng, *pop.sf_tau, n) * GYR
    has_burst = rng.random(n) < pop.burst_prob
    b_age = _log_uniform(rng, 1e7, 1e9, n)
    b_frac = np.where(has_burst, _log_uniform(rng, *pop.burst_frac, n), 0.0)
    # quiescent draws
    q_start = t_univ * rng.uniform(0.75, 0.97, n)
    q_tau = _log_uniform(rng, 0.3, 1.5, n) * GYR
    q_age = q_start * rng.uniform(0.15, 0.6, n)
    q_etau = rng.uniform(0.1, 0.5, n) * GYR
    psb = rng.random(n) < 0.1
    psb_age = _log_uniform(rng, 1.5e8, 1.2e9, n)
    psb_frac = rng.uniform(0.05, 0.25, n)
    q_age = np.where(psb, 0.8 * psb_age, q_age)
    q_etau = np.where(psb, 0.05 * GYR, q_etau)

    age_start = np.where(passive, q_start, sf_start)
    tau = np.where(passive, q_tau, sf_tau)
    bins = sps.sfh_bin_masses(age_start, tau,
                              quench_age=np.where(passive, q_age, 0.0),
                              quench_tau=np.where(passive, q_etau, 1.0),
                              burst_age=np.where(passive, psb_age, b_age),
                              burst_frac=np.where(passive, np.where(psb, psb_frac, 0.0), b_frac))
    log_z = np.where(passive, rng.normal(0.1, 0.1, n),
                     rng.normal(pop.sf_logz, pop.sf_logz_sigma, n))
    log_z = np.clip(log_z, sps.LOGZ[0], sps.LOGZ[-1])
    log_u = np.clip(pop.sf_logu - 0.8 * (log_z - pop.sf_logz) + rng.normal(0.0, 0.2, n),
                    -3.8, -2.0)
    ebv = np.minimum(rng.exponential(1.0, n) * np.where(passive, 0.05, pop.sf_ebv), EBV_MAX)
    sigma_star = np.where(passive, _log_uniform(rng, 110.0, 300.0, n),
                          _log_uniform(rng, 40.0, 150.0, n))
    sigma_gas = _log_uniform(rng, *pop.sigma_gas, n)
    coeff = sps.coefficients(bins, log_z)

    # nebular lines of young stars, with the scatter the photoionisation grid lacks
    young = bins[:, 0]
    lum = sps.line_luminosities(young, log_z, log_u)
    scale = np.ones_like(lum)
    f_n2, f_s2, f_o3, f_o2 = (10 ** rng.normal(0.0, s, n) for s in (0.12, 0.10, 0.10, 0.08))
    for name in ("NII_6550", "NII_6585", "NII_5756"):
        scale[:, _L[name]] = f_n2
    for name in ("SII_6718", "SII_6733", "SII_4070"):
        scale[:, _L[name]] = f_s2
    for name in ("OIII_4960", "OIII_5008", "OIII_4364", "NeIII_3869", "NeIII_3968"):
        scale[:, _L[name]] = f_o3
    for name in ("OII_3726", "OII_3729", "OII_7322", "OII_7332"):
        scale[:, _L[name]] = f_o2
    lum = lum * scale
    # Cloudy's own transition probabilities give 2.89 and 2.95; impose the ratios of the
    # atomic data (Storey & Zeippen 2000), as every other part of spectrax assumes.
    _redistribute(lum, "OIII_5008", "OIII_4960", np.full(n, OIII_RATIO))
    _redistribute(lum, "NII_6585", "NII_6550", np.full(n, NII_RATIO))
    _redistribute(lum, "OII_3729", "OII_3726", rng.uniform(1.0, 1.5, n))
    _redistribute(lum, "SII_6718", "SII_6733", rng.uniform(1.1, 1.45, n))

    # LINER-like emission of quiescent galaxies, scaled to a drawn EW(Hα) later (needs the
    # continuum): store the ratios to Hα here.
    liner = np.zeros((n, len(LINE_NAMES)))
    liner[:, _L["Halpha"]] = 1.0
    liner[:, _L["Hbeta"]] = 1.0 / 2.86
    liner[:, _L["Hgamma"]] = 0.468 / 2.86
    liner[:, _L["Hdelta"]] = 0.259 / 2.86
    n2 = rng.uniform(0.8, 2.0, n)
    liner[:, _L["NII_6585"]] = n2
    liner[:, _L["NII_6550"]] = n2 / NII_RATIO
    o3 = rng.uniform(1.0, 3.0, n) / 2.86
    liner[:, _L["OIII_5008"]] = o3
    liner[:, _L["OIII_4960"]] = o3 / OIII_RATIO
    s2 = rng.uniform(0.4, 0.8, n)
    liner[:, _L["SII_6718"]] = 0.55 * s2
    liner[:, _L["SII_6733"]] = 0.45 * s2
    o1 = rng.uniform(0.1, 0.3, n)
    liner[:, _L["OI_6302"]] = o1
    liner[:, _L["OI_6365"]] = o1 / 3.1
    o2 = rng.uniform(2.0, 5.0, n) / 2.86
    liner[:, _L["OII_3726"]] = 0.45 * o2
    liner[:, _L["OII_3729"]] = 0.55 * o2
    liner_ew = _log_uniform(rng, 0.3, 3.0, n)

    line_dust = 10 ** (-0.4 * sps.calzetti_k(LINE_WAVE)[None] * ebv[:, None])
    ages_mid = 0.5 * (sps.AGE_EDGES[1:] + sps.AGE_EDGES[:-1])
    mass_100 = bins[:, :3].sum(1)                       # formed in the last 100 Myr
    stellar = sps.stellar_mass(coeff)
    return {
        "passive": passive, "coeff": coeff, "young_mass": np.where(passive, 0.0, young),
        "log_z": log_z, "log_u": log_u, "ebv": ebv, "sigma_star": sigma_star,
        "sigma_gas": sigma_gas,
        "line_lum": np.where(passive[:, None], 0.0, lum) * line_dust,
        "liner_ratio": np.where(passive[:, None], liner, 0.0) * line_dust
        / line_dust[:, _L["Halpha"]][:, None],
        "liner_ew": np.where(passive, liner_ew, 0.0),
        "ssfr": np.log10(np.maximum(mass_100 / 1e8, 1e-30) / stellar),
        "age_mw": (bins * ages_mid[None]).sum(1),
        "burst": np.where(passive, psb, has_burst),
    }


def _redistribute(lum: np.ndarray, a: str, b: str, ratio: np.ndarray) -> None:
    """Sets lum[:, a] / lum[:, b] = ratio keeping their sum (in place)."""
    tot = lum[:, _L[a]] + lum[:, _L[b]]
    lum[:, _L[a]] = tot * ratio / (1 + ratio)
    lum[:, _L[b]] = tot / (1 + ratio)


def dust(k: np.ndarray, ebv: np.ndarray) -> np.ndarray:
    """Transmission 10^(−0.4 k E(B−V)) (float32), ``ebv`` [B] against k [B, L] or [L]."""
    e = (-0.4 * np.log(10.0) * np.asarray(ebv, np.float64))[:, None].astype(np.float32)
    return np.exp(np.asarray(k, np.float32) * e)


def render_continuum(p: dict, z: np.ndarray, ln_wave_obs: np.ndarray,
                     inst_sigma_ln: np.ndarray) -> np.ndarray:
    """Attenuated rest-frame continuum (stars + nebular) [B, L] float32, L☉/Å per M☉ formed, at
    every observed pixel (:func:`draw_physical` parameters ``p``; ln λ_obs [L]; instrument +
    pixel σ in ln λ [L])."""
    stars = sps.stellar_continuum(p["coeff"], z, p["sigma_star"], ln_wave_obs, inst_sigma_ln)
    k = sps.calzetti_k(np.exp(ln_wave_obs[None, :] - np.log1p(z)[:, None])).astype(np.float32)
    cont = stars * dust(k, STELLAR_TO_NEBULAR_EBV * p["ebv"])
    sf = p["young_mass"] > 0
    if sf.any():
        neb = sps.nebular_continuum(p["young_mass"][sf], p["log_z"][sf], p["log_u"][sf], z[sf],
                                    ln_wave_obs)
        cont[sf] += neb * dust(k[sf], p["ebv"][sf])
    return cont


# Side bands (rest Å) of the equivalent-width continua, and the truth windows.
_EW_BANDS = {"Halpha": ((6490.0, 6530.0), (6610.0, 6650.0)),
             "OII": ((3680.0, 3715.0), (3745.0, 3780.0))}
_TRUTH_RANGE = (3600.0, 7000.0)


def truth(p: dict) -> dict:
    """Rest-frame truth [B] from the attenuated stellar continuum at MILES resolution: d4000,
    dn4000, gr (g − r, AB, top-hat bands), cont_halpha and cont_oii (continuum L☉/Å per M☉
    formed at Hα and [OII] from side bands), plus the LINER line luminosities now that the
    continuum is known: returns also "line_lum" [B, M] (star formation + LINER, attenuated)."""
    model = sps.sps_model()
    wave = model.wave
    sel = np.nonzero((wave >= _TRUTH_RANGE[0]) & (wave <= _TRUTH_RANGE[1]))[0]
    w = wave[sel]
    spec = np.asarray(p["coeff"], np.float32) @ model.basis[0][:, sel]
    spec = spec * dust(sps.calzetti_k(w), STELLAR_TO_NEBULAR_EBV * p["ebv"])
    fnu = spec * (w ** 2).astype(np.float32)

    def band(lo, hi, arr=fnu):
        m = (w >= lo) & (w <= hi)
        return arr[:, m].mean(1, dtype=np.float64)

    out = {"d4000": band(4050, 4250) / band(3750, 3950),
           "dn4000": band(4000, 4100) / band(3850, 3950),
           "gr": -2.5 * np.log10(band(4000, 5500) / band(5600, 6900))}
    for key, (b1, b2) in _EW_BANDS.items():
        out[f"cont_{key.lower()}"] = 0.5 * (band(*b1, arr=spec) + band(*b2, arr=spec))
    line = p["line_lum"] + p["liner_ratio"] * (p["liner_ew"] * out["cont_halpha"])[:, None]
    out["line_lum"] = line
    return out
