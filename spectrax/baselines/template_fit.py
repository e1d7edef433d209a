r"""Classical redshifts: χ² fitting of a rest-frame PCA template basis over a redshift grid.

This is the method of DESI's Redrock (the pipeline whose redshifts the learned models are trained
to reproduce), written from its description, vectorised over spectra and trial redshifts in jax:

    python -m spectrax.baselines.template_fit                    # simulated BGS, train/test seeds
    python -m spectrax.baselines.template_fit --data=data/mine   # a shard directory (train/test)

Templates (:func:`fit_templates`)
  Training spectra with known z are moved to the rest frame (λ_rest = λ_obs / (1+z)) on a
  log-uniform grid (default step 1e-4 in ln λ, i.e. 30 km/s; default range
  λ_obs,min/(1+z_max) … λ_obs,max/(1+z_min), about 2250–9630 Å for BGS) by linear
  interpolation in ln λ. A rest pixel is valid only if both observed pixels it is interpolated
  from are valid (mask, finite, ivar > 0); its weight is the interpolated ivar times the
  fraction of an observed pixel one rest pixel spans, so each observed pixel's information is
  counted once whatever the relative sampling. Each spectrum is divided by its ivar-weighted
  mean flux over the rest range that EVERY training spectrum covers (so all are normalised on
  the same wavelengths; the spectrum's own coverage if that common range is under 10 %), and
  its weights multiplied by the square; spectra with a non-positive normalisation are dropped
  and counted.

  Different coverage and masked pixels are handled by WEIGHTED PCA (expectation-maximisation
  PCA with per-pixel weights, as in Bailey 2012, PASP 124, 1015): the basis is the weighted mean
  spectrum plus ``n_components − 1`` components, found by alternating weighted least squares:
  per-spectrum coefficients given the components, then per-pixel component values given the
  coefficients. A pixel a spectrum does not cover has weight 0, so nothing is filled in or
  extrapolated. The per-pixel step carries a small ridge (``ridge`` × the median per-pixel
  normal matrix) so the rarely covered ends of the rest range shrink towards the mean instead of
  fitting noise; the default grid is trimmed to the pixels at least ``min_coverage`` training
  spectra cover. Basis vectors are scaled to unit RMS (the fit does not depend on their scale).

Redshift fit (:func:`fit_redshifts`)
  For a trial z the basis is linearly interpolated (in ln λ) at λ_obs/(1+z) for every observed
  pixel, giving the design matrix M(z) [L, K] (optionally with a constant column). The
  coefficients minimise χ²(z) = Σ_l w_l (f_l − M(z)_l · a)² with w = ivar (0 for bad pixels),
  by the K×K normal equations (MᵀWM) a = MᵀWf, solved by a batched, Jacobi-scaled Cholesky
  factorisation with a 1e-5 relative ridge (so degenerate components cannot blow up in float32).

  1. Coarse scan: trial ln(1+z) uniform with step ``coarse × dz_log`` (default 4e-4), on pairs
     of adjacent pixels merged by inverse-variance weighting (half the work; 1.6 Å groups are
     still narrower than any line). Every spectrum shares the observed grid, so M(z) is shared
     too, and MᵀWf and MᵀWM for a chunk of spectra × a chunk of redshifts are two matrix
     products ([N, L] @ [L, Z·K] and [N, L] @ [L, Z·K(K+1)/2]); χ² = Σwf² − bᵀA⁻¹b. In float32
     this difference loses digits as Σwf²/χ² grows (bright spectra): χ² is then off by a
     smooth, slowly varying amount, which does not move minima; the scan only finds them.
  2. Candidates: the ``n_candidates`` lowest local minima of the coarse χ², each at least
     ``min_separation_kms`` (default 1000 km/s) from the ones already taken.
  3. Refinement: around each candidate a fine scan with step ``dz_log`` (default 1e-4) over ±1
     coarse step on the full-resolution pixels, χ² now computed from the residuals (no
     cancellation), then a parabola through the fine minimum and its neighbours; the vertex is
     kept if its (re-evaluated) χ² is lower than the grid point's.
  4. The best candidate gives z and χ² (every reported χ² comes from the residual form); Δχ²
     is the second-best candidate's χ² minus the best (+inf when there is no second minimum),
     Redrock's confidence measure. ``zerr`` is the 1σ error from the parabola's curvature
     (χ² rises by 1), as Redrock's ZERR. ``zwarn`` carries Redrock's bit values:
     SMALL_DELTA_CHI2 (4) when Δχ² < 9, Z_FITLIMIT (32) when the minimum is at an end of the z
     range, NODATA (512) when a spectrum has no valid pixel.

Refinement of given candidates (:func:`refine_redshifts`)
  Steps 3–4 alone, around candidate redshifts supplied by the caller (a learned model's
  proposals, :func:`spectrax.redshift.refine`): χ² over ±1 fine step on pixel pairs, the
  window walking downhill (at most 8 steps) where its minimum is on an edge, runner-up
  candidates the caller's prior makes negligible skipped, and one full-resolution χ² at the
  winner: about 3.7 full-resolution χ² evaluations per spectrum (padding included; measured on
  simulated BGS and ELG) instead of the ~1,100-redshift coarse scan's. A winning minimum still on its window's edge gets BAD_MINFIT (1024,
  Redrock's "bad parabola fit") because the true minimum may lie beyond it.

  Differences from Redrock worth knowing: templates here are PCA bases learnt from the training
  split (Redrock ships fixed PCA templates built from models, and fits stars and QSOs too);
  templates are interpolated at pixel centres rather than integrated over pixels and are not
  convolved with a resolution matrix (they are built from spectra observed at the same
  resolution); no Legendre-polynomial or archetype stage.

Inputs everywhere: ``flux`` [N, L] (any unit), ``ivar`` [N, L] (1/flux², 0 = no information),
``mask`` [N, L] bool (True = valid, spectrax's convention), ``wavelength`` [L] Å (one grid shared
by all spectra, vacuum or air as long as templates and data agree). A pixel counts only if the
mask says so AND flux and ivar are finite AND ivar > 0; anything else (NaN, inf, 1e30) is
replaced before it reaches arithmetic, so bad pixels cannot influence the result.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular

from spectrax import runtime

C_KMS = 299_792.458
DEFAULT_DLOG = 1e-4           # ln-λ step of the rest grid and of the fine z scan (30 km/s)
SMALL_DELTA_CHI2 = 9.0        # Redrock's threshold for its SMALL_DELTA_CHI2 warning
ZWARN_SMALL_DELTA_CHI2 = 2**2  # Redrock's ZWARN bit values
ZWARN_Z_FITLIMIT = 2**5
ZWARN_NODATA = 2**9
ZWARN_BAD_MINFIT = 2**10
_SMALL_CALL = 16             # rows of the smallest jitted χ² call (remainders)
_RIDGE = 1e-5                 # relative ridge on the Jacobi-scaled normal matrix (float32-safe)
_TINY = 1e-30


# ==============================================================================================
# Input hygiene
# ==============================================================================================
def _clean(flux, ivar, mask, wavelength) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (f, w, λ): f, w [N, L] float64 with 0 wherever the pixel is not valid, λ [L].

    Raises ValueError on inconsistent shapes or a wavelength grid that is not increasing.
    """
    flux, ivar, mask = np.asarray(flux), np.asarray(ivar), np.asarray(mask)
    wavelength = np.asarray(wavelength, dtype=np.float64)
    if flux.ndim != 2:
        raise ValueError(f"flux must be [N, L], got shape {flux.shape}")
    if ivar.shape != flux.shape or mask.shape != flux.shape:
        raise ValueError(f"flux {flux.shape}, ivar {ivar.shape} and mask {mask.shape} must have "
                         "the same [N, L] shape")
    if wavelength.shape != (flux.shape[1],):
        raise ValueError(f"wavelength must be [L] = [{flux.shape[1]}] (one grid shared by all "
                         f"spectra), got shape {wavelength.shape}")
    if not np.all(np.isfinite(wavelength)) or np.any(np.diff(wavelength) <= 0) \
            or wavelength[0] <= 0:
        raise ValueError("wavelength must be finite, positive and strictly increasing (Å)")
    with np.errstate(invalid="ignore"):
        valid = mask.astype(bool) & np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
    # where() before any arithmetic: NaN * 0 is NaN, so masked values must never be multiplied.
    f = np.where(valid, flux, 0.0).astype(np.float64)
    w = np.where(valid, ivar, 0.0).astype(np.float64)
    return f, w, wavelength


# ==============================================================================================
# Small batched linear algebra (millions of K×K systems, K ≈ 5–10)
# ==============================================================================================
@functools.lru_cache(maxsize=None)
def _pairs(k: int) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) with i ≤ j, row-major: the packed upper triangle of a k×k symmetric matrix."""
    i, j = np.triu_indices(k)
    return i, j


@functools.lru_cache(maxsize=None)
def _unpack_index(k: int) -> np.ndarray:
    """[k, k] positions in the packed upper triangle of every (i, j) (symmetric)."""
    i, j = _pairs(k)
    out = np.zeros((k, k), np.int32)
    out[i, j] = np.arange(i.size)
    out[j, i] = np.arange(i.size)
    return out


def _cholesky_solve(a_packed: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Solves A x = b for symmetric positive semi-definite A, batched over leading dimensions.

    Args:
      a_packed: [..., K(K+1)/2] upper triangle of A, row-major (see :func:`_pairs`).
      b: [..., K].

    Returns:
      (x [..., K], bᵀA⁻¹b [...]). A is first scaled to unit diagonal (Jacobi) and given a
      relative ridge of 1e-5, so a component that vanishes on the valid pixels (or duplicates
      another) gets a bounded coefficient instead of a float32 overflow; one step of iterative
      refinement then removes most of the ridge's bias. A factorisation that
      still fails gives NaN, which callers turn into χ² = +inf (never a best fit).
    """
    k = b.shape[-1]
    a = a_packed[..., jnp.asarray(_unpack_index(k))]                   # [..., K, K]
    d = jnp.diagonal(a, axis1=-2, axis2=-1)
    s = jax.lax.rsqrt(jnp.maximum(d, _TINY))
    a = a * s[..., :, None] * s[..., None, :]
    bs = b * s
    chol = jnp.linalg.cholesky(a + _RIDGE * jnp.eye(k, dtype=a.dtype))

    def solve(rhs):
        y = solve_triangular(chol, rhs[..., None], lower=True)
        return solve_triangular(chol, y, lower=True, trans="T")[..., 0]

    x = solve(bs)
    # One step of iterative refinement against the un-ridged matrix: the ridge's bias on x
    # drops from O(ridge/λ_min) to its square, which matters when χ² ≪ Σ w f² (bright spectra).
    x = x + solve(bs - jnp.einsum("...ij,...j->...i", a, x))
    return x * s, jnp.sum(bs * x, axis=-1)


# ==============================================================================================
# Templates
# ==============================================================================================
@dataclasses.dataclass(frozen=True)
class Templates:
    """A rest-frame template basis on a log-uniform wavelength grid.

    Attributes:
      rest_wavelength: [P] float64 Å, log-uniform (constant step in ln λ).
      basis: [K, P] float32; row 0 is the (weighted) mean spectrum, rows 1… the principal
        components, ordered by the variance they carry. Any basis works (tests build one by hand).
      constant: append a constant column to the design matrix at fit time (absorbs additive
        offsets such as sky-subtraction residuals).
      coverage: [P] number of training spectra with a valid pixel there (None if built by hand).
      report: facts about the fit (spectra used and dropped, residual χ²/dof before and after the
        components, normalisation window).
    """

    rest_wavelength: np.ndarray
    basis: np.ndarray
    constant: bool = False
    coverage: np.ndarray | None = None
    report: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        rw = np.asarray(self.rest_wavelength, dtype=np.float64)
        basis = np.asarray(self.basis, dtype=np.float32)
        if rw.ndim != 1 or rw.size < 3 or np.any(rw <= 0) or not np.all(np.isfinite(rw)):
            raise ValueError("rest_wavelength must be a 1-D array of ≥ 3 positive finite Å")
        steps = np.diff(np.log(rw))
        if np.any(steps <= 0) or np.ptp(steps) > 1e-6 * steps.mean() + 1e-12:
            raise ValueError("rest_wavelength must be log-uniform (constant step in ln λ)")
        if basis.ndim != 2 or basis.shape[1] != rw.size or basis.shape[0] < 1:
            raise ValueError(f"basis must be [K, {rw.size}], got {basis.shape}")
        if not np.all(np.isfinite(basis)):
            raise ValueError("basis holds NaN or inf")
        object.__setattr__(self, "rest_wavelength", rw)
        object.__setattr__(self, "basis", basis)

    @property
    def log_start(self) -> float:
        """ln of the first rest wavelength (Å)."""
        return float(np.log(self.rest_wavelength[0]))

    @property
    def dlog(self) -> float:
        """Step of the rest grid in ln λ."""
        rw = self.rest_wavelength
        return float(np.log(rw[-1] / rw[0]) / (rw.size - 1))

    @property
    def n_basis(self) -> int:
        """Columns of the design matrix: basis vectors plus the constant if any."""
        return self.basis.shape[0] + int(self.constant)

    def design_basis(self) -> np.ndarray:
        """[P, n_basis] float32: the basis as columns, with the constant column appended."""
        cols = self.basis.T
        if self.constant:
            cols = np.concatenate([cols, np.ones((cols.shape[0], 1), np.float32)], axis=1)
        return np.ascontiguousarray(cols, dtype=np.float32)

    def z_limits(self, wavelength) -> tuple[float, float]:
        """(z_lo, z_hi): the redshifts for which the rest grid covers every observed pixel."""
        wavelength = np.asarray(wavelength, dtype=np.float64)
        lo = wavelength[-1] / self.rest_wavelength[-1] - 1.0
        hi = wavelength[0] / self.rest_wavelength[0] - 1.0
        return float(lo), float(hi)

    def save(self, path: str | Path) -> Path:
        """Writes an .npz (arrays) with the report as JSON inside."""
        path = Path(path)
        np.savez(path, rest_wavelength=self.rest_wavelength, basis=self.basis,
                 constant=np.array(self.constant),
                 coverage=(self.coverage if self.coverage is not None else np.zeros(0)),
                 report=np.array(json.dumps(self.report)))
        return path if path.suffix == ".npz" else path.with_suffix(path.suffix + ".npz")

    @classmethod
    def load(cls, path: str | Path) -> "Templates":
        with np.load(path) as z:
            cov = z["coverage"]
            return cls(rest_wavelength=z["rest_wavelength"], basis=z["basis"],
                       constant=bool(z["constant"]), coverage=cov if cov.size else None,
                       report=json.loads(str(z["report"])))


def _rest_frame(f, w, wavelength, z, log_grid, chunk: int = 256):
    """Moves spectra to the rest frame on ``log_grid`` (ln Å, [P]).

    Returns x, wx [N, P] float32: linearly interpolated flux and weights (0 where a rest pixel is
    not covered or touches an invalid observed pixel).
    """
    n, length = f.shape
    u = np.log(wavelength)
    # Width of each observed pixel in ln λ: a rest pixel of width dlog carries dlog/du of it.
    du = np.gradient(u)
    dlog = (log_grid[-1] - log_grid[0]) / (log_grid.size - 1)
    x = np.zeros((n, log_grid.size), np.float32)
    wx = np.zeros((n, log_grid.size), np.float32)
    pix = np.arange(length, dtype=np.float64)
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        u_obs = log_grid[None, :] + np.log1p(z[sl])[:, None]         # [n, P] ln λ_obs
        inside = (u_obs >= u[0]) & (u_obs <= u[-1])
        t = np.interp(u_obs, u, pix)                                  # fractional obs index
        i0 = np.clip(np.floor(t).astype(np.int64), 0, length - 2)
        fr = t - i0
        rows = np.arange(sl.stop - sl.start)[:, None]
        fs, ws = f[sl], w[sl]
        x_ = fs[rows, i0] * (1 - fr) + fs[rows, i0 + 1] * fr
        both = (ws[rows, i0] > 0) & ((ws[rows, i0 + 1] > 0) | (fr == 0))
        w_ = (ws[rows, i0] * (1 - fr) + ws[rows, i0 + 1] * fr) * (dlog / du[i0])
        ok = inside & both
        x[sl] = np.where(ok, x_, 0.0)
        wx[sl] = np.where(ok, w_, 0.0)
    return x, wx


@functools.partial(jax.jit, static_argnames=("n_iter",))
def _empca(r, w, v0, ridge, n_iter: int):
    """Weighted EM-PCA: components V [P, m] minimising Σ w (r − C Vᵀ)² (Bailey 2012).

    Args: r, w [N, P] (residuals from the mean, weights; 0 weight = no data), v0 [P, m] start,
      ridge: relative ridge of the per-pixel step. Returns (V [P, m] orthonormal, sorted by
      the variance of their coefficients, C [N, m], singular values [m]).
    """
    m = v0.shape[1]
    pi, pj = (jnp.asarray(a) for a in _pairs(m))
    wr = w * r

    def coefficients(v):
        a = w @ (v[:, pi] * v[:, pj])                         # [N, m(m+1)/2]
        c, _ = _cholesky_solve(a, wr @ v)
        return jnp.nan_to_num(c)

    diag = jnp.asarray([n for n, (i, j) in enumerate(zip(*_pairs(m))) if i == j])

    def components(c):
        a = w.T @ (c[:, pi] * c[:, pj])                       # [P, m(m+1)/2]
        lam = ridge * jnp.median(jnp.mean(a[:, diag], axis=1))
        # Ridge on the unscaled diagonal: pixels few spectra cover are pulled towards 0.
        a = a.at[:, diag].add(lam)
        v, _ = _cholesky_solve(a, wr.T @ c)
        return jnp.nan_to_num(v)

    def step(v, _):
        v = components(coefficients(v))
        q, _ = jnp.linalg.qr(v)
        return q, None

    v, _ = jax.lax.scan(step, v0, None, length=n_iter)
    c = coefficients(v)
    # Rotate within the subspace to the principal axes of the coefficients (order by variance).
    _, sv, vt = jnp.linalg.svd(c, full_matrices=False)
    v = v @ vt.T
    return v, c @ vt.T, sv


def fit_templates(flux, ivar, mask, wavelength, z, *, n_components: int = 6,
                  rest_grid=None, constant: bool = False, dlog: float = DEFAULT_DLOG,
                  min_coverage: int = 3, n_iter: int = 10, ridge: float = 1e-2,
                  seed: int = 0) -> Templates:
    """Fits a rest-frame PCA basis to training spectra of known redshift (module docstring).

    Args:
      flux, ivar, mask: [N, L] training spectra; wavelength: [L] Å shared grid.
      z: [N] known redshifts.
      n_components: basis vectors: the weighted mean plus ``n_components − 1`` components.
      rest_grid: [P] log-uniform rest wavelengths (Å); default: step ``dlog`` over
        λ_min/(1+z_max) … λ_max/(1+z_min), trimmed to pixels ≥ ``min_coverage`` spectra cover.
        An explicit grid is used as given and must be covered that well everywhere.
      constant: append a constant column at fit time (see :class:`Templates`).
      n_iter: EM-PCA iterations. ridge: relative ridge of the per-pixel EM step.
      seed: of the random starting components.

    Returns:
      :class:`Templates`.

    Raises:
      ValueError: bad shapes, non-finite or ≤ −1 redshifts, fewer usable spectra than
        ``n_components``, or an explicit ``rest_grid`` the training set does not cover.
    """
    f, w, wavelength = _clean(flux, ivar, mask, wavelength)
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    if z.shape != (f.shape[0],):
        raise ValueError(f"z must be [N] = [{f.shape[0]}], got {z.shape}")
    if not np.all(np.isfinite(z)) or np.any(z <= -1):
        raise ValueError("z must be finite and > −1 for every training spectrum")
    if n_components < 1:
        raise ValueError(f"n_components must be ≥ 1, got {n_components}")
    explicit = rest_grid is not None
    if explicit:
        grid = np.asarray(rest_grid, dtype=np.float64)
        Templates(grid, np.zeros((1, grid.size)))   # validates log-uniformity
        log_grid = np.log(grid)
    else:
        lo = np.log(wavelength[0]) - np.log1p(z.max())
        hi = np.log(wavelength[-1]) - np.log1p(z.min())
        log_grid = lo + dlog * np.arange(int(np.floor((hi - lo) / dlog)) + 1)

    x, wx = _rest_frame(f, w, wavelength, z, log_grid)

    # Normalise every spectrum on the rest range all of them cover.
    win_lo = np.log(wavelength[0]) - np.log1p(z.min())
    win_hi = np.log(wavelength[-1]) - np.log1p(z.max())
    common = win_hi - win_lo > 0.1 * (np.log(wavelength[-1]) - np.log(wavelength[0]))
    in_win = ((log_grid >= win_lo) & (log_grid <= win_hi)) if common else \
        np.ones(log_grid.size, bool)
    sw = (wx * in_win).sum(axis=1)
    norm = np.where(sw > 0, (wx * x * in_win).sum(axis=1) / np.maximum(sw, _TINY), 0.0)
    keep = norm > 0
    dropped = int((~keep).sum())
    x, wx, norm = x[keep], wx[keep], norm[keep]
    x = (x / norm[:, None]).astype(np.float32)
    wx = (wx * (norm ** 2)[:, None]).astype(np.float32)
    if x.shape[0] < n_components:
        raise ValueError(f"only {x.shape[0]} training spectra have a positive normalisation "
                         f"({dropped} dropped); need at least n_components={n_components}")

    coverage = (wx > 0).sum(axis=0)
    if explicit:
        if coverage.min() < min_coverage:
            ok = np.nonzero(coverage >= min_coverage)[0]
            rng = (f"{np.exp(log_grid[ok[0]]):.1f}–{np.exp(log_grid[ok[-1]]):.1f} Å"
                   if ok.size else "nowhere")
            raise ValueError(f"rest_grid is covered by fewer than {min_coverage} training "
                             f"spectra in places (covered well: {rng}); shrink it or add spectra")
    else:
        ok = np.nonzero(coverage >= min_coverage)[0]
        if ok.size < 3:
            raise ValueError(f"no rest-frame range is covered by {min_coverage} training spectra")
        sl = slice(ok[0], ok[-1] + 1)
        log_grid, x, wx, coverage = log_grid[sl], x[:, sl], wx[:, sl], coverage[sl]

    sw = wx.sum(axis=0)
    mean = np.where(sw > 0, (wx * x).sum(axis=0) / np.maximum(sw, _TINY), 0.0)
    r = np.where(wx > 0, x - mean[None, :], 0.0).astype(np.float32)
    chi2_mean = float((wx * r * r).sum())
    n_valid = int((wx > 0).sum())
    m = n_components - 1
    rows = [mean.astype(np.float32)]
    chi2_full = chi2_mean
    if m > 0:
        rng = np.random.default_rng(seed)
        v0 = np.linalg.qr(rng.standard_normal((log_grid.size, m)))[0].astype(np.float32)
        v, c, _ = _empca(jnp.asarray(r), jnp.asarray(wx), jnp.asarray(v0),
                         jnp.float32(ridge), n_iter=n_iter)
        v, c = np.asarray(v), np.asarray(c)
        resid = r - c @ v.T
        chi2_full = float((wx * resid * resid).sum())
        rows += [v[:, k] for k in range(m)]
    basis = np.stack(rows)
    basis /= np.sqrt(np.mean(basis ** 2, axis=1, keepdims=True)) + _TINY
    report = {"n_train": int(f.shape[0]), "n_used": int(x.shape[0]), "dropped_norm": dropped,
              "chi2_per_pixel_mean_only": chi2_mean / max(n_valid, 1),
              "chi2_per_pixel_full": chi2_full / max(n_valid, 1),
              "norm_window_A": ([float(np.exp(win_lo)), float(np.exp(win_hi))] if common
                                else None),
              "n_components": n_components, "dlog": float(np.diff(log_grid).mean())}
    return Templates(np.exp(log_grid), basis, constant=constant, coverage=coverage,
                     report=report)


# ==============================================================================================
# χ²(z)
# ==============================================================================================
def _interp_basis(basis_t: jax.Array, t: jax.Array) -> jax.Array:
    """basis_t [P, K] at fractional rest-grid indices t [...] → [..., K] (linear in ln λ)."""
    p = basis_t.shape[0]
    i0 = jnp.clip(jnp.floor(t), 0, p - 2).astype(jnp.int32)
    fr = jnp.clip(t - i0, 0.0, 1.0)[..., None]
    return basis_t[i0] * (1.0 - fr) + basis_t[i0 + 1] * fr


@functools.partial(jax.jit, static_argnames=("zc",))
def _scan_chi2(basis_t, t_obs, f, w, shifts, zc: int):
    """χ² [N, Z] of every spectrum at every trial shift (normal-equation form).

    basis_t [P, K]; t_obs [L] fractional rest-grid index of each observed pixel at z = 0;
    f, w [N, L]; shifts [Z] = ln(1+z)/dlog (Z a multiple of ``zc``, the z-chunk bounding memory).
    """
    k = basis_t.shape[1]
    pi, pj = (jnp.asarray(a) for a in _pairs(k))
    wf = w * f
    total = jnp.sum(wf * f, axis=1)                                   # [N]

    def chunk(sh):                                                    # sh [zc]
        m = _interp_basis(basis_t, t_obs[None, :] - sh[:, None])      # [zc, L, K]
        prod = m[..., pi] * m[..., pj]                                # [zc, L, Kp]
        b = jnp.einsum("nl,zlk->nzk", wf, m)
        a = jnp.einsum("nl,zlp->nzp", w, prod)
        _, quad = _cholesky_solve(a, b)
        chi2 = total[:, None] - quad                                  # [N, zc]
        return jnp.where(jnp.isfinite(chi2), chi2, jnp.inf)

    out = jax.lax.map(chunk, shifts.reshape(-1, zc))                  # [Z/zc, N, zc]
    return jnp.transpose(out, (1, 0, 2)).reshape(f.shape[0], -1)


@jax.jit
def _residual_chi2(basis_t, t_obs, f, w, shifts):
    """χ² [N, R] at per-spectrum shifts [N, R], from the residuals (precise near minima)."""
    k = basis_t.shape[1]
    pi, pj = (jnp.asarray(a) for a in _pairs(k))

    def one(sh):                                                      # sh [N]
        m = _interp_basis(basis_t, t_obs[None, :] - sh[:, None])      # [N, L, K]
        wm = w[..., None] * m
        a = jnp.einsum("nlk,nlj->nkj", wm, m)[:, pi, pj]
        b = jnp.einsum("nlk,nl->nk", wm, f)
        coef, _ = _cholesky_solve(a, b)
        r = f - jnp.einsum("nlk,nk->nl", m, coef)
        chi2 = jnp.sum(w * r * r, axis=1)
        return jnp.where(jnp.isfinite(chi2), chi2, jnp.inf)

    return jax.lax.map(one, shifts.T).T


def _prepare(templates: Templates, flux, ivar, mask, wavelength):
    """Cleaned float32 (f, w) and the fractional rest-grid index t_obs [L] of every pixel at z=0.

    χ² is unchanged by f → f/s, w → w·s²; with s = 1/sqrt(median valid ivar) per spectrum the
    weights are O(1) and the flux is in units of its noise, whatever the input units (flux in
    erg/s/cm²/Å with ivar ~ 1e34 would otherwise overflow float32 sums).
    """
    f, w, wavelength = _clean(flux, ivar, mask, wavelength)
    med = np.array([np.median(row[row > 0]) if np.any(row > 0) else 1.0 for row in w])
    f32 = (f * np.sqrt(med)[:, None]).astype(np.float32)
    w32 = (w / med[:, None]).astype(np.float32)
    t_obs = ((np.log(wavelength) - templates.log_start) / templates.dlog).astype(np.float32)
    return f32, w32, t_obs, wavelength


def _check_range(templates: Templates, wavelength, z_min: float, z_max: float) -> None:
    lo, hi = templates.z_limits(wavelength)
    if z_min < lo - 1e-9 or z_max > hi + 1e-9 or z_min >= z_max:
        raise ValueError(f"z range [{z_min}, {z_max}] needs rest wavelengths the templates do "
                         f"not cover: with this observed grid they support z in "
                         f"[{lo:.4f}, {hi:.4f}] (and z_min < z_max)")


def chi2_grid(templates: Templates, flux, ivar, mask, wavelength, z, *, exact: bool = True,
              chunk: int = 128, zc: int = 32) -> np.ndarray:
    """χ² of the best linear combination of the templates at each redshift in ``z``.

    Args:
      templates: :class:`Templates`. flux, ivar, mask: [N, L]. wavelength: [L] Å.
      z: [Z] trial redshifts (within ``templates.z_limits(wavelength)``).
      exact: True: χ² from the residuals of the fitted model (what :func:`fit_redshifts`
        reports; agrees with a float64 computation to ~1e-6). False: the fast normal-equation
        form of the coarse scan, χ² = Σwf² − bᵀA⁻¹b in float32, which is for locating minima:
        its absolute error grows with Σwf²/χ², i.e. with S/N (≈1e-5 relative at BGS-like
        S/N ≈ 2 per pixel, a few per cent at S/N ≈ 30).
      chunk: spectra per jitted call; zc: trial redshifts per matrix product (memory).

    Returns:
      [N, Z] float64 χ² (in the units of the input ivar; bad pixels excluded).
    """
    z = np.atleast_1d(np.asarray(z, dtype=np.float64))
    f, w, t_obs, wavelength = _prepare(templates, flux, ivar, mask, wavelength)
    _check_range(templates, wavelength, float(z.min()), float(z.max()) + 1e-12)
    shifts = np.log1p(z) / templates.dlog
    nz = z.size
    basis_t = jnp.asarray(templates.design_basis())
    out = np.zeros((f.shape[0], nz))
    if exact:
        for start, stop, fc, wc in _chunks(f, w, chunk):
            per = jnp.asarray(np.broadcast_to(shifts, (fc.shape[0], nz)), dtype=jnp.float32)
            c = _residual_chi2(basis_t, jnp.asarray(t_obs), fc, wc, per)
            out[start:stop] = np.asarray(c)[: stop - start]
        return out
    pad = (-nz) % zc
    shifts = np.concatenate([shifts, np.full(pad, shifts[-1])]).astype(np.float32)
    for start, stop, fc, wc in _chunks(f, w, chunk):
        c = _scan_chi2(basis_t, jnp.asarray(t_obs), fc, wc, jnp.asarray(shifts), zc=zc)
        out[start:stop] = np.asarray(c)[: stop - start, :nz]
    return out


def _chunks(f, w, chunk):
    """Yields (start, stop, f_chunk, w_chunk) with the last chunk zero-padded to ``chunk`` rows
    (zero weight: its χ² is 0 and is discarded), so every call has the same shape (one compile)."""
    n = f.shape[0]
    chunk = min(chunk, n) if n else chunk
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        fc, wc = f[start:stop], w[start:stop]
        if stop - start < chunk:
            padn = chunk - (stop - start)
            fc = np.concatenate([fc, np.zeros((padn, f.shape[1]), f.dtype)])
            wc = np.concatenate([wc, np.zeros((padn, f.shape[1]), w.dtype)])
        yield start, stop, jnp.asarray(fc), jnp.asarray(wc)


def _bin_pairs(f: np.ndarray, w: np.ndarray, t_obs: np.ndarray, n: int):
    """Merges ``n`` adjacent pixels by inverse-variance weighting (as a coadd would): returns
    f_b, w_b [N, ⌈L/n⌉] and the mean rest-grid position t_b [⌈L/n⌉] of each group."""
    if n == 1:
        return f, w, t_obs
    pad = (-f.shape[1]) % n
    if pad:  # zero-weight padding pixels continue the grid
        f = np.concatenate([f, np.zeros((f.shape[0], pad), f.dtype)], axis=1)
        w = np.concatenate([w, np.zeros((w.shape[0], pad), w.dtype)], axis=1)
        t_obs = np.concatenate([t_obs, t_obs[-1] + (t_obs[-1] - t_obs[-2]) * np.arange(1, pad + 1)])
    wf = w * f
    # Sums of n strided views: numpy reduces a trailing axis of length 2 far slower than it adds.
    wb = sum(w[:, i::n] for i in range(n))
    wfb = sum(wf[:, i::n] for i in range(n))
    fb = np.where(wb > 0, wfb / np.where(wb > 0, wb, 1), 0.0)
    return fb.astype(np.float32), wb.astype(np.float32), \
        t_obs.reshape(-1, n).mean(axis=1).astype(np.float32)


def _local_minima(c: np.ndarray) -> np.ndarray:
    """[N, Z] bool: points no higher than their neighbours (ends count against one neighbour)."""
    left = np.concatenate([np.full((c.shape[0], 1), np.inf), c[:, :-1]], axis=1)
    right = np.concatenate([c[:, 1:], np.full((c.shape[0], 1), np.inf)], axis=1)
    return (c <= left) & (c <= right)


def _candidates(c: np.ndarray, s: np.ndarray, n_cand: int, sep: float):
    """Up to ``n_cand`` lowest local minima of c [N, Z] on grid s [Z], each ≥ sep apart.

    Returns (s_cand [N, n_cand], ok [N, n_cand])."""
    masked = np.where(_local_minima(c), c, np.inf)
    rows = np.arange(c.shape[0])
    s_c, ok = np.zeros((c.shape[0], n_cand)), np.zeros((c.shape[0], n_cand), bool)
    for k in range(n_cand):
        j = np.argmin(masked, axis=1)
        ok[:, k] = np.isfinite(masked[rows, j])
        s_c[:, k] = s[j]
        masked = np.where(np.abs(s[None, :] - s[j][:, None]) < sep, np.inf, masked)
    return s_c, ok


def _refine_chunk(basis_t, t_obs_j, fc, wc, s_c, ok, s_lo: float, s_hi: float, dz_log: float,
                  half_window: int, inv: float):
    """Fine χ² scans around candidate shifts of one chunk of spectra (module docstring, step 3).

    Args:
      basis_t, t_obs_j: design basis [P, K] and observed pixels' rest-grid index [L] (jax).
      fc, wc: [B, L] float32 flux and weights of the chunk (jax).
      s_c: [B, C] candidate ln(1+z); ok: [B, C] bool (False = no candidate, χ² = +inf).
      s_lo, s_hi: the fitted ln(1+z) range (windows are clipped to it).
      dz_log: fine step; half_window: fine steps each side of a candidate (window 2h+1 points).
      inv: 1 / templates.dlog.

    Returns:
      (s_best [B, C], c_best [B, C] χ² (+inf where not ok), sigma_s [B, C] the 1σ error of
      ln(1+z) from the χ² curvature (NaN where the minimum is at a window edge or flat),
      at_edge [B, C] bool: the minimum is on the window's edge, so the true minimum may lie
      outside it).
    """
    offsets = dz_log * np.arange(-half_window, half_window + 1)                 # [F]
    s_f = np.clip(s_c[:, :, None] + offsets[None, None, :], s_lo, s_hi)         # [B, C, F]
    shp = s_f.shape
    cf = np.asarray(_residual_chi2(basis_t, t_obs_j, fc, wc,
                                   jnp.asarray(s_f.reshape(shp[0], -1) * inv,
                                               dtype=jnp.float32)),
                    dtype=np.float64).reshape(shp)
    j = np.argmin(cf, axis=2)                                                   # [B, C]
    jc = np.clip(j, 1, shp[2] - 2)
    take = lambda a, idx: np.take_along_axis(a, idx[..., None], axis=2)[..., 0]  # noqa: E731
    c_m, c_0, c_p = take(cf, jc - 1), take(cf, jc), take(cf, jc + 1)
    curv = c_m - 2 * c_0 + c_p
    interior = (curv > 0) & (j == jc)
    # Parabola vertex through three equally spaced points (spacing dz_log), at most one step
    # from the middle one; none when the minimum is on the window edge or flat.
    delta = np.where(interior, 0.5 * (c_m - c_p) / np.where(curv > 0, curv, 1), 0.0)
    delta = np.clip(delta, -1.0, 1.0)
    s_v = np.clip(take(s_f, jc) + delta * dz_log, s_lo, s_hi)
    cv = np.asarray(_residual_chi2(basis_t, t_obs_j, fc, wc,
                                   jnp.asarray(s_v * inv, dtype=jnp.float32)),
                    dtype=np.float64)
    c_grid, s_grid = take(cf, j), take(s_f, j)
    use_v = cv < c_grid
    s_best = np.where(use_v, s_v, s_grid)
    c_best = np.where(ok, np.where(use_v, cv, c_grid), np.inf)
    # χ²(s) ≈ χ²_min + (s − s0)² / σ² near the minimum: curv = 2 dz_log² / σ².
    sigma_s = np.where(interior, dz_log * np.sqrt(2.0 / np.where(curv > 0, curv, 1.0)), np.nan)
    return s_best, c_best, sigma_s, ~interior


def _best_of(s_best, c_best, sigma_s, s_lo: float, s_hi: float, dz_log: float):
    """Best candidate per spectrum: (s, χ², Δχ² to the second best, σ_s, at-range-limit)."""
    order = np.argsort(c_best, axis=1)
    r = np.arange(c_best.shape[0])
    b0 = order[:, 0]
    chi_best = c_best[r, b0]
    chi_2nd = c_best[r, order[:, 1]] if c_best.shape[1] > 1 else np.full(len(r), np.inf)
    s = s_best[r, b0]
    edge = (np.abs(s - s_lo) < 0.5 * dz_log) | (np.abs(s - s_hi) < 0.5 * dz_log)
    return s, chi_best, chi_2nd - chi_best, sigma_s[r, b0], edge


def _finish(out: dict) -> dict:
    """Redrock's ZWARN bits and χ² of spectra without data (shared by fit and refine)."""
    small = out["delta_chi2"] < SMALL_DELTA_CHI2
    out["zwarn"] |= np.where(small, ZWARN_SMALL_DELTA_CHI2, 0).astype(np.int32)
    nodata = out["npix"] == 0
    out["zwarn"] |= np.where(nodata, ZWARN_NODATA, 0).astype(np.int32)
    out["chi2"] = np.where(nodata, 0.0, out["chi2"])
    out["zerr"] = np.where(nodata, np.nan, out["zerr"])
    return out


def _empty_result(n: int, w: np.ndarray) -> dict[str, np.ndarray]:
    return {"z": np.zeros(n), "zerr": np.zeros(n), "chi2": np.zeros(n),
            "delta_chi2": np.zeros(n), "npix": (w > 0).sum(axis=1).astype(np.int64),
            "zwarn": np.zeros(n, np.int32)}


def _store(out: dict, start: int, stop: int, s, chi, dchi, sigma_s, edge) -> None:
    rows = stop - start
    z = np.expm1(s[:rows])
    out["z"][start:stop] = z
    out["zerr"][start:stop] = (1.0 + z) * sigma_s[:rows]
    out["chi2"][start:stop] = chi[:rows]
    out["delta_chi2"][start:stop] = dchi[:rows]
    out["zwarn"][start:stop] = (edge[:rows] * ZWARN_Z_FITLIMIT).astype(np.int32)


def fit_redshifts(templates: Templates, flux, ivar, mask, wavelength, *,
                  z_min: float | None = None, z_max: float | None = None,
                  dz_log: float = DEFAULT_DLOG, coarse: int = 4, n_candidates: int = 3,
                  min_separation_kms: float = 1000.0, coarse_bin: int = 2,
                  chunk: int = 128, zc: int = 32) -> dict[str, np.ndarray]:
    """Best-fit redshifts by χ² template fitting (coarse scan, then refinement; module docstring).

    Args:
      templates: :class:`Templates` (e.g. from :func:`fit_templates`).
      flux, ivar, mask: [N, L]; wavelength: [L] Å shared by all spectra.
      z_min, z_max: fitted range; default: what the templates cover on this grid
        (:meth:`Templates.z_limits`), with z_min ≥ 0.
      dz_log: fine step in ln(1+z) (1e-4 ≈ 30 km/s); the coarse scan uses ``coarse × dz_log``.
      n_candidates: minima of the coarse scan refined; min_separation_kms: their minimum
        separation (c·Δln(1+z)).
      coarse_bin: the coarse scan runs on groups of this many adjacent pixels merged by
        inverse-variance weighting (1.6 Å for the DESI grid at 2, still below the width of any
        line: σ_instrument ≳ 0.7 Å); refinement always uses the full-resolution pixels.
      chunk: spectra per jitted call (memory ∝ chunk); zc: trial redshifts per matrix product.

    Returns:
      dict of [N] arrays: "z" (float64), "zerr" (1σ from the χ² curvature at the minimum,
      (1+z)·σ_ln(1+z); NaN when the minimum is not bracketed), "chi2" (best χ², float64),
      "delta_chi2" (second-best candidate's χ² − best; +inf if none), "npix" (valid pixels),
      "zwarn" (int32, Redrock bits 4 SMALL_DELTA_CHI2, 32 Z_FITLIMIT, 512 NODATA).

    Raises:
      ValueError: bad shapes, or a z range the templates do not cover on this grid.
    """
    if dz_log <= 0 or coarse < 1 or n_candidates < 1 or coarse_bin < 1:
        raise ValueError("dz_log must be > 0; coarse, coarse_bin and n_candidates ≥ 1")
    f, w, t_obs, wavelength = _prepare(templates, flux, ivar, mask, wavelength)
    lo, hi = templates.z_limits(wavelength)
    z_min = max(lo, 0.0) if z_min is None else float(z_min)
    z_max = hi if z_max is None else float(z_max)
    _check_range(templates, wavelength, z_min, z_max)
    s_lo, s_hi = math.log1p(z_min), math.log1p(z_max)
    step = coarse * dz_log
    n_coarse = int(math.floor((s_hi - s_lo) / step)) + 1
    s_coarse = s_lo + step * np.arange(n_coarse)
    if s_coarse[-1] < s_hi - 1e-12:        # the far end is always tried
        s_coarse = np.append(s_coarse, s_hi)
    nz = s_coarse.size
    pad = (-nz) % zc
    inv = 1.0 / templates.dlog
    coarse_shifts = jnp.asarray(np.concatenate([s_coarse, np.full(pad, s_coarse[-1])]) * inv,
                                dtype=jnp.float32)
    basis_t = jnp.asarray(templates.design_basis())
    t_obs_j = jnp.asarray(t_obs)
    fb_all, wb_all, t_b = _bin_pairs(f, w, t_obs, coarse_bin)
    t_b_j = jnp.asarray(t_b)
    sep = min_separation_kms / C_KMS

    out = _empty_result(f.shape[0], w)
    binned = _chunks(fb_all, wb_all, chunk)
    for start, stop, fc, wc in _chunks(f, w, chunk):
        _, _, fbc, wbc = next(binned)
        c = np.asarray(_scan_chi2(basis_t, t_b_j, fbc, wbc, coarse_shifts, zc=zc))[:, :nz]
        s_c, ok = _candidates(c.astype(np.float64), s_coarse, n_candidates, sep)
        # Fine scan over ±1 coarse step around every candidate, from the residuals.
        refined = _refine_chunk(basis_t, t_obs_j, fc, wc, s_c, ok, s_lo, s_hi, dz_log,
                                coarse, inv)
        _store(out, start, stop, *_best_of(*refined[:3], s_lo, s_hi, dz_log))
    return _finish(out)


def _rows_chi2(basis_t, t_obs_j, f: np.ndarray, w: np.ndarray, rows: np.ndarray,
               shifts: np.ndarray, chunk: int) -> np.ndarray:
    """Residual-form χ² [P, R] of the spectra ``rows`` [P] of f, w [N, L] at ``shifts`` [P, R]
    (ln(1+z) / templates.dlog), in jitted calls of ``chunk`` rows, the remainder in a call of
    the next power of two ≥ :data:`_SMALL_CALL` rows: at most four compiled shapes per (L, R)
    and at most half of a small call padded, where the walking windows' calls are small and
    uneven. Padding rows have zero weight (χ² 0, discarded)."""
    p, r = shifts.shape
    out = np.empty((p, r))
    start = 0
    while start < p:
        left = p - start
        size = min(chunk, max(_SMALL_CALL, 1 << (left - 1).bit_length()))
        take = min(size, left)
        idx = rows[start:start + take]
        fc = np.zeros((size, f.shape[1]), np.float32)
        wc = np.zeros((size, f.shape[1]), np.float32)
        fc[:take], wc[:take] = f[idx], w[idx]
        sh = np.repeat(shifts[start:start + 1], size, axis=0).astype(np.float32)
        sh[:take] = shifts[start:start + take]
        c = _residual_chi2(basis_t, t_obs_j, jnp.asarray(fc), jnp.asarray(wc), jnp.asarray(sh))
        out[start:start + take] = np.asarray(c, np.float64)[:take]
        start += take
    return out


def refine_redshifts(templates: Templates, flux, ivar, mask, wavelength, z_candidates,
                     candidate_ok=None, *, dz_log: float = DEFAULT_DLOG, half_window: int = 1,
                     max_walks: int = 7, pixel_bin: int = 2, chunk: int = 128,
                     candidate_penalty=None, max_penalty: float = np.inf
                     ) -> dict[str, np.ndarray]:
    """χ² refinement of GIVEN candidate redshifts over narrow windows only (no full-grid scan).

    The candidates typically come from a learned model (:func:`spectrax.redshift.refine`), each
    within a step or two of its χ² minimum, so the search is local and cheap:

    1. Candidates whose ``candidate_penalty`` (the learned prior) exceeds the row's lowest by
       more than ``max_penalty`` are not refined (a learned model's runner-ups are mostly
       negligible; this is most of the saving).
    2. Around each remaining candidate χ² is evaluated at ``2·half_window + 1`` trial redshifts
       ``dz_log`` apart, on groups of ``pixel_bin`` adjacent pixels merged by inverse-variance
       weighting (as the full fit's coarse scan; 1.6 Å groups on the DESI grid are narrower
       than any line, and Δχ² between nearby redshifts barely changes), from the residuals.
    3. Where the window's lowest point is on its edge (and not at the templates' range limit),
       the window walks ``half_window`` steps that way (only the new points are evaluated), at
       most ``max_walks`` times, so a candidate up to ``half_window·(1 + max_walks)`` steps off
       (default 8, ±240 km/s) still finds its minimum, at the cost of a wide window only where
       one is needed.
    4. A parabola through the lowest point and its neighbours gives the sub-step redshift, its
       χ² and the 1σ error from the curvature (as :func:`fit_redshifts`' refinement).
    5. The candidate with the lowest χ² + penalty wins; its χ² (CHI2) is then evaluated once
       on the full-resolution pixels at its redshift.

    Args:
      templates: :class:`Templates`. flux, ivar, mask: [N, L]; wavelength: [L] Å.
      z_candidates: [N, C] candidate redshifts (any order); candidate_ok: [N, C] bool (False =
        ignore this candidate; default: all finite candidates). Candidates outside the
        templates' range on this grid (:meth:`Templates.z_limits`) are clipped into it and get
        Z_FITLIMIT if they win at its edge.
      dz_log, half_window: the window's step in ln(1+z) and half width in steps.
      max_walks: steps of ``half_window`` a window whose minimum is on its edge may walk
        (0: fixed windows).
      pixel_bin: adjacent pixels merged for the window scans (1: full resolution).
      chunk: rows per jitted call.
      candidate_penalty: [N, C] added to each candidate's χ² when choosing the winner (a prior,
        e.g. −2 ln of a learned model's probability of the candidate relative to its best, as
        Redrock adds its priors to χ²); the reported "chi2" stays the winner's own χ², the
        reported "delta_chi2" is the penalised difference. None: χ² alone decides.
      max_penalty: step 1's threshold (needs ``candidate_penalty``; inf: refine every
        candidate). An unrefined candidate still counts for "delta_chi2", by its penalty alone
        (its χ² taken equal to the winner's): the learned model's equivalent of Δχ².

    Returns:
      dict of [N] arrays as :func:`fit_redshifts` ("z", "zerr" from the binned χ² curvature,
      "chi2" full-resolution χ² of the winner, "delta_chi2" = second best candidate's
      χ² + penalty − the winner's (+inf with one candidate), "npix", "zwarn" with
      SMALL_DELTA_CHI2, Z_FITLIMIT (at the templates' range limit), NODATA, and BAD_MINFIT
      (1024) when the winning minimum is still on its window's edge after the walks, i.e. the
      χ² minimum was not bracketed), plus "window_edge" [N] bool (the same condition).

    Raises:
      ValueError: bad shapes, or no candidate column.
    """
    if dz_log <= 0 or half_window < 1 or max_walks < 0 or pixel_bin < 1:
        raise ValueError("dz_log must be > 0, half_window ≥ 1, max_walks ≥ 0, pixel_bin ≥ 1")
    f, w, t_obs, wavelength = _prepare(templates, flux, ivar, mask, wavelength)
    z_candidates = np.asarray(z_candidates, dtype=np.float64)
    if z_candidates.ndim != 2 or z_candidates.shape[0] != f.shape[0] \
            or z_candidates.shape[1] < 1:
        raise ValueError(f"z_candidates must be [N, C] = [{f.shape[0]}, ≥1], got "
                         f"{z_candidates.shape}")
    ok = np.isfinite(z_candidates) & (z_candidates > -1)
    if candidate_ok is not None:
        ok &= np.asarray(candidate_ok, bool)
    penalty = np.zeros(z_candidates.shape) if candidate_penalty is None else np.nan_to_num(
        np.asarray(candidate_penalty, np.float64), nan=0.0, posinf=0.0)
    if penalty.shape != z_candidates.shape:
        raise ValueError(f"candidate_penalty must be {z_candidates.shape}, got {penalty.shape}")
    lo, hi = templates.z_limits(wavelength)
    s_lo, s_hi = math.log1p(max(lo, 0.0)), math.log1p(hi)
    s_all = np.clip(np.log1p(np.where(ok, z_candidates, 0.0)), s_lo, s_hi)
    basis_t = jnp.asarray(templates.design_basis())
    inv = 1.0 / templates.dlog
    fb, wb, t_b = _bin_pairs(f, w, t_obs, pixel_bin)
    t_b_j = jnp.asarray(t_b)
    n, n_cand = z_candidates.shape

    # 1. The (spectrum, candidate) pairs worth a χ² scan.
    pen_ok = np.where(ok, penalty, np.inf)
    lowest = np.min(pen_ok, axis=1, keepdims=True)
    active = ok & (pen_ok <= lowest + max_penalty)
    rows, cols = np.nonzero(active)
    offsets = dz_log * np.arange(-half_window, half_window + 1)                  # [F]

    def scan(pairs: np.ndarray, centres: np.ndarray, steps: np.ndarray):
        """(ln(1+z) [p, S], binned χ² [p, S]) of ``pairs`` at ``centres`` [p] + ``steps`` [S]."""
        s = np.clip(centres[:, None] + steps[None, :], s_lo, s_hi)
        return s, _rows_chi2(basis_t, t_b_j, fb, wb, rows[pairs], s * inv, chunk)

    # 2–3. Windows, walking downhill where the lowest point is on an edge: a walk drops the
    # window's far ``half_window`` points and evaluates as many new ones beyond the low edge.
    s_win, c_win = scan(np.arange(rows.size), s_all[rows, cols], offsets)
    for _ in range(max_walks):
        j = np.argmin(c_win, axis=1)
        low = np.nonzero((j == 0) & (s_win[:, 0] > s_lo + 0.5 * dz_log))[0]
        high = np.nonzero((j == 2 * half_window) & (s_win[:, -1] < s_hi - 0.5 * dz_log))[0]
        if low.size == 0 and high.size == 0:
            break
        h = half_window
        for move, side in ((low, -1), (high, 1)):
            if move.size == 0:
                continue
            edge = s_win[move, 0 if side < 0 else -1]
            s_new, c_new = scan(move, edge, side * dz_log * np.arange(1, h + 1))
            if side < 0:   # new points are below the window, nearest first
                s_win[move] = np.concatenate([s_new[:, ::-1], s_win[move, :-h]], axis=1)
                c_win[move] = np.concatenate([c_new[:, ::-1], c_win[move, :-h]], axis=1)
            else:
                s_win[move] = np.concatenate([s_win[move, h:], s_new], axis=1)
                c_win[move] = np.concatenate([c_win[move, h:], c_new], axis=1)

    # 4. Parabola through the lowest point and its neighbours (none on an edge or where flat).
    r = np.arange(rows.size)
    j = np.argmin(c_win, axis=1)
    jc = np.clip(j, 1, 2 * half_window - 1)
    c_m, c_0, c_p = c_win[r, jc - 1], c_win[r, jc], c_win[r, jc + 1]
    curv = c_m - 2 * c_0 + c_p
    interior = (curv > 0) & (j == jc)
    safe = np.where(curv > 0, curv, 1.0)
    delta = np.where(interior, np.clip(0.5 * (c_m - c_p) / safe, -1.0, 1.0), 0.0)
    s_pair = np.where(interior, np.clip(s_win[r, jc] + delta * dz_log, s_lo, s_hi), s_win[r, j])
    c_pair = np.where(interior, c_0 - 0.5 * curv * delta ** 2, c_win[r, j])
    # χ²(s) ≈ χ²_min + (s − s0)² / σ² near the minimum: curv = 2 dz_log² / σ².
    sigma_pair = np.where(interior, dz_log * np.sqrt(2.0 / safe), np.nan)

    # 5. The winner per spectrum, Δχ² to the runner-up, the winner's full-resolution χ².
    score = np.full((n, n_cand), np.inf)
    score[rows, cols] = c_pair + penalty[rows, cols]
    pair_of = np.full((n, n_cand), -1)
    pair_of[rows, cols] = r
    b0 = np.argmin(score, axis=1)
    has = active.any(axis=1)
    best = score[np.arange(n), b0]
    runner = np.partition(score, 1, axis=1)[:, 1] if n_cand > 1 else np.full(n, np.inf)
    skipped = np.where(ok & ~active, pen_ok, np.inf).min(axis=1) - penalty[np.arange(n), b0]
    out = _empty_result(n, w)
    out["delta_chi2"] = np.where(has, np.minimum(runner - best, skipped), np.inf)
    win = pair_of[np.arange(n), b0][has]
    s = np.full(n, s_lo)
    s[has] = s_pair[win]
    z = np.expm1(s)
    out["z"] = np.where(has, z, np.nan)
    sigma = np.full(n, np.nan)
    sigma[has] = sigma_pair[win]
    out["zerr"] = (1.0 + z) * sigma
    idx = np.nonzero(has)[0]
    if idx.size:
        out["chi2"][idx] = _rows_chi2(basis_t, jnp.asarray(t_obs), f, w, idx,
                                      (s[idx] * inv)[:, None], chunk)[:, 0]
    edge = (np.abs(s - s_lo) < 0.5 * dz_log) | (np.abs(s - s_hi) < 0.5 * dz_log)
    out["zwarn"] = np.where(has & edge, ZWARN_Z_FITLIMIT, 0).astype(np.int32)
    out["window_edge"] = np.zeros(n, bool)
    out["window_edge"][idx] = ~interior[win]
    # A minimum on the window's edge that is not the range limit: the parabola found no minimum.
    bad_min = out["window_edge"] & ((out["zwarn"] & ZWARN_Z_FITLIMIT) == 0) & (out["npix"] > 0)
    out["zwarn"] |= np.where(bad_min, ZWARN_BAD_MINFIT, 0).astype(np.int32)
    out = _finish(out)
    out["z"] = np.where(has, out["z"], np.nan)
    return out


# ==============================================================================================
# Command line: templates from a train split, metrics and throughput on a test split
# ==============================================================================================
def load_split(directory: str | Path, split: str, limit: int | None = None
               ) -> dict[str, np.ndarray]:
    """Reads up to ``limit`` records of a shard split into arrays (flux, ivar, mask, z, id,
    wavelength). Records must share the manifest grid (or carry identical wavelengths); the
    first label is the redshift."""
    from spectrax.data import shards

    manifest = shards.read_manifest(directory)
    if "z" not in manifest.label_names:
        raise ValueError(f"{directory}: labels {manifest.label_names} have no 'z'")
    zi = manifest.label_names.index("z")
    grid = manifest.grid_array()
    rows = {"flux": [], "ivar": [], "mask": [], "z": [], "id": []}
    for rec in shards.iter_records(directory, split):
        if limit is not None and len(rows["z"]) >= limit:
            break
        wl = rec.get("wavelength")
        if grid is None:
            grid = np.asarray(wl, np.float64)
        elif wl is not None and (len(wl) != len(grid) or not np.allclose(wl, grid)):
            raise ValueError(f"{directory}: record {rec['id']} has its own wavelength grid; "
                             "the template fit needs one shared grid (resample first)")
        for k in ("flux", "ivar", "mask"):
            rows[k].append(rec[k])
        rows["z"].append(float(rec["labels"][zi]))
        rows["id"].append(int(rec["id"]))
    if not rows["z"]:
        raise ValueError(f"{directory}: split '{split}' is empty")
    out = {k: np.stack(v) if k in ("flux", "ivar", "mask") else np.asarray(v)
           for k, v in rows.items()}
    out["wavelength"] = np.asarray(grid, np.float64)
    good = np.isfinite(out["z"])   # unknown redshifts (NaN labels) cannot train or be scored
    return {k: (v[good] if k != "wavelength" else v) for k, v in out.items()}


def simulated_split(n: int, seed: int, sample: str = "bgs") -> dict[str, np.ndarray]:
    """``n`` simulated DESI spectra (spectrax.data.synthetic) as arrays, with the grid."""
    from spectrax.data import grids, synthetic

    sim = synthetic.simulate_desi_galaxies(n, sample, seed)
    return {"flux": sim["flux"], "ivar": sim["ivar"], "mask": sim["mask"], "z": sim["z"],
            "id": sim["id"], "wavelength": grids.desi_wavelength()}


def timed_fit(templates: Templates, test: dict, **kwargs) -> tuple[dict, float, float]:
    """Runs :func:`fit_redshifts` twice on the first chunk (compile, excluded) and then on all
    of ``test``. Returns (result, seconds of the timed run, compile seconds). The result is
    host numpy, so the timing includes every device computation (nothing left in flight)."""
    chunk = kwargs.get("chunk", 128)
    warm = slice(0, min(chunk, len(test["z"])))
    t0 = time.perf_counter()
    fit_redshifts(templates, test["flux"][warm], test["ivar"][warm], test["mask"][warm],
                  test["wavelength"], **kwargs)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = fit_redshifts(templates, test["flux"], test["ivar"], test["mask"], test["wavelength"],
                        **kwargs)
    jax.block_until_ready(jnp.zeros(()))
    return res, time.perf_counter() - t0, compile_s


def main(argv) -> None:
    from absl import flags

    from spectrax import metrics

    FLAGS = flags.FLAGS
    del argv
    if FLAGS.data:
        train = load_split(FLAGS.data, "train", FLAGS.n_train)
        test = load_split(FLAGS.data, FLAGS.split, FLAGS.n_test)
        source = f"{FLAGS.data} (train / {FLAGS.split})"
    else:
        train = simulated_split(FLAGS.n_train, FLAGS.seed, FLAGS.sample)
        test = simulated_split(FLAGS.n_test, FLAGS.seed + 1, FLAGS.sample)
        source = f"simulated {FLAGS.sample} (train seed {FLAGS.seed}, test seed {FLAGS.seed + 1})"
    t0 = time.perf_counter()
    templates = fit_templates(train["flux"], train["ivar"], train["mask"], train["wavelength"],
                              train["z"], n_components=FLAGS.n_components,
                              constant=FLAGS.constant)
    t_templates = time.perf_counter() - t0
    lo, hi = templates.z_limits(test["wavelength"])
    res, secs, compile_s = timed_fit(templates, test, dz_log=FLAGS.dz_log, coarse=FLAGS.coarse,
                                     coarse_bin=FLAGS.coarse_bin, chunk=FLAGS.chunk)
    z_true, z_pred = test["z"], res["z"]
    summary = {"source": source, "n_train": int(len(train["z"])), "n_test": int(len(z_true)),
               "n_components": FLAGS.n_components, "z_range": [round(max(lo, 0), 4),
                                                               round(hi, 4)],
               "nmad": metrics.nmad(z_true, z_pred),
               "eta": metrics.outlier_fraction(z_true, z_pred),
               "small_delta_chi2_fraction": float(np.mean(res["delta_chi2"] < SMALL_DELTA_CHI2)),
               "spectra_per_s": len(z_true) / secs, "fit_seconds": secs,
               "warmup_seconds": compile_s, "template_seconds": t_templates,
               "platform": jax.devices()[0].platform}
    print(json.dumps(summary, indent=2))


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("data", "", "Shard directory (train split → templates, --split → "
                        "test); empty = simulated DESI spectra.")
    flags.DEFINE_string("split", "test", "Split scored when --data is given.")
    flags.DEFINE_enum("sample", "bgs", ["bgs", "elg"], "Simulated sample (no --data).")
    flags.DEFINE_integer("seed", 0, "Seed of the simulated train set (test uses seed + 1).")
    flags.DEFINE_integer("n_train", 2000, "Training spectra for the templates.")
    flags.DEFINE_integer("n_test", 500, "Test spectra fitted.")
    flags.DEFINE_integer("n_components", 6, "Basis vectors (mean + n−1 components).")
    flags.DEFINE_bool("constant", False, "Add a constant column to the design matrix.")
    flags.DEFINE_float("dz_log", DEFAULT_DLOG, "Fine step in ln(1+z).")
    flags.DEFINE_integer("coarse", 4, "Coarse step = coarse × dz_log.")
    flags.DEFINE_integer("coarse_bin", 2, "Pixels merged for the coarse scan.")
    flags.DEFINE_integer("chunk", 128, "Spectra per jitted call.")


if __name__ == "__main__":
    runtime.configure()  # XLA:CPU flag and log levels, before any computation
    from absl import app

    _define_flags()
    app.run(main)
