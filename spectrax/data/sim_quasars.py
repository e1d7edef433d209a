"""Simulated quasar spectra on any observed wavelength grid (SDSS/BOSS, LAMOST, DESI, ...).

Everything is numpy (no jax) and deterministic from ``(seed, row)``: rows are drawn in blocks
of :data:`BLOCK` (64) whose random streams come from ``SeedSequence([seed, QSO_CODE, block])``,
so row ``i`` depends only on ``(seed, i)`` and the call's settings (grid, resolving power,
ranges), never on ``n``, ``start`` or ``batch``. Each block spawns three streams: physical
parameters (fixed number of draws, so the same seed gives the same quasars on every grid),
the Lyα-forest absorbers (their number depends on the grid's range), and masks + pixel noise.

This module also holds the grid-generic instrument and noise model shared with
:mod:`spectrax.data.sim_galaxies` (:class:`GridModel`, :func:`gaussian_sum`, :func:`observe`).

Physics model (vacuum Å; flux densities in 1e-17 erg/s/cm²/Å; line fluxes in 1e-17 erg/s/cm²;
velocities km/s; rest-frame quantities unless stated):

Redshift
  p(z) ∝ exp(−½((z−1.7)/0.75)²) + 0.5·exp(−½((z−2.4)/0.35)²) on ``z_range`` (default 0.5–3.5):
  a broad SDSS/eBOSS-like bulk (mean 1.7) plus the BOSS Lyα-quasar excess at z ≈ 2.1–2.7.
  Mode ≈ 2.2, median ≈ 1.9, about 30% above z = 2.3 (where the forest enters SDSS spectra).

Continuum
  Power law f_ν ∝ ν^α, i.e. f_λ ∝ λ^(−2−α), α ~ N(−0.5, 0.3) clipped to [−1.5, 0.5]; plus a
  "small blue bump" (Balmer continuum below 3646 Å, smoothed edge, 0.1–0.35 of the power law
  at 3000 Å; UV Fe II pseudo-continuum 2200–3100 Å, 0.05–0.35), optical Fe II (4400–4700 and
  5100–5400 Å, 0.03–0.25 of the power law at 5100 Å) and, at z < 1, an old host galaxy (the
  old template of :mod:`spectrax.data.synthetic`, 0–0.5 of the power law at 5100 Å, fading to 0
  by z = 1). The flux scale makes the unabsorbed continuum at observed 6250 Å equal the flux of
  a drawn r magnitude (AB, 17.0–21.5, dN/dm ∝ 10^(0.45 m)).

Emission lines
  Gaussians (in λ) with rest equivalent widths against the power law (median EW in Å, scatter
  in dex): Lyβ+O VI 1033.8 (10, 0.2), Lyα 1215.7 (75, 0.15), N V 1240.1 (15, 0.2),
  Si IV+O IV] 1399.8 (8, 0.2), C IV 1549.1 (30, 0.2), He II 1640.4 (3, 0.25), C III] 1908.7
  (20, 0.15), Mg II 2799.1 (32, 0.15), Hδ 4102.9 (6, 0.2), Hγ 4341.7 (14, 0.2), Hβ 4862.7
  (46, 0.15), Hα 6564.6 (195, 0.15); a common strength factor (0.1 dex) multiplies all broad
  lines. Broad FWHM: a per-object base (log-normal, median 4500 km/s, 0.15 dex) × a per-line
  factor (C IV, Si IV, C III] 1.1; Mg II, Hα 0.9) × 0.05 dex scatter, clipped to 2000–10000.
  High-ionisation lines (Lyβ/O VI, N V, Si IV, C IV, He II) are blueshifted by an exponential
  velocity (mean 600 km/s, ≤ 3000). Narrow lines (FWHM 300–900 km/s): [Ne V] 3426.9 (EW 1),
  [O II] 3728.5 (2), [Ne III] 3869.9 (1.5), [O III] 5008.2 (13, 0.35 dex) and [O III] 4960.3
  with exactly 1/2.98 of the 5008 flux.

Lyα forest
  Blueward of Lyα (1+z), a Poisson process of absorbers in observed λ with Gaussian optical
  depth profiles whose width is the instrument resolution ⊕ pixel ⊕ b = 30 km/s (absorbers are
  unresolved at R ~ 2000, so this is the profile the instrument sees, evaluated at pixel
  centres). Peak optical depths τ0 ∝ τ0^−1.5 on 0.1–10 (a column-density-like power law, so
  most are weak and a few are saturated troughs). The absorber rate per Å is set so that the
  expected transmission is exactly exp(−τ_eff(z_abs)) with τ_eff = 0.223 ((1+z_abs)/3.5)^3.3,
  i.e. mean transmission 0.80 at z_abs = 2.5 and 0.60 at z_abs = 3.5 (for a Poisson process
  E[exp(−Στ)] = exp(−rate · E[equivalent width])). Each absorber also absorbs Lyβ at
  1025.72/1215.67 of its wavelength with 0.16 of its τ0. Below the Lyman limit 912 Å (rest)
  the flux is further suppressed by exp(−τ_LL (λ/912)^3), τ_LL log-normal (median 1).
  Not modelled: DLAs, metal absorbers, BALs, the proximity effect.

Instrument, sky and noise (shared with sim_galaxies)
  Resolving power R (scalar or per pixel): lines are Gaussians with σ² = σ_line² +
  (λ/(2.3548 R))² + Δλ²/12 (Δλ the local pixel width) evaluated at pixel centres — no
  fine-grid convolution; smooth continua are not convolved. Throughput is a smooth generic
  curve over the grid, 0.3 at both ends and 1 in the middle (in ln λ). Sky = per-object level
  × [(λ/5500)^1.5 + the night-sky lines of :func:`spectrax.data.synthetic.sky_lines` at the
  instrument resolution]. Variance = g · (max(model, 0) + sky + 0.5) / throughput; the gain
  factor g is solved per object so that the median over the grid of model/σ equals the drawn
  S/N, which is log-uniform on ``snr_range`` and anticorrelated with the magnitude (bright →
  high S/N). ivar = 1/variance. Flux = model + sky-subtraction residual (2% of the sky lines,
  0.3% of the sky continuum) + Gaussian noise. Masked pixels (mask False, flux 0, ivar 0):
  cosmic rays (Poisson, mean 2 per spectrum) and, in 30% of spectra, a bad column of 1–3 px.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from spectrax.data.synthetic import (BLOCK, C_KMS, FWHM_TO_SIGMA, SKY_LINE_SCALE, SQRT_2PI,
                                     rmag_to_flambda, sky_lines, templates)

QSO_CODE = 30  # enters the seed and the ids (synthetic.py uses 1 and 2; galaxies use 40)
LYA = 1215.67
LYB = 1025.72
LYMAN_LIMIT = 911.75
R_BAND_EFF = 6250.0  # Å, observed; effective wavelength of the drawn r magnitude

# ---------------------------------------------------------------------------------------------
# Grid-generic instrument model (shared with sim_galaxies)
# ---------------------------------------------------------------------------------------------
WINDOW_SIGMAS = 5.5     # Gaussians are evaluated within ±5.5 σ (exp(−15) ≈ 3e-7 of the peak)
THROUGHPUT_EDGE = 0.3   # generic throughput at both grid ends (1 in the middle)
NOISE_FLOOR = 0.5       # read-noise-like variance term, flux units, before the gain factor
SKY_CONT_SLOPE = 1.5    # sky continuum ∝ (λ/5500)^1.5: rises to the red
SKY_RESID_LINES = 0.02  # relative sky-line subtraction error (σ)
SKY_RESID_CONT = 0.003  # relative sky-continuum subtraction error (σ)
CR_MEAN = 2.0           # cosmic rays per spectrum (Poisson)
BAD_COLUMN_PROB = 0.3   # probability of one bad column run (1–3 px) per spectrum


@dataclasses.dataclass(frozen=True)
class GridModel:
    """An observed grid with its instrument ([L] float64 arrays unless stated).

    wave: pixel centres, Å (vacuum, strictly increasing); ln_wave: ln(wave/Å); resolution: R
    per pixel; pix_width: local pixel width Δλ (Å; the smaller neighbour spacing, so a gap in the
    grid does not look like a wide pixel); throughput: generic relative throughput (0.3–1);
    sky_continuum: (λ/5500)^1.5; sky_lines: night-sky line spectrum per unit sky level at the
    instrument resolution (flux units)."""

    wave: np.ndarray
    ln_wave: np.ndarray
    resolution: np.ndarray
    pix_width: np.ndarray
    throughput: np.ndarray
    sky_continuum: np.ndarray
    sky_lines: np.ndarray

    @property
    def npix(self) -> int:
        return self.wave.size

    def inst_var(self, obs: np.ndarray) -> np.ndarray:
        """Instrumental + pixel variance (Å²) of an unresolved line at ``obs`` Å (any shape);
        R and Δλ are interpolated on the grid (constant beyond its ends)."""
        r = np.interp(obs, self.wave, self.resolution)
        dl = np.interp(obs, self.wave, self.pix_width)
        return (obs * FWHM_TO_SIGMA / r) ** 2 + dl**2 / 12.0


def grid_model(wavelength, resolving_power) -> GridModel:
    """Validates an observed grid and resolving power; returns its :class:`GridModel`.

    Args: wavelength: [L] vacuum Å, strictly increasing, finite, L ≥ 2; resolving_power: R > 0,
    a scalar or an [L] array (per pixel).
    Raises: ValueError naming the problem."""
    wave = np.asarray(wavelength, dtype=np.float64)
    if wave.ndim != 1 or wave.size < 2:
        raise ValueError(f"wavelength must be a 1-D array of ≥ 2 pixels, got shape {wave.shape}")
    if not np.all(np.isfinite(wave)) or wave[0] <= 0:
        raise ValueError("wavelength must be finite and positive (Å)")
    step = np.diff(wave)
    if np.any(step <= 0):
        raise ValueError("wavelength must be strictly increasing")
    res = np.asarray(resolving_power, dtype=np.float64)
    if res.ndim == 0:
        res = np.full(wave.shape, float(res))
    if res.shape != wave.shape:
        raise ValueError(f"resolving_power must be a scalar or shape {wave.shape}, "
                         f"got {res.shape}")
    if not np.all(np.isfinite(res)) or np.any(res <= 0):
        raise ValueError("resolving_power must be finite and > 0")
    pix = np.minimum(np.concatenate([step[:1], step]), np.concatenate([step, step[-1:]]))
    ln_wave = np.log(wave)
    x = np.clip((ln_wave - ln_wave[0]) / (ln_wave[-1] - ln_wave[0]), 0.0, 1.0)
    throughput = THROUGHPUT_EDGE + (1 - THROUGHPUT_EDGE) * np.sqrt(4 * x * (1 - x))
    partial = GridModel(wave=wave, ln_wave=ln_wave, resolution=res, pix_width=pix,
                        throughput=throughput, sky_continuum=(wave / 5500.0) ** SKY_CONT_SLOPE,
                        sky_lines=np.zeros_like(wave))
    lw, lf = sky_lines()
    profile = gaussian_sum(partial, lw, np.sqrt(partial.inst_var(lw)), SKY_LINE_SCALE * lf,
                           rows=np.zeros(lw.size, np.int64), n_rows=1)[0]
    return dataclasses.replace(partial, sky_lines=profile)


def gaussian_sum(grid: GridModel, centers: np.ndarray, sigmas: np.ndarray, weights: np.ndarray,
                 rows: np.ndarray | None = None, n_rows: int | None = None) -> np.ndarray:
    """Σ_k weights_k · N(λ; centers_k, sigmas_k) per row, at the grid's pixel centres.

    Each Gaussian has unit area in λ (``weights`` are fluxes or equivalent widths) and is
    evaluated within ±5.5 σ: its window in pixels is sized from its own σ and the pixel width
    at its blue end, so it depends only on that Gaussian (never on the batch), and Gaussians
    entirely off the grid are skipped. All windows are scattered with one np.bincount in input
    order, so a row's sum never depends on the other rows.

    Args:
      centers, sigmas, weights: [B, M] (then row b holds line m of row b) or, with ``rows``,
        flat [K] arrays (Å, Å, any).
      rows: [K] int row of each Gaussian (ragged input), with ``n_rows`` the number of rows.
    Returns: [B or n_rows, L] float64.
    """
    c = np.asarray(centers, np.float64)
    if rows is None:
        n_rows = c.shape[0]
        rows = np.repeat(np.arange(n_rows), c.shape[1]) if c.ndim == 2 else np.zeros(0, int)
    c = c.ravel()
    s = np.broadcast_to(np.asarray(sigmas, np.float64), np.shape(centers)).ravel()
    w = np.broadcast_to(np.asarray(weights, np.float64), np.shape(centers)).ravel()
    rows = np.asarray(rows, np.int64).ravel()
    wave, npix = grid.wave, grid.npix
    reach = WINDOW_SIGMAS * s
    keep = (c + reach >= wave[0]) & (c - reach <= wave[-1]) & (w != 0)
    out_width = npix
    if not keep.any():
        return np.zeros((n_rows, out_width))
    c, s, w, rows, reach = c[keep], s[keep], w[keep], rows[keep], reach[keep]
    dl = np.interp(c - reach, wave, grid.pix_width)
    hw = (np.ceil(reach / dl) + 1).astype(np.int64)
    # Windows are centred on the insertion index (≤ 1 px from the nearest pixel; the +1 above
    # covers it). Rows are padded on both sides so windows off the grid's ends land in the
    # padding (extrapolated pixel positions), which is dropped at the end.
    pad = int(hw.max()) + 1
    width = npix + 2 * pad
    k_ext = np.arange(-pad, npix + pad)
    wave_ext = np.concatenate([wave[0] + (wave[1] - wave[0]) * k_ext[:pad], wave,
                               wave[-1] + (wave[-1] - wave[-2]) * (k_ext[pad + npix:] - npix + 1)])
    lens = 2 * hw + 1
    owner = np.repeat(np.arange(c.size), lens)
    first = np.cumsum(lens) - lens
    offsets = np.arange(owner.size) - np.repeat(first + hw, lens)          # in [−hw, hw]
    idx = np.repeat(np.searchsorted(wave, c) + pad, lens) + offsets       # into wave_ext
    x = (wave_ext[idx] - c[owner]) / s[owner]
    vals = (w / (s * SQRT_2PI))[owner] * np.exp(-0.5 * x * x)
    flat = rows[owner] * width + idx
    out = np.bincount(flat, weights=vals, minlength=n_rows * width)
    return out.reshape(n_rows, width)[:, pad:pad + npix]


def _rest_table_interp(ln_rest: np.ndarray, ln0: float, dln: float,
                       tables: tuple[tuple[np.ndarray, np.ndarray], ...]) -> tuple:
    """Linear interpolation of (value, slope) float32 tables on a uniform ln λ grid at ln_rest
    (any shape); positions are clipped to the table. One index computation, one gather pair
    per table (cheaper than np.interp per row)."""
    size = tables[0][0].size
    pos = (ln_rest - ln0) / dln
    i0 = np.clip(pos.astype(np.int64), 0, size - 2)
    frac = np.clip(pos - i0, 0.0, 1.0).astype(np.float32)
    return tuple(v[i0] + frac * d[i0] for v, d in tables)


def _value_slope(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = arr.astype(np.float32)
    return v, np.diff(v, append=v[-1:])


def draw_bad_pixels(rng: np.random.Generator, n: int, npix: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) int64 of masked pixels for ``n`` spectra of ``npix`` pixels: Poisson
    cosmic rays anywhere and, in BAD_COLUMN_PROB of the spectra, one run of 1–3 bad columns."""
    n_cr = rng.poisson(CR_MEAN, n)
    cr_rows = np.repeat(np.arange(n), n_cr)
    cr_cols = rng.integers(0, npix, cr_rows.size)
    has_col = rng.random(n) < BAD_COLUMN_PROB
    col_start = rng.integers(0, max(npix - 3, 1), n)
    col_len = rng.integers(1, 4, n)
    bc_rows = np.repeat(np.arange(n)[has_col], col_len[has_col])
    bc_cols = np.concatenate([s + np.arange(m) for s, m in zip(col_start[has_col],
                                                               col_len[has_col])]
                             + [np.zeros(0, np.int64)])
    rows = np.concatenate([cr_rows, bc_rows]).astype(np.int64)
    cols = np.minimum(np.concatenate([cr_cols, bc_cols]), npix - 1).astype(np.int64)
    return rows, cols


def draw_observing(rng: np.random.Generator, n: int, snr_range: tuple[float, float],
                   mag_u: np.ndarray) -> dict:
    """Per-object observing conditions [n]: target S/N (log-uniform on ``snr_range``, 75%
    set by the magnitude's quantile ``mag_u`` ∈ [0, 1] so bright objects get high S/N), sky
    level (log-normal, median 2.5 flux units) and sky-subtraction errors."""
    lo, hi = snr_range
    v = 0.75 * (1.0 - mag_u) + 0.25 * rng.random(n)
    return {
        "snr": np.exp(np.log(lo) + v * (np.log(hi) - np.log(lo))),
        "sky_scale": 2.5 * np.exp(rng.normal(0.0, 0.3, n)),
        "sky_eps": rng.normal(0.0, SKY_RESID_LINES, n),
        "sky_cont_eps": rng.normal(0.0, SKY_RESID_CONT, n),
    }


def observe(model: np.ndarray, p: dict, grid: GridModel, bad: tuple[np.ndarray, np.ndarray],
            noise_rngs: list, noiseless: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise, sky residual and masks for a batch of whole blocks.

    Args: model [B, L] noiseless object flux (flux units); p: dict with "snr", "sky_scale",
      "sky_eps", "sky_cont_eps" [B]; bad: (rows, cols) of masked pixels; noise_rngs: one
      Generator per block (BLOCK rows each); noiseless: flux = model (ivar and mask unchanged).
    Returns: flux [B, L] float32 (0 where masked), ivar [B, L] float32 (0 where masked), mask
      [B, L] bool (True = valid)."""
    b, npix = model.shape
    sky_scale = p["sky_scale"][:, None]
    sky = (sky_scale * (grid.sky_continuum + grid.sky_lines)[None]).astype(np.float32)
    inv_t = (1.0 / grid.throughput).astype(np.float32)
    shape = (np.maximum(model, 0.0) + sky + np.float32(NOISE_FLOOR)) * inv_t   # var / g
    # g solves median(model / sqrt(g · shape)) = target S/N exactly (median is scale-free).
    ratio = np.median(model / np.sqrt(shape), axis=1).astype(np.float64)
    gain = (np.maximum(ratio, 1e-30) / p["snr"]) ** 2
    var = shape * gain.astype(np.float32)[:, None]
    ivar = (1.0 / var).astype(np.float32)
    if noiseless:
        flux = model.astype(np.float32)
    else:
        noise = np.concatenate([r.standard_normal((BLOCK, npix), dtype=np.float32)
                                for r in noise_rngs])
        resid = sky_scale * (p["sky_eps"][:, None] * grid.sky_lines[None]
                             + p["sky_cont_eps"][:, None] * grid.sky_continuum[None])
        flux = (model + resid.astype(np.float32)) + np.sqrt(var) * noise
        flux = flux.astype(np.float32)
    mask = np.ones((b, npix), bool)
    mask[bad[0], bad[1]] = False
    flux[~mask] = 0.0
    ivar[~mask] = 0.0
    return flux, ivar, mask


def inverse_cdf_mag(u: np.ndarray, lo: float, hi: float, slope: float) -> np.ndarray:
    """Magnitudes with dN/dm ∝ 10^(slope·m) on [lo, hi] at quantiles ``u`` ∈ [0, 1]."""
    a = slope * np.log(10.0)
    return np.log(np.exp(a * lo) + u * (np.exp(a * hi) - np.exp(a * lo))) / a


def check_common_args(n, seed, start, snr_range, batch) -> tuple[int, int, int, tuple, int]:
    """Validates the shared public arguments; returns them as ints / a float pair."""
    for name, v in (("n", n), ("seed", seed), ("start", start)):
        if isinstance(v, bool) or int(v) != v or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    lo, hi = (float(x) for x in snr_range)
    if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo <= hi):
        raise ValueError(f"snr_range must satisfy 0 < lo <= hi, got {snr_range!r}")
    if int(batch) != batch or batch <= 0:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    return int(n), int(seed), int(start), (lo, hi), int(batch)


def simulate_rows(render_blocks, n: int, start: int, batch: int, code: int,
                  seed: int) -> dict[str, np.ndarray]:
    """Rows [start, start+n) rendered ``batch`` rows (rounded up to whole blocks) at a time.

    ``render_blocks(block_ids) -> dict`` renders whole blocks; rows outside the range are
    dropped and "id" = code·10^15 + (seed mod 10^6)·10^9 + row is added."""
    stop = start + n
    blocks_per_batch = max(1, -(-batch // BLOCK))
    first, last = start // BLOCK, -(-stop // BLOCK)
    if n == 0:
        first, last = 0, 1
    parts = []
    for b0 in range(first, last, blocks_per_batch):
        block_ids = list(range(b0, min(b0 + blocks_per_batch, last)))
        out = render_blocks(block_ids)
        rows = np.arange(b0 * BLOCK, (b0 + len(block_ids)) * BLOCK)
        keep = (rows >= start) & (rows < stop)
        out = {k: v[keep] for k, v in out.items()}
        out["id"] = (code * 10**15 + (seed % 10**6) * 10**9 + rows[keep]).astype(np.int64)
        parts.append(out)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ---------------------------------------------------------------------------------------------
# Quasar physics
# ---------------------------------------------------------------------------------------------
# name: (rest λ Å, median rest EW Å, scatter dex, FWHM factor, kind) with kind "high" (broad,
# high ionisation: blueshifted), "low" (broad) or "narrow". EWs are against the power law.
QSO_LINES = {
    "LyB_OVI": (1033.8, 10.0, 0.2, 1.0, "high"),
    "Lya": (1215.67, 75.0, 0.15, 1.0, "low"),
    "NV": (1240.14, 15.0, 0.2, 1.0, "high"),
    "SiIV_OIV": (1399.8, 8.0, 0.2, 1.1, "high"),
    "CIV": (1549.06, 30.0, 0.2, 1.1, "high"),
    "HeII": (1640.4, 3.0, 0.25, 1.0, "high"),
    "CIII": (1908.73, 20.0, 0.15, 1.1, "low"),
    "MgII": (2799.12, 32.0, 0.15, 0.9, "low"),
    "NeV_3427": (3426.9, 1.0, 0.3, 0.0, "narrow"),
    "OII_3728": (3728.5, 2.0, 0.3, 0.0, "narrow"),
    "NeIII_3870": (3869.9, 1.5, 0.3, 0.0, "narrow"),
    "Hdelta": (4102.9, 6.0, 0.2, 1.0, "low"),
    "Hgamma": (4341.7, 14.0, 0.2, 1.0, "low"),
    "Hbeta": (4862.7, 46.0, 0.15, 1.0, "low"),
    "OIII_4960": (4960.3, 0.0, 0.0, 0.0, "narrow"),  # flux = OIII_5008 / 2.98
    "OIII_5008": (5008.2, 13.0, 0.35, 0.0, "narrow"),
    "Halpha": (6564.6, 195.0, 0.15, 0.9, "low"),
}
LINE_NAMES = tuple(QSO_LINES)
_LINE = {k: i for i, k in enumerate(LINE_NAMES)}
_LINE_TABLE = np.array([v[:4] for v in QSO_LINES.values()])  # [M, 4]
_KIND = np.array([v[4] for v in QSO_LINES.values()])
OIII_RATIO = 2.98  # [O III] 5008/4960, atomic physics

Z_RANGE = (0.5, 3.5)
MAG_RANGE = (17.0, 21.5)
MAG_SLOPE = 0.45
ALPHA_MEAN, ALPHA_SD, ALPHA_CLIP = -0.5, 0.3, (-1.5, 0.5)
FWHM_MEDIAN, FWHM_DEX, FWHM_RANGE = 4500.0, 0.15, (2000.0, 10000.0)
NARROW_FWHM_RANGE = (300.0, 900.0)
BLUESHIFT_MEAN, BLUESHIFT_MAX = 600.0, 3000.0

# Lyα forest
TAU_EFF_NORM, TAU_EFF_Z, TAU_EFF_SLOPE = 0.223, 2.5, 3.3   # τ_eff = 0.223((1+z)/3.5)^3.3
TAU0_RANGE, TAU0_INDEX = (0.1, 10.0), 1.5                   # dN/dτ0 ∝ τ0^−1.5
FOREST_B_KMS = 30.0
LYB_TAU_RATIO = 0.16  # f_β λ_β / (f_α λ_α)
FOREST_MARGIN = 30.0  # Å of absorbers generated beyond the grid ends (their tails reach in)


def tau_eff(z_abs) -> np.ndarray:
    """Effective Lyα optical depth at absorber redshift ``z_abs``: mean transmission is
    exp(−τ_eff) = 0.80 at z = 2.5 and 0.60 at z = 3.5."""
    return TAU_EFF_NORM * ((1.0 + np.asarray(z_abs, np.float64)) / (1.0 + TAU_EFF_Z)) \
        ** TAU_EFF_SLOPE


@functools.lru_cache(maxsize=None)
def _mean_absorber_width() -> float:
    """E[∫(1 − exp(−τ0 e^{−x²/2})) dx] over the τ0 distribution: an absorber's equivalent
    width in units of its σ (numerical quadrature)."""
    tau = np.geomspace(*TAU0_RANGE, 401)
    x = np.linspace(-9.0, 9.0, 1801)
    f = np.trapezoid(1 - np.exp(-tau[:, None] * np.exp(-0.5 * x * x)[None]), x, axis=1)
    wt = tau ** (1 - TAU0_INDEX)  # pdf × dτ/d ln τ: integrate over ln τ
    return float(np.trapezoid(f * wt, np.log(tau)) / np.trapezoid(wt, np.log(tau)))


def _draw_tau0(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n] peak optical depths, dN/dτ0 ∝ τ0^−1.5 on TAU0_RANGE (inverse CDF)."""
    a, b = (t ** (1 - TAU0_INDEX) for t in TAU0_RANGE)
    return (a + rng.random(n) * (b - a)) ** (1 / (1 - TAU0_INDEX))


def _absorber_sigma(grid: GridModel, lam: np.ndarray) -> np.ndarray:
    """Observed Gaussian σ (Å) of an unresolved absorber at ``lam`` Å: instrument ⊕ pixel ⊕
    thermal/turbulent b (σ_b = λ b / (c √2))."""
    return np.sqrt(grid.inst_var(lam) + (lam * FOREST_B_KMS / (C_KMS * np.sqrt(2.0))) ** 2)


@dataclasses.dataclass(frozen=True)
class ForestTable:
    """Cumulative absorber count Λ(λ) [G] on a λ grid [G] (Lyα absorber positions, Å)."""

    lam: np.ndarray
    cum: np.ndarray


def forest_table(grid: GridModel) -> ForestTable:
    """Cumulative number of Lyα absorbers vs observed λ for this grid: rate per Å
    τ_eff(z_abs) / (σ(λ) · E[W/σ]), so the expected transmission is exp(−τ_eff). The range
    reaches redward far enough for the Lyβ of absorbers to cover the grid."""
    lo = max(LYA * 1.0001, grid.wave[0] - FOREST_MARGIN)
    hi = max(lo * 1.01, (grid.wave[-1] + FOREST_MARGIN) * LYA / LYB)
    lam = np.geomspace(lo, hi, 8192)
    rate = tau_eff(lam / LYA - 1.0) / (_absorber_sigma(grid, lam) * _mean_absorber_width())
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (rate[1:] + rate[:-1]) * np.diff(lam))])
    return ForestTable(lam=lam, cum=cum)


@functools.lru_cache(maxsize=None)
def _redshift_cdf(z_lo: float, z_hi: float) -> tuple[np.ndarray, np.ndarray]:
    """(z grid, normalised CDF) of the quasar redshift distribution truncated to [z_lo, z_hi]."""
    z = np.linspace(z_lo, z_hi, 4001)
    pdf = np.exp(-0.5 * ((z - 1.7) / 0.75) ** 2) + 0.5 * np.exp(-0.5 * ((z - 2.4) / 0.35) ** 2)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (pdf[1:] + pdf[:-1]) * np.diff(z))])
    return z, cdf / cdf[-1]


def draw_qso_redshifts(rng: np.random.Generator, n: int,
                       z_range: tuple[float, float] = Z_RANGE) -> np.ndarray:
    """[n] float64 quasar redshifts (inverse CDF; see the module docstring)."""
    if z_range[1] == z_range[0]:
        return np.full(n, float(z_range[0]))
    z, cdf = _redshift_cdf(float(z_range[0]), float(z_range[1]))
    return np.interp(rng.random(n), cdf, z)


# Rest-frame pseudo-continuum tables on a uniform ln λ grid (value + slope, float32).
_TAB_LN0, _TAB_DLN = np.log(400.0), 2e-4
_TAB_SIZE = int(np.log(40000.0 / 400.0) / _TAB_DLN) + 2


def _bump(wave: np.ndarray, comps: tuple) -> np.ndarray:
    """Sum of Gaussian bumps (centre Å, σ Å, amplitude), normalised to a peak of 1."""
    out = sum(a * np.exp(-0.5 * ((wave - c) / s) ** 2) for c, s, a in comps)
    return out / out.max()


@functools.lru_cache(maxsize=None)
def _pseudo_tables() -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """(Balmer continuum, UV Fe II, optical Fe II, host) rest shapes, each peaking at 1 (host:
    1 at 5100 Å), as (value, slope) float32 tables on the _TAB grid."""
    wave = np.exp(_TAB_LN0 + _TAB_DLN * np.arange(_TAB_SIZE))
    edge = 3646.0
    # Balmer continuum (Grandi 1982 form): optically thick-ish emission B_λ(15000 K)(1 −
    # e^{−τ(λ/λ_BE)^3}) below the edge; the edge is smoothed (high-order Balmer lines blend).
    x = np.minimum(1.438777e8 / (wave * 15000.0), 700.0)
    planck = wave**-5.0 / np.expm1(x)
    bc = planck * (1 - np.exp(-((wave / edge) ** 3))) / (1 + np.exp(np.minimum((wave - edge) / 30.0,
                                                                             700.0)))
    bc /= bc.max()
    fe_uv = _bump(wave, ((2400, 60, 0.6), (2520, 50, 0.8), (2630, 60, 1.0), (2750, 40, 0.5),
                         (2950, 60, 0.5), (3100, 50, 0.25)))
    fe_opt = _bump(wave, ((4450, 60, 0.6), (4560, 60, 1.0), (5190, 60, 0.8), (5320, 60, 0.8)))
    t = templates()
    host = np.interp(wave, t.wave, t.old_a, left=0.0, right=t.old_a[-1])
    host /= np.interp(5100.0, t.wave, t.old_a)
    return tuple(_value_slope(a) for a in (bc, fe_uv, fe_opt, host))


def _power_law(rest: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """f_λ ∝ λ^(−2−α) (i.e. f_ν ∝ ν^α), 1 at 3000 Å rest; ``rest`` (Å) and ``alpha``
    broadcast."""
    return np.exp((-2.0 - alpha) * np.log(rest / 3000.0))


def _unit_continuum_at(rest: np.ndarray, p: dict) -> np.ndarray:
    """Unabsorbed continuum shape (power law + pseudo-continua + host) [B, K] at rest λ
    [B, K] Å (float64; before the flux scale; the same mixture as the rendered continuum)."""
    a = p["alpha"][:, None]
    wave_t = np.exp(_TAB_LN0 + _TAB_DLN * np.arange(_TAB_SIZE))
    bc, fe_uv, fe_opt, host = (np.interp(rest, wave_t, t[0].astype(np.float64))
                               for t in _pseudo_tables())
    pl5100 = _power_law(np.full_like(a, 5100.0), a)
    return (_power_law(rest, a) + p["a_bc"][:, None] * bc + p["a_feuv"][:, None] * fe_uv
            + pl5100 * (p["a_feopt"][:, None] * fe_opt + p["host"][:, None] * host))


def _draw_qso_block(seed: int, block: int, grid: GridModel, table: ForestTable,
                    z_range: tuple[float, float], snr_range: tuple[float, float]):
    """Parameters of one block of BLOCK quasars.

    Returns (params, absorbers, bad, noise_rng): params [BLOCK] arrays (+ "line_ew",
    "line_fwhm", "line_shift" [BLOCK, M]); absorbers (rows [A], λ_α [A] Å, τ0 [A]); bad
    (rows, cols) masked pixels; noise_rng for the pixel noise only."""
    param_ss, forest_ss, noise_ss = np.random.SeedSequence([seed, QSO_CODE, block]).spawn(3)
    rng = np.random.default_rng(param_ss)
    n = BLOCK
    m = len(LINE_NAMES)
    z = draw_qso_redshifts(rng, n, z_range)
    alpha = np.clip(rng.normal(ALPHA_MEAN, ALPHA_SD, n), *ALPHA_CLIP)
    mag_u = rng.random(n)
    mag = inverse_cdf_mag(mag_u, *MAG_RANGE, MAG_SLOPE)
    base_fwhm = np.clip(FWHM_MEDIAN * 10 ** rng.normal(0, FWHM_DEX, n), *FWHM_RANGE)
    line_fwhm = np.clip(base_fwhm[:, None] * _LINE_TABLE[None, :, 3]
                        * 10 ** rng.normal(0, 0.05, (n, m)), *FWHM_RANGE)
    narrow_fwhm = np.exp(rng.uniform(*np.log(NARROW_FWHM_RANGE), n))
    narrow = _KIND == "narrow"
    line_fwhm[:, narrow] = narrow_fwhm[:, None]
    strength = 10 ** rng.normal(0, 0.1, n)
    line_ew = (_LINE_TABLE[None, :, 1] * 10 ** (rng.normal(0, 1, (n, m)) * _LINE_TABLE[None, :, 2])
               * np.where(narrow, 1.0, strength[:, None]))
    blueshift = np.minimum(rng.exponential(BLUESHIFT_MEAN, n), BLUESHIFT_MAX)
    line_shift = np.where((_KIND == "high")[None], -blueshift[:, None], 0.0)   # km/s
    host_max = np.clip((1.0 - z) / 0.5, 0.0, 1.0)
    params = {
        "z": z, "alpha": alpha, "mag": mag, "fwhm": base_fwhm, "blueshift": blueshift,
        "line_ew": line_ew, "line_fwhm": line_fwhm, "line_shift": line_shift,
        "a_bc": rng.uniform(0.1, 0.35, n), "a_feuv": rng.uniform(0.05, 0.35, n),
        "a_feopt": rng.uniform(0.03, 0.25, n), "host": rng.uniform(0.0, 0.5, n) * host_max,
        "tau_ll": np.exp(rng.normal(0.0, 0.7, n)),
    }
    params.update(draw_observing(rng, n, snr_range, mag_u))

    # Forest absorbers: a Poisson process with cumulative count table.cum up to Lyα(1+z).
    frng = np.random.default_rng(forest_ss)
    lam_max = np.minimum(LYA * (1 + z), table.lam[-1])
    cum_max = np.where(lam_max > table.lam[0], np.interp(lam_max, table.lam, table.cum), 0.0)
    counts = frng.poisson(cum_max)
    rows = np.repeat(np.arange(n), counts)
    u = frng.random(rows.size) * cum_max[rows]
    lam = np.interp(u, table.cum, table.lam)
    tau0 = _draw_tau0(frng, rows.size)

    nrng = np.random.default_rng(noise_ss)
    bad = draw_bad_pixels(nrng, n, grid.npix)
    return params, (rows, lam, tau0), bad, nrng


def _concat_blocks(drawn: list) -> tuple:
    """Stacks per-block draws; absorber and bad-pixel rows are offset to batch rows."""
    params = {k: np.concatenate([d[0][k] for d in drawn]) for k in drawn[0][0]}
    absorbers = tuple(np.concatenate([d[1][j] + (i * BLOCK if j == 0 else 0)
                                      for i, d in enumerate(drawn)]) for j in range(3))
    bad = tuple(np.concatenate([d[2][j] + (i * BLOCK if j == 0 else 0)
                                for i, d in enumerate(drawn)]) for j in range(2))
    return params, absorbers, bad, [d[3] for d in drawn]


def _transmission(p: dict, absorbers: tuple, grid: GridModel) -> np.ndarray:
    """IGM transmission [B, L] float32: Lyα + Lyβ forest absorbers and the Lyman limit."""
    b = p["z"].size
    rows, lam, tau0 = absorbers
    lam_b = lam * (LYB / LYA)
    use_b = lam_b > grid.wave[0] - FOREST_MARGIN
    all_rows = np.concatenate([rows, rows[use_b]])
    all_lam = np.concatenate([lam, lam_b[use_b]])
    all_tau = np.concatenate([tau0, LYB_TAU_RATIO * tau0[use_b]])
    sig = _absorber_sigma(grid, all_lam)
    # weight = τ0 σ √(2π) makes the unit-area Gaussian peak at τ0
    tau = gaussian_sum(grid, all_lam, sig, all_tau * sig * SQRT_2PI, rows=all_rows, n_rows=b)
    rest = grid.wave[None] / (1 + p["z"][:, None])
    # Lyman limit: smoothed edge (2 Å rest), τ ∝ (λ/912)^3 below it
    below = 1.0 / (1.0 + np.exp(np.minimum((rest - LYMAN_LIMIT) / 2.0, 700.0)))
    tau += p["tau_ll"][:, None] * (rest / LYMAN_LIMIT) ** 3 * below
    return np.exp(-tau).astype(np.float32)


def _render_qso(p: dict, absorbers: tuple, bad: tuple, noise_rngs: list, grid: GridModel,
                noiseless: bool, components: bool) -> dict[str, np.ndarray]:
    """Turns a batch of whole blocks into the output dict of :func:`simulate_quasars`."""
    z = p["z"]
    alpha32 = p["alpha"].astype(np.float32)[:, None]
    ln_rest = grid.ln_wave[None] - np.log1p(z)[:, None]                 # [B, L]
    bc, fe_uv, fe_opt, host = _rest_table_interp(ln_rest, _TAB_LN0, _TAB_DLN, _pseudo_tables())
    pl = np.exp((-2.0 - alpha32) * (ln_rest - np.log(3000.0)).astype(np.float32))
    pl5100 = _power_law(np.full_like(z, 5100.0), p["alpha"]).astype(np.float32)[:, None]

    def col(key):
        return p[key].astype(np.float32)[:, None]

    cont = (pl + col("a_bc") * bc + col("a_feuv") * fe_uv
            + pl5100 * (col("a_feopt") * fe_opt + col("host") * host))
    # Flux scale: unabsorbed continuum at observed R_BAND_EFF = flux of the r magnitude.
    at_r = _unit_continuum_at((R_BAND_EFF / (1 + z))[:, None], p)[:, 0]
    scale = rmag_to_flambda(p["mag"]) / at_r                            # [B]
    cont = cont * scale.astype(np.float32)[:, None]

    # Lines: flux = rest EW × (1+z) × power law at the line (observed, scaled).
    rest = _LINE_TABLE[None, :, 0]
    pl_line = _power_law(rest, p["alpha"][:, None]) * scale[:, None] / (1 + z[:, None])
    fluxes = p["line_ew"] * (1 + z[:, None]) * pl_line
    i5008, i4960 = _LINE["OIII_5008"], _LINE["OIII_4960"]
    fluxes[:, i4960] = fluxes[:, i5008] / OIII_RATIO
    obs = rest * (1 + z[:, None]) * (1 + p["line_shift"] / C_KMS)
    sig = np.sqrt((obs * p["line_fwhm"] * FWHM_TO_SIGMA / C_KMS) ** 2 + grid.inst_var(obs))
    lines = gaussian_sum(grid, obs, sig, fluxes).astype(np.float32)

    trans = _transmission(p, absorbers, grid)
    model = (cont + lines) * trans
    flux, ivar, mask = observe(model, p, grid, bad, noise_rngs, noiseless)
    out = {"flux": flux, "ivar": ivar, "mask": mask, "z": z.astype(np.float64),
           "alpha": p["alpha"], "snr": p["snr"], "mag": p["mag"], "fwhm": p["fwhm"],
           "blueshift": p["blueshift"], "line_ew": p["line_ew"].copy(), "line_flux": fluxes}
    # [O III] 4960 was drawn with EW 0; report the EW its fixed flux ratio implies
    out["line_ew"][:, i4960] = out["line_ew"][:, i5008] * (
        _power_law(5008.2, p["alpha"]) / _power_law(4960.3, p["alpha"])) / OIII_RATIO
    if components:
        out["model"] = model.astype(np.float32)
        out["continuum"] = cont.astype(np.float32)
        out["transmission"] = trans
    return out


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def simulate_quasars(n: int, wavelength, seed: int = 0, *, resolving_power,
                     snr_range: tuple[float, float] = (2.0, 20.0), start: int = 0,
                     z_range: tuple[float, float] = Z_RANGE, noiseless: bool = False,
                     components: bool = False, batch: int = 256) -> dict[str, np.ndarray]:
    """Simulates quasar spectra (rows ``start`` … ``start+n−1``) on an observed grid.

    See the module docstring for the physics. Row i depends only on (seed, i) and the settings
    (grid, resolving power, ranges); any ``start``/``n``/``batch`` split gives the same bytes.

    Args:
      n: number of spectra.
      wavelength: [L] observed vacuum wavelengths, Å, strictly increasing (any spacing; e.g.
        SDSS ``10**(3.5563 + 1e-4*np.arange(4600))``, DESI ``3600 + 0.8*np.arange(7781)``).
      seed: non-negative integer.
      resolving_power: R = λ/Δλ_FWHM, scalar or [L] array.
      snr_range: (lo, hi) of the per-object target S/N (median over the grid of the noiseless
        model over σ, per pixel); log-uniform, anticorrelated with the magnitude.
      start: index of the first row.
      z_range: (lo, hi) truncation of the redshift distribution (default 0.5–3.5).
      noiseless: flux is the noiseless model (no noise, no sky residual); ivar, mask and truth
        are identical to the noisy version.
      components: also return "model" (noiseless object, [n, L]), "continuum" (unabsorbed
        continuum without lines) and "transmission" (IGM transmission), float32.
      batch: rows rendered at once (rounded up to multiples of 64); memory only.

    Returns:
      dict with "flux" [n, L] float32 (1e-17 erg/s/cm²/Å, 0 where masked), "ivar" [n, L]
      float32 (0 where masked), "mask" [n, L] bool (True = valid), "z" [n] float64, "alpha"
      [n] (f_ν ∝ ν^α), "snr" [n] (the drawn target S/N), "id" [n] int64, "mag" [n] (r, AB),
      "fwhm" [n] (base broad FWHM, km/s), "blueshift" [n] (km/s, high-ionisation lines),
      "line_ew" [n, M] (rest EW vs the power law, Å) and "line_flux" [n, M] (1e-17 erg/s/cm²)
      for the lines of LINE_NAMES in order.

    Raises:
      ValueError: negative n/seed/start, bad grid, resolving power, snr_range or z_range.
    """
    n, seed, start, snr_range, batch = check_common_args(n, seed, start, snr_range, batch)
    z_lo, z_hi = (float(v) for v in z_range)
    if not (0.0 <= z_lo <= z_hi < 10.0):
        raise ValueError(f"z_range must satisfy 0 <= lo <= hi < 10, got {z_range!r}")
    grid = grid_model(wavelength, resolving_power)
    table = forest_table(grid)

    def render(block_ids):
        drawn = [_draw_qso_block(seed, blk, grid, table, (z_lo, z_hi), snr_range)
                 for blk in block_ids]
        p, absorbers, bad, rngs = _concat_blocks(drawn)
        return _render_qso(p, absorbers, bad, rngs, grid, noiseless, components)

    return simulate_rows(render, n, start, batch, QSO_CODE, seed)
