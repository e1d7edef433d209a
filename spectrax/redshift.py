r"""Redshift catalogues a survey would accept: Redrock's columns from learned distributions and
from the learned-proposal + χ²-refinement mode.

Columns (Redrock's names, so code written for Redrock catalogues runs unchanged):

``Z``
  Learned models: the maximum of the redshift distribution over ln(1+z) bins, refined within
  its bin by a parabola through the log-probabilities of the peak bin and its neighbours.
  Refinement mode: the χ² minimum of the template fit within the window of the best candidate.
``ZERR``
  1σ uncertainty of Z. Learned models: the half width of the interval centred on Z that holds
  68.27 % of the whole predicted distribution (probability in secondary peaks counts against
  it, so a spectrum whose distribution is 90 % in its main peak gets a wider interval than
  the main peak's own 1σ: the fraction of true redshifts within ±ZERR is 0.683 for a calibrated
  distribution, catastrophic failures included). Refinement mode: Redrock's definition, the
  step in z that raises χ² by 1 (from the parabola's curvature).
``ZWARN``
  Redrock's bit values where they apply (:class:`ZWarn`): SMALL_DELTA_CHI2 (2**2) when
  DELTACHI2 < 9, Z_FITLIMIT (2**5) when the best redshift is at an end of the scanned range
  (learned: the first or last bin; refinement: the templates' range), NODATA (2**9) when no
  pixel is valid, BAD_MINFIT (2**10, refinement only) when the χ² minimum lies on its window's
  edge. Plus OUTSIDE_TRAINED_RANGE (2**20, in the range 2**16–2**23 that Redrock reserves for
  afterburners, above DESI's own 2**16–2**19) when Z lies outside the redshifts of the training
  split: such a redshift is an extrapolation of the model, flagged instead of trusted.
``DELTACHI2``
  Refinement mode: Redrock's, the χ² of the second-best candidate minus the best's (over the
  learned candidates, all ≥ 1000 km/s apart; a χ² minimum that none of them is near is not
  seen, so it can exceed a full-grid fit's Δχ²). Learned models: the χ²-equivalent of the
  distribution, 2·ln(P₁/P₂), where P₁ and P₂ are the probabilities within ±500 km/s of the
  highest peak and of the highest peak ≥ 1000 km/s from it. For a Gaussian likelihood
  (−2 ln L = χ² + const) and a flat prior this equals χ²₂ − χ²₁, so the same cuts
  (DELTACHI2 > 9, > 40) keep their meaning of odds against the runner-up: e^(−9/2) ≈ 1 %.
``SPECTYPE``
  "GALAXY": the redshift models and the χ² templates of spectrax are galaxy models, so this is
  the class the fit assumes, as Redrock writes the spectype of its winning template.

The refinement mode is :func:`refine` (arrays) / :func:`refine_columns` (a SpectrumBatch and
the task's predictions) with templates from :func:`templates_for`; from the command line::

    python -m spectrax.redshift --config=configs/specpt_redshift_bgs.py \
        --checkpoint=runs/specpt_redshift_bgs-zscan [--split=test] [--output=cat.fits]
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spectrax.baselines import template_fit

C_KMS = 299_792.458
INTERVAL = 0.6827          # probability of ±1σ of a Gaussian
SMALL_DELTA_CHI2 = template_fit.SMALL_DELTA_CHI2
MIN_SEPARATION_KMS = 1000.0


class ZWarn:
    """ZWARN bit values (Redrock's ``redrock.zwarning.ZWarningMask`` where they apply)."""

    SMALL_DELTA_CHI2 = template_fit.ZWARN_SMALL_DELTA_CHI2   # 2**2
    Z_FITLIMIT = template_fit.ZWARN_Z_FITLIMIT               # 2**5
    NODATA = template_fit.ZWARN_NODATA                       # 2**9
    BAD_MINFIT = template_fit.ZWARN_BAD_MINFIT               # 2**10
    # spectrax's own: Redrock reserves 2**16–2**23 for afterburners; DESI uses 2**16–2**19.
    OUTSIDE_TRAINED_RANGE = 2**20


# ==============================================================================================
# Learned redshift distributions -> Z, ZERR, DELTACHI2, candidates (jax, inside predict)
# ==============================================================================================
def summarise_logits(logits, ln1pz_grid, *, n_candidates: int = 3,
                     min_separation_kms: float = MIN_SEPARATION_KMS) -> dict[str, jax.Array]:
    """Reads a redshift and its quality off logits over ln(1+z) bins (module docstring).

    Args:
      logits: [B, M] float32, unnormalised log-probabilities of the M bins.
      ln1pz_grid: [M] ln(1+z) at the bin centres (numpy, uniform step, ascending).
      n_candidates: peaks returned as candidates for the χ² refinement (≥ 2 for DELTACHI2).
      min_separation_kms: candidates are at least this far apart (c·Δln(1+z)).

    Returns:
      dict of jax arrays: "z" [B], "z_err" [B] (68.27 % centred credible half-width, in z),
      "delta_chi2" [B] (2·ln(P₁/P₂); +inf when no second peak exists), "peak_prob" [B] (P₁),
      "at_edge" [B] bool (peak in the first or last bin), "z_candidates" [B, K] (the highest
      local maxima ≥ min_separation_kms apart, best first; the first is "z") and
      "candidate_ok" [B, K] bool (False where no further local maximum exists).
    """
    grid = np.asarray(ln1pz_grid, np.float64)
    m = grid.size
    dlog = float((grid[-1] - grid[0]) / (m - 1))
    sep = max(1, int(round(min_separation_kms / C_KMS / dlog)))
    half = max(1, sep // 2)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    bins = jnp.arange(m)

    # Candidates: the highest bin, then the highest LOCAL MAXIMUM ≥ sep bins from every one
    # taken so far (the shoulder of a broad peak is not a rival redshift, as in Redrock, whose
    # candidates are distinct χ² minima).
    left = jnp.concatenate([jnp.full_like(logp[:, :1], -jnp.inf), logp[:, :-1]], axis=1)
    right = jnp.concatenate([logp[:, 1:], jnp.full_like(logp[:, :1], -jnp.inf)], axis=1)
    peaks = (logp >= left) & (logp >= right)
    masked, cands, cand_lp = logp, [], []
    for _ in range(max(n_candidates, 2)):
        j = jnp.argmax(masked, axis=-1)
        cand_lp.append(jnp.take_along_axis(masked, j[:, None], 1)[:, 0])
        cands.append(j)
        masked = jnp.where((jnp.abs(bins[None] - j[:, None]) < sep) | ~peaks, -jnp.inf, masked)
    j1 = cands[0]

    # Sub-bin position of the best peak: parabola through log p at j−1, j, j+1.
    jc = jnp.clip(j1, 1, m - 2)
    lp = lambda o: jnp.take_along_axis(logp, (jc + o)[:, None], 1)[:, 0]  # noqa: E731
    a, b, c = lp(-1), lp(0), lp(1)
    curv = a - 2 * b + c
    delta = jnp.where((curv < 0) & (jc == j1), 0.5 * (a - c) / jnp.where(curv < 0, curv, -1.0),
                      0.0)
    pos = jc + jnp.clip(delta, -1.0, 1.0)                       # fractional bin of Z
    pos = jnp.where(jc == j1, pos, j1.astype(jnp.float32))
    z = jnp.expm1(grid[0] + pos * dlog)

    # Probability within ±half bins of a peak.
    p = jnp.exp(logp)
    cdf = jnp.concatenate([jnp.zeros_like(p[:, :1]), jnp.cumsum(p, axis=-1)], axis=-1)

    def mass(j):
        lo = jnp.clip(j - half, 0, m)
        hi = jnp.clip(j + half + 1, 0, m)
        return (jnp.take_along_axis(cdf, hi[:, None], 1) - jnp.take_along_axis(cdf, lo[:, None], 1)
                )[:, 0]

    p1, p2 = mass(j1), mass(cands[1])
    has_second = jnp.isfinite(cand_lp[1])
    delta_chi2 = jnp.where(has_second, 2.0 * (jnp.log(jnp.maximum(p1, 1e-37))
                                              - jnp.log(jnp.maximum(p2, 1e-37))), jnp.inf)

    # Centred credible interval: the CDF with uniform density inside each bin (bin i spans
    # [i − 0.5, i + 0.5]), evaluated at pos ± r on a geometric grid of radii, interpolated.
    def cdf_at(x):
        e = jnp.clip(x + 0.5, 0.0, float(m))
        i = jnp.clip(jnp.floor(e).astype(jnp.int32), 0, m - 1)
        return jnp.take_along_axis(cdf, i, 1) + (e - i) * jnp.take_along_axis(p, i, 1)

    radii = jnp.asarray(np.geomspace(0.01, m, 128), jnp.float32)[None]
    inside = cdf_at(pos[:, None] + radii) - cdf_at(pos[:, None] - radii)   # [B, R] increasing
    k = jnp.argmax(inside >= INTERVAL, axis=-1)
    k = jnp.where(jnp.any(inside >= INTERVAL, axis=-1), k, radii.shape[1] - 1)
    k0 = jnp.maximum(k - 1, 0)
    m0 = jnp.take_along_axis(inside, k0[:, None], 1)[:, 0]
    m1 = jnp.take_along_axis(inside, k[:, None], 1)[:, 0]
    r0, r1 = radii[0, k0], radii[0, k]
    frac = jnp.clip((INTERVAL - m0) / jnp.maximum(m1 - m0, 1e-12), 0.0, 1.0)
    radius = jnp.where((k > 0) & (m1 > m0), r0 + frac * (r1 - r0), r1)
    z_err = (1.0 + z) * radius * dlog          # dz = (1+z) d ln(1+z)

    z_cands = [z] + [jnp.expm1(grid[0] + j.astype(jnp.float32) * dlog)
                     for j in cands[1:n_candidates]]
    ok = [jnp.ones_like(has_second)] + [jnp.isfinite(v) for v in cand_lp[1:n_candidates]]
    return {"z": z, "z_err": z_err, "delta_chi2": delta_chi2, "peak_prob": p1,
            "at_edge": (j1 == 0) | (j1 == m - 1),
            "z_candidates": jnp.stack(z_cands[:n_candidates], axis=-1),
            "candidate_ok": jnp.stack(ok[:n_candidates], axis=-1)}


def outside_range(z, z_range) -> Any:
    """[B] bool: z outside [lo, hi] (``z_range`` None or (None, None): never)."""
    if z_range is None or z_range[0] is None:
        return np.zeros(np.shape(z), bool) if isinstance(z, np.ndarray) else jnp.zeros_like(
            z, dtype=bool)
    return (z < z_range[0]) | (z > z_range[1])


def zwarn_bits(*, nodata=None, small_delta_chi2=None, at_limit=None, outside=None,
               bad_minfit=None) -> np.ndarray:
    """ORs the given [B] bool conditions into Redrock-style ZWARN int32 values."""
    parts = [(nodata, ZWarn.NODATA), (small_delta_chi2, ZWarn.SMALL_DELTA_CHI2),
             (at_limit, ZWarn.Z_FITLIMIT), (outside, ZWarn.OUTSIDE_TRAINED_RANGE),
             (bad_minfit, ZWarn.BAD_MINFIT)]
    shape = next(np.shape(c) for c, _ in parts if c is not None)
    out = np.zeros(shape, np.int32)
    for cond, bit in parts:
        if cond is not None:
            out |= np.where(np.asarray(cond, bool), bit, 0).astype(np.int32)
    return out


# ==============================================================================================
# Refinement mode: learned candidates -> χ² over narrow windows
# ==============================================================================================
def templates_for(data_dir: str | Path, *, n_train: int = 2000, n_components: int = 6,
                  cache: str | Path | None = None) -> template_fit.Templates:
    """The χ² template basis of the refinement: EM-PCA templates of the first ``n_train``
    spectra of ``data_dir``'s train split (:func:`spectrax.baselines.template_fit.fit_templates`,
    the split the learned model was trained on), loaded from ``cache`` (.npz) when it exists
    and written there otherwise."""
    cache = Path(cache) if cache else None
    if cache is not None and cache.exists():
        return template_fit.Templates.load(cache)
    train = template_fit.load_split(data_dir, "train", n_train)
    templates = template_fit.fit_templates(train["flux"], train["ivar"], train["mask"],
                                           train["wavelength"], train["z"],
                                           n_components=n_components)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        templates.save(cache)
    return templates


def refine(templates: template_fit.Templates, flux, ivar, mask, wavelength, z_candidates,
           candidate_ok=None, *, z_train_range=None, half_window: int = 4,
           z_learned=None) -> dict[str, np.ndarray]:
    """The refinement mode on arrays: χ² over narrow windows around learned candidates.

    Args:
      templates: the χ² basis (:func:`templates_for`).
      flux, ivar, mask: [N, L]; wavelength: [L] Å, or [N, L] with identical rows.
      z_candidates: [N, K] the learned model's candidates (``z_candidates`` of the redshift
        task's predictions, best first); candidate_ok: [N, K] bool.
      z_train_range: (lo, hi) redshifts of the training split; Z outside gets
        OUTSIDE_TRAINED_RANGE.
      half_window: fine steps (1e-4 in ln(1+z)) each side of a candidate.
      z_learned: [N] the learned Z, copied to the output as Z_LEARNED (optional).

    Returns:
      Catalogue columns, each [N]: Z, ZERR, ZWARN, DELTACHI2, CHI2, SPECTYPE (and Z_LEARNED).
    """
    wavelength = np.asarray(wavelength, np.float64)
    if wavelength.ndim == 2:
        real = wavelength[0] > 0
        if not np.allclose(wavelength, wavelength[:1]):
            raise ValueError("refine: the χ² refinement needs one wavelength grid shared by all "
                             "spectra of a call; group spectra by grid first")
        if not real.all():
            raise ValueError("refine: padded spectra (wavelength ≤ 0) are not supported; the "
                             "refinement runs on the instrument grid")
        wavelength = wavelength[0]
    res = template_fit.refine_redshifts(templates, flux, ivar, mask, wavelength, z_candidates,
                                        candidate_ok, half_window=half_window)
    z = np.where(np.isfinite(res["z"]), res["z"], np.nan)
    zwarn = res["zwarn"] | zwarn_bits(outside=outside_range(np.nan_to_num(z), z_train_range))
    cols = {"Z": z, "ZERR": res["zerr"], "ZWARN": zwarn.astype(np.int32),
            "DELTACHI2": res["delta_chi2"], "CHI2": res["chi2"],
            "SPECTYPE": np.full(z.shape, "GALAXY")}
    if z_learned is not None:
        cols["Z_LEARNED"] = np.asarray(z_learned, np.float64)
    return cols


def refine_columns(batch, outputs: dict, templates: template_fit.Templates, *,
                   z_train_range=None, half_window: int = 4) -> dict[str, np.ndarray]:
    """:func:`refine` on a :class:`spectrax.spectra.SpectrumBatch` and the redshift task's
    predictions for it (``outputs``: ``z_candidates``, ``candidate_ok``, ``z_pred``). Returns
    columns for every row of the batch (padding rows have no valid pixel: ZWARN has NODATA);
    keep the ``batch.valid`` rows as for the task's own catalogue."""
    if "z_candidates" not in outputs:
        raise ValueError("refine_columns needs a model that outputs a redshift distribution "
                         "(z_candidates in its predictions), e.g. the zscan model")
    return refine(templates, np.asarray(batch.flux), np.asarray(batch.ivar),
                  np.asarray(batch.mask) & np.asarray(batch.valid)[:, None],
                  np.asarray(batch.wavelength), np.asarray(outputs["z_candidates"]),
                  np.asarray(outputs["candidate_ok"]), z_train_range=z_train_range,
                  half_window=half_window, z_learned=np.asarray(outputs["z_pred"]))
