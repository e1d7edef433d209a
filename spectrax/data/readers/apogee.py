"""APOGEE ``aspcapStar`` and ``apStar`` reader, chip gaps removed (7514 pixels), native grid.

Both products sample 8575 pixels on ``log10 λ = CRVAL1 + CDELT1 · k`` (4.179, 6e-6; vacuum Å,
rest frame for aspcapStar). Only the pixels the three detectors cover are kept:
k ∈ [246, 3273] ∪ [3585, 6079] ∪ [6344, 8334] (3028 + 2495 + 1991 = 7514 pixels,
15152–16944 Å), as in SpectraFM and the Multimodal Universe APOGEE set.

aspcapStar (HDU1 pseudo-continuum-normalised flux, HDU2 its error, HDU3 the ASPCAP best-fit
synthetic spectrum, HDU4 the one-row ASPCAP table): a pixel is masked when its flux is
< 0.05 or > 1.2 (SpectraFM's rule, counted as ``flux_out_of_range``), non-finite, or its error
is <= 0 / non-finite; ivar = 1 / error². ``use_model=True`` returns the best-fit synthetic
spectrum as the flux (SpectraFM pre-trains on those); the range rule then applies to the model
and the ivar is still the observed spectrum's.

apStar (HDU1 flux [1 + 1 + n_visits, 8575] or [8575], HDU2 error, HDU3 APOGEE pixel bitmask):
the combined spectrum is row 0; a pixel is masked when its bitmask is > 0 (``flagged``) or its
error <= 0. Flux is in 1e-17 erg/s/cm²/Å. The file carries no labels (all NaN).

Labels (``LABEL_NAMES``): teff and logg are the calibrated PARAM entries (index 0 and 1, the
order TEFF, LOGG, VMICRO, M_H, C_M, N_M, ALPHA_M, VSINI, O_M of DR13–DR17 ``PARAM_SYMBOL``);
fe_h = X_H[Fe], o_fe = X_H[O] − X_H[Fe], mg_fe = X_H[Mg] − X_H[Fe] with the DR13
``ELEM_SYMBOL`` order (used when the table has no ``ELEM_SYMBOL`` column of its own); this is
how allStar defines FE_H, O_FE and MG_FE. −9999 (not calibrated) → NaN. The raw FERRE fit
(FPARAM) and PARAM's [M/H] go to ``meta`` (``FPARAM_TEFF``, ..., ``PARAM_M_H``).

Id: a stable 63-bit blake2b hash of APOGEE_ID (kept in ``meta``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from astropy.io import fits

from spectrax.data.readers.common import (ReadResult, as_paths, bump, finish_record, get_hdu,
                                          header_value, native, open_fits, stable_id,
                                          table_columns)
from spectrax.spectra import SpectrumError

LABEL_NAMES = ("teff", "logg", "fe_h", "o_fe", "mg_fe")
NPIX_FULL = 8575
CHIPS = ((246, 3274), (3585, 6080), (6344, 8335))  # [start, stop) in apStar pixel index
CHIP_PIXELS = np.concatenate([np.arange(a, b) for a, b in CHIPS])  # [7514]
FLUX_RANGE = (0.05, 1.2)  # normalised-flux range kept (SpectraFM)
PARAM_NAMES = ("TEFF", "LOGG", "VMICRO", "M_H", "C_M", "N_M", "ALPHA_M", "VSINI", "O_M")
ELEM_NAMES_DR13 = ("C", "CI", "N", "O", "Na", "Mg", "Al", "Si", "P", "S", "K", "Ca", "Ti",
                   "TiII", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Ge", "Ce", "Rb", "Y", "Nd")
MISSING = -9999.0
ASPCAP_META = ("APOGEE_ID", "FIELD", "LOCATION_ID", "RA", "DEC", "SNR", "VHELIO", "VSCATTER",
               "STARFLAG", "ASPCAPFLAG", "NVISITS", "CLASS")


def wavelength_full(header: fits.Header, path: Path, n: int = NPIX_FULL) -> np.ndarray:
    """[n] vacuum Å from the header's log-linear CRVAL1/CDELT1 (pixel 0 at CRVAL1)."""
    crval = float(header_value(header, "CRVAL1", path, "image"))
    cdelt = float(header_value(header, "CDELT1", path, "image"))
    crpix = float(header.get("CRPIX1", 1.0))
    return 10.0 ** (crval + cdelt * (np.arange(n) - (crpix - 1.0)))


def _image(hdul: fits.HDUList, index: int, path: Path, row0: bool = False) -> np.ndarray:
    """HDU ``index`` as float64 [8575] (row 0 of a 2-D image when ``row0``)."""
    data = native(get_hdu(hdul, index, path).data, np.float64)
    if row0 and data.ndim == 2:
        data = data[0]
    if data.ndim != 1 or data.shape[0] != NPIX_FULL:
        raise SpectrumError(f"{path}: HDU {index} has shape {data.shape}; expected "
                            f"({NPIX_FULL},) on the apStar grid (or [rows, {NPIX_FULL}] for apStar)")
    return data


def _ivar(error: np.ndarray) -> np.ndarray:
    """1/error² where the error is finite and > 0, else 0 (masked later)."""
    ok = np.isfinite(error) & (error > 0)
    return np.where(ok, 1.0 / np.where(ok, error, 1.0) ** 2, 0.0)


def _calibrated(values: np.ndarray, i: int | None) -> float:
    if i is None or i >= len(values):
        return np.nan
    v = float(values[i])
    return np.nan if (not np.isfinite(v) or v <= MISSING + 1) else v


def aspcap_labels(table: dict[str, np.ndarray]) -> tuple[np.ndarray, dict]:
    """([5] float32 labels, meta) from the ASPCAP table columns of row 0 (see module docstring)."""
    param = np.asarray(table["PARAM"][0], np.float64)
    elem_names = (tuple(str(s).strip() for s in table["ELEM_SYMBOL"][0])
                  if "ELEM_SYMBOL" in table else ELEM_NAMES_DR13)
    idx = {n: i for i, n in enumerate(elem_names)}
    x_h = np.asarray(table["X_H"][0], np.float64) if "X_H" in table else np.array([])
    fe = _calibrated(x_h, idx.get("Fe"))
    labels = np.array([_calibrated(param, 0), _calibrated(param, 1), fe,
                       _calibrated(x_h, idx.get("O")) - fe,
                       _calibrated(x_h, idx.get("Mg")) - fe], np.float32)
    meta = {f"PARAM_{n}": _calibrated(param, i) for i, n in enumerate(PARAM_NAMES)
            if n in ("M_H", "ALPHA_M")}
    if "FPARAM" in table:
        fparam = np.asarray(table["FPARAM"][0], np.float64)
        meta.update({f"FPARAM_{n}": _calibrated(fparam, i) for i, n in enumerate(PARAM_NAMES)})
    meta.update({k: table[k][0] for k in ASPCAP_META if k in table})
    return labels, meta


def _finish(flux, ivar, mask, wave, labels, apogee_id, meta, where, counts) -> dict | None:
    """Cuts the chip gaps, counts, and sanitises one spectrum."""
    keep = CHIP_PIXELS
    meta.update(APOGEE_ID=apogee_id)
    if not np.isfinite(labels).any():
        bump(counts, "labels_missing")
    raw = {"flux": flux[keep], "ivar": ivar[keep], "mask": mask[keep], "wavelength": wave[keep],
           "labels": labels, "id": stable_id(apogee_id), "meta": meta}
    return finish_record(raw, where, counts)


def read_aspcapstar_file(path: str | Path, counts: dict[str, int] | None = None, *,
                         use_model: bool = False) -> dict | None:
    """One aspcapStar file as a record: [7514] pixels, labels [5] (None if nothing valid)."""
    path = Path(path)
    counts = {} if counts is None else counts
    with open_fits(path) as hdul:
        obs, err, model = (_image(hdul, i, path) for i in (1, 2, 3))
        wave = wavelength_full(hdul[1].header, path)
        table = table_columns(get_hdu(hdul, 4, path).data, ("PARAM",),
                              ("FPARAM", "X_H", "ELEM_SYMBOL", *ASPCAP_META), f"{path} HDU 4")
        apogee_id = str(table.get("APOGEE_ID", [hdul[0].header.get("OBJ", path.stem)])[0])
    flux = model if use_model else obs
    with np.errstate(invalid="ignore"):
        in_range = (flux >= FLUX_RANGE[0]) & (flux <= FLUX_RANGE[1])
    bump(counts, "flux_out_of_range", int((~in_range & np.isfinite(flux))[CHIP_PIXELS].sum()))
    labels, meta = aspcap_labels(table)
    meta.update(survey="apogee", file=path.name, product="aspcapStar",
                flux_source="model" if use_model else "observed")
    return _finish(flux, _ivar(err), in_range, wave, labels, apogee_id, meta,
                   f"{path} (APOGEE_ID {apogee_id})", counts)


def read_apstar_file(path: str | Path, counts: dict[str, int] | None = None) -> dict | None:
    """One apStar file's combined spectrum (row 0) as a record: [7514] pixels, labels NaN."""
    path = Path(path)
    counts = {} if counts is None else counts
    with open_fits(path) as hdul:
        flux, err = _image(hdul, 1, path, row0=True), _image(hdul, 2, path, row0=True)
        bitmask = _image(hdul, 3, path, row0=True).astype(np.int64)
        wave = wavelength_full(hdul[1].header, path)
        header = hdul[0].header
    apogee_id = str(header.get("OBJID", path.stem.split("-")[-1])).strip()
    meta = {k: header[k] for k in ("RA", "DEC", "SNR", "NVISITS", "VHELIO", "FIELD", "TELESCOP")
            if k in header}
    meta.update(survey="apogee", file=path.name, product="apStar")
    labels = np.full(len(LABEL_NAMES), np.nan, np.float32)
    return _finish(flux, _ivar(err), bitmask == 0, wave, labels, apogee_id, meta,
                   f"{path} (APOGEE_ID {apogee_id})", counts)


def read_apogee(paths: str | Path | Sequence[str | Path], *, use_model: bool = False
                ) -> ReadResult:
    """Reads aspcapStar and apStar files (told apart by name: ``apStar*`` vs anything else).

    Args:
      paths: one file or a list of files.
      use_model: aspcapStar only: return the ASPCAP best-fit synthetic spectrum as the flux.

    Returns:
      :class:`ReadResult`: records of 7514 pixels with wavelength 15152–16944 Å, labels
      ``LABEL_NAMES``, counts (``flux_out_of_range``, ``flagged``, ``nonpositive_ivar``,
      ``labels_missing`` = spectra with no calibrated label at all, ``all_pixels_masked``).

    Raises:
      SpectrumError: naming the file when it is missing, truncated, has too few HDUs or a
        wrong-sized image, or lacks the ASPCAP PARAM column (listing what it has).
    """
    files = as_paths(paths)
    counts: dict[str, int] = {"all_pixels_masked": 0, "labels_missing": 0,
                              "flux_out_of_range": 0}
    records = []
    for p in files:
        rec = (read_apstar_file(p, counts) if p.name.startswith("apStar")
               else read_aspcapstar_file(p, counts, use_model=use_model))
        if rec is not None:
            records.append(rec)
    return ReadResult(records, counts, LABEL_NAMES, [str(p) for p in files])
