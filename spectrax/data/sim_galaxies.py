"""Simulated galaxy spectra on any observed wavelength grid (SDSS/BOSS-like, LAMOST-like, ...).

The physics is that of the DESI simulator :mod:`spectrax.data.synthetic`: stellar population
synthesis (BC03 + MILES SSPs, Cloudy nebular emission, delayed-τ star-formation histories,
Calzetti dust; :mod:`spectrax.data.galaxy_pop` and :mod:`spectrax.data.sps`), rendered here on
a generic grid with the generic instrument/noise model of :mod:`spectrax.data.sim_quasars`.
Numpy only; deterministic from ``(seed, row)``: blocks of :data:`BLOCK` (64) rows draw from
``SeedSequence([seed, GALAXY_CODE, block])``, spawned into a physical-parameter stream (same
galaxies on every grid) and a mask + noise stream.

Units: vacuum Å; flux densities 1e-17 erg/s/cm²/Å; line fluxes 1e-17 erg/s/cm²; km/s.

Population (SDSS main sample + an optional LRG-like tail)
  A fraction ``lrg_fraction`` (default 0.15) are LRG-like (galaxy_pop "lrg": quiescent, old,
  σ* 110–300 km/s), z from a normal with mode 0.45 and σ 0.12 truncated to 0.15–0.7 (BOSS
  LOWZ+CMASS-like), fibre r 19.0–20.8. The rest are main-sample galaxies (galaxy_pop "bgs": 40%
  quiescent, the rest star-forming with nebular emission): p(z) ∝ z² exp(−(z/0.0826)^1.5) on
  0.02–0.4 (peak 0.10, median ≈ 0.12), fibre r 16.5–19.5. Redshifts therefore lie in
  0.02–0.7 (0.02–0.4 for main, 0.15–0.7 for LRG).

Rendering
  Stellar continuum broadened by σ* and the grid's resolving power per pixel, nebular
  continuum, Gaussian nebular lines with σ² = (λ σ_gas/c)² + (λ/(2.3548 R))² + Δλ²/12
  evaluated at pixel centres. The flux scale makes the attenuated continuum at observed
  6250 Å equal the flux of the drawn fibre r magnitude (one point, so it works on grids that
  do not cover the r band). Instrument, sky, noise (S/N drawn per object on ``snr_range``,
  median model/σ over the grid) and masks: :mod:`spectrax.data.sim_quasars`.
"""
from __future__ import annotations

import functools

import numpy as np

from spectrax.data import galaxy_pop
from spectrax.data.sim_quasars import (BLOCK, GridModel, check_common_args, draw_bad_pixels,
                                       draw_observing, gaussian_sum, grid_model,
                                       inverse_cdf_mag, observe, simulate_rows)
from spectrax.data.synthetic import EMISSION_LINES, R_BAND_EFF, _rmag_to_flambda

GALAXY_CODE = 40  # enters the seed and the ids
LINE_NAMES = galaxy_pop.LINE_NAMES  # order of "line_flux"
LINE_WAVE = galaxy_pop.LINE_WAVE
C_KMS = galaxy_pop.C_KMS
_L = {k: i for i, k in enumerate(LINE_NAMES)}

MAIN_Z_RANGE = (0.02, 0.4)
MAIN_Z_SCALE = 0.0826  # p(z) ∝ z² exp(−(z/s)^1.5) peaks at (4/3)^(2/3) s = 0.10
LRG_Z_RANGE = (0.15, 0.7)
LRG_Z_MODE, LRG_Z_SIGMA = 0.45, 0.12
LRG_FRACTION = 0.15
MAIN_PASSIVE_FRACTION = 0.35
MAIN_RMAG, LRG_RMAG, RMAG_SLOPE = (16.5, 19.5), (19.0, 20.8), 0.4


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

    params holds [BLOCK] arrays of :func:`spectrax.data.galaxy_pop.draw_physical` (main-sample
    and LRG rows drawn from the same stream; each row takes its own population's values) plus
    z, lrg, rmag and the observing draws; bad = (rows, cols) masked pixels."""
    param_ss, noise_ss = np.random.SeedSequence([seed, GALAXY_CODE, block]).spawn(2)
    rng = np.random.default_rng(param_ss)
    n = BLOCK
    lrg = rng.random(n) < lrg_fraction
    z = draw_galaxy_redshifts(rng, n, lrg)
    main = galaxy_pop.draw_physical(rng, z, "bgs")
    red = galaxy_pop.draw_physical(rng, z, "lrg")
    params = {k: np.where(lrg.reshape((-1,) + (1,) * (np.ndim(v) - 1)), red[k], v)
              for k, v in main.items()}
    mag_u = rng.random(n)
    params.update({
        "z": z, "lrg": lrg,
        "rmag": np.where(lrg, inverse_cdf_mag(mag_u, *LRG_RMAG, RMAG_SLOPE),
                         inverse_cdf_mag(mag_u, *MAIN_RMAG, RMAG_SLOPE)),
    })
    params.update(draw_observing(rng, n, snr_range, mag_u))
    nrng = np.random.default_rng(noise_ss)
    return params, draw_bad_pixels(nrng, n, npix), nrng


def _render_gal(p: dict, bad: tuple, noise_rngs: list, grid: GridModel, noiseless: bool,
                components: bool) -> dict[str, np.ndarray]:
    """Turns a batch of whole blocks into the output dict of :func:`simulate_galaxies`."""
    z = p["z"]
    inst_sigma_ln = np.sqrt(grid.inst_var(grid.wave)) / grid.wave
    cont = galaxy_pop.render_continuum(p, z, grid.ln_wave, inst_sigma_ln)
    tr = galaxy_pop.truth(p)
    # flux scale: the attenuated continuum at observed R_BAND_EFF (rest R_BAND_EFF/(1+z))
    at_r = np.array([np.interp(np.log(R_BAND_EFF), grid.ln_wave, c) for c in cont])
    if not np.all((R_BAND_EFF >= grid.wave[0]) & (R_BAND_EFF <= grid.wave[-1])):
        at_r = galaxy_pop.render_continuum(p, z, np.log(np.array([R_BAND_EFF - 0.5,
                                                                   R_BAND_EFF + 0.5])),
                                           np.full(2, 1e-4)).mean(1)
    scale = _rmag_to_flambda(p["rmag"]) / at_r
    cont = cont * scale.astype(np.float32)[:, None]
    fluxes = tr["line_lum"] * (scale * (1 + z))[:, None]                  # [B, M]
    obs = LINE_WAVE[None] * (1 + z[:, None])
    sig = np.sqrt((obs * p["sigma_gas"][:, None] / C_KMS) ** 2 + grid.inst_var(obs))
    model = cont + gaussian_sum(grid, obs, sig, fluxes).astype(np.float32)
    flux, ivar, mask = observe(model, p, grid, bad, noise_rngs, noiseless)

    cont_obs = scale * (1 + z)
    out = {
        "flux": flux, "ivar": ivar, "mask": mask, "z": z.astype(np.float64), "snr": p["snr"],
        "ebv": p["ebv"], "d4000": tr["d4000"], "dn4000": tr["dn4000"], "gr": tr["gr"],
        "line_flux": fluxes, "oiii_flux": fluxes[:, _L["OIII_5008"]],
        "halpha_flux": fluxes[:, _L["Halpha"]],
        "halpha_ew": fluxes[:, _L["Halpha"]] / (tr["cont_halpha"] * cont_obs),
        "rmag": p["rmag"], "passive": p["passive"], "lrg": p["lrg"], "log_z": p["log_z"],
        "ssfr": p["ssfr"], "sigma_star": p["sigma_star"], "sigma_gas": p["sigma_gas"],
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
      components: also return "model" (noiseless object) and "continuum" (stellar + nebular
        continuum with dust, no lines), [n, L] float32.
      batch: rows rendered at once (rounded up to multiples of 64); memory only.

    Returns:
      dict with "flux" [n, L] float32 (1e-17 erg/s/cm²/Å, 0 where masked), "ivar" [n, L]
      float32 (0 where masked), "mask" [n, L] bool (True = valid), "z" [n] float64, "snr" [n]
      (drawn target S/N), "id" [n] int64, and truth [n]: "ebv" (nebular E(B−V)), "d4000",
      "dn4000", "gr" (rest g − r), "line_flux" [n, M] (LINE_NAMES order, attenuated,
      1e-17 erg/s/cm²), "oiii_flux" (5008), "halpha_flux", "halpha_ew" (rest Å), "rmag" (fibre
      r, AB), "passive", "lrg" (bool), "log_z", "ssfr", "sigma_star", "sigma_gas" (km/s).

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
