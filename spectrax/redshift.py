r"""Redshift catalogues a survey would accept: Redrock's columns from learned distributions and
from the learned-proposal + χ²-refinement mode.

Columns (Redrock's names, so code written for Redrock catalogues runs unchanged):

``Z``
  Learned models: the maximum of the redshift distribution over ln(1+z) bins, refined within
  its bin by a parabola through the log-probabilities of the peak bin and its neighbours.
  Refinement mode: the χ² minimum of the template fit within the window of the best candidate.
``ZERR``
  1σ uncertainty of Z, calibrated so that the fraction of true redshifts within ±ZERR is
  0.683 (catastrophic failures count as not covered). Learned models: from the distribution
  (the peak's width, widened by the probability outside the peak; see
  :func:`summarise_logits`), mapped by a calibration the redshift task trains on a held-out
  tenth of the training spectra (:func:`calibrated_radius`), then, after the last training
  step, by an S/N-dependent one fitted on the validation split and that tenth
  (:func:`fit_zerr_calibration`, ``RedshiftTask.calibrate``). Refinement mode: Redrock's
  definition, the step in z that raises χ² by 1 (the parabola's curvature), which alone covers
  too little (0.50 on simulated BGS: the PCA templates do not describe a galaxy exactly, an
  error χ² does not see), so it is scaled and given a floor, ZERR = √((k·σ_χ²)² +
  (f·(1+z))²), with the floor f and a scale k that varies with the median S/N fitted on
  spectra of known redshift the templates were not fitted on (:func:`fit_zerr_calibration`).
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
the task's predictions) with templates from :func:`templates_for`; from the command line it is
``python -m spectrax.predict --refine`` (Z, ZERR, ZWARN, DELTACHI2 refined, CHI2 added, the
learned values kept as Z_LEARNED, ZERR_LEARNED, ZWARN_LEARNED, DELTACHI2_LEARNED)::

    python -m spectrax.predict --config=configs/specpt_redshift_bgs.py \
        --checkpoint=runs/specpt_redshift_bgs-zscan --input=<coadds or shards> --refine
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erfinv

from spectrax import metrics
from spectrax.baselines import template_fit
from spectrax.data import preprocess

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
LOG_SIGMA_RANGE = (math.log(0.02), math.log(3.0))   # sub-bin widths, in bins
HOLDOUT_MODULUS = 10     # 1 in 10 training spectra calibrates ZERR and never trains the model
CALIBRATION_FEATURES = 2
CALIBRATION_SCALE = 10.0  # coefficients are stored /10: Adam then moves them 10× faster


def split_output(output):
    """A redshift model's output -> (logits [B, M], offset [B, M] or None, log σ [B, M] or None).

    [B, M]: logits over the bins only. [B, M, 3]: a mixture with sub-bin resolution: per bin its
    logit, the offset (in bins, |·| < 1) of the redshift from the bin centre given that bin,
    and the ln σ (in bins) of a Gaussian around it; the density of the bin position x is
    Σ_i softmax(logit)_i · N(x; i + offset_i, σ_i²)."""
    output = output.astype(jnp.float32)
    if output.ndim == 2:
        return output, None, None
    return (output[..., 0], jnp.tanh(output[..., 1]),
            jnp.clip(output[..., 2], *LOG_SIGMA_RANGE))


def mixture_nll(output, position):
    """−ln density of the true bin position ``position`` [B] (fractional bins) under a [B, M, 3]
    mixture output (:func:`split_output`): a proper score, so the trained mixture is both the
    redshift distribution and its sub-bin offsets and widths."""
    logits, offset, log_sigma = split_output(output)
    bins = jnp.arange(logits.shape[-1])[None]
    d = (position[:, None] - bins - offset) / jnp.exp(log_sigma)
    comp = (jax.nn.log_softmax(logits, -1) - 0.5 * d * d - log_sigma
            - 0.5 * math.log(2 * math.pi))
    return -jax.nn.logsumexp(comp, axis=-1)


def summarise_logits(output, ln1pz_grid, *, n_candidates: int = 3,
                     min_separation_kms: float = MIN_SEPARATION_KMS,
                     zerr_coefficients=None) -> dict[str, jax.Array]:
    """Reads a redshift and its quality off a learned distribution (module docstring).

    Args:
      output: [B, M] logits over ln(1+z) bins, or [B, M, 3] the sub-bin mixture of
        :func:`split_output`.
      ln1pz_grid: [M] ln(1+z) at the bin centres (numpy, uniform step, ascending).
      n_candidates: peaks returned as candidates for the χ² refinement (≥ 2 for DELTACHI2).
      min_separation_kms: candidates are at least this far apart (c·Δln(1+z)).
      zerr_coefficients: [CALIBRATION_FEATURES] coefficients of the ZERR calibration
        (:func:`calibrated_radius`, trained on held-out spectra by the redshift task); None:
        the uncalibrated radius.

    Returns:
      dict of jax arrays: "z" [B]; "z_err" [B]; "delta_chi2" [B] (2·ln(P₁/P₂); +inf when there
      is no second local maximum); "peak_prob" [B] (P₁); "radius_raw" [B] (the uncalibrated
      ZERR in bins); "at_edge" [B] bool (peak in the first or last bin); "z_candidates" [B, K]
      (the highest local maxima ≥ min_separation_kms apart, best first; the first is "z"),
      "candidate_ok" [B, K] bool (False where no further local maximum exists) and
      "candidate_chi2" [B, K] (2·ln(P₁/P_k), P_k the probability within ±500 km/s of candidate
      k; 0 for the best).

    Z: with a mixture, the mean of the peak bin and its two neighbours' components, weighted
    by their probabilities; with logits only, a parabola through ln p of the peak bin and its
    neighbours. Raw radius (bins): with a mixture, the peak's σ (the same three components'
    total variance) times √2·erfinv(0.6827/P₁), so that probability outside the peak counts
    against it; when P₁ < 0.6827, and with logits only, the half width of the interval centred
    on Z holding 68.27 % of the distribution (uniform density within each bin).
    """

    grid = np.asarray(ln1pz_grid, np.float64)
    m = grid.size
    dlog = float((grid[-1] - grid[0]) / (m - 1))
    sep = max(1, int(round(min_separation_kms / C_KMS / dlog)))
    half = max(1, sep // 2)
    logits, offset, log_sigma = split_output(output)
    logp = jax.nn.log_softmax(logits, axis=-1)
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
    jc = jnp.clip(j1, 1, m - 2)
    at = lambda a, o: jnp.take_along_axis(a, (jc + o)[:, None], 1)[:, 0]  # noqa: E731
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

    if offset is not None:
        w = jnp.stack([at(p, -1), at(p, 0), at(p, 1)], -1)
        w = w / jnp.maximum(w.sum(-1, keepdims=True), 1e-30)
        centre = jnp.stack([jc - 1 + at(offset, -1), jc + at(offset, 0),
                            jc + 1 + at(offset, 1)], -1).astype(jnp.float32)
        var = jnp.stack([jnp.exp(2 * at(log_sigma, o)) for o in (-1, 0, 1)], -1)
        pos = jnp.sum(w * centre, -1)
        sigma = jnp.sqrt(jnp.sum(w * (var + (centre - pos[:, None]) ** 2), -1))
        peak_radius = sigma * math.sqrt(2.0) * erfinv(jnp.clip(INTERVAL / jnp.maximum(p1, 1e-6),
                                                               0.0, 1.0 - 1e-6))
    else:
        a, b, c = at(logp, -1), at(logp, 0), at(logp, 1)
        curv = a - 2 * b + c
        delta = jnp.where((curv < 0) & (jc == j1),
                          0.5 * (a - c) / jnp.where(curv < 0, curv, -1.0), 0.0)
        pos = jc + jnp.clip(delta, -1.0, 1.0)
    pos = jnp.where(jc == j1, pos, j1.astype(jnp.float32))   # a peak in an edge bin stays there
    z = jnp.expm1(grid[0] + pos * dlog)

    # Centred credible interval of the whole distribution: the CDF with uniform density inside
    # each bin (bin i spans [i − 0.5, i + 0.5]) at pos ± r on a geometric grid of r, interpolated.
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
    if offset is not None:
        radius = jnp.where(p1 >= INTERVAL, peak_radius, radius)
    raw = radius
    if zerr_coefficients is not None:
        radius = calibrated_radius(zerr_coefficients, calibration_features(raw))
    z_err = (1.0 + z) * radius * dlog          # dz = (1+z) d ln(1+z)

    z_cands = [z] + [jnp.expm1(grid[0] + j.astype(jnp.float32) * dlog)
                     for j in cands[1:n_candidates]]
    ok = [jnp.ones_like(has_second)] + [jnp.isfinite(v) for v in cand_lp[1:n_candidates]]
    # Each candidate's χ²-equivalent against the best, 2·ln(P₁/P_k) (0 for the best; +inf where
    # no such peak exists): the refinement's prior (:func:`refine`).
    cand_chi2 = [jnp.zeros_like(p1)] + [
        jnp.where(jnp.isfinite(cand_lp[k]), 2.0 * (jnp.log(jnp.maximum(p1, 1e-37))
                                                   - jnp.log(jnp.maximum(mass(cands[k]), 1e-37))),
                  jnp.inf) for k in range(1, n_candidates)]
    return {"z": z, "z_err": z_err, "delta_chi2": delta_chi2, "peak_prob": p1,
            "radius_raw": raw, "at_edge": (j1 == 0) | (j1 == m - 1),
            "z_candidates": jnp.stack(z_cands[:n_candidates], axis=-1),
            "candidate_ok": jnp.stack(ok[:n_candidates], axis=-1),
            "candidate_chi2": jnp.stack(cand_chi2[:n_candidates], axis=-1)}


def calibration_features(radius_raw):
    """Features [B, CALIBRATION_FEATURES] of the ZERR calibration: 1 and ln(raw radius)."""
    return jnp.stack([jnp.ones_like(radius_raw), jnp.log(jnp.maximum(radius_raw, 1e-6))], -1)


def calibrated_radius(coefficients, features):
    """ZERR in bins of ln(1+z): exp(features · CALIBRATION_SCALE·coefficients), [B]; the
    identity (ZERR = raw radius) at coefficients (0, 1/CALIBRATION_SCALE).

    The stored coefficients are scaled down by CALIBRATION_SCALE so that Adam's steps (of order
    the learning rate in the stored units) move the log-radius ten times faster than the model's
    weights: the calibration must settle within the few hundred steps of a CPU run."""
    return jnp.exp(jnp.clip(features @ (CALIBRATION_SCALE * coefficients), -10.0, 10.0))


def is_holdout(z):
    """[B] bool: the fixed tenth of training spectra held out of the model's loss to calibrate
    ZERR, chosen by a hash of the redshift label (the step sees no ids; a label is fixed per
    spectrum, so the same spectra are held out in every epoch)."""
    key = jnp.floor(jnp.abs(z) * 1e7).astype(jnp.int32)
    return (key % HOLDOUT_MODULUS) == 3


def pinball(y, r, quantile: float = INTERVAL):
    """Quantile (pinball) loss of predicting ``r`` for ``y`` (> 0), on their logarithms: its
    minimiser is the ``quantile`` quantile of y (quantiles commute with monotone maps), so a
    ZERR trained with it on |Δ| covers that fraction; in logs one catastrophic failure weighs
    like any other miss instead of by its size, and every S/N contributes on the same scale."""
    d = jnp.log(y + 1e-3) - jnp.log(r)
    return jnp.maximum(quantile * d, (quantile - 1.0) * d)


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
TEMPLATE_CACHE = "refine_templates.npz"   # templates_for's cache inside a run directory
ZERR_CALIBRATION_CACHE = "refine_zerr.json"  # the refined ZERR's calibration, same place
# Runner-up candidates whose learned odds against the best are below e^(-10) are not refined
# (their prior alone then stands for their Δχ²). With the zscan_fast proposer 3.9 % (BGS) /
# 9.6 % (ELG) of simulated test spectra have a runner-up within it (12 % / 43 % within 50); on
# those splits 20 gave the same NMAD, η and success as 50 (BGS η 0.05 vs 0.10 %) in 0.69×
# (ELG) / 0.86× (BGS) of the refinement's time; 0 (best candidate only) lost 0.15 % of
# success and 1.2–2 % of ZWARN = 0 on both.
REFINE_MAX_PENALTY = 20.0


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


@jax.jit
def batch_snr(flux, ivar, mask):
    """[B] median per-pixel S/N (flux·√ivar) over each spectrum's valid pixels, 0 where none
    (:func:`spectrax.metrics.median_snr` in jax by the sort-free median): what the ZERR
    calibrations depend on, computed inside the redshift task's jitted predictions
    (``median_snr``), so neither the catalogue nor the refinement reads the pixels again."""
    ok = mask & (ivar > 0) & jnp.isfinite(flux) & jnp.isfinite(ivar)
    snr = jnp.where(ok, flux * jnp.sqrt(jnp.where(ok, ivar, 0.0)), 0.0)
    return jnp.nan_to_num(preprocess.masked_median(snr, ok), nan=0.0)


def refine(templates: template_fit.Templates, flux, ivar, mask, wavelength, z_candidates,
           candidate_ok=None, *, z_train_range=None, half_window: int = 1,
           z_learned=None, zerr_calibration: dict | None = None,
           candidate_chi2=None, snr=None) -> dict[str, np.ndarray]:
    """The refinement mode on arrays: χ² over narrow windows around learned candidates.

    Args:
      templates: the χ² basis (:func:`templates_for`).
      flux, ivar, mask: [N, L]; wavelength: [L] Å, or [N, L] with identical rows.
      z_candidates: [N, K] the learned model's candidates (``z_candidates`` of the redshift
        task's predictions, best first); candidate_ok: [N, K] bool.
      z_train_range: (lo, hi) redshifts of the training split; Z outside gets
        OUTSIDE_TRAINED_RANGE.
      half_window: fine steps (1e-4 in ln(1+z)) each side of a candidate (the window walks
        where its minimum is on an edge: :func:`~spectrax.baselines.template_fit.refine_redshifts`).
      z_learned: [N] the learned Z, copied to the output as Z_LEARNED (optional).
      zerr_calibration: :func:`fit_zerr_calibration`'s result, applied to ZERR at each
        spectrum's median S/N (:func:`calibrate_zerr`); None: Redrock's χ² + 1 error as it is.
      candidate_chi2: [N, K] the learned distribution's χ²-equivalent of each candidate against
        its best (``candidate_chi2`` of the predictions): added to the candidates' χ² when the
        winner is chosen, as a prior (so the template fit must beat the learned odds to move
        Z to another candidate); DELTACHI2 then includes it, and candidates more than
        :data:`REFINE_MAX_PENALTY` behind the best are not refined (their prior alone stands
        for their Δχ²). None: χ² alone decides, every candidate is refined.
      snr: [N] median S/N the ZERR calibration is applied at (the predictions' ``median_snr``,
        :func:`batch_snr`); None: computed here (:func:`spectrax.metrics.median_snr`).

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
                                        candidate_ok, half_window=half_window,
                                        candidate_penalty=candidate_chi2,
                                        max_penalty=REFINE_MAX_PENALTY)
    z = np.where(np.isfinite(res["z"]), res["z"], np.nan)
    zwarn = res["zwarn"] | zwarn_bits(outside=outside_range(np.nan_to_num(z), z_train_range))
    if zerr_calibration is not None and snr is None:
        snr = metrics.median_snr(flux, ivar, mask)
    zerr = res["zerr"] if zerr_calibration is None else calibrate_zerr(
        z, res["zerr"], zerr_calibration, snr)
    cols = {"Z": z, "ZERR": zerr, "ZWARN": zwarn.astype(np.int32),
            "DELTACHI2": res["delta_chi2"], "CHI2": res["chi2"],
            "SPECTYPE": np.full(z.shape, "GALAXY")}
    if z_learned is not None:
        cols["Z_LEARNED"] = np.asarray(z_learned, np.float64)
    return cols


def refine_columns(batch, outputs: dict, templates: template_fit.Templates, *,
                   z_train_range=None, half_window: int = 1,
                   zerr_calibration: dict | None = None,
                   use_prior: bool = True) -> dict[str, np.ndarray]:
    """:func:`refine` on a :class:`spectrax.spectra.SpectrumBatch` and the redshift task's
    predictions for it (``outputs``: ``z_candidates``, ``candidate_ok``, ``z_pred`` and, used
    as the candidates' prior unless ``use_prior`` is False, ``candidate_chi2``). Returns
    columns for every row of the batch (padding rows have no valid pixel: ZWARN has NODATA);
    keep the ``batch.valid`` rows as for the task's own catalogue."""
    if "z_candidates" not in outputs:
        raise ValueError("refine_columns needs a model that outputs a redshift distribution "
                         "(z_candidates in its predictions), e.g. the zscan model")
    valid = np.asarray(batch.valid, bool)
    wavelength = np.asarray(batch.wavelength)
    if wavelength.ndim == 2:  # padding rows may carry no grid: the valid rows' shared grid
        rows = wavelength[valid] if valid.any() else wavelength[:1]
        if not np.allclose(rows, rows[:1]):
            raise ValueError("refine_columns: the χ² refinement needs one wavelength grid "
                             "shared by the batch's spectra; group spectra by grid first")
        wavelength = rows[0]
    return refine(templates, np.asarray(batch.flux), np.asarray(batch.ivar),
                  np.asarray(batch.mask) & valid[:, None], wavelength,
                  np.asarray(outputs["z_candidates"]), np.asarray(outputs["candidate_ok"]),
                  z_train_range=z_train_range, half_window=half_window,
                  z_learned=np.asarray(outputs["z_pred"]), zerr_calibration=zerr_calibration,
                  candidate_chi2=(np.asarray(outputs["candidate_chi2"])
                                  if use_prior and "candidate_chi2" in outputs else None),
                  snr=(np.asarray(outputs["median_snr"]) if "median_snr" in outputs else None))


def calibrate_zerr(z, zerr, calibration: dict, snr=None) -> np.ndarray:
    """[N] calibrated ZERR (refined or learned): √((k(S/N)·zerr)² + (floor·(1+z))²), ln k
    interpolated linearly in ln S/N between the calibration's S/N groups (constant beyond the
    end groups' medians: extrapolating the end segments' trends amplified the groups' sampling
    noise); a NaN zerr (χ² minimum not bracketed) becomes the floor alone.

    Args:
      z, zerr: [N] redshift and its uncalibrated error. calibration: :func:`fit_zerr_calibration`'s
        dict ({"scale", "floor"} with a scalar scale, or per-group "scale" at "log_snr").
      snr: [N] median S/N (:func:`batch_snr`); needed for per-group scales.
    """
    z = np.asarray(z, np.float64)
    zerr = np.nan_to_num(np.asarray(zerr, np.float64), nan=0.0)
    scale = np.asarray(calibration["scale"], np.float64)
    if scale.ndim:
        if snr is None:
            raise ValueError("calibrate_zerr: this calibration depends on S/N; pass snr")
        log_snr = np.log(np.maximum(np.nan_to_num(np.asarray(snr, np.float64)), 1e-3))
        scale = np.exp(np.interp(log_snr, calibration["log_snr"], np.log(scale)))
    return np.sqrt((scale * zerr) ** 2
                   + (calibration["floor"] * (1.0 + np.nan_to_num(z))) ** 2)


def fit_zerr_calibration(z_true, z, zerr, snr, *, n_groups: int = 3,
                         per_group: int = 200, max_groups: int = 8) -> dict[str, Any]:
    """A ZERR calibration (:func:`calibrate_zerr`; the refined one and the learned one's last
    stage) from spectra of known redshift: a floor and a scale that depends on S/N.

    1. The floor (template mismatch, in Δz/(1+z)): with one global scale, the grid point
       (scale in [0.5, 4], floor 0 or in [1e-6, 1e-4]) whose coverage, |z_true − z| < ZERR, is
       closest to 0.6827 in each of ``n_groups`` median-S/N quantile groups (least squares).
    2. The scale per S/N: in quantile groups of at least ``per_group`` spectra (at most
       ``max_groups``; the floor first capped at the median |Δz|/(1+z) of every group, so that
       it alone never over-covers one), the scale that covers 0.6827 of the group given it (the
       0.6827 quantile of the scale each spectrum needs), clipped to [0.25, 10]; between groups
       ln k is interpolated linearly in ln S/N. One scale alone left the refined coverage
       drifting with S/N (0.62 at S/N 1–2 and 0.59 above 20 on simulated BGS, 0.66–0.67 in
       between).

    Args:
      z_true, z, zerr, snr: [N] true and estimated redshifts, the uncalibrated errors (the
        refinement's χ² + 1 or the model's) and median S/N (:func:`batch_snr`).

    Returns:
      {"scale": [G], "log_snr": [G] group medians of ln S/N, "floor", "n", "coverage"
      (of the calibrated ZERR on these spectra)}.
    """
    z_true, z = np.asarray(z_true, np.float64), np.asarray(z, np.float64)
    zerr = np.nan_to_num(np.asarray(zerr, np.float64), nan=0.0)
    snr = np.nan_to_num(np.asarray(snr, np.float64), nan=0.0)
    ok = np.isfinite(z_true) & np.isfinite(z)
    z_true, z, zerr, snr = z_true[ok], z[ok], zerr[ok], snr[ok]
    if z.size < 3 * n_groups:
        raise ValueError(f"fit_zerr_calibration: {z.size} spectra of known redshift; need "
                         f"≥ {3 * n_groups}")
    groups = np.digitize(snr, np.quantile(snr, np.linspace(0, 1, n_groups + 1)[1:-1]))
    dz = np.abs(z_true - z)
    scales = np.geomspace(0.5, 4.0, 80)
    floors = np.concatenate([[0.0], np.geomspace(1e-6, 1e-4, 60)])
    e = np.sqrt((scales[:, None, None] * zerr) ** 2
                + (floors[None, :, None] * (1.0 + z)) ** 2)              # [S, F, N]
    covered = dz < e
    dev = sum((covered[..., groups == g].mean(-1) - INTERVAL) ** 2 for g in range(n_groups))
    floor = float(floors[np.unravel_index(np.argmin(dev), dev.shape)[1]])
    n_snr = int(np.clip(z.size // per_group, 1, max_groups))
    parts = np.array_split(np.argsort(snr), n_snr)
    # The floor alone must not cover more than half of any group, or no scale could bring that
    # group's coverage down to 0.6827.
    floor = min(floor, min(float(np.quantile(dz[p] / (1.0 + z[p]), 0.5)) for p in parts))
    # The scale each spectrum needs to be covered given the floor (0 if the floor covers it,
    # inf if nothing can: a zero error beyond the floor).
    rest = np.maximum(dz ** 2 - (floor * (1.0 + z)) ** 2, 0.0)
    need = np.where(rest == 0, 0.0, np.sqrt(rest) / np.where(zerr > 0, zerr, np.nan))
    need = np.nan_to_num(need, nan=np.inf)
    scale = [float(np.clip(np.quantile(need[p], INTERVAL), 0.25, 10.0)) for p in parts]
    log_snr = [float(np.median(np.log(np.maximum(snr[p], 1e-3)))) for p in parts]
    cal = {"scale": scale, "log_snr": log_snr, "floor": floor, "n": int(z.size)}
    cal["coverage"] = float(np.mean(dz < calibrate_zerr(z, zerr, cal, snr)))
    return cal
