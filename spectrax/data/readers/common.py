"""Helpers shared by the native-grid readers (SDSS, LAMOST, APOGEE, GALAH, Multimodal Universe).

They follow the conventions of :mod:`spectrax.data.readers.desi` (errors that name the file,
astropy truncation warnings turned into :class:`SpectrumError`) without importing its private
functions, so the DESI reader stays untouched.

Wavelength policy, the same in every reader: a non-finite or non-positive wavelength INSIDE the
data masks that pixel (counted as ``bad_wavelength`` by :func:`sanitize_record`); wavelengths
that are not strictly increasing over the pixels that have one are REFUSED with a
:class:`SpectrumError` naming the file and field, because an out-of-order native grid means the
file was misread or is corrupt, and sorting it silently would hide that.
"""
from __future__ import annotations

import dataclasses
import hashlib
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from astropy.io import fits

from spectrax.data import grids
from spectrax.spectra import SpectrumError, sanitize_record


@dataclasses.dataclass
class ReadResult:
    """What every reader returns (all surveys, DESI included).

    Attributes:
      records: one dict per spectrum: ``flux`` [L] float32 (0 where bad), ``ivar`` [L] float32
        (0 where bad), ``mask`` [L] bool (True = valid), ``wavelength`` [L] float32 (vacuum Å,
        the survey's native grid, −1 where unknown) unless ``grid`` is set, ``labels`` [K]
        float32 (NaN = unknown, in the order of ``label_names``), ``id`` np.int64, ``meta``
        dict of JSON-able scalars.
      counts: spectra skipped and pixels masked, by reason (the :func:`sanitize_record`
        counts are summed over the kept records).
      label_names: names of the K labels.
      paths: the files read, as strings.
      grid: the wavelength grid every record shares, as a :func:`spectrax.data.grids.grid_array`
        descriptor, when the records carry no ``wavelength`` of their own (DESI coadds: the
        merged 7781-pixel grid); None when each record has its own.
    """

    records: list[dict]
    counts: dict[str, int]
    label_names: tuple[str, ...]
    paths: list[str] = dataclasses.field(default_factory=list)
    grid: dict | None = None

    @property
    def wavelength(self) -> np.ndarray | None:
        """The shared grid as [L] float64 Å (None when records carry their own)."""
        return grids.grid_array(self.grid) if self.grid else None


# ----------------------------------------------------------------------------------------------
# FITS access with errors that name the file
# ----------------------------------------------------------------------------------------------
def open_fits(path: Path) -> fits.HDUList:
    """Opens a FITS file with every header read now, so truncation surfaces here, by name.

    astropy only warns about a truncated file, so truncation warnings become SpectrumError;
    harmless warnings (e.g. non-standard cards fixed on read, common in APOGEE headers) are
    dropped, because they say nothing about the data.
    """
    path = Path(path)
    if not path.exists():
        raise SpectrumError(f"{path}: file not found")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdul = fits.open(path, memmap=False, lazy_load_hdus=False)
        except Exception as exc:  # OSError, ValueError, … depending on where the file breaks
            notes = "; ".join(str(w.message) for w in caught)
            raise SpectrumError(f"{path}: cannot read as FITS (truncated or corrupt?): "
                                f"{type(exc).__name__}: {exc}" + (f" [{notes}]" if notes else "")
                                ) from exc
    truncated = [str(w.message) for w in caught if "truncated" in str(w.message).lower()]
    if truncated:
        hdul.close()
        raise SpectrumError(f"{path}: FITS file is truncated: {truncated[0]}")
    return hdul


def hdu_names(hdul: fits.HDUList) -> list[str]:
    return [h.name for h in hdul]


def get_hdu(hdul: fits.HDUList, key: str | int, path: Path) -> Any:
    """HDU ``key`` (name or index) with its data loaded; SpectrumError listing the HDUs if absent."""
    try:
        hdu = hdul[key]
    except (KeyError, IndexError):
        raise SpectrumError(f"{path}: no HDU {key!r}; the file has {len(hdul)} HDUs "
                            f"{hdu_names(hdul)}") from None
    try:
        _ = hdu.data
    except Exception as exc:
        raise SpectrumError(f"{path}: HDU {key!r} cannot be read (truncated or corrupt?): "
                            f"{type(exc).__name__}: {exc}") from exc
    if hdu.data is None:
        raise SpectrumError(f"{path}: HDU {key!r} has no data; the file has {hdu_names(hdul)}")
    return hdu


def native(arr: Any, dtype: Any = None) -> np.ndarray:
    """A numpy array in native byte order (FITS data are big-endian), optionally cast."""
    arr = np.asarray(arr)
    if dtype is not None:
        return arr.astype(dtype)
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def table_columns(table: Any, required: Sequence[str], optional: Sequence[str],
                  where: str) -> dict[str, np.ndarray]:
    """Columns of a FITS table as numpy arrays (native byte order, stripped str not bytes).

    Raises SpectrumError naming ``where`` and listing the table's columns when one is missing.
    """
    names = list(getattr(table, "colnames", None) or table.columns.names)  # astropy Table too
    missing = [c for c in required if c not in names]
    if missing:
        raise SpectrumError(f"{where}: missing column(s) {missing}; the table has {names}")
    out = {}
    for col in (*required, *[c for c in optional if c in names]):
        arr = np.asarray(table[col])
        out[col] = np.char.strip(arr.astype(str)) if arr.dtype.kind in "SU" else native(arr)
    return out


def header_value(header: fits.Header, key: str, path: Path, hdu: str = "primary") -> Any:
    """A required header keyword; SpectrumError naming file, HDU and keyword if absent."""
    if key not in header:
        raise SpectrumError(f"{path}: {hdu} header has no keyword {key!r}")
    return header[key]


# ----------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------
def scalar(value: Any) -> Any:
    """A numpy/FITS scalar as the matching JSON-able Python scalar (NaN → None)."""
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode(errors="replace").strip()
    if isinstance(value, (str, np.str_)):
        return str(value).strip()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def stable_id(text: str) -> np.int64:
    """A stable non-negative int64 for a string id: blake2b 8 bytes masked to 63 bits.

    Python's ``hash`` is salted per process, so it cannot be used for ids stored in shards.
    """
    h = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return np.int64(int.from_bytes(h, "little") & (2**63 - 1))


def air_to_vacuum(wave_air: np.ndarray) -> np.ndarray:
    """Air → vacuum wavelengths (Å), Ciddor (1996) as in SDSS idlutils ``airtovac``.

    Args:
      wave_air: [L] air wavelengths, Å. Values below 2000 Å are returned unchanged (the formula
        is only defined for air; non-positive values pass through so they stay masked).
    """
    wave_air = np.asarray(wave_air, np.float64)
    vac = wave_air.copy()
    ok = wave_air >= 2000.0
    # Iterate: the dispersion formula is in terms of the vacuum wavenumber.
    for _ in range(2):
        sigma2 = (1e4 / vac[ok]) ** 2
        fact = 1.0 + 5.792105e-2 / (238.0185 - sigma2) + 1.67917e-3 / (57.362 - sigma2)
        vac[ok] = wave_air[ok] * fact
    return vac


def check_wavelength(wave: np.ndarray, where: str) -> np.ndarray:
    """Checks a native wavelength array; returns it as float64.

    Non-finite / non-positive entries are left for :func:`sanitize_record` to mask and count.
    Raises SpectrumError naming ``where`` when the remaining entries are not strictly increasing.
    """
    wave = np.asarray(wave, np.float64)
    ok = np.isfinite(wave) & (wave > 0)
    steps = np.diff(wave[ok])
    if steps.size and not np.all(steps > 0):
        first = int(np.argmax(steps <= 0))
        raise SpectrumError(f"{where}: wavelengths are not strictly increasing (step {first} "
                            f"goes {wave[ok][first]:.4f} → {wave[ok][first + 1]:.4f} Å); "
                            "refusing an out-of-order native grid")
    return wave


def check_lengths(arrays: Mapping[str, np.ndarray], where: str) -> int:
    """The common length of 1-D arrays; SpectrumError naming each field's shape otherwise."""
    shapes = {k: np.shape(v) for k, v in arrays.items()}
    lengths = {s[0] if len(s) == 1 else None for s in shapes.values()}
    if len(lengths) != 1 or None in lengths:
        raise SpectrumError(f"{where}: arrays of one spectrum must be 1-D with equal lengths, "
                            f"got {shapes}")
    return lengths.pop()


# ----------------------------------------------------------------------------------------------
# Records and counts
# ----------------------------------------------------------------------------------------------
def bump(counts: dict[str, int], key: str, by: int = 1) -> None:
    counts[key] = counts.get(key, 0) + int(by)


def finish_record(raw: dict, where: str, counts: dict[str, int]) -> dict | None:
    """Sanitises one raw record and adds its pixel counts to ``counts``.

    Args:
      raw: ``flux``, ``ivar``, ``mask`` (True = valid), ``wavelength`` [L]; ``labels`` [K];
        ``id``; ``meta``.
      where: names the spectrum in messages (file, row, id).
      counts: updated in place; a spectrum with no valid pixel is skipped and counted as
        ``all_pixels_masked`` (its pixel counts are not added).

    Returns:
      The clean record, or None when it has no valid pixel.
    """
    check_lengths({k: raw[k] for k in ("flux", "ivar", "mask", "wavelength")}, where)
    wave = check_wavelength(raw["wavelength"], f"{where} field wavelength")
    clean, pix = sanitize_record({**raw, "wavelength": wave}, where=where)
    if pix["valid_pixels"] == 0:
        bump(counts, "all_pixels_masked")
        return None
    for key, value in pix.items():
        bump(counts, key, value)
    clean["id"] = np.int64(raw["id"])
    clean["meta"] = {k: scalar(v) for k, v in raw.get("meta", {}).items()}
    return clean


def as_paths(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """One path or a sequence of paths as a list of Path."""
    if isinstance(paths, (str, Path)):
        return [Path(paths)]
    return [Path(p) for p in paths]
