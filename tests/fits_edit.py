"""Test helper: a FITS file copied through astropy with an in-memory edit (bad-input cases)."""
from __future__ import annotations

from pathlib import Path

from astropy.io import fits


def edited_copy(src: Path, dst: Path, edit) -> Path:
    """Copies ``src`` to ``dst``, applying ``edit(hdul)`` to the loaded HDUList first."""
    with fits.open(src, memmap=False) as hdul:
        for hdu in hdul:
            _ = hdu.data  # load everything before editing/writing
        edit(hdul)
        hdul.writeto(dst, output_verify="silentfix")
    return dst
