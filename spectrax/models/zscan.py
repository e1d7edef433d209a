r"""ZScan: redshifts as a learned matched filter, a score for every trial redshift.

On a grid uniform in ln λ a redshift is a pure shift: λ_obs = λ_rest (1 + z) moves every
feature by ln(1 + z). ZScan uses that symmetry instead of asking a network to discover it:

1. **Log-λ resampling** (:func:`log_rebin`): the spectrum (any increasing grid; padding has
   λ ≤ 0) is rebinned onto ``ln λ = ln(wave_min) + j·dlog`` by inverse-variance weighting of
   the native pixels each log bin overlaps (weights = ivar × the overlapped fraction of the
   native pixel, so each observed pixel's information is counted once). A bin no valid pixel
   overlaps is masked.
2. **Observed-frame features** (translation-equivariant convolutions): per log bin, signal-to-
   noise channels that need no flux normalisation (f·√w, its high-passed version, asinh of it,
   the relative noise level √w / mean √w, and the valid mask), then ``conv_kernel``-wide and
   pointwise convolutions to ``filters`` feature channels g_c. Optionally a learned per-pixel
   gain in the observed frame (``observed_gain``): sky lines, camera overlaps and the
   dichroics sit at fixed observed wavelengths, which the convolution alone cannot know.
3. **Learned rest-frame filter bank**: ``filters`` templates T_c on a rest grid of the same
   step, long enough to cover the observed range at every scanned redshift. The score of
   channel c at trial shift s is the cross-correlation Σ_j g_c(j) T_c(j + s), computed for all
   shifts at once by FFT (O(P log P) per channel instead of O(P · shifts)): the same sum the
   χ² template fit evaluates (its bᵀA⁻¹b term) with learned features and templates.
4. **Per-shift head**: a pointwise MLP over the channels turns the [filters] scores of each
   trial shift into its logit, so lines can be combined non-linearly ("Hα and [NII] and
   [OIII] at the same shift"), and (``sub_bin``) into the offset of the redshift within the
   bin and its width: the distribution is a mixture of one Gaussian per bin, resolving the
   redshift far below the bin width (60 km/s) as the matched filter's S/N allows. Optionally
   a learned log-prior over the redshifts of the trained range (``prior``; constant beyond its
   ends, so bins outside the trained range are not pushed down by the training and an
   out-of-range galaxy can still win and be flagged).

The output is [B, M, 3] (logit, offset, ln σ per bin; [B, M] logits without ``sub_bin``) over
M bins of ln(1+z): bin i is centred on ``ln(1+z) = (s_lo + i)·dlog``
(:attr:`ZScan.ln1pz_grid`). The redshift task trains it by the likelihood of the true redshift
and reads z, its uncertainty, a χ²-like confidence and candidate redshifts off the
distribution (:mod:`spectrax.redshift`).

Inputs: ``flux`` [B, L] (any flux unit; not median-normalised, the model takes raw spectra),
``ivar`` [B, L] (1/flux², 0 = no information), ``mask`` [B, L] bool (True = valid),
``wavelength`` [B, L] float32 vacuum Å (≤ 0 on padding). Bad pixels (mask False, ivar ≤ 0,
non-finite flux or ivar) never reach arithmetic.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectrax.redshift import CALIBRATION_FEATURES, CALIBRATION_SCALE

C_KMS = 299_792.458
MIN_OVERLAP = 3e-3   # overlap fractions below this are float32 rounding of pixel edges
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ZScanConfig:
    """Every size of a ZScan model.

    Attributes:
      dlog: step of the log-λ grid and of the redshift bins in ln(1+z) (2e-4 = 60 km/s).
      wave_min, wave_max: observed range (Å, vacuum) put on the log grid; pixels outside it are
        ignored. DESI: 3600–9824 Å.
      z_min, z_max: redshifts scanned (the output bins). Keep a margin beyond the trained range so
        that a galaxy outside it can be recognised as such instead of being mapped into it.
      prior_z_range: redshift range of the learned log-prior (the trained range), used only with
        ``prior``.
      conv_width: channels of the observed-frame convolutions.
      conv_kernel: width (log bins) of the first convolution; conv_kernel2 of the second.
      filters: feature channels = learned rest-frame templates.
      head_width: hidden width of the per-shift MLP.
      highpass_dlog: half width, in ln λ, of the running mean subtracted for the high-passed
        channels (0.005 ≈ ±20 Å at 4000 Å: wider than any line, narrower than the continuum).
      max_overlap: native pixels one log bin can overlap (the rebinning looks at this many);
        must be ≥ ceil(dlog·λ / Δλ_native) + 1 everywhere (DESI at 2e-4: 3).
      observed_gain: learned per-observed-bin gain of the first convolution's output.
      prior: learned log-prior over the redshift bins of ``prior_z_range``.
      sub_bin: the head also gives, per bin, the redshift's offset from the bin centre and its
        width (a mixture of Gaussians, one per bin: sub-bin precision and a per-spectrum
        uncertainty, trained by the mixture's likelihood); else logits only.
      template_init_std: standard deviation of the templates' random initialisation.
      dtype: compute dtype of the convolutions and the head; the rebinning, the FFT correlation
        and the logits are float32.
    """

    dlog: float = 2e-4
    wave_min: float = 3600.0
    wave_max: float = 9824.0
    z_min: float = 0.0
    z_max: float = 0.7
    prior_z_range: tuple[float, float] = (0.02, 0.6)
    conv_width: int = 16
    conv_kernel: int = 9
    conv_kernel2: int = 1
    filters: int = 16
    head_width: int = 64
    highpass_dlog: float = 0.005
    max_overlap: int = 4
    observed_gain: bool = False
    prior: bool = False
    sub_bin: bool = True
    template_init_std: float = 0.02
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} unknown; use one of {COMPUTE_DTYPES}")
        if not 0 < self.wave_min < self.wave_max:
            raise ValueError(f"need 0 < wave_min < wave_max, got {self.wave_min}, "
                             f"{self.wave_max}")
        if not -1 < self.z_min < self.z_max:
            raise ValueError(f"need -1 < z_min < z_max, got {self.z_min}, {self.z_max}")
        if self.dlog <= 0 or self.dlog > 0.01:
            raise ValueError(f"dlog must be in (0, 0.01], got {self.dlog}")
        lo, hi = self.prior_z_range
        if self.prior and not (self.z_min <= lo < hi <= self.z_max):
            raise ValueError(f"prior_z_range {self.prior_z_range} must lie inside "
                             f"[z_min, z_max] = [{self.z_min}, {self.z_max}]")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def num_log_pixels(self) -> int:
        """N: log bins covering [wave_min, wave_max]."""
        return int(math.floor(math.log(self.wave_max / self.wave_min) / self.dlog)) + 1

    @property
    def shift_range(self) -> tuple[int, int]:
        """(s_lo, s_hi): first and last redshift bin in units of dlog (ln(1+z) = s·dlog)."""
        return (int(math.floor(math.log1p(self.z_min) / self.dlog)),
                int(math.ceil(math.log1p(self.z_max) / self.dlog)))

    @property
    def num_bins(self) -> int:
        """M: redshift bins."""
        s_lo, s_hi = self.shift_range
        return s_hi - s_lo + 1

    @property
    def template_length(self) -> int:
        """P = N + M − 1 rest-frame pixels: the observed range at every scanned shift."""
        return self.num_log_pixels + self.num_bins - 1

    @property
    def fft_length(self) -> int:
        """FFT size: P rounded up to a power of two (no circular wrap-around: P ≥ N + M − 1)."""
        return 1 << (self.template_length - 1).bit_length()

    def ln1pz_grid(self) -> np.ndarray:
        """[M] float64: ln(1+z) at the centre of every output bin, ascending."""
        s_lo, _ = self.shift_range
        return (s_lo + np.arange(self.num_bins)) * self.dlog

    def rest_wavelength(self) -> np.ndarray:
        """[P] float64 Å: the rest-frame wavelength of every template pixel."""
        _, s_hi = self.shift_range
        return np.exp(math.log(self.wave_min) + (np.arange(self.template_length) - s_hi)
                      * self.dlog)

    def prior_bins(self) -> tuple[int, int]:
        """(first, last) output bins of ``prior_z_range`` (clipped to the grid)."""
        s_lo, _ = self.shift_range
        lo, hi = self.prior_z_range
        first = int(round(math.log1p(lo) / self.dlog)) - s_lo
        last = int(round(math.log1p(hi) / self.dlog)) - s_lo
        return max(first, 0), min(last, self.num_bins - 1)


VARIANTS: dict[str, ZScanConfig] = {
    # CPU default (the quick start): 60 km/s bins, 16 channels and templates.
    "small": ZScanConfig(),
    # Wider observed-frame features and more templates, for the ≤ 45-min configs.
    "base": ZScanConfig(conv_width=32, conv_kernel2=5, filters=32),
    # The proposer of the learned + χ² refinement mode: 120 km/s bins and narrower channels,
    # 2.6× faster than ``small`` (0.65 vs 1.7 ms per spectrum on 2 CPU cores, batch 128); the χ²
    # refinement, not the bins, sets the precision. A log bin spans up to 4.9 DESI pixels.
    "fast": ZScanConfig(dlog=4e-4, max_overlap=6, conv_width=12, filters=12, head_width=32),
    # Toy width for tests.
    "tiny": ZScanConfig(conv_width=4, conv_kernel=5, filters=4, head_width=8),
}


def zscan_config(variant: str, sample: str | None = None, **overrides) -> ZScanConfig:
    """The named variant, with the scan range of a simulated DESI ``sample`` ('bgs': z 0–0.7
    around the trained 0.02–0.6; 'elg': z 0.5–1.7 around 0.6–1.6) and fields overridden."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ZScan variant {variant!r}; known: {sorted(VARIANTS)}")
    ranges = {None: {}, "bgs": dict(z_min=0.0, z_max=0.7, prior_z_range=(0.02, 0.6)),
              "elg": dict(z_min=0.5, z_max=1.7, prior_z_range=(0.6, 1.6))}
    if sample not in ranges:
        raise ValueError(f"unknown sample {sample!r}; known: bgs, elg")
    return dataclasses.replace(VARIANTS[variant], **{**ranges[sample], **overrides})


# ------------------------------------------------------------------------------------------------
# Log-λ rebinning
# ------------------------------------------------------------------------------------------------

def _pixel_edges(lam):
    """[L] pixel centres (Å; ≤ 0 = padding at the end) -> [L + 1] edges (midpoints, the outer
    ones mirrored). Padding pixels get edges past the last real one, so nothing overlaps them."""
    real = lam > 0
    n_real = jnp.maximum(jnp.sum(real), 2)
    last = lam[n_real - 1]
    step = last - lam[n_real - 2]
    # Padding continues the grid beyond the last real pixel (it has ivar 0 anyway).
    idx = jnp.arange(lam.shape[0])
    lam = jnp.where(real, lam, last + step * (idx - n_real + 1))
    mid = 0.5 * (lam[1:] + lam[:-1])
    return jnp.concatenate([lam[:1] - (mid[:1] - lam[:1]), mid,
                            lam[-1:] + (lam[-1:] - mid[-1:])])


def log_rebin(cfg: ZScanConfig, flux, ivar, mask, wavelength):
    """Inverse-variance rebinning onto the log grid of ``cfg``.

    Args:
      flux, ivar: [B, L] float; mask: [B, L] bool (True = valid); wavelength: [B, L] Å, strictly
        increasing over the real pixels, ≤ 0 on trailing padding.

    Returns:
      (f, w): [B, N] float32 rebinned flux (ivar-weighted mean of the overlapped native pixels,
      0 where w = 0) and information w = Σ overlap_fraction · ivar (0 = no valid pixel overlaps).
      Overlaps are computed in float32 Å (good to ~1e-3 of a pixel); fractions below
      :data:`MIN_OVERLAP` count as 0.
    """
    good = mask & jnp.isfinite(flux) & jnp.isfinite(ivar) & (ivar > 0) & (wavelength > 0)
    w = jnp.where(good, ivar, 0.0).astype(jnp.float32)
    wf = w * jnp.where(good, flux, 0.0).astype(jnp.float32)
    # Bin edges in float64 on the host: exp of a float32 ln λ ≈ 8.3 would be off by ~2e-3 Å.
    u = math.log(cfg.wave_min) + cfg.dlog * np.arange(cfg.num_log_pixels)
    lo = jnp.asarray(np.exp(u - cfg.dlog / 2), jnp.float32)
    hi = jnp.asarray(np.exp(u + cfg.dlog / 2), jnp.float32)
    length = flux.shape[1]

    def one(lam, w_row, wf_row):
        e = _pixel_edges(lam.astype(jnp.float32))
        i0 = jnp.clip(jnp.searchsorted(e, lo, side="right") - 1, 0, length - 1)
        total_w = jnp.zeros_like(lo)
        total_wf = jnp.zeros_like(lo)
        for k in range(cfg.max_overlap):
            i = jnp.clip(i0 + k, 0, length - 1)
            overlap = jnp.clip(jnp.minimum(hi, e[i + 1]) - jnp.maximum(lo, e[i]), 0.0)
            frac = jnp.where(i0 + k < length, overlap / (e[i + 1] - e[i]), 0.0)
            # Float32 Å resolve an edge to ~1e-3 of a pixel at 9800 Å: slivers below
            # MIN_OVERLAP are rounding, not overlap (they would turn empty bins "valid").
            frac = jnp.where(frac > MIN_OVERLAP, frac, 0.0)
            total_w = total_w + frac * w_row[i]
            total_wf = total_wf + frac * wf_row[i]
        return total_w, total_wf

    total_w, total_wf = jax.vmap(one)(wavelength, w, wf)
    f = jnp.where(total_w > 0, total_wf / jnp.where(total_w > 0, total_w, 1.0), 0.0)
    return f, total_w


def _running_mean(x, weight, half: int):
    """Weighted running mean of x over ±half bins ([B, N]); 0 where no weight."""
    pad = ((0, 0), (half + 1, half))
    cx = jnp.cumsum(jnp.pad(x * weight, pad), axis=1)
    cw = jnp.cumsum(jnp.pad(weight, pad), axis=1)
    sx = cx[:, 2 * half + 1:] - cx[:, :-2 * half - 1]
    sw = cw[:, 2 * half + 1:] - cw[:, :-2 * half - 1]
    return jnp.where(sw > 0, sx / jnp.maximum(sw, 1e-30), 0.0)


def input_features(cfg: ZScanConfig, f, w):
    """Scale-free per-bin inputs [B, N, 5] and the valid mask [B, N] (float 0/1).

    Channels: S/N f·√w; high-passed S/N (f − running mean of f, weighted by w) · √w; asinh of
    the latter / 3 (compresses bright lines); √w / mean √w (where the noise is high: sky lines,
    camera ends); valid. Multiplying flux by a constant changes none of them.
    """
    valid = (w > 0).astype(jnp.float32)
    sw = jnp.sqrt(w)
    mean_sw = jnp.sum(sw, 1, keepdims=True) / jnp.maximum(valid.sum(1, keepdims=True), 1.0)
    half = max(1, int(round(cfg.highpass_dlog / cfg.dlog)))
    hp = (f - _running_mean(f, w, half)) * sw * valid
    x = jnp.stack([f * sw, hp, jnp.arcsinh(hp / 3.0),
                   sw / jnp.maximum(mean_sw, 1e-30), valid], axis=-1)
    return x, valid


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------

class ZScan(nnx.Module):
    """Learned matched-filter redshift scan (module docstring): spectra -> logits [B, M].

    Sub-modules: ``conv1`` (inputs → conv_width, conv_kernel), ``conv2`` (conv_width →
    conv_width, conv_kernel2), ``conv3`` (→ filters, pointwise), ``templates`` [filters, P]
    (rest frame), ``channel_scale`` [filters], ``head1`` / ``head2`` (per-shift MLP),
    ``zerr_coefficients`` [CALIBRATION_FEATURES] (the ZERR calibration, see
    :mod:`spectrax.redshift`; not used by the logits) and, when configured, ``observed_gain`` [N, conv_width] and ``log_prior``
    [bins of prior_z_range].

    Class attributes: ``takes_raw_spectra = True`` (the task passes raw flux and ivar, see
    :func:`spectrax.tasks.forward`); ``outputs_redshift_logits = True`` (the redshift task treats
    the output as logits over :attr:`ln1pz_grid`).
    """

    takes_raw_spectra = True
    outputs_redshift_logits = True
    NUM_INPUTS = 5

    def __init__(self, cfg: ZScanConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = cfg.compute_dtype
        self.conv1 = nnx.Conv(self.NUM_INPUTS, cfg.conv_width, (cfg.conv_kernel,),
                              padding="SAME", dtype=dtype, rngs=rngs)
        self.conv2 = nnx.Conv(cfg.conv_width, cfg.conv_width, (cfg.conv_kernel2,),
                              padding="SAME", dtype=dtype, rngs=rngs)
        self.conv3 = nnx.Conv(cfg.conv_width, cfg.filters, (1,), dtype=dtype, rngs=rngs)
        self.templates = nnx.Param(cfg.template_init_std * jax.random.normal(
            rngs.params(), (cfg.filters, cfg.template_length), jnp.float32))
        self.channel_scale = nnx.Param(jnp.ones((cfg.filters,), jnp.float32))
        self.head1 = nnx.Linear(cfg.filters, cfg.head_width, dtype=dtype, rngs=rngs)
        self.head2 = nnx.Linear(cfg.head_width, 3 if cfg.sub_bin else 1, dtype=dtype, rngs=rngs)
        self.observed_gain = (nnx.Param(jnp.zeros((cfg.num_log_pixels, cfg.conv_width),
                                                  jnp.float32))
                              if cfg.observed_gain else None)
        if cfg.prior:
            first, last = cfg.prior_bins()
            self.log_prior = nnx.Param(jnp.zeros((last - first + 1,), jnp.float32))
        else:
            self.log_prior = None
        # ZERR calibration (spectrax.redshift.calibrated_radius): trained by the redshift task
        # on held-out spectra from stop-gradient outputs, so it never changes the distribution.
        # Start: the identity (ZERR = the distribution's own radius).
        init = np.zeros(CALIBRATION_FEATURES, np.float32)
        init[1] = 1.0 / CALIBRATION_SCALE
        self.zerr_coefficients = nnx.Param(jnp.asarray(init))

    @property
    def ln1pz_grid(self) -> np.ndarray:
        """[M] ln(1+z) of the output bins (float64, ascending)."""
        return self.cfg.ln1pz_grid()

    def features(self, flux, mask, wavelength, ivar):
        """Observed-frame feature channels g [B, N, filters] (0 at masked log bins)."""
        f, w = log_rebin(self.cfg, flux, ivar, mask, wavelength)
        x, valid = input_features(self.cfg, f, w)
        dtype = self.cfg.compute_dtype
        g = self.conv1(x.astype(dtype))
        if self.observed_gain is not None:
            g = g * (1.0 + self.observed_gain[...]).astype(dtype)[None]
        g = jax.nn.gelu(g)
        g = jax.nn.gelu(self.conv2(g))
        return self.conv3(g).astype(jnp.float32) * valid[..., None]

    def scores(self, g):
        """[B, N, C] features -> [B, M, C] cross-correlation with the templates, ascending z.

        corr[m] = Σ_j g[j] T[j + m] with m = s_hi − s (shift s in dlog units), by FFT of length
        ``cfg.fft_length`` ≥ N + M − 1, so no product wraps around.
        """
        n_fft, m = self.cfg.fft_length, self.cfg.num_bins
        g_hat = jnp.fft.rfft(g, n=n_fft, axis=1)                              # [B, F, C]
        t_hat = jnp.fft.rfft(self.templates[...], n=n_fft, axis=1).T          # [F, C]
        corr = jnp.fft.irfft(jnp.conj(g_hat) * t_hat[None], n=n_fft, axis=1)[:, :m, :]
        return corr[:, ::-1, :] * self.channel_scale[...]

    def __call__(self, flux, mask, wavelength, *, ivar, train: bool = False):
        """flux, ivar [B, L], mask [B, L] bool, wavelength [B, L] Å -> float32 [B, M, 3] (per
        bin: logit, offset, ln σ; see :func:`spectrax.redshift.split_output`) with
        ``sub_bin``, else logits [B, M]."""
        del train  # no dropout or batch statistics
        scores = self.scores(self.features(flux, mask, wavelength, ivar))
        h = jax.nn.gelu(self.head1(scores.astype(self.cfg.compute_dtype)))
        out = self.head2(h).astype(jnp.float32)                               # [B, M, 1 or 3]
        if self.log_prior is not None:
            first, last = self.cfg.prior_bins()
            idx = jnp.clip(jnp.arange(self.cfg.num_bins) - first, 0, last - first)
            out = out.at[..., 0].add(self.log_prior[...][idx])
        return out if self.cfg.sub_bin else out[..., 0]
