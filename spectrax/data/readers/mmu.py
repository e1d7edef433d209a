"""Multimodal Universe (MMU) spectrum HDF5 reader: native grids, padding stripped.

An MMU spectrum file (``<config>/healpix=<N>/*.hdf5``) stores one dataset per column, one row
per object: ``object_id`` [N], ``ra``/``dec`` [N], ``spectrum_flux``/``spectrum_ivar``/
``spectrum_lambda``/``spectrum_mask``/``spectrum_lsf_sigma`` [N, L], plus catalogue columns [N].
Rows shorter than the file's L are padded at the end with λ = −1 and ivar 0.

Pixel validity (True = valid) per survey, after SPECS.md section 3 (``spectrum_mask`` is the
survey's mask: True / non-zero = BAD):

- ``sdss``: mask == 0 and ivar > 1e-6 (the MMU mask is and_mask ≠ 0 or ivar ≤ 1e-6).
- ``desi``: mask == 0 and ivar >= 1e-6 (MASK > 0 or ivar < 1e-6 is bad).
- ``galah``: no mask field; derived: ivar > 0, λ > 0, flux and ivar finite.
- ``apogee``: mask == 0 and ivar >= 1e-6 and finite (bitmask > 0, ivar < 1e-6 or NaN is bad).

Pixels failing the ivar threshold are counted as ``low_ivar`` (those with ivar <= 0 are left
to :func:`sanitize_record`'s ``nonpositive_ivar``); ``flagged`` counts the mask field.
Trailing λ <= 0 pixels are padding: removed, counted as ``padding_pixels``. A λ <= 0 inside
the data masks that pixel (``bad_wavelength``); unsorted λ is refused (see ``common``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from spectrax.data.readers.common import (ReadResult, as_paths, bump, finish_record, scalar,
                                          stable_id)
from spectrax.spectra import SpectrumError

SURVEYS = ("sdss", "desi", "galah", "apogee")
BASE_FIELDS = ("object_id", "spectrum_flux", "spectrum_ivar", "spectrum_lambda")
IVAR_MIN = {"sdss": 1e-6, "desi": 1e-6, "galah": 0.0, "apogee": 1e-6}
IVAR_STRICT = {"sdss": True, "desi": False, "galah": True, "apogee": False}  # ivar > vs >= min
DEFAULT_LABELS = {"sdss": ("Z",), "desi": ("Z",), "galah": ("teff", "logg", "fe_h"),
                  "apogee": ("teff", "logg", "fe_h")}
LABEL_NAMES = ("z",)  # the registry's default (SDSS/DESI MMU files); see ReadResult.label_names


def infer_survey(path: Path) -> str:
    """The survey named in an MMU path (e.g. ``.../sdss/healpix=12/001-of-004.hdf5``)."""
    for part in reversed(Path(path).parts):
        low = part.lower()
        for s in SURVEYS:
            if s in low:
                return s
    raise SpectrumError(f"{path}: cannot tell the survey from the path; pass survey= one of "
                        f"{SURVEYS}")


def required_fields(survey: str) -> tuple[str, ...]:
    return BASE_FIELDS if survey == "galah" else (*BASE_FIELDS, "spectrum_mask")


def _load(path: Path, survey: str, label_columns: Sequence[str]) -> dict[str, np.ndarray]:
    """The needed datasets of one file as numpy arrays; SpectrumError naming missing fields."""

    if not path.exists():
        raise SpectrumError(f"{path}: file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise SpectrumError(f"{path}: cannot read as HDF5 (truncated or corrupt?): {exc}") from exc
    with f:
        have = {k.lower(): k for k in f.keys()}
        wanted = (*required_fields(survey), *label_columns)
        missing = [k for k in wanted if k.lower() not in have]
        if missing:
            raise SpectrumError(f"{path}: missing field(s) {missing}; the file has "
                                f"{sorted(f.keys())}")
        optional = [k for k in ("ra", "dec", "spectrum_mask") if k in have]
        try:
            return {k: np.asarray(f[have[k.lower()]][()]) for k in (*wanted, *optional)}
        except OSError as exc:
            raise SpectrumError(f"{path}: dataset unreadable (truncated or corrupt?): {exc}") from exc


def _valid(row: dict[str, np.ndarray], survey: str, counts: dict) -> np.ndarray:
    """[L] bool, True = valid, by the survey rule in the module docstring (padding included)."""
    ivar = row["ivar"]
    with np.errstate(invalid="ignore"):
        low = (ivar <= IVAR_MIN[survey]) if IVAR_STRICT[survey] else (ivar < IVAR_MIN[survey])
        low &= ivar > 0  # ivar <= 0 is counted by sanitize_record
    ok = ~low
    bump(counts, "low_ivar", int(low.sum()))
    if "mask" in row:
        m = row["mask"]
        ok &= ~m if m.dtype == bool else (m == 0)
    return ok


def _object_id(value) -> tuple[np.int64, str]:
    """(int64 id, text id): integer ids used as is, strings hashed (stable, 63 bits)."""
    text = scalar(value) if not isinstance(value, (bytes, np.bytes_)) else value.decode().strip()
    text = str(text)
    if text.lstrip("-").isdigit() and -2**63 <= int(text) < 2**63:
        return np.int64(int(text)), text
    return stable_id(text), text


def _strip_padding(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """Drops the trailing λ <= 0 (or non-finite) pixels; returns (arrays, pixels dropped)."""
    wave = arrays["wavelength"]
    real = np.flatnonzero(np.isfinite(wave) & (wave > 0))
    n = int(real[-1]) + 1 if real.size else 0
    return {k: v[:n] for k, v in arrays.items()}, wave.size - n


def read_mmu(path: str | Path, survey: str | None = None,
             label_columns: Sequence[str] | None = None) -> ReadResult:
    """Reads one MMU spectrum HDF5 file, one record per row.

    Args:
      path: the ``.hdf5`` file.
      survey: ``sdss``, ``desi``, ``galah`` or ``apogee`` (mask rule); None = from the path.
      label_columns: catalogue columns to use as labels (matched case-insensitively; label
        names are their lower-case names). None = the survey's default (Z, or teff/logg/fe_h),
        which must then exist too.

    Returns:
      :class:`ReadResult` (``label_names`` = the lower-cased label columns); counts include
      ``padding_pixels``, ``low_ivar``, ``flagged``, ``all_pixels_masked``, ``labels_missing``.

    Raises:
      SpectrumError: naming the file and field for a missing field, mismatched shapes,
        unsorted wavelengths or an unreadable file.
    """
    path = Path(path)
    survey = (survey or infer_survey(path)).lower()
    if survey not in SURVEYS:
        raise SpectrumError(f"{path}: survey={survey!r}; use one of {SURVEYS}")
    label_columns = tuple(DEFAULT_LABELS[survey] if label_columns is None else label_columns)
    data = _load(path, survey, label_columns)
    flux = data["spectrum_flux"]
    n_rows = flux.shape[0]
    for key in (*required_fields(survey), *label_columns):
        want = flux.shape if key.startswith("spectrum_") else (n_rows,)
        if data[key].shape[:len(want)] != want:
            raise SpectrumError(f"{path}: field {key} has shape {data[key].shape}, expected "
                                f"{want} (spectrum_flux is {flux.shape})")
    counts: dict[str, int] = {"all_pixels_masked": 0, "labels_missing": 0, "padding_pixels": 0,
                              "low_ivar": 0}
    records = []
    for i in range(n_rows):
        rec = _row_record(data, i, path, survey, label_columns, counts)
        if rec is not None:
            records.append(rec)
    names = tuple(c.lower() for c in label_columns)
    return ReadResult(records, counts, names, [str(path)])


def _row_record(data: dict, i: int, path: Path, survey: str, label_columns: Sequence[str],
                counts: dict) -> dict | None:
    """Row ``i`` as a sanitised record with padding stripped (None if nothing valid)."""
    row = {"flux": np.asarray(data["spectrum_flux"][i], np.float64),
           "ivar": np.asarray(data["spectrum_ivar"][i], np.float64),
           "wavelength": np.asarray(data["spectrum_lambda"][i], np.float64)}
    if survey != "galah" and "spectrum_mask" in data:
        row["mask"] = np.asarray(data["spectrum_mask"][i])
    row, n_pad = _strip_padding(row)
    bump(counts, "padding_pixels", n_pad)
    tid, text = _object_id(data["object_id"][i])
    where = f"{path} row {i} (object_id {text})"
    if row["flux"].size == 0:
        bump(counts, "all_pixels_masked")
        return None
    labels = np.array([float(data[c][i]) for c in label_columns], np.float32)
    if labels.size and not np.isfinite(labels).any():
        bump(counts, "labels_missing")
    meta = {"survey": f"mmu_{survey}", "file": path.name, "object_id": text}
    meta.update({k: data[k][i] for k in ("ra", "dec") if k in data})
    meta.update({c: data[c][i] for c in label_columns})
    raw = {"flux": row["flux"], "ivar": row["ivar"], "mask": _valid(row, survey, counts),
           "wavelength": row["wavelength"], "labels": labels, "id": tid, "meta": meta}
    return finish_record(raw, where, counts)
