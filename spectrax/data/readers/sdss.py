"""SDSS / BOSS ``spec-PLATE-MJD-FIBER.fits`` (spec-lite) reader, native log-linear grid.

A spec-lite file holds one spectrum: HDU ``COADD`` is a table with one row per pixel
(``loglam`` = log10 of the vacuum wavelength in Å, ``flux`` in 1e-17 erg/s/cm²/Å, ``ivar`` its
inverse variance, ``and_mask`` the pixel bitmask that is set when every exposure flagged the
pixel); the second HDU is the one-row spectroscopic catalogue entry (Z, CLASS, SUBCLASS,
SPECOBJID, PLATE, MJD, FIBERID, ...), named ``SPECOBJ`` in SDSS-I/II (DR7-era run2d 26) files
and ``SPALL`` in every BOSS/eBOSS file from DR9 on (run2d v5_x): both are read, with the same
columns.

A pixel is bad when ``and_mask != 0`` or ``ivar <= 0`` (counted as ``flagged`` and
``nonpositive_ivar`` by :func:`spectrax.spectra.sanitize_record`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from spectrax.data.readers.common import (ReadResult, as_paths, bump, finish_record, get_hdu,
                                          open_fits, table_columns)
from spectrax.spectra import CLASS_IDS, SpectrumError

LABEL_NAMES = ("z", "class")
# The catalogue-row HDU: SPECOBJ (SDSS-I/II), SPALL (BOSS/eBOSS, DR9 on).
CATALOGUE_HDUS = ("SPECOBJ", "SPALL")
SPECOBJ_META = ("Z", "Z_ERR", "ZWARNING", "CLASS", "SUBCLASS", "PLATE", "MJD", "FIBERID",
                "PLUG_RA", "PLUG_DEC", "SN_MEDIAN_ALL", "SPECPRIMARY", "RUN2D")


def pack_plate_mjd_fiber(plate: int, mjd: int, fiber: int) -> np.int64:
    """A unique int64 from PLATE (< 100000), MJD (< 100000) and FIBERID (< 10000).

    Used only when SPECOBJ has no SPECOBJID; the digits read PLATE·10^9 + MJD·10^4 + FIBERID.
    """
    return np.int64(int(plate) * 10**9 + int(mjd) * 10**4 + int(fiber))


def _labels_and_id(spec: dict[str, np.ndarray], path: Path, counts: dict) -> tuple:
    """(labels [2] float32, id, meta) from the SPECOBJ/SPALL columns of row 0."""
    z = float(spec["Z"][0]) if "Z" in spec else np.nan
    cls = str(spec["CLASS"][0]).upper() if "CLASS" in spec else ""
    cls_id = float(CLASS_IDS[cls]) if cls in CLASS_IDS else np.nan
    if not np.isfinite(z) or np.isnan(cls_id):
        bump(counts, "labels_missing")
    sid = str(spec.get("SPECOBJID", [""])[0]).strip()
    if sid.lstrip("-").isdigit() and int(sid) > 0:
        tid = np.int64(int(sid))
    elif all(k in spec for k in ("PLATE", "MJD", "FIBERID")):
        tid = pack_plate_mjd_fiber(spec["PLATE"][0], spec["MJD"][0], spec["FIBERID"][0])
        bump(counts, "id_from_plate_mjd_fiber")
    else:
        raise SpectrumError(f"{path}: the catalogue HDU has neither SPECOBJID nor "
                            "PLATE/MJD/FIBERID; "
                            "cannot give the spectrum an id")
    meta = {k: spec[k][0] for k in SPECOBJ_META if k in spec and np.ndim(spec[k]) == 1}
    meta.update(survey="sdss", file=path.name, SPECOBJID=sid or None)
    return np.array([z, cls_id], np.float32), tid, meta


def read_sdss_file(path: str | Path, counts: dict[str, int] | None = None) -> dict | None:
    """Reads one spec-lite file into a record (None if no pixel is valid; counted).

    Returns a record with ``flux``/``ivar``/``mask``/``wavelength`` [L] (L = COADD rows, ~3800
    for SDSS, ~4600 for BOSS), ``labels`` [2] = (Z, CLASS id), ``id`` = SPECOBJID.
    """
    path = Path(path)
    counts = {} if counts is None else counts
    with open_fits(path) as hdul:
        coadd = table_columns(get_hdu(hdul, "COADD", path).data,
                              ("loglam", "flux", "ivar", "and_mask"), (), f"{path} HDU COADD")
        name = next((h for h in CATALOGUE_HDUS if h in hdul), CATALOGUE_HDUS[0])
        spec = table_columns(get_hdu(hdul, name, path).data, (),
                             ("Z", "CLASS", "SPECOBJID", *SPECOBJ_META), f"{path} HDU {name}")
    labels, tid, meta = _labels_and_id(spec, path, counts)
    # loglam is stored as float32; 10** in float64 keeps the grid as exact as the file allows.
    wave = 10.0 ** np.asarray(coadd["loglam"], np.float64)
    raw = {"flux": coadd["flux"], "ivar": coadd["ivar"], "mask": coadd["and_mask"] == 0,
           "wavelength": wave, "labels": labels, "id": tid, "meta": meta}
    return finish_record(raw, f"{path} (SPECOBJID {meta['SPECOBJID']})", counts)


def read_sdss(paths: str | Path | Sequence[str | Path]) -> ReadResult:
    """Reads SDSS spec-lite files, one record each.

    Args:
      paths: one file or a list of files.

    Returns:
      :class:`ReadResult` with ``label_names`` ``("z", "class")`` (class ids GALAXY 0, QSO 1,
      STAR 2; NaN for an unknown CLASS) and counts of masked pixels (``flagged`` = and_mask,
      ``nonpositive_ivar``, ...), ``all_pixels_masked``, ``labels_missing``.

    Raises:
      SpectrumError: naming the file when it is missing, truncated, lacks COADD/SPECOBJ(SPALL) or a
        column (listing what it has), or has unsorted wavelengths.
    """
    files = as_paths(paths)
    counts: dict[str, int] = {"all_pixels_masked": 0, "labels_missing": 0}
    records = [r for r in (read_sdss_file(p, counts) for p in files) if r is not None]
    return ReadResult(records, counts, LABEL_NAMES, [str(p) for p in files])
