"""LAMOST low-resolution spectrum reader (both file layouts), native log-linear grid.

Layouts:
- DR1–DR4 style: the primary HDU is a 5 × N float image whose rows are (header EXTEN0)
  ``Flux Inverse Subcontinuum Andmask Ormask``: row 0 flux, row 1 inverse variance, row 2 the
  continuum-normalised flux, row 3 the AND mask, row 4 the OR mask. There is no wavelength
  array: ``log10 λ = COEFF0 + COEFF1 · i`` (i = 0 … N−1) from the primary header.
- DR5+ style: HDU 1 is a one-row binary table with vector columns FLUX, IVAR, WAVELENGTH,
  ANDMASK, ORMASK (the WAVELENGTH column is used as is).

In both, the primary header carries CLASS, SUBCLASS, Z, Z_ERR and (DR5+) OBSID.

A pixel is bad when ANDMASK != 0 or ivar <= 0. Flux is in the pipeline's relative flux units.

Vacuum vs air: the header keyword VACUUM says which. ``VACUUM = T`` (every fixture file, and
the LAMOST pipeline default) → used as is. ``VACUUM = F`` → converted with
:func:`spectrax.data.readers.common.air_to_vacuum` and counted as ``air_converted``. No keyword →
assumed vacuum (the pipeline's convention) and counted as ``vacuum_keyword_missing``.

Id: OBSID when the header has it (DR5+); DR1 files have none, so the id is a stable 63-bit hash
of ``LMJD-PLANID-SPID-FIBERID`` (which is what the file name encodes; unique per observation).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from astropy.io import fits

from spectrax.data.readers.common import (ReadResult, air_to_vacuum, as_paths, bump,
                                          finish_record, get_hdu, header_value, native,
                                          open_fits, stable_id, table_columns)
from spectrax.spectra import CLASS_IDS, SpectrumError

LABEL_NAMES = ("z", "class")
IMAGE_ROWS = {"flux": 0, "ivar": 1, "andmask": 3}  # rows of the DR1-style 5 × N image
TABLE_COLUMNS = ("FLUX", "IVAR", "WAVELENGTH", "ANDMASK")
HEADER_META = ("CLASS", "SUBCLASS", "Z", "Z_ERR", "OBSID", "DESIG", "OBJNAME", "RA", "DEC",
               "LMJD", "MJD", "PLANID", "SPID", "FIBERID", "SN_G", "SN_R", "VERSPIPE")
MISSING = -9999.0  # LAMOST's "no value"


def _image_arrays(hdul: fits.HDUList, path: Path) -> dict[str, np.ndarray]:
    """flux/ivar/andmask/wavelength [N] from the DR1-style 5 × N primary image."""
    hdu = get_hdu(hdul, 0, path)
    data = native(hdu.data, np.float64)
    if data.ndim != 2 or data.shape[0] < 4:
        raise SpectrumError(f"{path}: primary image has shape {data.shape}; expected 5 × N rows "
                            "(flux, ivar, subcontinuum, andmask, ormask)")
    c0 = float(header_value(hdu.header, "COEFF0", path))
    c1 = float(header_value(hdu.header, "COEFF1", path))
    out = {k: data[row] for k, row in IMAGE_ROWS.items()}
    out["wavelength"] = 10.0 ** (c0 + c1 * np.arange(data.shape[1]))
    return out


def _table_arrays(hdul: fits.HDUList, path: Path) -> dict[str, np.ndarray]:
    """flux/ivar/andmask/wavelength [N] from row 0 of the DR5+ HDU-1 table."""
    table = get_hdu(hdul, 1, path).data
    cols = table_columns(table, TABLE_COLUMNS, (), f"{path} HDU 1")
    if len(table) < 1:
        raise SpectrumError(f"{path} HDU 1: table has no rows")
    return {"flux": np.asarray(cols["FLUX"][0], np.float64),
            "ivar": np.asarray(cols["IVAR"][0], np.float64),
            "andmask": np.asarray(cols["ANDMASK"][0]),
            "wavelength": np.asarray(cols["WAVELENGTH"][0], np.float64)}


def _layout(hdul: fits.HDUList) -> str:
    """'table' when HDU 1 is a binary table, 'image' when the primary HDU holds the spectrum."""
    if len(hdul) > 1 and isinstance(hdul[1], fits.BinTableHDU):
        return "table"
    return "image"


def _to_vacuum(wave: np.ndarray, header: fits.Header, counts: dict) -> tuple[np.ndarray, str]:
    """Applies the VACUUM keyword rule (see module docstring); returns (λ, medium read)."""
    if "VACUUM" not in header:
        bump(counts, "vacuum_keyword_missing")
        return wave, "assumed vacuum"
    if bool(header["VACUUM"]):
        return wave, "vacuum"
    bump(counts, "air_converted")
    return air_to_vacuum(wave), "air→vacuum"


def _header_labels(header: fits.Header, counts: dict) -> np.ndarray:
    """[2] float32: (Z, CLASS id); NaN for -9999 / absent / unknown class."""
    z = float(header.get("Z", np.nan))
    z = np.nan if z == MISSING else z
    cls = str(header.get("CLASS", "")).strip().upper()
    cls_id = float(CLASS_IDS[cls]) if cls in CLASS_IDS else np.nan
    if np.isnan(z) or np.isnan(cls_id):
        bump(counts, "labels_missing")
    return np.array([z, cls_id], np.float32)


def _lamost_id(header: fits.Header, path: Path) -> np.int64:
    """OBSID if present, else a hash of LMJD-PLANID-SPID-FIBERID (see module docstring)."""
    obsid = header.get("OBSID")
    if obsid is not None and str(obsid).strip().isdigit():
        return np.int64(int(str(obsid).strip()))
    parts = [header.get(k) for k in ("LMJD", "PLANID", "SPID", "FIBERID")]
    key = "-".join(str(p).strip() for p in parts) if None not in parts else path.stem
    return stable_id(f"lamost:{key}")


def read_lamost_file(path: str | Path, counts: dict[str, int] | None = None) -> dict | None:
    """One LAMOST low-resolution file as a record (None when no pixel is valid; counted)."""
    path = Path(path)
    counts = {} if counts is None else counts
    with open_fits(path) as hdul:
        header = hdul[0].header
        layout = _layout(hdul)
        arrays = _table_arrays(hdul, path) if layout == "table" else _image_arrays(hdul, path)
    wave, medium = _to_vacuum(arrays["wavelength"], header, counts)
    meta = {k: header[k] for k in HEADER_META if k in header}
    meta.update(survey="lamost", file=path.name, layout=layout, wavelength_medium=medium)
    raw = {"flux": arrays["flux"], "ivar": arrays["ivar"],
           "mask": np.asarray(arrays["andmask"]) == 0, "wavelength": wave,
           "labels": _header_labels(header, counts), "id": _lamost_id(header, path),
           "meta": meta}
    return finish_record(raw, f"{path} ({layout} layout)", counts)


def read_lamost(paths: str | Path | Sequence[str | Path]) -> ReadResult:
    """Reads LAMOST low-resolution files (DR1-style image or DR5+ table), one record each.

    Returns:
      :class:`ReadResult`: records on each file's native grid (3904 pixels for the DR1
      fixtures, 3690–9100 Å), labels ``("z", "class")``, counts (``flagged`` = ANDMASK,
      ``nonpositive_ivar``, ``all_pixels_masked``, ``labels_missing``, vacuum rule counts).

    Raises:
      SpectrumError: naming the file when it is missing, truncated, lacks COEFF0/COEFF1 or a
        table column (listing what it has), has mismatched lengths or unsorted wavelengths.
    """
    files = as_paths(paths)
    counts: dict[str, int] = {"all_pixels_masked": 0, "labels_missing": 0}
    records = [r for r in (read_lamost_file(p, counts) for p in files) if r is not None]
    return ReadResult(records, counts, LABEL_NAMES, [str(p) for p in files])
