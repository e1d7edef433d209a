"""GALAH per-CCD spectrum reader: the four HERMES CCD files of a star → one native-grid record.

GALAH (internal reduction v6.0) writes one file per star and CCD, named
``<sobject_id><ccd>.fits`` (ccd 1–4: blue, green, red, IR). Each file has 8 HDUs: the primary
HDU is the fluxed spectrum (counts), then ``normalized``, ``relative_error``, ``sky``,
``teluric``, ``scattered``, ``cross_talk``, ``resolution_profile``; every extension carries
a LINEAR wavelength solution ``λ = CRVAL1 + CDELT1 · (i + 1 − CRPIX1)`` (Å, 4096 pixels).

The record of a star concatenates its CCDs in CCD order (≈4713–4903, 5648–5872, 6477–6736,
7584–7887 Å): the wavelength array is NOT uniform and has gaps between CCDs; nothing is
resampled. σ = relative_error × flux (of the extension used), ivar = 1/σ²; a pixel is masked
when the flux or σ is non-finite or σ <= 0 (no mask extension exists).

Air vs vacuum: the HERMES wavelength solutions are in AIR (arc lines in air; GALAH line lists
are air), and the headers do not say otherwise, so ``vacuum=True`` (default) converts them with
:func:`spectrax.data.readers.common.air_to_vacuum` (≈ +1.3–2.1 Å over 4700–7900 Å); pass
``vacuum=False`` to keep the file's numbers. The spectra are not shifted to the rest frame.

Labels come from a GALAH catalogue table (``dr6.0.fits`` of the fixtures: per-night database
with ``sobject_id`` and ``teff_r``, ``logg_r``, ``fe_h_r``; DR3/DR4 catalogues name them
``teff``, ``logg``, ``fe_h``; the plain names are preferred when both exist), matched by
sobject_id; a star absent from it gets NaN labels (counted ``labels_missing``).
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
from astropy.io import fits

from spectrax.data.readers.common import (ReadResult, air_to_vacuum, as_paths, bump,
                                          check_wavelength, finish_record, get_hdu,
                                          header_value, native, open_fits, table_columns)
from spectrax.spectra import SpectrumError

LABEL_NAMES = ("teff", "logg", "fe_h")
CATALOGUE_NAME = "dr6.0.fits"  # looked for next to the spectra when no catalogue is given
EXTENSIONS = {"normalized": "normalized", "fluxed": 0}  # option value → HDU (name or index)
ERROR_HDU = "relative_error"
HEADER_META = ("RV", "E_RV", "RVCOM", "TEFF_R", "LOGG_R", "FE_H_R", "AIRMASS", "WAV_OK")
_NAME = re.compile(r"^(\d+)([1-4])$")


def split_name(path: Path) -> tuple[int, int]:
    """(sobject_id, ccd) from a file name ``<sobject_id><ccd>.fits``."""
    m = _NAME.match(path.stem)
    if not m:
        raise SpectrumError(f"{path}: not a GALAH CCD file name (expected <sobject_id><1-4>.fits)")
    return int(m.group(1)), int(m.group(2))


def linear_wavelength(header: fits.Header, n: int, path: Path, hdu: str) -> np.ndarray:
    """[n] Å from CRVAL1/CDELT1/CRPIX1 of one extension header."""
    crval = float(header_value(header, "CRVAL1", path, hdu))
    cdelt = float(header_value(header, "CDELT1", path, hdu))
    crpix = float(header.get("CRPIX1", 1.0))
    return crval + cdelt * (np.arange(n) + 1.0 - crpix)


def read_ccd(path: Path, extension: str = "normalized") -> dict[str, np.ndarray]:
    """One CCD file: ``flux``, ``sigma``, ``wavelength`` (as in the file, Å) [4096], ``header``."""
    if extension not in EXTENSIONS:
        raise SpectrumError(f"extension={extension!r}; use one of {sorted(EXTENSIONS)}")
    with open_fits(path) as hdul:
        hdu = get_hdu(hdul, EXTENSIONS[extension], path)
        rel = native(get_hdu(hdul, ERROR_HDU, path).data, np.float64)
        flux = native(hdu.data, np.float64)
        if flux.ndim != 1 or rel.shape != flux.shape:
            raise SpectrumError(f"{path}: {extension} has shape {flux.shape} but {ERROR_HDU} has "
                                f"{rel.shape}; expected equal 1-D arrays")
        wave = linear_wavelength(hdu.header, flux.size, path, str(extension))
        header = hdul[0].header.copy()
    return {"flux": flux, "sigma": rel * flux, "wavelength": wave, "header": header}


def read_catalogue(path: str | Path) -> dict[int, np.ndarray]:
    """sobject_id → [3] float32 (teff, logg, fe_h) from a GALAH catalogue FITS table."""
    path = Path(path)
    with open_fits(path) as hdul:
        table = get_hdu(hdul, 1, path).data
        names = table.columns.names
        cols = [c if c in names else f"{c}_r" for c in LABEL_NAMES]
        data = table_columns(table, ("sobject_id", *cols), (), f"{path} HDU 1")
    values = np.stack([np.asarray(data[c], np.float64) for c in cols], axis=1)
    return {int(s): values[i].astype(np.float32) for i, s in enumerate(data["sobject_id"])}


def group_by_star(files: Sequence[Path]) -> dict[int, dict[int, Path]]:
    """{sobject_id: {ccd: path}} (duplicate CCD files of a star are an error)."""
    stars: dict[int, dict[int, Path]] = defaultdict(dict)
    for p in files:
        sid, ccd = split_name(p)
        if ccd in stars[sid]:
            raise SpectrumError(f"{p}: CCD {ccd} of sobject_id {sid} given twice "
                                f"(also {stars[sid][ccd]})")
        stars[sid][ccd] = p
    return dict(stars)


def combine_ccds(ccds: Sequence[dict], vacuum: bool) -> dict[str, np.ndarray]:
    """Concatenates CCD arrays in order: flux, ivar, mask, wavelength [Σ L_ccd]."""
    flux = np.concatenate([c["flux"] for c in ccds])
    sigma = np.concatenate([c["sigma"] for c in ccds])
    wave = np.concatenate([c["wavelength"] for c in ccds])
    ok = np.isfinite(sigma) & (sigma > 0)
    ivar = np.where(ok, 1.0 / np.where(ok, sigma, 1.0) ** 2, 0.0)
    return {"flux": flux, "ivar": ivar, "mask": ok,
            "wavelength": air_to_vacuum(wave) if vacuum else wave}


def _find_catalogue(files: Sequence[Path]) -> Path | None:
    candidate = files[0].parent / CATALOGUE_NAME if files else None
    return candidate if candidate is not None and candidate.exists() else None


def read_galah(star_files: str | Path | Sequence[str | Path], *,
               catalogue: str | Path | None = None, extension: str = "normalized",
               vacuum: bool = True) -> ReadResult:
    """Reads GALAH CCD files, one record per star (its CCDs concatenated).

    Args:
      star_files: CCD files ``<sobject_id><ccd>.fits`` (any number of stars, any order; a
        ``dr6.0.fits`` among them is taken as the catalogue). Stars with fewer than 4 CCDs are
        kept with the CCDs present (missing ones counted as ``missing_ccd``).
      catalogue: label table; default ``dr6.0.fits`` next to the first spectrum, if it exists
        (otherwise all labels are NaN and counted).
      extension: ``"normalized"`` (continuum-normalised) or ``"fluxed"`` (primary HDU, counts).
      vacuum: convert the air wavelengths to vacuum (see module docstring).

    Returns:
      :class:`ReadResult`: id = sobject_id, labels ``("teff", "logg", "fe_h")``, counts.

    Raises:
      SpectrumError: naming the file when it is missing, truncated, lacks an extension
        (listing what it has), has mismatched flux/error lengths or unsorted wavelengths.
    """
    files = [p for p in as_paths(star_files) if p.name != CATALOGUE_NAME]
    given = [p for p in as_paths(star_files) if p.name == CATALOGUE_NAME]
    cat_path = catalogue or (given[0] if given else _find_catalogue(files))
    labels_of = read_catalogue(cat_path) if cat_path else {}
    counts: dict[str, int] = {"all_pixels_masked": 0, "labels_missing": 0, "missing_ccd": 0}
    records = []
    for sid, by_ccd in sorted(group_by_star(files).items()):
        bump(counts, "missing_ccd", 4 - len(by_ccd))
        ccds = [read_ccd(by_ccd[c], extension) for c in sorted(by_ccd)]
        for c, path in zip(ccds, (by_ccd[k] for k in sorted(by_ccd))):
            check_wavelength(c["wavelength"], f"{path} field wavelength ({extension})")
        arrays = combine_ccds(ccds, vacuum)
        labels = labels_of.get(sid)
        if labels is None or not np.isfinite(labels).any():
            bump(counts, "labels_missing")
            labels = np.full(len(LABEL_NAMES), np.nan, np.float32)
        header = ccds[0]["header"]
        meta = {k: header[k] for k in HEADER_META if k in header}
        meta.update(survey="galah", sobject_id=sid, extension=extension,
                    files=",".join(by_ccd[c].name for c in sorted(by_ccd)),
                    ccds="".join(str(c) for c in sorted(by_ccd)),
                    ccd_pixels=",".join(str(c["flux"].size) for c in ccds),
                    wavelength_medium="air→vacuum" if vacuum else "air")
        rec = finish_record({**arrays, "labels": labels, "id": sid, "meta": meta},
                            f"{by_ccd[min(by_ccd)]} (sobject_id {sid})", counts)
        if rec is not None:
            records.append(rec)
    return ReadResult(records, counts, LABEL_NAMES, [str(p) for p in files])
