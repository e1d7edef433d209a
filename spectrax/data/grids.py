"""Instrument wavelength grids (vacuum Å).

Every fixed-grid model in spectrax is defined on one of these grids; readers resample or merge
onto them, the simulator draws spectra on them. Values follow ../shared/SIMULATOR.md and the
survey data models.
"""
from __future__ import annotations

import numpy as np

# DESI coadd with the b, r and z cameras merged: 3600–9824 Å in 0.8 Å steps (7781 pixels).
DESI_WAVE_MIN = 3600.0
DESI_WAVE_STEP = 0.8
DESI_NPIX = 7781
# Camera ranges (Å) of the DESI spectrographs; they overlap (b/r 5760–5800, r/z 7520–7620).
DESI_CAMERAS = {"b": (3600.0, 5800.0), "r": (5760.0, 7620.0), "z": (7520.0, 9824.0)}


def desi_wavelength() -> np.ndarray:
    """The merged DESI coadd grid: [7781] float64, Å (vacuum), 3600.0 … 9824.0."""
    return DESI_WAVE_MIN + DESI_WAVE_STEP * np.arange(DESI_NPIX, dtype=np.float64)
