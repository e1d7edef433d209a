r"""Spectra as 224 × 224 images, rendered on the device (SPECS.md section 2).

The spectra-as-images ViT (Strano Moraes et al.) sees each spectrum as a picture. The reference
code draws every picture with matplotlib on the host and stores PNG files; here the same pictures
are computed by jitted, batched jax functions, so the images are made inside the input-to-model
path (no PNGs on disk, no host round trip, any batch size)::

    from spectrax import render
    images = render.render("map2d", flux, mask, wavelength, fit="truncate")   # [B, 224, 224, 3]
    fn = jax.jit(functools.partial(render.render, "simple"))                  # options static

Inputs (every representation): ``flux`` [B, L] (any units), ``mask`` [B, L] bool (True = valid
pixel) and ``wavelength`` [B, L] Å; a pixel whose wavelength is −1 (the spectrax padding value,
also any non-finite or ≤ 0 wavelength) is padding and is removed before anything else (the real
pixels keep their order, so padding may sit anywhere in a row). Wavelengths must not decrease
along a row once padding is removed, as on every survey grid: :func:`render` raises ValueError
for numpy input that breaks this; under jit it cannot be checked and is the caller's contract.
Output: float32 [B, 224, 224, 3] in [0, 1] (RGB); with ``quantize`` (the default) every value is
k/255, exactly what the reference's 8-bit PNG holds. :func:`to_vit_input` applies the ViT
normalisation ((x − 0.5) / 0.5).

Compilation: one compiled function per (line plot kind or "block map", shapes, shape-changing
options: size, block_size, fit, x/y limit modes, segment_chunk). Options that only change values
(colours, line width, margin, vmin/vmax, map_scale, fill_order, masked, quantize, and which block
map) are passed as arrays and never recompile; all three block maps share one function.

Representations (:func:`representations`; the facts are SPECS.md section 2):

``simple``
  The reference's default plot: flux against wavelength, a 2.24 in × 2.24 in figure at 100 dpi,
  line width 0.5 pt (0.694 px), colour #1f77b4 on white, no axes, the axes filling the figure.
  Axis ranges are matplotlib's autoscaling: the data min–max of the drawn points widened by 5 %
  on each side (``margin``), so the line spans pixels ≈ 10–214 in both directions (checked
  against the reference's own savefig: drawn rows/columns 9…214). ``x_limits`` / ``y_limits``
  replace this with a fixed range (e.g. :data:`PAPER_WAVE_RANGE`, the SLOMOST cut, for one
  wavelength axis across spectra) or, for y, a robust quantile range; fixed ranges get no margin.
``overlap``
  The spectrum is split into three equal index chunks (``np.array_split`` sizes: the first
  n mod 3 chunks one longer); each chunk's wavelengths are min–max scaled to [0, 1] and the three
  are drawn on one axes, in order, in red, green (0, 0.5, 0) and blue, line width 0.5 pt, alpha
  0.5 (source-over on white). Flux is not normalised; y is one autoscaled range shared by the
  chunks. The x axis is the normalised [0, 1] (plus margins); ``x_limits`` does not apply.
``map2d``
  224 // 3 = 74 blocks per side hold 74² = 5476 flux values, value i in block row i // 74,
  column i % 74 (``fill_order="standard"``) or with every odd block row reversed
  (``"boustrophedon"``); each value fills a 3 × 3 block and is coloured with viridis at fixed
  vmin −1.13, vmax 144.97 (``map_scale="fixed"``; ``"minmax"`` uses the spectrum's own min–max
  instead). Cells without data hold the value 0 before colouring, as in the reference's zeroed
  array, so they show viridis(0) = colour index 1 at the paper's vmin/vmax; 3 · 74 = 222, so the
  last two pixel rows and columns are always such empty cells. Colours are matplotlib's:
  index = floor(256 · (v − vmin) / (vmax − vmin)) clipped to [0, 255] in float32 (the test checks
  this pixel for pixel against ``matplotlib.colormaps["viridis"]`` and the reference's imshow
  PNG); with ``quantize`` the table is truncated to 8 bits as matplotlib does when it writes
  bytes (``(lut * 255).astype(uint8)``). With ``map_scale="minmax"`` empty cells still hold 0,
  coloured on the spectrum's own scale (the under/over colour when 0 is outside its range).
``map2dnormal``
  The same blocks, R channel only: int(255 · (f − min) / (max − min)) with the spectrum's own
  min–max (truncation, as the reference's ``int()``); G = B = 0; empty cells are black.
``map2dnormaldev``
  R as ``map2dnormal``; G the first derivative ``np.gradient(flux)`` (unit index spacing:
  central differences inside, one-sided at the ends), B the second derivative (gradient of the
  gradient), each min–max scaled the same way. Derivatives and min–max statistics are taken over
  the whole (valid, possibly resampled) spectrum before truncation, as the reference does.

Lengths for the block maps (``fit``; 5476 = (224 // block_size)² cells):
  ``"error"`` (default): a padded length L > 5476 raises ValueError at trace time (under jit
  only the padded length is known, so a batch padded beyond 5476 needs an explicit choice).
  ``"truncate"``: the first 5476 values (blue end) are kept, the rest dropped (the reference).
  ``"resample"``: every spectrum is linearly interpolated in wavelength onto 5476 points evenly
  spaced from its first to its last wavelength (the reference's ``interpolate`` option, which it
  applies to shorter spectra only); all cells are then filled.
  Spectra shorter than 5476 values (with "error"/"truncate") leave their trailing cells empty,
  as the reference does.

Bad input never produces NaN:
  * masked pixels (mask False) and non-finite flux: ``masked="interpolate"`` (default) replaces
    them by linear interpolation in wavelength between the nearest valid neighbours (the nearest
    valid value beyond the first/last valid pixel), so cells keep their positions and lines run
    through; ``masked="gap"`` leaves them out: no line segment touches them and their cells are
    empty.
  * constant flux: min–max scalings use a denominator of 1 when max == min, so the normalised
    values are 0; a constant line is drawn through the middle of the canvas (matplotlib's
    ``nonsingular`` widening: ±5 % of |value|, or ±0.05 around 0).
  * a spectrum with no valid pixel renders as the empty picture (white canvas, or all cells
    empty).

Where spectrax departs from the reference code:
  * the reference divides flux by (1 + z); that leaks the label and is not done here.
  * the reference's map2d slice assignment would write values 5476–5549 into the two spare pixel
    rows of spectra longer than 5476 (NumPy clips the out-of-range slice); SPECS states "values
    beyond 5476 dropped; the last two pixel rows/columns are always empty", which is what
    ``fit="truncate"`` does. Its SDSS/LAMOST spectra (≤ ~4700 pixels) never get there.
  * the reference's min–max scalings divide by zero on a constant spectrum (NaN, then int()
    fails); here they give 0 (see "Bad input" above).
  * line plots are rasterised analytically (below), not by Agg: the drawn pixels agree with
    matplotlib's to IoU ≥ 0.9 (tests/test_render.py), individual edge pixels differ by a few
    levels.

Line rasterisation: every segment adds the area of each nearby pixel that lies inside its own
piece of the stroke (width w px, the segment's length, projecting caps at the ends of a run),
computed from the exact distribution of the pixel's area projected across and along the
segment; pieces of a polyline tile its stroke, so the clipped sum is the stroke's coverage, and
strokes drawn over each other saturate as Agg's filled union does. Because wavelengths increase,
the segments that can touch one pixel column are a contiguous index range (found by counting
points per column); all columns are processed together, ``segment_chunk`` segments at a time in a
``fori_loop`` whose trip count is the largest range in the batch, so memory is
O(B · 224 · 224 · segment_chunk) whatever L is. Colour = white · (1 − coverage) + line colour ·
coverage, as Agg blends.

Command line (contact sheet of N spectra per representation; rows = representations)::

    python -m spectrax.render --representations simple,overlap,map2d,map2dnormal,map2dnormaldev \
        --n 8 --out sheet.png [--input SHARD_DIR --split test] [--fit truncate]
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import struct
import zlib
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spectrax import runtime

# SLOMOST wavelength cut of the reference (SPECS.md section 2), Å: a fixed x range for line plots.
PAPER_WAVE_RANGE = (3536.714, 10413.580)
# Fixed colour limits of the reference's map2d (its flux units: SDSS/LAMOST 1e-17 erg/s/cm²/Å).
PAPER_VMIN, PAPER_VMAX = -1.13, 144.97

REPRESENTATIONS = {
    "simple": "line plot of flux vs wavelength, #1f77b4 on white, autoscaled (5 % margins)",
    "overlap": "three index chunks, wavelengths each scaled to [0, 1], red/green/blue, alpha 0.5",
    "map2d": "74 × 74 blocks of 3 × 3 px, one flux value each, viridis at vmin/vmax",
    "map2dnormal": "74 × 74 blocks, R = per-spectrum min–max flux, G = B = 0",
    "map2dnormaldev": "74 × 74 blocks, R = flux, G = 1st, B = 2nd derivative, each min–max",
}
_LINE_REPS = ("simple", "overlap")
_FILL_ORDERS = ("standard", "boustrophedon")
_FITS = ("error", "truncate", "resample")


def representations() -> tuple[str, ...]:
    """Names accepted by :func:`render`, in the order of SPECS.md section 2."""
    return tuple(REPRESENTATIONS)


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RenderConfig:
    """Every rendering option; the defaults are the reference's (SPECS.md section 2).

    Frozen and hashable, so it can be a static argument of ``jax.jit``. Build one from a dict
    (e.g. an ``ml_collections.ConfigDict``'s ``to_dict()``) with ``RenderConfig(**d)``.

    Attributes:
      size: image side, px (224).
      linewidth: line width in points (0.5); pixels = linewidth · dpi / 72.
      dpi: figure resolution (100; 2.24 in × 100 dpi = 224 px).
      margin: autoscale margin, fraction of the data range added on each side (0.05).
      x_limits: "minmax" (autoscale, the reference) or a fixed (lo, hi) in Å (no margin).
      y_limits: "minmax" (autoscale, the reference), "robust" (the ``robust_quantiles`` of the
        drawn flux, plus margin) or a fixed (lo, hi) in flux units (no margin).
      robust_quantiles: (q_lo, q_hi) for ``y_limits="robust"``.
      line_color: RGB in [0, 1] of ``simple`` (#1f77b4).
      overlap_colors: RGB of the three ``overlap`` chunks (red, green (0, 0.5, 0), blue).
      overlap_alpha: opacity of the ``overlap`` lines (0.5).
      segment_chunk: segments per column evaluated at once (memory/speed only).
      block_size: block side of the 2D maps, px (3 → 74 blocks per side).
      fill_order: "standard" (row-major) or "boustrophedon" (odd block rows right to left).
      fit: "error", "truncate" or "resample": spectra longer than the map (module docstring).
      map_scale: map2d colour limits: "fixed" (vmin, vmax) or "minmax" (per spectrum).
      vmin, vmax: map2d fixed colour limits (−1.13, 144.97).
      masked: "interpolate" or "gap": what masked / non-finite pixels become.
      quantize: outputs are k/255 as in the reference's 8-bit PNGs (map2d: matplotlib's
        truncated colour bytes; normal maps: the reference's int(); line plots: rounded).
    """

    size: int = 224
    linewidth: float = 0.5
    dpi: float = 100.0
    margin: float = 0.05
    x_limits: Any = "minmax"
    y_limits: Any = "minmax"
    robust_quantiles: tuple[float, float] = (0.01, 0.99)
    line_color: tuple[float, float, float] = (31 / 255, 119 / 255, 180 / 255)
    overlap_colors: tuple[tuple[float, float, float], ...] = ((1.0, 0.0, 0.0), (0.0, 0.5, 0.0),
                                                             (0.0, 0.0, 1.0))
    overlap_alpha: float = 0.5
    segment_chunk: int = 8
    block_size: int = 3
    fill_order: str = "standard"
    fit: str = "error"
    map_scale: str = "fixed"
    vmin: float = PAPER_VMIN
    vmax: float = PAPER_VMAX
    masked: str = "interpolate"
    quantize: bool = True

    def __post_init__(self):
        # Sequences (lists from ConfigDicts / JSON, numpy arrays) become tuples of floats so the
        # config stays hashable (a static jit argument).
        for name in ("x_limits", "y_limits", "robust_quantiles", "line_color"):
            v = getattr(self, name)
            if not isinstance(v, str):
                object.__setattr__(self, name, tuple(float(x) for x in v))
        object.__setattr__(self, "overlap_colors",
                           tuple(tuple(float(x) for x in c) for c in self.overlap_colors))
        self._validate()

    def _validate(self) -> None:
        def bad(msg):
            raise ValueError(f"RenderConfig: {msg}")

        if int(self.size) != self.size or self.size < 8:
            bad(f"size must be an integer ≥ 8, got {self.size!r}")
        if int(self.block_size) != self.block_size or not 1 <= self.block_size <= self.size:
            bad(f"block_size must be an integer in [1, size], got {self.block_size!r}")
        if not self.linewidth > 0 or not self.dpi > 0:
            bad(f"linewidth and dpi must be > 0, got {self.linewidth!r}, {self.dpi!r}")
        if not 0 <= self.margin < 0.5:
            bad(f"margin must be in [0, 0.5), got {self.margin!r}")
        if self.fill_order not in _FILL_ORDERS:
            bad(f"fill_order must be one of {_FILL_ORDERS}, got {self.fill_order!r}")
        if self.fit not in _FITS:
            bad(f"fit must be one of {_FITS}, got {self.fit!r}")
        if self.map_scale not in ("fixed", "minmax"):
            bad(f"map_scale must be 'fixed' or 'minmax', got {self.map_scale!r}")
        if self.masked not in ("interpolate", "gap"):
            bad(f"masked must be 'interpolate' or 'gap', got {self.masked!r}")
        if not self.vmax > self.vmin:
            bad(f"vmax must exceed vmin, got {self.vmin!r}, {self.vmax!r}")
        if int(self.segment_chunk) != self.segment_chunk or self.segment_chunk < 1:
            bad(f"segment_chunk must be a positive integer, got {self.segment_chunk!r}")
        for name, allowed in (("x_limits", ("minmax",)), ("y_limits", ("minmax", "robust"))):
            v = getattr(self, name)
            if isinstance(v, str):
                if v not in allowed:
                    bad(f"{name} must be one of {allowed} or (lo, hi), got {v!r}")
            elif not (isinstance(v, tuple) and len(v) == 2 and float(v[1]) > float(v[0])):
                bad(f"{name} as a range must be (lo, hi) with hi > lo, got {v!r}")
        q = self.robust_quantiles
        if not (len(q) == 2 and 0 <= q[0] < q[1] <= 1):
            bad(f"robust_quantiles must be (lo, hi) with 0 ≤ lo < hi ≤ 1, got {q!r}")
        if len(self.overlap_colors) != 3:
            bad("overlap_colors must hold three RGB colours")

    @property
    def blocks_per_side(self) -> int:
        return self.size // self.block_size

    @property
    def capacity(self) -> int:
        """Values a block map holds: (size // block_size)² (5476)."""
        return self.blocks_per_side ** 2

    @property
    def half_width_px(self) -> float:
        return 0.5 * self.linewidth * self.dpi / 72.0

    def replace(self, **options) -> "RenderConfig":
        return _with_options(self, options)


def _with_options(config: RenderConfig | dict | None, options: dict) -> RenderConfig:
    if config is None:
        config = RenderConfig()
    elif isinstance(config, dict):
        config = RenderConfig(**config)
    if not options:
        return config
    names = {f.name for f in dataclasses.fields(RenderConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"unknown render option(s) {unknown}; options are {sorted(names)}")
    return dataclasses.replace(config, **options)


# --------------------------------------------------------------------------------------------
# Viridis
# --------------------------------------------------------------------------------------------
# matplotlib's viridis (a 256-colour ListedColormap, CC0), generated from
# ``matplotlib.colormaps["viridis"].colors`` by :func:`_viridis_from_matplotlib` and stored here so
# that rendering needs no matplotlib; tests/test_render.py checks it equals matplotlib's table.
_VIRIDIS_TEXT = """
0.267004 0.004874 0.329415 0.26851 0.009605 0.335427 0.269944 0.014625 0.341379 0.271305
0.019942 0.347269 0.272594 0.025563 0.353093 0.273809 0.031497 0.358853 0.274952 0.037752
0.364543 0.276022 0.044167 0.370164 0.277018 0.050344 0.375715 0.277941 0.056324 0.381191
0.278791 0.062145 0.386592 0.279566 0.067836 0.391917 0.280267 0.073417 0.397163 0.280894
0.078907 0.402329 0.281446 0.08432 0.407414 0.281924 0.089666 0.412415 0.282327 0.094955
0.417331 0.282656 0.100196 0.42216 0.28291 0.105393 0.426902 0.283091 0.110553 0.431554
0.283197 0.11568 0.436115 0.283229 0.120777 0.440584 0.283187 0.125848 0.44496 0.283072
0.130895 0.449241 0.282884 0.13592 0.453427 0.282623 0.140926 0.457517 0.28229 0.145912
0.46151 0.281887 0.150881 0.465405 0.281412 0.155834 0.469201 0.280868 0.160771 0.472899
0.280255 0.165693 0.476498 0.279574 0.170599 0.479997 0.278826 0.17549 0.483397 0.278012
0.180367 0.486697 0.277134 0.185228 0.489898 0.276194 0.190074 0.493001 0.275191 0.194905
0.496005 0.274128 0.199721 0.498911 0.273006 0.20452 0.501721 0.271828 0.209303 0.504434
0.270595 0.214069 0.507052 0.269308 0.218818 0.509577 0.267968 0.223549 0.512008 0.26658
0.228262 0.514349 0.265145 0.232956 0.516599 0.263663 0.237631 0.518762 0.262138 0.242286
0.520837 0.260571 0.246922 0.522828 0.258965 0.251537 0.524736 0.257322 0.25613 0.526563
0.255645 0.260703 0.528312 0.253935 0.265254 0.529983 0.252194 0.269783 0.531579 0.250425
0.27429 0.533103 0.248629 0.278775 0.534556 0.246811 0.283237 0.535941 0.244972 0.287675
0.53726 0.243113 0.292092 0.538516 0.241237 0.296485 0.539709 0.239346 0.300855 0.540844
0.237441 0.305202 0.541921 0.235526 0.309527 0.542944 0.233603 0.313828 0.543914 0.231674
0.318106 0.544834 0.229739 0.322361 0.545706 0.227802 0.326594 0.546532 0.225863 0.330805
0.547314 0.223925 0.334994 0.548053 0.221989 0.339161 0.548752 0.220057 0.343307 0.549413
0.21813 0.347432 0.550038 0.21621 0.351535 0.550627 0.214298 0.355619 0.551184 0.212395
0.359683 0.55171 0.210503 0.363727 0.552206 0.208623 0.367752 0.552675 0.206756 0.371758
0.553117 0.204903 0.375746 0.553533 0.203063 0.379716 0.553925 0.201239 0.38367 0.554294
0.19943 0.387607 0.554642 0.197636 0.391528 0.554969 0.19586 0.395433 0.555276 0.1941
0.399323 0.555565 0.192357 0.403199 0.555836 0.190631 0.407061 0.556089 0.188923 0.41091
0.556326 0.187231 0.414746 0.556547 0.185556 0.41857 0.556753 0.183898 0.422383 0.556944
0.182256 0.426184 0.55712 0.180629 0.429975 0.557282 0.179019 0.433756 0.55743 0.177423
0.437527 0.557565 0.175841 0.44129 0.557685 0.174274 0.445044 0.557792 0.172719 0.448791
0.557885 0.171176 0.45253 0.557965 0.169646 0.456262 0.55803 0.168126 0.459988 0.558082
0.166617 0.463708 0.558119 0.165117 0.467423 0.558141 0.163625 0.471133 0.558148 0.162142
0.474838 0.55814 0.160665 0.47854 0.558115 0.159194 0.482237 0.558073 0.157729 0.485932
0.558013 0.15627 0.489624 0.557936 0.154815 0.493313 0.55784 0.153364 0.497 0.557724
0.151918 0.500685 0.557587 0.150476 0.504369 0.55743 0.149039 0.508051 0.55725 0.147607
0.511733 0.557049 0.14618 0.515413 0.556823 0.144759 0.519093 0.556572 0.143343 0.522773
0.556295 0.141935 0.526453 0.555991 0.140536 0.530132 0.555659 0.139147 0.533812 0.555298
0.13777 0.537492 0.554906 0.136408 0.541173 0.554483 0.135066 0.544853 0.554029 0.133743
0.548535 0.553541 0.132444 0.552216 0.553018 0.131172 0.555899 0.552459 0.129933 0.559582
0.551864 0.128729 0.563265 0.551229 0.127568 0.566949 0.550556 0.126453 0.570633 0.549841
0.125394 0.574318 0.549086 0.124395 0.578002 0.548287 0.123463 0.581687 0.547445 0.122606
0.585371 0.546557 0.121831 0.589055 0.545623 0.121148 0.592739 0.544641 0.120565 0.596422
0.543611 0.120092 0.600104 0.54253 0.119738 0.603785 0.5414 0.119512 0.607464 0.540218
0.119423 0.611141 0.538982 0.119483 0.614817 0.537692 0.119699 0.61849 0.536347 0.120081
0.622161 0.534946 0.120638 0.625828 0.533488 0.12138 0.629492 0.531973 0.122312 0.633153
0.530398 0.123444 0.636809 0.528763 0.12478 0.640461 0.527068 0.126326 0.644107 0.525311
0.128087 0.647749 0.523491 0.130067 0.651384 0.521608 0.132268 0.655014 0.519661 0.134692
0.658636 0.517649 0.137339 0.662252 0.515571 0.14021 0.665859 0.513427 0.143303 0.669459
0.511215 0.146616 0.67305 0.508936 0.150148 0.676631 0.506589 0.153894 0.680203 0.504172
0.157851 0.683765 0.501686 0.162016 0.687316 0.499129 0.166383 0.690856 0.496502 0.170948
0.694384 0.493803 0.175707 0.6979 0.491033 0.180653 0.701402 0.488189 0.185783 0.704891
0.485273 0.19109 0.708366 0.482284 0.196571 0.711827 0.479221 0.202219 0.715272 0.476084
0.20803 0.718701 0.472873 0.214 0.722114 0.469588 0.220124 0.725509 0.466226 0.226397
0.728888 0.462789 0.232815 0.732247 0.459277 0.239374 0.735588 0.455688 0.24607 0.73891
0.452024 0.252899 0.742211 0.448284 0.259857 0.745492 0.444467 0.266941 0.748751 0.440573
0.274149 0.751988 0.436601 0.281477 0.755203 0.432552 0.288921 0.758394 0.428426 0.296479
0.761561 0.424223 0.304148 0.764704 0.419943 0.311925 0.767822 0.415586 0.319809 0.770914
0.411152 0.327796 0.77398 0.40664 0.335885 0.777018 0.402049 0.344074 0.780029 0.397381
0.35236 0.783011 0.392636 0.360741 0.785964 0.387814 0.369214 0.788888 0.382914 0.377779
0.791781 0.377939 0.386433 0.794644 0.372886 0.395174 0.797475 0.367757 0.404001 0.800275
0.362552 0.412913 0.803041 0.357269 0.421908 0.805774 0.35191 0.430983 0.808473 0.346476
0.440137 0.811138 0.340967 0.449368 0.813768 0.335384 0.458674 0.816363 0.329727 0.468053
0.818921 0.323998 0.477504 0.821444 0.318195 0.487026 0.823929 0.312321 0.496615 0.826376
0.306377 0.506271 0.828786 0.300362 0.515992 0.831158 0.294279 0.525776 0.833491 0.288127
0.535621 0.835785 0.281908 0.545524 0.838039 0.275626 0.555484 0.840254 0.269281 0.565498
0.84243 0.262877 0.575563 0.844566 0.256415 0.585678 0.846661 0.249897 0.595839 0.848717
0.243329 0.606045 0.850733 0.236712 0.616293 0.852709 0.230052 0.626579 0.854645 0.223353
0.636902 0.856542 0.21662 0.647257 0.8584 0.209861 0.657642 0.860219 0.203082 0.668054
0.861999 0.196293 0.678489 0.863742 0.189503 0.688944 0.865448 0.182725 0.699415 0.867117
0.175971 0.709898 0.868751 0.169257 0.720391 0.87035 0.162603 0.730889 0.871916 0.156029
0.741388 0.873449 0.149561 0.751884 0.874951 0.143228 0.762373 0.876424 0.137064 0.772852
0.877868 0.131109 0.783315 0.879285 0.125405 0.79376 0.880678 0.120005 0.804182 0.882046
0.114965 0.814576 0.883393 0.110347 0.82494 0.88472 0.106217 0.83527 0.886029 0.102646
0.845561 0.887322 0.099702 0.85581 0.888601 0.097452 0.866013 0.889868 0.095953 0.876168
0.891125 0.09525 0.886271 0.892374 0.095374 0.89632 0.893616 0.096335 0.906311 0.894855
0.098125 0.916242 0.896091 0.100717 0.926106 0.89733 0.104071 0.935904 0.89857 0.108131
0.945636 0.899815 0.112838 0.9553 0.901065 0.118128 0.964894 0.902323 0.123941 0.974417
0.90359 0.130215 0.983868 0.904867 0.136897 0.993248 0.906157 0.143936
"""


@functools.lru_cache(maxsize=None)
def viridis_table() -> np.ndarray:
    """matplotlib's viridis colours: [256, 3] float64 in [0, 1]."""
    table = np.array(_VIRIDIS_TEXT.split(), dtype=np.float64).reshape(256, 3)
    table.flags.writeable = False
    return table


def _viridis_from_matplotlib() -> np.ndarray:
    """Regenerates the table from matplotlib (used by the test and to rewrite the constant)."""
    import matplotlib

    return np.asarray(matplotlib.colormaps["viridis"].colors, dtype=np.float64)


def _lut(quantize: bool) -> jnp.ndarray:
    table = viridis_table()
    if quantize:
        # matplotlib's Colormap(..., bytes=True) truncates: (lut * 255).astype(uint8).
        table = np.floor(table * 255.0) / 255.0
    return jnp.asarray(table, jnp.float32)


# --------------------------------------------------------------------------------------------
# Shared preparation
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Prepared:
    wave: jnp.ndarray   # [B, L] float32 Å, increasing; padding moved to the end (= last wave)
    flux: jnp.ndarray   # [B, L] float32, masked pixels filled (interpolated), padding 0
    valid: jnp.ndarray  # [B, L] bool, pixel valid (mask & finite & not padding)
    real: jnp.ndarray   # [B, L] bool, not padding (the first n positions)
    n: jnp.ndarray      # [B] int32, number of non-padding pixels


def _cumsum_rows(x, block: int = 64):
    """Inclusive cumulative sum of 0/1 values along rows: [B, L] → [B, L] int32.

    Two small triangular matmuls (within blocks of ``block``, then over block totals) instead
    of ``jnp.cumsum``: identical integers (float32 holds counts < 2**24 exactly, HIGHEST
    precision), a fraction of the compile time on CPU, and MXU/tensor-core friendly."""
    b, length = x.shape
    nb = -(-length // block)
    xb = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, nb * block - length))).reshape(b, nb, block)
    hi = jax.lax.Precision.HIGHEST
    tri = jnp.tril(jnp.ones((block, block), jnp.float32))           # [i, j] = 1 for j ≤ i
    within = jnp.einsum("bnj,ij->bni", xb, tri, precision=hi)
    before = jnp.tril(jnp.ones((nb, nb), jnp.float32), -1)           # blocks strictly before
    offset = jnp.einsum("bn,mn->bm", within[..., -1], before, precision=hi)
    total = (within + offset[..., None]).reshape(b, nb * block)[:, :length]
    return jnp.round(total).astype(jnp.int32)


def _prepare(flux, mask, wave) -> _Prepared:
    """Moves padding to the end of each row and fills masked pixels (see the module docstring).

    Wavelengths must increase along each row once padding is removed (every survey grid does;
    :func:`render` checks host inputs)."""
    b, length = flux.shape
    pad = ~(jnp.isfinite(wave) & (wave > 0))
    valid = mask & jnp.isfinite(flux) & ~pad
    idx = jnp.arange(length, dtype=jnp.int32)[None, :]
    rows = jnp.arange(b, dtype=jnp.int32)[:, None]
    take = functools.partial(jnp.take_along_axis, axis=-1)

    # Compaction: real pixels keep their order at the front, padding follows.
    seen = _cumsum_rows(~pad)                                  # real pixels up to here
    n = seen[:, -1]
    dest = jnp.where(pad, n[:, None] + (idx + 1 - seen) - 1, seen - 1)   # a permutation
    src = jnp.zeros((b, length), jnp.int32).at[rows, dest].set(
        jnp.broadcast_to(idx, (b, length)), unique_indices=True)
    # (The barrier materialises the gathered rows once; see the interpolation below.)
    wave, flux, valid = jax.lax.optimization_barrier(
        (take(wave, src), take(jnp.where(valid, flux, 0.0), src), take(valid, src)))
    real = idx < n[:, None]
    # Padding gets the last real wavelength: rows stay finite and non-decreasing.
    w_last = take(wave, jnp.clip(n - 1, 0, length - 1)[:, None])
    wave = jnp.where(real, wave, jnp.where(n[:, None] > 0, w_last, 0.0))

    # Masked pixels: np.interp over the valid ones (linear in wavelength between the nearest
    # valid neighbours, their value beyond the first/last one). ``count`` valid pixels lie at
    # or before pixel i, so its neighbours are the valid pixels number count − 1 and count.
    count = _cumsum_rows(valid)
    n_valid = count[:, -1:]
    where_valid = jnp.full((b, length), length - 1, jnp.int32).at[
        rows, jnp.where(valid, count - 1, length)].set(
        jnp.broadcast_to(idx, (b, length)), mode="drop", unique_indices=True)
    prev = take(where_valid, jnp.clip(count - 1, 0, length - 1))
    nxt = take(where_valid, jnp.clip(count, 0, jnp.maximum(n_valid - 1, 0)))
    # The barrier materialises the four gathers once; fused into their consumers XLA (CPU)
    # recomputed them and the step ran 2× slower.
    wp, wn, fp, fn = jax.lax.optimization_barrier(
        (take(wave, prev), take(wave, nxt), take(flux, prev), take(flux, nxt)))
    frac = (wave - wp) / jnp.where(wn > wp, wn - wp, 1.0)
    inner = fp + (fn - fp) * frac
    has_prev, has_next = count > 0, count < n_valid
    filled = jnp.where(has_prev & has_next, inner, jnp.where(has_prev, fp, fn))
    filled = jnp.where(valid, flux, jnp.where(n_valid > 0, filled, 0.0))
    filled = jnp.where(real, filled, 0.0)
    return _Prepared(wave=wave, flux=filled, valid=valid, real=real, n=n)


def _masked_min_max(x, where):
    big = jnp.finfo(jnp.float32).max
    lo = jnp.min(jnp.where(where, x, big), axis=-1)
    hi = jnp.max(jnp.where(where, x, -big), axis=-1)
    empty = ~jnp.any(where, axis=-1)
    return jnp.where(empty, 0.0, lo), jnp.where(empty, 0.0, hi)


def _masked_quantile(x, where, q):
    """Linear-interpolated quantile q of x over ``where`` per row (numpy's default method)."""
    length = x.shape[-1]
    s = jnp.sort(jnp.where(where, x, jnp.inf), axis=-1)
    cnt = jnp.sum(where, axis=-1)
    pos = q * jnp.maximum(cnt - 1, 0).astype(jnp.float32)
    i0 = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, length - 1)
    i1 = jnp.clip(i0 + 1, 0, jnp.maximum(cnt - 1, 0))
    v0 = jnp.take_along_axis(s, i0[:, None], axis=-1)[:, 0]
    v1 = jnp.take_along_axis(s, i1[:, None], axis=-1)[:, 0]
    v = v0 + (v1 - v0) * (pos - i0)
    return jnp.where(cnt > 0, v, 0.0)


# --------------------------------------------------------------------------------------------
# Line plots
# --------------------------------------------------------------------------------------------
def _nonsingular(lo, hi):
    """matplotlib's ``nonsingular(expander=0.05)``: a zero-width range is widened by 5 % of its
    value (±0.05 around 0), so a constant line lands mid-canvas instead of dividing by zero."""
    scale = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    # float32: a range below ~1e-6 relative cannot be drawn meaningfully anyway.
    flat = (hi - lo) <= 1e-6 * scale
    zero = scale == 0
    lo2 = jnp.where(zero, -0.05, lo - 0.05 * jnp.abs(lo))
    hi2 = jnp.where(zero, 0.05, hi + 0.05 * jnp.abs(hi))
    return jnp.where(flat, lo2, lo), jnp.where(flat, hi2, hi)


def _axis_limits(values, where, spec, cfg: RenderConfig, margin):
    if isinstance(spec, tuple):
        b = values.shape[0]
        return jnp.full((b,), float(spec[0]), jnp.float32), jnp.full((b,), float(spec[1]),
                                                                     jnp.float32)
    if spec == "robust":
        lo = _masked_quantile(values, where, cfg.robust_quantiles[0])
        hi = _masked_quantile(values, where, cfg.robust_quantiles[1])
    else:
        lo, hi = _masked_min_max(values, where)
    lo, hi = _nonsingular(lo, hi)
    delta = (hi - lo) * margin
    return lo - delta, hi + delta


def _to_pixels(x, y, xlim, ylim, size):
    """Data → pixel coordinates with the origin at the image's top-left corner (pixel (r, c)
    covers [c, c+1] × [r, r+1]); far-off values are clamped so squares stay finite."""
    sx = size / (xlim[1] - xlim[0])
    sy = size / (ylim[1] - ylim[0])
    px = (x - xlim[0][:, None]) * sx[:, None]
    py = (ylim[1][:, None] - y) * sy[:, None]
    far = 100.0 * size
    return jnp.clip(px, -far, far + size), jnp.clip(py, -far, far + size)


def _pixel_cdf(s, a, b, inv2ab):
    """Fraction of a unit pixel whose projection on a unit direction lies below s (centre at 0).

    The projection of the pixel's area on a direction (cos θ, sin θ) is the convolution of two
    boxes of widths a = max(|cos θ|, |sin θ|) and b = min(...), a trapezoid; its CDF is quadratic,
    linear, quadratic. The same (a, b) serve the segment's direction and its normal."""
    u = jnp.clip(s + 0.5 * (a + b), 0.0, a + b)
    top = a + b - u
    return jnp.where(u < b, u * u * inv2ab,
                     jnp.where(u <= a, (u - 0.5 * b) / a, 1.0 - top * top * inv2ab))


def _count_below(x, queries, s):
    """#{i : x_i < queries[c]} per row for ``s`` queries spaced 1 px apart: [B, L] → [B, s].

    Each point lands in the bin of the first query above it; a histogram (scatter-add) and a
    running sum over the s bins replace ``searchsorted`` (much cheaper to compile on CPU)."""
    b = x.shape[0]
    first = jnp.clip(jnp.floor(x - queries[0]) + 1, 0, s).astype(jnp.int32)
    hist = jnp.zeros((b, s + 1), jnp.float32).at[jnp.arange(b)[:, None], first].add(1.0)
    tri = jnp.tril(jnp.ones((s, s + 1), jnp.float32))         # bins 0..c count for query c
    return jnp.round(jnp.einsum("bk,ck->bc", hist, tri,
                                precision=jax.lax.Precision.HIGHEST)).astype(jnp.int32)


def _rasterize(px, py, seg_ok, cfg: RenderConfig, hw):
    """Anti-aliased coverage of B polylines: [B, L] pixel coords, x non-decreasing along each
    row; seg_ok [B, L-1] says which segments are drawn. Returns [B, size, size] in [0, 1]
    (rows top to bottom).

    Each segment contributes the area of the pixel inside its own piece of the stroke: the band
    |across| ≤ w/2 times the slab 0 ≤ along ≤ length (a product of the pixel's projected-area
    CDFs across and along the segment, exact for axis-aligned and for long straight strokes).
    Consecutive pieces of a polyline tile its stroke, so their sum is the stroke's coverage; where
    strokes overlap (a narrow emission line drawn up and back down within one pixel, dense noise)
    the sum saturates at 1 like Agg's filled union, which a max over segments would
    underestimate by up to ~30 %. Runs of drawn segments get matplotlib's projecting caps
    (extended by w/2 at both ends)."""
    b, length = px.shape
    s, k = cfg.size, cfg.segment_chunk
    nseg = length - 1
    # A segment farther than hw + √2/2 from a pixel centre cannot touch the pixel.
    reach = hw + 0.75
    centres = jnp.arange(s, dtype=jnp.float32) + 0.5
    i0, i1 = _count_below(px, centres - reach, s), _count_below(px, centres + reach, s)
    # Segment j spans [x_j, x_{j+1}]: it can reach column c iff x_{j+1} ≥ lo and x_j ≤ hi.
    start = jnp.clip(i0 - 1, 0, nseg - 1)                  # [B, S]
    stop = jnp.clip(i1, 0, nseg)                            # exclusive
    count = jnp.maximum(stop - start, 0)
    trips = (jnp.max(count) + k - 1) // k

    ax, ay = px[:, :-1], py[:, :-1]
    dx, dy = px[:, 1:] - ax, py[:, 1:] - ay
    seg_len = jnp.sqrt(dx * dx + dy * dy)
    has_len = seg_len > 0
    safe = jnp.where(has_len, seg_len, 1.0)
    ux, uy = jnp.where(has_len, dx / safe, 1.0), jnp.where(has_len, dy / safe, 0.0)
    ca = jnp.maximum(jnp.abs(ux), jnp.abs(uy))
    # b → 0 (axis-aligned) is the box limit; 1e-3 keeps 1 / (2ab) finite at no visible cost.
    cb = jnp.maximum(jnp.minimum(jnp.abs(ux), jnp.abs(uy)), 1e-3)
    inv2ab = 1.0 / (2.0 * ca * cb)
    off = jnp.zeros((b, 1), bool)
    run_start = seg_ok & ~jnp.concatenate([off, seg_ok[:, :-1]], axis=1)
    run_end = seg_ok & ~jnp.concatenate([seg_ok[:, 1:], off], axis=1)
    lo = jnp.where(run_start, -hw, 0.0)                      # projecting caps
    hi = seg_len + jnp.where(run_end, hw, 0.0)
    params = jnp.stack([ax, ay, ux, uy, lo, hi, ca, cb, inv2ab,
                        seg_ok.astype(jnp.float32)], axis=-1)     # [B, nseg, 10]

    offsets = jnp.arange(k, dtype=jnp.int32)
    rows = centres[None, None, None, :]                      # pixel-centre y of every row
    colx = centres[None, :, None, None]                      # [1, S, 1, 1]

    def body(t, acc):
        j = start[:, :, None] + t * k + offsets              # [B, S, K]
        inside = j < stop[:, :, None]
        jc = jnp.clip(j, 0, nseg - 1).reshape(b, -1)
        g = jnp.take_along_axis(params, jc[:, :, None], axis=1).reshape(b, s, k, 10)
        gax, gay, gux, guy, glo, ghi, gca, gcb, g2ab, gok = (g[..., i, None] for i in range(10))
        use = inside[..., None] & (gok > 0.5)
        rx = colx - gax                                      # [B, S, K, 1]
        ry = rows - gay                                      # [B, S, K, S]
        along = rx * gux + ry * guy
        across = jnp.abs(rx * guy - ry * gux)
        band = (_pixel_cdf(across + hw, gca, gcb, g2ab)
                - _pixel_cdf(across - hw, gca, gcb, g2ab))
        piece = (_pixel_cdf(ghi - along, gca, gcb, g2ab)
                 - _pixel_cdf(glo - along, gca, gcb, g2ab))
        cov = jnp.where(use, band * piece, 0.0)
        return acc + jnp.sum(cov, axis=2)                    # [B, S(cols), S(rows)]

    acc = jax.lax.fori_loop(0, trips, body, jnp.zeros((b, s, s), jnp.float32))
    return jnp.clip(jnp.swapaxes(acc, 1, 2), 0.0, 1.0)


def _drawn_points(p: _Prepared, dyn):
    return jnp.where(dyn["gap"], p.valid, p.real)


def _segments(drawn):
    return drawn[:, :-1] & drawn[:, 1:]


# k / 255 as float32 division, looked up (XLA may turn a division by 255 into a multiplication
# by its reciprocal, which differs in the last bit from what numpy gives for uint8 / 255).
_LEVELS = np.arange(256, dtype=np.float32) / np.float32(255)


def _levels(k):
    return jnp.asarray(_LEVELS)[jnp.clip(k, 0, 255).astype(jnp.int32)]


def _quantize(img, dyn):
    return jnp.where(dyn["quantize"], _levels(jnp.round(img * 255.0)), img)


def _render_simple(p: _Prepared, cfg: RenderConfig, dyn):
    drawn = _drawn_points(p, dyn)
    xlim = _axis_limits(p.wave, drawn, cfg.x_limits, cfg, dyn["margin"])
    ylim = _axis_limits(p.flux, drawn, cfg.y_limits, cfg, dyn["margin"])
    px, py = _to_pixels(p.wave, p.flux, xlim, ylim, cfg.size)
    cov = _rasterize(px, py, _segments(drawn), cfg, dyn["hw"])
    img = 1.0 - cov[..., None] * (1.0 - dyn["line_color"])   # source-over on white
    return _quantize(img, dyn)


def _render_overlap(p: _Prepared, cfg: RenderConfig, dyn):
    b, length = p.flux.shape
    drawn = _drawn_points(p, dyn)
    idx = jnp.arange(length, dtype=jnp.int32)[None, :]
    # np.array_split(n, 3): sizes q+1 for the first n mod 3 chunks, q for the rest.
    q, r = p.n // 3, p.n % 3
    b1 = q + (r > 0)
    b2 = b1 + q + (r > 1)
    chunk = jnp.where(idx < b1[:, None], 0, jnp.where(idx < b2[:, None], 1, 2))
    chunk = jnp.where(p.real, chunk, 3)                      # padding belongs to no chunk

    xs, ok = [], []
    for c in range(3):
        inc = chunk == c
        lo, hi = _masked_min_max(p.wave, inc)                 # over all the chunk's pixels
        span = hi - lo
        # A one-pixel (or zero-width) chunk has no extent: the reference gets 0/0 and draws
        # nothing there; here its x is 0 and, having no segment, it is not drawn either.
        xn = (p.wave - lo[:, None]) / jnp.where(span > 0, span, 1.0)[:, None]
        # Points outside the chunk keep x monotonic (far left before it, far right after it,
        # padding included) and take part in no segment.
        xs.append(jnp.where(inc, xn, jnp.where(chunk < c, -50.0, 51.0)))
        ok.append(_segments(drawn & inc))
    # Autoscaled x: the data range of every drawn point in its own chunk's [0, 1] units.
    x_own = jnp.select([chunk == 0, chunk == 1], [xs[0], xs[1]], xs[2])
    xlim = _axis_limits(x_own, drawn, "minmax", cfg, dyn["margin"])
    ylim = _axis_limits(p.flux, drawn, cfg.y_limits, cfg, dyn["margin"])
    pxs, pys = [], []
    for c in range(3):
        px, py = _to_pixels(xs[c], p.flux, xlim, ylim, cfg.size)
        pxs.append(px)
        pys.append(py)
    # The three chunks go through the rasteriser as one batch of 3B polylines.
    cov = _rasterize(jnp.concatenate(pxs), jnp.concatenate(pys), jnp.concatenate(ok), cfg,
                     dyn["hw"])
    cov = cov.reshape(3, b, cfg.size, cfg.size)
    img = jnp.ones((b, cfg.size, cfg.size, 3), jnp.float32)
    for c in range(3):
        alpha = dyn["overlap_alpha"] * cov[c][..., None]
        img = img * (1.0 - alpha) + dyn["overlap_colors"][c] * alpha   # in order, source-over
    return _quantize(img, dyn)


# --------------------------------------------------------------------------------------------
# Block maps
# --------------------------------------------------------------------------------------------
def _blocks(per_cell, cfg: RenderConfig, boustrophedon):
    """[B, cap + 1, C] cell values (the last one = empty) → [B, size, size, C] image.

    Block rows are laid out by reshape, every odd one reversed for boustrophedon, each value
    repeated block_size × block_size by broadcasting, and the spare strip filled with the empty
    cell: the same image as indexing with :func:`cell_index_map`, without a per-pixel gather
    (which costs XLA CPU ~10× more)."""
    b, _, ch = per_cell.shape
    nb, bs, size = cfg.blocks_per_side, cfg.block_size, cfg.size
    grid = per_cell[:, :nb * nb].reshape(b, nb, nb, ch)
    odd = (jnp.arange(nb) % 2 == 1)[None, :, None, None]
    grid = jnp.where(boustrophedon & odd, grid[:, :, ::-1], grid)
    img = jnp.broadcast_to(grid[:, :, None, :, None, :], (b, nb, bs, nb, bs, ch))
    img = img.reshape(b, nb * bs, nb * bs, ch)
    spare = size - nb * bs
    if spare:
        empty = per_cell[:, -1][:, None, None, :]
        img = jnp.concatenate([img, jnp.broadcast_to(empty, (b, nb * bs, spare, ch))], axis=2)
        img = jnp.concatenate([img, jnp.broadcast_to(empty, (b, spare, size, ch))], axis=1)
    return img


@functools.lru_cache(maxsize=None)
def cell_index_map(size: int = 224, block_size: int = 3, fill_order: str = "standard"):
    """For every pixel, the index of the value it shows: [size, size] int32, value i in
    [0, capacity) or ``capacity`` for the spare strip beyond blocks_per_side · block_size."""
    nb = size // block_size
    yy, xx = np.mgrid[0:size, 0:size]
    br, bc = yy // block_size, xx // block_size
    if fill_order == "boustrophedon":
        bc = np.where(br % 2 == 0, bc, nb - 1 - bc)
    elif fill_order != "standard":
        raise ValueError(f"fill_order must be one of {_FILL_ORDERS}, got {fill_order!r}")
    inside = (yy // block_size < nb) & (xx // block_size < nb)
    out = np.where(inside, br * nb + bc, nb * nb).astype(np.int32)
    out.flags.writeable = False
    return out


def _resample(p: _Prepared, cap: int):
    """Linear resampling of every spectrum onto ``cap`` wavelengths evenly spaced from its first
    to its last wavelength (``np.interp``). Returns (flux [B, cap], valid [B, cap], n [B]).

    The targets are evenly spaced, so each source pixel's position among them is arithmetic:
    a histogram of source pixels per target and a running count give every target's
    neighbours without a search."""
    b, length = p.flux.shape
    take = functools.partial(jnp.take_along_axis, axis=-1)
    n = p.n[:, None]
    first = p.wave[:, :1]
    last = take(p.wave, jnp.clip(n - 1, 0, length - 1))
    step = (last - first) / (cap - 1)
    safe = jnp.where(step > 0, step, 1.0)
    target = first + step * jnp.arange(cap, dtype=jnp.float32)[None, :]
    # Source pixel i counts for every target at or after the first one ≥ its wavelength.
    k = jnp.clip(jnp.ceil((p.wave - first) / safe), 0, cap).astype(jnp.int32)
    k = jnp.where(p.real, k, cap)
    hist = jnp.zeros((b, cap + 1), jnp.float32).at[jnp.arange(b)[:, None], k].add(1.0)
    below = _cumsum_rows(hist[:, :cap])                         # sources at or before target
    i_prev = jnp.clip(below - 1, 0, jnp.maximum(n - 1, 0))
    i_next = jnp.clip(below, 0, jnp.maximum(n - 1, 0))
    both = jnp.concatenate([i_prev, i_next], axis=1)
    src = jnp.stack([p.wave, p.flux, p.valid.astype(jnp.float32)])
    g = take(src, jnp.broadcast_to(both, (3, b, 2 * cap)))
    wp, wn = g[0, :, :cap], g[0, :, cap:]
    frac = jnp.clip((target - wp) / jnp.where(wn > wp, wn - wp, 1.0), 0.0, 1.0)
    vals = g[1:, :, :cap] + (g[1:, :, cap:] - g[1:, :, :cap]) * frac   # flux, validity
    vals = jnp.where(n > 0, vals, 0.0)
    out_n = jnp.where(p.n > 0, cap, 0).astype(jnp.int32)
    # A resampled point is valid (gap mode) when its nearer original pixel is.
    return vals[0], vals[1] >= 0.5, out_n


def _gradient(f, n):
    """np.gradient of each row's first n values (unit spacing); 0 beyond n and for n < 2."""
    length = f.shape[-1]
    idx = jnp.arange(length)[None, :]
    right = jnp.concatenate([f[:, 1:], f[:, -1:]], axis=1)
    left = jnp.concatenate([f[:, :1], f[:, :-1]], axis=1)
    g = (right - left) / 2.0
    last = (n - 1)[:, None]
    f_prev_last = jnp.take_along_axis(f, jnp.clip(last - 1, 0, length - 1), axis=1)
    f_last = jnp.take_along_axis(f, jnp.clip(last, 0, length - 1), axis=1)
    g = jnp.where(idx == 0, right - f, g)
    g = jnp.where(idx == last, f_last - f_prev_last, g)
    return jnp.where((idx < last + 1) & (n[:, None] >= 2), g, 0.0)


def _ieee_div(num, den):
    """num / den rounded as IEEE float32 division, bit-identical to numpy's.

    XLA rewrites a division by a broadcast value into a multiplication by its reciprocal (and
    then reassociates constants), which differs from numpy in the last bit for ~15 % of values;
    at a colour-table or 0–255 truncation boundary that changes a pixel. Broadcasting the
    divisor behind an optimization barrier keeps a true element-wise division."""
    den = jax.lax.optimization_barrier(jnp.broadcast_to(den, jnp.shape(num)))
    return num / den


def _minmax_scale(x, where):
    """(x − min) / (max − min) over ``where``; a constant row scales to 0 (no division by 0)."""
    lo, hi = _masked_min_max(x, where)
    den = jnp.where(hi > lo, hi - lo, 1.0)
    return lo[:, None], den[:, None]


def _render_map(p: _Prepared, cfg: RenderConfig, dyn):
    """All three block maps in one compiled function (``dyn["map_kind"]`` picks map2d,
    map2dnormal or map2dnormaldev): the per-cell work is small next to the shared preparation,
    and one compile instead of three matters on CPU."""
    b = p.flux.shape[0]
    cap = cfg.capacity
    if cfg.fit == "resample":
        flux, valid, n = _resample(p, cap)
        real = jnp.arange(cap)[None, :] < n[:, None]
    else:
        flux, valid, n, real = p.flux, p.valid, p.n, p.real
    # Values that count: every real one (masked ones interpolated), or only valid ones in gap
    # mode. They show in the first min(n, cap) cells; the rest are dropped.
    shown = real & (valid | ~dyn["gap"])
    length = flux.shape[1]

    def cells(v, empty):
        """[B, length] per value → [B, cap + 1] per cell, the extra last cell being 'empty'."""
        v = jnp.where(shown, v, empty)
        if length >= cap:
            v = v[:, :cap]
        else:
            v = jnp.concatenate([v, jnp.full((b, cap - length), empty, v.dtype)], axis=1)
        return jnp.concatenate([v, jnp.full((b, 1), empty, v.dtype)], axis=1)

    # map2d: viridis colours.
    lo_s, den_s = _minmax_scale(flux, shown)
    lo = jnp.where(dyn["minmax"], lo_s, dyn["vmin"])
    den = jnp.where(dyn["minmax"], den_s, dyn["vrange"])
    # Empty cells hold the value 0 before colouring (the reference's zeroed image).
    t = _ieee_div(cells(flux, 0.0) - lo, den)
    # matplotlib's Colormap: floor(t · N), t == 1 → N − 1, under → 0, over → N − 1.
    index = jnp.clip(jnp.floor(t * 256.0), 0, 255).astype(jnp.int32)
    lut = jnp.where(dyn["quantize"], _lut(True), _lut(False))
    viridis = lut[index]                                      # [B, cap + 1, 3]

    # map2dnormal(dev): R flux, G / B first / second derivative, each min–max to 0–255.
    g1 = _gradient(flux, n)
    scaled = []
    for ch in (flux, g1, _gradient(g1, n)):
        lo, den = _minmax_scale(ch, shown)
        v = _ieee_div(255 * (ch - lo), den)                   # the reference's 0–255 scaling
        # Quantised: its int() truncation, k / 255 as the 8-bit image holds it.
        scaled.append(cells(jnp.where(dyn["quantize"], _levels(jnp.floor(v)),
                                      jnp.clip(v / 255.0, 0.0, 1.0)), 0.0))
    dev = dyn["map_kind"] == 2
    normal = jnp.stack([scaled[0], jnp.where(dev, scaled[1], 0.0),
                        jnp.where(dev, scaled[2], 0.0)], axis=-1)   # [B, cap + 1, 3]
    per_cell = jnp.where(dyn["map_kind"] == 0, viridis, normal)
    return _blocks(per_cell, cfg, dyn["boustrophedon"])       # [B, size, size, 3]


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def _check_increasing(wavelength: np.ndarray) -> None:
    """Host-side check that wavelengths never decrease along a row (padding ignored): the
    rasteriser and the block order rely on it, and under jit it cannot be checked."""
    w = np.atleast_2d(np.asarray(wavelength, np.float64))
    real = np.isfinite(w) & (w > 0)
    running = np.maximum.accumulate(np.where(real, w, -np.inf), axis=1)
    bad = real[:, 1:] & (w[:, 1:] < running[:, :-1])
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"wavelength must not decrease along a spectrum (padding aside): row {row} has "
            f"{w[row, col + 1]} Å at pixel {col + 1} after {running[row, col]} Å; sort the "
            "pixels by wavelength first")


def _check_inputs(representation, flux, mask, wavelength, cfg: RenderConfig):
    if representation not in REPRESENTATIONS:
        raise ValueError(f"unknown representation {representation!r}; "
                         f"choose from {representations()}")
    flux = jnp.asarray(flux)
    if flux.ndim != 2:
        raise ValueError(f"flux must be [B, L], got shape {flux.shape}")
    b, length = flux.shape
    if length < 1:
        raise ValueError("flux has no pixels (L = 0)")
    mask = jnp.ones((b, length), bool) if mask is None else jnp.asarray(mask)
    if wavelength is None:
        # Pixel index + 1 as the x axis (positive, so nothing counts as padding).
        wavelength = jnp.broadcast_to(jnp.arange(1, length + 1, dtype=jnp.float32), (b, length))
    if isinstance(wavelength, np.ndarray):
        _check_increasing(wavelength)
    wavelength = jnp.asarray(wavelength)
    if wavelength.ndim == 1:
        wavelength = jnp.broadcast_to(wavelength, (b, wavelength.shape[0]))
    for name, arr in (("mask", mask), ("wavelength", wavelength)):
        if arr.shape != (b, length):
            raise ValueError(f"{name} has shape {arr.shape}, flux has {(b, length)}")
    if representation not in _LINE_REPS and cfg.fit == "error" and length > cfg.capacity:
        raise ValueError(
            f"{representation}: spectra of {length} pixels do not fit the {cfg.capacity} "
            f"cells of a {cfg.blocks_per_side} × {cfg.blocks_per_side} block map. Choose "
            "fit='truncate' (keep the first values and drop the rest, as the reference does) "
            "or fit='resample' (linear resampling in wavelength onto the cells); under jit "
            "only the padded length is known, so this is decided on it")
    return (flux.astype(jnp.float32), mask.astype(bool), wavelength.astype(jnp.float32))


_LINE_FIELDS = ("linewidth", "dpi", "margin", "x_limits", "y_limits", "robust_quantiles",
                "line_color", "overlap_colors", "overlap_alpha", "segment_chunk")
_MAP_FIELDS = ("block_size", "fill_order", "fit", "map_scale", "vmin", "vmax")
# Options that only change values, not shapes or code paths: passed to the compiled function
# as arrays, so changing them (or switching representations' unused fields) reuses it.
_DYNAMIC_FIELDS = ("linewidth", "dpi", "margin", "line_color", "overlap_colors",
                   "overlap_alpha", "fill_order", "map_scale", "vmin", "vmax", "masked",
                   "quantize")


def _split(representation: str, cfg: RenderConfig):
    """(kind, static config, dynamic arrays): kind ("simple", "overlap" or "map") and the static
    config key the compiled function; fields the representation ignores are reset to their
    defaults so that they never cause a recompile."""
    default = RenderConfig()
    unused = _MAP_FIELDS if representation in _LINE_REPS else _LINE_FIELDS
    static = dataclasses.replace(
        cfg, **{f: getattr(default, f) for f in set(unused) | set(_DYNAMIC_FIELDS)})
    kind = representation if representation in _LINE_REPS else "map"
    f32 = functools.partial(np.asarray, dtype=np.float32)
    dyn = {
        "hw": f32(cfg.half_width_px), "margin": f32(cfg.margin),
        "line_color": f32(cfg.line_color), "overlap_colors": f32(cfg.overlap_colors),
        "overlap_alpha": f32(cfg.overlap_alpha),
        "boustrophedon": np.asarray(cfg.fill_order == "boustrophedon"),
        "minmax": np.asarray(cfg.map_scale == "minmax"),
        # vmax − vmin in float64 first, then float32, as numpy/matplotlib do.
        "vmin": f32(cfg.vmin), "vrange": f32(cfg.vmax - cfg.vmin),
        "gap": np.asarray(cfg.masked == "gap"), "quantize": np.asarray(bool(cfg.quantize)),
        "map_kind": np.asarray({"map2d": 0, "map2dnormal": 1}.get(representation, 2)),
    }
    return kind, static, dyn


def _render_impl(kind: str, cfg: RenderConfig, flux, mask, wavelength, dyn):
    if flux.shape[1] == 1:
        # One pixel: add a padding pixel so there is a (non-drawn) segment axis.
        flux = jnp.concatenate([flux, jnp.zeros_like(flux)], axis=1)
        mask = jnp.concatenate([mask, jnp.zeros_like(mask)], axis=1)
        wavelength = jnp.concatenate([wavelength, jnp.full_like(wavelength, -1.0)], axis=1)
    p = _prepare(flux, mask, wavelength)
    if kind == "simple":
        img = _render_simple(p, cfg, dyn)
    elif kind == "overlap":
        img = _render_overlap(p, cfg, dyn)
    else:
        img = _render_map(p, cfg, dyn)
    return img.astype(jnp.float32)


_render_jit = jax.jit(_render_impl, static_argnums=(0, 1))


def render(representation: str, flux, mask=None, wavelength=None,
           config: RenderConfig | dict | None = None, **options) -> jax.Array:
    """Renders B spectra as images (see the module docstring for every representation).

    Args:
      representation: one of :func:`representations`.
      flux: [B, L] float, any flux units (map2d's fixed vmin/vmax assume 1e-17 erg/s/cm²/Å).
      mask: [B, L] bool, True = valid pixel; None = all valid.
      wavelength: [B, L] or [L] float, Å; −1 (or non-finite, ≤ 0) marks padding. None = pixel
        index.
      config: a :class:`RenderConfig` (or a dict of its fields); ``options`` override fields.

    Returns:
      float32 [B, size, size, 3] in [0, 1], RGB, row 0 at the top.

    Raises:
      ValueError: unknown representation or option, mismatched shapes, or a block map whose
        padded length exceeds its cells with ``fit="error"``.

    Jittable with ``representation``, ``config`` and ``options`` static, e.g.
    ``jax.jit(functools.partial(render, "map2d", fit="truncate"))``; called eagerly it runs a
    cached jitted function per (representation, options).
    """
    cfg = _with_options(config, options)
    flux, mask, wavelength = _check_inputs(representation, flux, mask, wavelength, cfg)
    kind, static, dyn = _split(representation, cfg)
    return _render_jit(kind, static, flux, mask, wavelength, dyn)


def render_batch(representation: str, batch, config=None, **options) -> jax.Array:
    """:func:`render` of a :class:`spectrax.spectra.SpectrumBatch`."""
    return render(representation, batch.flux, batch.mask, batch.wavelength, config, **options)


def to_vit_input(images) -> jax.Array:
    """The reference's ViT normalisation: pixel/255 then (x − 0.5) / 0.5 per channel; our images
    are already pixel/255, so this is 2x − 1 (values in [−1, 1])."""
    return jnp.asarray(images) * 2.0 - 1.0


def to_uint8(images) -> np.ndarray:
    """Images in [0, 1] → uint8 (round to nearest; k/255 inputs map back to k exactly)."""
    x = np.asarray(images, dtype=np.float32)
    return np.round(np.clip(np.nan_to_num(x), 0.0, 1.0) * 255.0).astype(np.uint8)


def write_png(path: str | Path, image) -> Path:
    """Writes one image ([H, W], [H, W, 3] or [H, W, 4]; float in [0, 1] or uint8) as a PNG.

    Plain zlib, no imaging library needed."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = to_uint8(img)
    if img.ndim == 2:
        colour_type = 0
    elif img.ndim == 3 and img.shape[2] in (3, 4):
        colour_type = 2 if img.shape[2] == 3 else 6
    else:
        raise ValueError(f"write_png wants [H, W], [H, W, 3] or [H, W, 4], got {img.shape}")
    h, w = img.shape[:2]
    rows = np.ascontiguousarray(img).reshape(h, -1)
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
           + chunk(b"IEND", b""))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


# --------------------------------------------------------------------------------------------
# Command line: contact sheet
# --------------------------------------------------------------------------------------------
def load_spectra(n: int, input_dir: str | None = None, split: str = "test", seed: int = 0):
    """n spectra as numpy (flux [n, L], mask [n, L], wavelength [n, L], labels [str]).

    Without ``input_dir``: simulated DESI BGS-like galaxies on the DESI grid. With it: the first
    n records of ``split`` of a spectrax shard directory (their own wavelengths, else the
    manifest grid), padded to a common length with wavelength −1."""
    if input_dir is None:
        from spectrax.data import grids, synthetic

        sim = synthetic.simulate_desi_galaxies(n, "bgs", seed)
        wave = np.broadcast_to(grids.desi_wavelength(), sim["flux"].shape)
        labels = [f"z={z:.3f}" for z in sim["z"]]
        return sim["flux"], sim["mask"], np.asarray(wave, np.float32), labels
    import itertools

    from spectrax.data import shards
    from spectrax.spectra import sanitize_record, stack_records

    manifest = shards.read_manifest(input_dir)
    records = [sanitize_record(r, f"{input_dir} record {i}")[0]
               for i, r in enumerate(itertools.islice(shards.iter_records(input_dir, split), n))]
    if not records:
        raise ValueError(f"{input_dir}: split {split!r} has no records")
    batch = stack_records(records, len(manifest.label_names), grid=manifest.grid_array())
    labels = [str(r.get("id", i)) for i, r in enumerate(records)]
    return batch.flux, batch.mask, batch.wavelength, labels


def contact_sheet(images: dict[str, np.ndarray], labels: Sequence[str], out: str | Path) -> Path:
    """One PNG: rows = representations, columns = spectra, each image at its native size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(images)
    n = len(labels)
    size = next(iter(images.values())).shape[1]
    left, top, gap = 110, 24, 6                               # px
    width = left + n * (size + gap)
    height = top + len(names) * (size + gap)
    fig = plt.figure(figsize=(width / 100, height / 100), dpi=100)
    for r, name in enumerate(names):
        for c in range(n):
            x0 = (left + c * (size + gap)) / width
            y0 = 1 - (top + r * (size + gap) + size) / height
            ax = fig.add_axes([x0, y0, size / width, size / height])
            ax.imshow(to_uint8(images[name][c]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
            if r == 0:
                ax.set_title(labels[c], fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spectrax.render",
        description="Render N spectra in each representation into one contact-sheet PNG.")
    parser.add_argument("--representations", default=",".join(representations()),
                        help=f"comma-separated, from {','.join(representations())}")
    parser.add_argument("--n", type=int, default=8, help="spectra (columns)")
    parser.add_argument("--out", default="sheet.png", help="output PNG")
    parser.add_argument("--input", default=None,
                        help="spectrax shard directory; default: simulated DESI BGS spectra")
    parser.add_argument("--split", default="test", help="split of --input")
    parser.add_argument("--seed", type=int, default=0, help="simulation seed")
    parser.add_argument("--fit", default="truncate", choices=_FITS,
                        help="block maps, spectra longer than 5476 values (DESI has 7781)")
    parser.add_argument("--fill-order", default="standard", choices=_FILL_ORDERS)
    parser.add_argument("--masked", default="interpolate", choices=("interpolate", "gap"))
    args = parser.parse_args(argv)
    reps = [r.strip() for r in args.representations.split(",") if r.strip()]
    for r in reps:
        if r not in REPRESENTATIONS:
            parser.error(f"unknown representation {r!r}; choose from {representations()}")
    if args.n < 1:
        parser.error("--n must be ≥ 1")
    flux, mask, wave, labels = load_spectra(args.n, args.input, args.split, args.seed)
    cfg = RenderConfig(fit=args.fit, fill_order=args.fill_order, masked=args.masked)
    images = {r: np.asarray(render(r, flux, mask, wave, cfg)) for r in reps}
    path = contact_sheet(images, labels, args.out)
    print(f"wrote {path} ({len(reps)} representations × {len(labels)} spectra)")
    return 0


if __name__ == "__main__":
    runtime.configure()  # XLA:CPU flag and log levels, before any computation
    raise SystemExit(main())
