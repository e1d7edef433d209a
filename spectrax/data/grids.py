"""Instrument wavelength grids (vacuum Å).

Every fixed-grid model in spectrax is defined on one of these grids; readers resample or merge
onto them, the simulator draws spectra on them. Values follow ../shared/SIMULATOR.md and the
survey data models.
"""
from __future__ import annotations

import functools
import json
from typing import Any, Mapping

import numpy as np

from spectrax.spectra import SpectrumError

# DESI coadd with the b, r and z cameras merged: 3600–9824 Å in 0.8 Å steps (7781 pixels).
DESI_WAVE_MIN = 3600.0
DESI_WAVE_STEP = 0.8
DESI_NPIX = 7781
# Camera ranges (Å) of the DESI spectrographs; they overlap (b/r 5760–5800, r/z 7520–7620).
DESI_CAMERAS = {"b": (3600.0, 5800.0), "r": (5760.0, 7620.0), "z": (7520.0, 9824.0)}
# The same grid as a descriptor (:func:`grid_array`): what DESI records and
# shard manifests store instead of a 7781-value array.
DESI_GRID = {"kind": "linear", "start": DESI_WAVE_MIN, "step": DESI_WAVE_STEP, "n": DESI_NPIX}


def desi_wavelength() -> np.ndarray:
    """The merged DESI coadd grid: [7781] float64, Å (vacuum), 3600.0 … 9824.0."""
    return DESI_WAVE_MIN + DESI_WAVE_STEP * np.arange(DESI_NPIX, dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# Wavelength grids described in a few numbers
# ----------------------------------------------------------------------------------------------
def grid_array(desc: Mapping[str, Any]) -> np.ndarray:
    """A wavelength grid [n] float64 (Å) from its descriptor:

    - ``{"kind": "linear", "start": Å, "step": Å, "n": int}``
    - ``{"kind": "loglinear", "log10_start": ..., "log10_step": ..., "n": int}``
    - ``{"kind": "segments", "segments": [descriptor, ...]}``: concatenated sub-grids (CCDs,
      chips with gaps between them).

    Records and manifests store descriptors instead of arrays where a grid has a closed form:
    an APOGEE wavelength array is 30 kB per spectrum, its descriptor ~150 bytes. The returned
    array is read-only and shared by every caller naming the same grid.
    """
    return _grid_cached(grid_key(desc))


def grid_f32(desc: Mapping[str, Any] | str) -> np.ndarray:
    """:func:`grid_array` as float32 (what records decode to; one shared read-only array per
    grid). ``desc`` may also be the JSON text of a descriptor (as shards store it)."""
    return _grid_f32(desc if isinstance(desc, str) else grid_key(desc))


def grid_key(desc: Mapping[str, Any]) -> str:
    """The canonical JSON text of a descriptor (sorted keys, numpy scalars as Python ones)."""
    return json.dumps(desc, sort_keys=True,
                      default=lambda v: v.item() if isinstance(v, np.generic) else v)


@functools.lru_cache(maxsize=256)
def _grid_cached(key: str) -> np.ndarray:
    desc = json.loads(key)
    kind = desc.get("kind")
    if kind == "linear":
        out = desc["start"] + desc["step"] * np.arange(desc["n"])
    elif kind == "loglinear":
        out = 10.0 ** (desc["log10_start"] + desc["log10_step"] * np.arange(desc["n"]))
    elif kind == "segments":
        out = np.concatenate([_grid_cached(grid_key(d)) for d in desc["segments"]])
    else:
        raise SpectrumError(f"wavelength grid of unknown kind {kind!r} (descriptor {desc})")
    out = np.asarray(out, np.float64)
    out.setflags(write=False)  # shared by every record that names this grid
    return out


@functools.lru_cache(maxsize=256)
def _grid_f32(key: str) -> np.ndarray:
    out = _grid_cached(key).astype(np.float32)
    out.setflags(write=False)
    return out
