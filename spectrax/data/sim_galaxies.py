"""Simulated galaxy spectra on any observed wavelength grid (SDSS/BOSS-like, LAMOST-like, ...).

The physics is that of the DESI simulator :mod:`spectrax.data.synthetic` (its continuum
templates, absorption-feature tables, emission-line ratios, Calzetti dust, line-flux and D4000
code are imported, not copied, and synthetic.py's own outputs are untouched); this module adds
an SDSS-like population, a grid-generic renderer and the generic instrument/noise model of
:mod:`spectrax.data.sim_quasars`. Numpy only; deterministic from ``(seed, row)``: blocks of
:data:`BLOCK` (64) rows draw from ``SeedSequence([seed, GALAXY_CODE, block])``, spawned into a
physical-parameter stream (same galaxies on every grid) and a mask + noise stream.

Units: vacuum Å; flux densities 1e-17 erg/s/cm²/Å; line fluxes 1e-17 erg/s/cm²; km/s.

Population (SDSS main sample + an optional LRG-like tail)
  A fraction ``lrg_fraction`` (default 0.15) are LRG-like: passive, old (strong 4000 Å break),
  σ* 180–300 km/s, z from a normal with mode 0.45 and σ 0.12 truncated to 0.15–0.7 (BOSS
  LOWZ+CMASS-like), fibre r 19.0–20.8. The rest are main-sample galaxies: p(z) ∝ z²
  exp(−(z/0.0826)^1.5) on 0.02–0.4 (peak 0.10, median ≈ 0.12), 35% passive, fibre r 16.5–19.5;
  star-forming ones get a young fraction 0.35–1 and Hα EW 5–200 Å (median 25), passive ones
  0–3 Å with LINER-like ratios — the ``bgs`` parameter distributions of synthetic.py. Redshifts
  therefore lie in 0.02–0.7 (0.02–0.4 for main, 0.15–0.7 for LRG).

Rendering
  Continuum: synthetic.py's templates (old/young, 4000 Å break), Gaussian optical-depth
  absorption features (OLD_ABSORPTION, YOUNG_ABSORPTION) and Calzetti dust (stellar E(B−V) =
  0.44 × nebular). Emission: synthetic.py's line list and ratios (case-B Balmer, [O III]
  5008/4960 = 2.98, [N II] 6585/6550 = 3.05, ...) scaled by the Hα EW. Line and feature σ² =
  intrinsic² ⊕ velocity² ⊕ (λ/(2.3548 R))² ⊕ Δλ²/12, Gaussians evaluated analytically at pixel
  centres (no fine-grid convolution). The flux scale makes the smooth attenuated continuum at
  observed 6250 Å equal the flux of the drawn fibre r magnitude (one point, so it works on
  grids that do not cover the r band).
  Instrument, sky, noise (S/N drawn per object on ``snr_range``, median model/σ over the grid)
  and masks: :mod:`spectrax.data.sim_quasars`.
"""
from __future__ import annotations

import functools

import numpy as np

from spectrax.data import synthetic as syn
from spectrax.data.sim_quasars import (BLOCK, GridModel, check_common_args, draw_bad_pixels,
                                       draw_observing, gaussian_sum, grid_model,
                                       inverse_cdf_mag, observe, simulate_rows)

GALAXY_CODE = 40  # enters the seed and the ids
LINE_NAMES = syn._EM_NAMES  # order of "line_flux"
EMISSION_LINES = syn.EMISSION_LINES

MAIN_Z_RANGE = (0.02, 0.4)
MAIN_Z_SCALE = 0.0826  # p(z) ∝ z² exp(−(z/s)^1.5) peaks at (4/3)^(2/3) s = 0.10
LRG_Z_RANGE = (0.15, 0.7)
LRG_Z_MODE, LRG_Z_SIGMA = 0.45, 0.12
LRG_FRACTION = 0.15
MAIN_PASSIVE_FRACTION = 0.35
MAIN_RMAG, LRG_RMAG, RMAG_SLOPE = (16.5, 19.5), (19.0, 20.8), 0.4
R_BAND_EFF = syn.R_BAND_EFF  # Å observed


@functools.lru_cache(maxsize=None)
def _redshift_cdfs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"main", "lrg"}: (z grid, normalised CDF) of the two redshift distributions."""
    out = {}
    for name, (lo, hi) in (("main", MAIN_Z_RANGE), ("lrg", LRG_Z_RANGE)):
        z = np.linspace(lo, hi, 4001)
        if name == "main":
            pdf = z**2 * np.exp(-((z / MAIN_Z_SCALE) ** 1.5))
        else:
            pdf = np.exp(-0.5 * ((z - LRG_Z_MODE) / LRG_Z_SIGMA) ** 2)
        cdf = np.concatenate([[0.0], np.cumsum(0.5 * (pdf[1:] + pdf[:-1]) * np.diff(z))])
        out[name] = (z, cdf / cdf[-1])
    return out


def draw_galaxy_redshifts(rng: np.random.Generator, n: int,
                          lrg: np.ndarray | None = None) -> np.ndarray:
    """[n] float64 redshifts: main-sample distribution, LRG distribution where ``lrg`` [n]."""
    u = rng.random(n)
    cdfs = _redshift_cdfs()
    z = np.interp(u, cdfs["main"][1], cdfs["main"][0])
    if lrg is not None:
        z = np.where(lrg, np.interp(u, cdfs["lrg"][1], cdfs["lrg"][0]), z)
    return z


def _draw_gal_block(seed: int, block: int, npix: int, lrg_fraction: float,
                    snr_range: tuple[float, float]):
    """Parameters of one block of BLOCK galaxies: (params, bad, noise_rng).

    params holds [BLOCK] arrays (+ "line_ratio" [BLOCK, M]) with the keys synthetic.py's
    helpers expect (z, ebv, f_young, w_strong_break, metal, balmer, sigma_star, sigma_gas,
    driver_ew, line_ratio); bad = (rows, cols) masked pixels."""
    param_ss, noise_ss = np.random.SeedSequence([seed, GALAXY_CODE, block]).spawn(2)
    rng = np.random.default_rng(param_ss)
    n = BLOCK
    lrg = rng.random(n) < lrg_fraction
    passive = lrg | (rng.random(n) < MAIN_PASSIVE_FRACTION)
    z = draw_galaxy_redshifts(rng, n, lrg)
    lu = syn._log_uniform
    ebv = np.minimum(rng.exponential(syn.BGS.ebv_mean, n) * np.where(passive, 0.3, 1.0),
                     syn.EBV_MAX)
    mag_u = rng.random(n)
    rmag = np.where(lrg, inverse_cdf_mag(mag_u, *LRG_RMAG, RMAG_SLOPE),
                    inverse_cdf_mag(mag_u, *MAIN_RMAG, RMAG_SLOPE))
    params = {
        "z": z, "lrg": lrg, "passive": passive,
        "f_young": np.where(passive, rng.uniform(0.0, 0.05, n), rng.uniform(0.35, 1.0, n)),
        "w_strong_break": np.where(lrg, rng.uniform(0.6, 1.0, n),
                                   np.where(passive, rng.uniform(0.3, 1.0, n),
                                            rng.uniform(0.0, 0.6, n))),
        "metal": rng.uniform(0.7, 1.3, n),
        "balmer": rng.uniform(0.3, 1.5, n),
        "sigma_star": np.where(lrg, lu(rng, 180.0, syn.SIGMA_STAR_RANGE[1], n),
                               np.where(passive, lu(rng, 120.0, syn.SIGMA_STAR_RANGE[1], n),
                                        lu(rng, syn.SIGMA_STAR_RANGE[0], 150.0, n))),
        "sigma_gas": lu(rng, *syn.SIGMA_GAS_RANGE, n),
        "ebv": ebv,
        "rmag": rmag,
        "driver_ew": np.where(passive, rng.uniform(0.0, 3.0, n),
                              np.clip(np.exp(rng.normal(np.log(25.0), 0.8, n)), 5.0, 200.0)),
        "line_ratio": syn._draw_line_ratios(rng, passive, "bgs"),
    }
    params.update(draw_observing(rng, n, snr_range, mag_u))
    nrng = np.random.default_rng(noise_ss)
    return params, draw_bad_pixels(nrng, n, npix), nrng


def _optical_depth(grid: GridModel, table: np.ndarray, p: dict, strength: np.ndarray):
    """τ(λ_obs) [B, L] of one population's absorption features (table [F, 3]: rest λ, EW at
    strength 1, intrinsic σ; Å) for redshift, σ* and strength [B]."""
    z = p["z"][:, None]
    rest, ew, sig_int = table[None, :, 0], table[None, :, 1], table[None, :, 2]
    obs = rest * (1 + z)
    var = ((sig_int * (1 + z)) ** 2 + (obs * p["sigma_star"][:, None] / syn.C_KMS) ** 2
           + grid.inst_var(obs))
    return gaussian_sum(grid, obs, np.sqrt(var), ew * strength[:, None] * (1 + z))


def _smooth_continuum_at(rest: np.ndarray, p: dict) -> np.ndarray:
    """Smooth attenuated template mixture [B] at one rest λ per row ([B] Å)."""
    oa, ob, yg, k = syn._rest_templates(np.log(rest)[:, None])
    ws, fy = p["w_strong_break"][:, None], p["f_young"][:, None]
    mix = (1 - fy) * ((1 - ws) * oa + ws * ob) + fy * yg
    return (mix * syn._dust(k, syn.STELLAR_TO_NEBULAR_EBV * p["ebv"][:, None]))[:, 0]


def _render_gal(p: dict, bad: tuple, noise_rngs: list, grid: GridModel, noiseless: bool,
                components: bool) -> dict[str, np.ndarray]:
    """Turns a batch of whole blocks into the output dict of :func:`simulate_galaxies`."""
    z = p["z"]
    ln_rest = grid.ln_wave[None] - np.log1p(z)[:, None]
    old_a, old_b, young, k = syn._rest_templates(ln_rest)                  # float32 [B, L]
    tau_old = _optical_depth(grid, syn.OLD_ABSORPTION, p, p["metal"])
    tau_young = _optical_depth(grid, syn.YOUNG_ABSORPTION, p, p["balmer"])
    ws = p["w_strong_break"].astype(np.float32)[:, None]
    fy = p["f_young"].astype(np.float32)[:, None]
    old = ((1 - ws) * old_a + ws * old_b) * np.exp(-tau_old.astype(np.float32))
    cont = ((1 - fy) * old + fy * young * np.exp(-tau_young.astype(np.float32))) * syn._dust(
        k, syn.STELLAR_TO_NEBULAR_EBV * p["ebv"][:, None])
    scale = syn._rmag_to_flambda(p["rmag"]) / _smooth_continuum_at(R_BAND_EFF / (1 + z), p)
    cont = cont * scale.astype(np.float32)[:, None]

    fluxes = syn._line_fluxes(p, scale, "bgs")                             # [B, M]
    obs = syn._EM_WAVE[None] * (1 + z[:, None])
    sig = np.sqrt((obs * p["sigma_gas"][:, None] / syn.C_KMS) ** 2 + grid.inst_var(obs))
    model = cont + gaussian_sum(grid, obs, sig, fluxes).astype(np.float32)
    flux, ivar, mask = observe(model, p, grid, bad, noise_rngs, noiseless)

    em = syn._EM
    cont_ha = scale * _smooth_continuum_at(np.full_like(z, syn.EMISSION_LINES["Halpha"]), p)
    out = {
        "flux": flux, "ivar": ivar, "mask": mask, "z": z.astype(np.float64), "snr": p["snr"],
        "ebv": p["ebv"], "d4000": syn._true_d4000(p), "line_flux": fluxes,
        "oiii_flux": fluxes[:, em["OIII_5008"]], "halpha_flux": fluxes[:, em["Halpha"]],
        "halpha_ew": fluxes[:, em["Halpha"]] / (cont_ha * (1 + z)),
        "rmag": p["rmag"], "passive": p["passive"], "lrg": p["lrg"], "f_young": p["f_young"],
        "sigma_star": p["sigma_star"], "sigma_gas": p["sigma_gas"],
    }
    if components:
        out["model"] = model.astype(np.float32)
        out["continuum"] = cont.astype(np.float32)
    return out


def simulate_galaxies(n: int, wavelength, seed: int = 0, *, resolving_power,
                      snr_range: tuple[float, float] = (3.0, 30.0), start: int = 0,
                      lrg_fraction: float = LRG_FRACTION, noiseless: bool = False,
                      components: bool = False, batch: int = 256) -> dict[str, np.ndarray]:
    """Simulates galaxy spectra (rows ``start`` … ``start+n−1``) on an observed grid.

    See the module docstring for the population and physics. Row i depends only on (seed, i)
    and the settings (grid, resolving power, snr_range, lrg_fraction); any ``start``/``n``/
    ``batch`` split gives the same bytes.

    Args:
      n: number of spectra.
      wavelength: [L] observed vacuum wavelengths, Å, strictly increasing (e.g. SDSS
        ``10**(3.5563 + 1e-4*np.arange(4600))``, LAMOST ``10**(3.5682 + 1e-4*np.arange(3900))``).
      seed: non-negative integer.
      resolving_power: R = λ/Δλ_FWHM, scalar or [L] array.
      snr_range: (lo, hi) of the per-object target S/N per pixel (median over the grid of the
        noiseless model over σ); log-uniform, anticorrelated with the magnitude.
      start: index of the first row.
      lrg_fraction: fraction of LRG-like galaxies (0 gives the main sample only, z ≤ 0.4).
      noiseless: flux is the noiseless model; ivar, mask and truth are unchanged.
      components: also return "model" (noiseless object) and "continuum" (stellar continuum
        with absorption and dust, no emission), [n, L] float32.
      batch: rows rendered at once (rounded up to multiples of 64); memory only.

    Returns:
      dict with "flux" [n, L] float32 (1e-17 erg/s/cm²/Å, 0 where masked), "ivar" [n, L]
      float32 (0 where masked), "mask" [n, L] bool (True = valid), "z" [n] float64, "snr" [n]
      (drawn target S/N), "id" [n] int64, and truth [n]: "ebv" (nebular E(B−V)), "d4000",
      "line_flux" [n, 15] (LINE_NAMES order, attenuated, 1e-17 erg/s/cm²), "oiii_flux" (5008),
      "halpha_flux", "halpha_ew" (rest Å), "rmag" (fibre r, AB), "passive", "lrg" (bool),
      "f_young", "sigma_star", "sigma_gas" (km/s).

    Raises:
      ValueError: negative n/seed/start, bad grid, resolving power, snr_range or lrg_fraction.
    """
    n, seed, start, snr_range, batch = check_common_args(n, seed, start, snr_range, batch)
    lrg_fraction = float(lrg_fraction)
    if not 0.0 <= lrg_fraction <= 1.0:
        raise ValueError(f"lrg_fraction must be in [0, 1], got {lrg_fraction!r}")
    grid = grid_model(wavelength, resolving_power)

    def render(block_ids):
        drawn = [_draw_gal_block(seed, blk, grid.npix, lrg_fraction, snr_range)
                 for blk in block_ids]
        p = {k: np.concatenate([d[0][k] for d in drawn]) for k in drawn[0][0]}
        bad = tuple(np.concatenate([d[1][j] + (i * BLOCK if j == 0 else 0)
                                    for i, d in enumerate(drawn)]) for j in range(2))
        return _render_gal(p, bad, [d[2] for d in drawn], grid, noiseless, components)

    return simulate_rows(render, n, start, batch, GALAXY_CODE, seed)
