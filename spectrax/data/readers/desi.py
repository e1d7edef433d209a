"""DESI coadd + redrock reader: b, r, z cameras merged onto the 7781-pixel grid, redshifts joined.

A DESI coadd file (desispec ``coadd-*.fits``) holds, per camera c in {B, R, Z}, the images
``c_WAVELENGTH`` [Lc] (vacuum Å), ``c_FLUX`` [N, Lc] (1e-17 erg/s/cm²/Å), ``c_IVAR`` [N, Lc] and
``c_MASK`` [N, Lc] (a bitmask: 0 = good), plus a ``FIBERMAP`` table with one row per target.
Redshifts come from the matching redrock file (``REDSHIFTS`` table; ``ZBEST`` in the older
``zbest-*.fits``), joined by TARGETID; their values travel in each record's ``meta`` as
``REDROCK_Z``, ``REDROCK_ZWARN``, ... so they never share a name with a prediction.

File layouts found in DESI releases, all read the same way (the redrock or zbest file sits in
the same directory with the same suffix, see :func:`spectrax.data.readers.units_desi`): tile
coadds ``tiles/cumulative/<TILE>/<NIGHT>/coadd-<PETAL>-<TILE>-thru<NIGHT>.fits`` and the DR1
healpix layout ``healpix/<SURVEY>/<PROGRAM>/<HP//100>/<HP>/coadd-<SURVEY>-<PROGRAM>-<HP>.fits``.

The cameras overlap (b/r 5760–5800 Å, r/z 7520–7620 Å); :func:`merge_cameras` combines them
by inverse-variance weighting onto :func:`spectrax.data.grids.desi_wavelength`, which is what
SpecPT takes as input. The survey's sample cuts (:func:`bgs_quality_cuts`,
:func:`elg_quality_cuts`) live here too, next to the columns they read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from astropy.io import fits

from spectrax.data.grids import (DESI_GRID, DESI_NPIX, DESI_WAVE_MIN, DESI_WAVE_STEP,
                                  desi_wavelength)
from spectrax.data.readers.common import ReadResult
from spectrax.data.readers.common import hdu_names as _hdu_names
from spectrax.data.readers.common import open_fits as _open_fits
from spectrax.data.readers.common import table_columns as _table_columns
from spectrax.spectra import SpectrumError

# Largest distance (Å) between a camera pixel and the grid pixel it is mapped to. Real coadds
# sit on the grid to ~1e-9 Å; anything beyond 1e-3 Å means a different grid (e.g. a frame or
# a resampled product), which would need flux-conserving resampling rather than a merge.
GRID_TOLERANCE = 1e-3

# Cameras in the order they are looked for. A "BRZ" coadd (cameras already combined by
# desispec) is read as a single camera on the same grid.
CAMERA_NAMES = ("B", "R", "Z", "BRZ")

# Why a FIBERMAP row can be left out (keys of ReadResult.counts).
SKIP_REASONS = ("sky_or_negative_targetid", "duplicate_targetid", "all_pixels_masked",
                "no_redshift_match")

# Scalar catalogue columns copied into each record's "meta" when the file has them.
FIBERMAP_META = ("TARGET_RA", "TARGET_DEC", "OBJTYPE", "COADD_FIBERSTATUS", "TILEID", "FIBER",
                 "DESI_TARGET", "BGS_TARGET")
REDSHIFT_META = ("Z", "ZERR", "ZWARN", "SPECTYPE", "SUBTYPE", "DELTACHI2", "CHI2", "NPIXELS",
                 "FOII_SNR")
# Values copied from a redrock file are stored under this prefix (REDROCK_Z, REDROCK_ZWARN, ...):
# catalogues written by spectrax carry their OWN predictions under Redrock's names (Z, ZERR,
# ZWARN, ...), and an input's redrock values must never be mistaken for them.
REDROCK_PREFIX = "REDROCK_"
# Names of the redshift table HDU: redrock files (Everest and later) and the older zbest files.
REDSHIFT_HDUS = ("REDSHIFTS", "ZBEST")
LABEL_NAMES = ("z",)


# ----------------------------------------------------------------------------------------------
# Camera merge
# ----------------------------------------------------------------------------------------------

def camera_grid_indices(wave: np.ndarray, camera: str = "?") -> np.ndarray:
    """Maps camera wavelengths onto the merged grid.

    Args:
      wave: [Lc] camera wavelengths, vacuum Å.
      camera: name used in error messages.

    Returns:
      [Lc] int64 indices into :func:`desi_wavelength`, strictly increasing.

    Raises:
      SpectrumError: when a pixel lies off the grid (beyond ``GRID_TOLERANCE``), outside
        3600–9824 Å, or the wavelengths are not increasing. We do not resample: every real
        DESI coadd is on this grid, and silently interpolating would hide a wrong input file.
    """
    wave = np.asarray(wave, dtype=np.float64)
    if wave.ndim != 1 or wave.size == 0:
        raise SpectrumError(f"camera {camera}: wavelength must be a non-empty 1-D array, "
                            f"got shape {wave.shape}")
    idx = np.rint((wave - DESI_WAVE_MIN) / DESI_WAVE_STEP).astype(np.int64)
    inside = (idx >= 0) & (idx < DESI_NPIX)
    if not inside.all():
        raise SpectrumError(
            f"camera {camera}: {int((~inside).sum())} wavelengths fall outside the DESI grid "
            f"{DESI_WAVE_MIN}–{desi_wavelength()[-1]} Å (camera spans {wave.min():.3f}–"
            f"{wave.max():.3f} Å)")
    offset = np.abs(desi_wavelength()[idx] - wave)
    if offset.max() >= GRID_TOLERANCE:
        raise SpectrumError(
            f"camera {camera} is not on the DESI 0.8 Å grid: max |Δλ| to the nearest grid pixel "
            f"is {offset.max():.4g} Å (tolerance {GRID_TOLERANCE} Å); this reader merges coadds "
            "and does not resample")
    if np.any(np.diff(idx) <= 0):
        raise SpectrumError(f"camera {camera}: wavelengths are not strictly increasing")
    return idx


def camera_pixel_ok(flux: np.ndarray, ivar: np.ndarray,
                    bitmask: np.ndarray | None) -> np.ndarray:
    """[N, Lc] bool: camera pixels that may contribute (MASK == 0, ivar > 0, both finite)."""
    with np.errstate(invalid="ignore"):
        ok = (ivar > 0) & (ivar < np.inf)  # NaN fails both comparisons
    ok &= np.isfinite(flux)
    if bitmask is not None:
        ok &= np.asarray(bitmask) == 0
    return ok


def merge_cameras(waves: Mapping[str, np.ndarray], fluxes: Mapping[str, np.ndarray],
                  ivars: Mapping[str, np.ndarray],
                  masks: Mapping[str, np.ndarray] | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merges DESI camera spectra onto the 7781-pixel grid by inverse-variance weighting.

    For each grid pixel, over the cameras whose pixel there is usable,
    ``flux = Σ ivar_c f_c / Σ ivar_c`` and ``ivar = Σ ivar_c``. A grid pixel that no camera
    covers with a usable pixel gets flux 0, ivar 0, mask False: merging never invents flux.

    Args:
      waves: camera name → [Lc] wavelengths (vacuum Å), on the 0.8 Å grid.
      fluxes: camera name → [N, Lc] flux (any consistent unit).
      ivars: camera name → [N, Lc] inverse variance (unit⁻²).
      masks: camera name → [N, Lc] DESI bitmask where 0 = good (NOT the spectrax
        True-is-valid convention: these are the survey's MASK images). ``None`` or a missing
        camera means all pixels unflagged.

    Returns:
      (flux [N, 7781] float32, ivar [N, 7781] float32, mask [N, 7781] bool, True = valid).

    Raises:
      SpectrumError: if the cameras disagree on N, a camera's arrays disagree with its
        wavelength length, or a camera is not on the grid (see :func:`camera_grid_indices`).
    """
    flux, ivar, good, _ = merge_and_count(waves, fluxes, ivars, masks)
    return flux, ivar, good


def merge_and_count(waves: Mapping[str, np.ndarray], fluxes: Mapping[str, np.ndarray],
                    ivars: Mapping[str, np.ndarray],
                    masks: Mapping[str, np.ndarray] | None = None,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """:func:`merge_cameras`, plus the camera pixels it excluded, by the first reason that
    applies (:func:`camera_excluded`), summed over all N spectra. Returns (flux, ivar, mask,
    {reason: count}).

    Arrays may be in the file's byte order (FITS is big-endian): the copies onto the grid
    convert them, which saves a byte-swapping pass over every camera array.
    """
    if not waves:
        raise SpectrumError("merge_cameras: no cameras given")
    masks = masks or {}
    n_rows = {np.shape(fluxes[c])[0] for c in waves}
    if len(n_rows) != 1:
        raise SpectrumError(f"merge_cameras: cameras have different numbers of spectra {n_rows}")
    n = n_rows.pop()
    cams = {cam: camera_grid_indices(wave, cam) for cam, wave in waves.items()}
    cover = np.zeros(DESI_NPIX, np.int32)
    for idx in cams.values():
        cover[idx] += 1  # idx strictly increasing: no pixel counted twice per camera
    # A pixel one camera covers is copied (bit-identical); only the camera overlaps
    # (b/r 5760–5800 Å, r/z 7520–7620 Å) are weighted, accumulated in float64.
    overlap = np.flatnonzero(cover > 1)
    slot = np.full(DESI_NPIX, -1)
    slot[overlap] = np.arange(overlap.size)
    out_flux = np.zeros((n, DESI_NPIX), np.float32)
    out_ivar = np.zeros((n, DESI_NPIX), np.float32)
    good = np.zeros((n, DESI_NPIX), bool)
    num = np.zeros((n, overlap.size), np.float64)
    den = np.zeros((n, overlap.size), np.float64)
    counts = dict.fromkeys(CAMERA_COUNTS, 0)
    for cam, idx in cams.items():
        flux, ivar = np.asarray(fluxes[cam]), np.asarray(ivars[cam])
        for name, arr in (("flux", flux), ("ivar", ivar)):
            if arr.shape != (n, idx.size):
                raise SpectrumError(f"camera {cam}: {name} has shape {arr.shape}, expected "
                                    f"{(n, idx.size)} from its wavelength array")
        ok = camera_pixel_ok(flux, ivar, masks.get(cam))
        for key, value in _count_excluded(flux, ivar, masks.get(cam), ok).items():
            counts[key] += value
        alone = cover[idx] == 1
        for src, dst in _runs(idx, alone):  # contiguous runs: slices, not fancy indexing
            np.copyto(out_flux[:, dst], flux[:, src], where=ok[:, src])  # others stay 0
            np.copyto(out_ivar[:, dst], ivar[:, src], where=ok[:, src])
            good[:, dst] = ok[:, src]
        if not alone.all():
            shared, at = ~alone, slot[idx[~alone]]
            w = np.where(ok[:, shared], ivar[:, shared].astype(np.float64), 0.0)
            num[:, at] += w * np.where(ok[:, shared], flux[:, shared].astype(np.float64), 0.0)
            den[:, at] += w
    if overlap.size:
        covered = den > 0
        out_flux[:, overlap] = np.divide(num, den, out=np.zeros_like(num), where=covered)
        out_ivar[:, overlap] = den
        good[:, overlap] = covered
    return out_flux, out_ivar, good, counts


CAMERA_COUNTS = ("camera_flagged", "camera_nonfinite_flux", "camera_nonfinite_ivar",
                 "camera_nonpositive_ivar")


def _count_excluded(flux, ivar, bitmask, ok) -> dict[str, int]:
    """One camera's excluded pixels by reason (:func:`camera_excluded`), given its ``ok``.
    Usually every excluded pixel is flagged in MASK: then two counts suffice, and the
    breakdown by reason is computed only when one is not."""
    flagged = np.asarray(bitmask) != 0 if bitmask is not None else np.zeros(ok.shape, bool)
    out = dict.fromkeys(CAMERA_COUNTS, 0)
    out["camera_flagged"] = n_flagged = int(np.count_nonzero(flagged))
    if ok.size - int(np.count_nonzero(ok)) == n_flagged:
        return out
    left = ~flagged
    for key, bad in (("camera_nonfinite_flux", ~np.isfinite(flux)),
                     ("camera_nonfinite_ivar", ~np.isfinite(ivar))):
        bad &= left
        out[key] = int(np.count_nonzero(bad))
        left &= ~bad
    with np.errstate(invalid="ignore"):
        out["camera_nonpositive_ivar"] = int(np.count_nonzero(left & (ivar <= 0)))
    return out


def camera_excluded(fluxes: Mapping[str, np.ndarray], ivars: Mapping[str, np.ndarray],
                    masks: Mapping[str, np.ndarray] | None, rows: np.ndarray
                    ) -> dict[str, int]:
    """Camera pixels of spectra ``rows`` that :func:`merge_cameras` excludes, by the first
    reason that applies: a pixel flagged in MASK counts as ``camera_flagged`` only; an
    unflagged one with non-finite flux as ``camera_nonfinite_flux``; then non-finite ivar
    (``camera_nonfinite_ivar``); then ivar <= 0 (``camera_nonpositive_ivar``)."""
    masks = masks or {}
    out = dict.fromkeys(CAMERA_COUNTS, 0)
    for cam in fluxes:
        flux, ivar = np.asarray(fluxes[cam])[rows], np.asarray(ivars[cam])[rows]
        mask = np.asarray(masks[cam])[rows] if cam in masks else None
        for key, value in _count_excluded(flux, ivar, mask,
                                          camera_pixel_ok(flux, ivar, mask)).items():
            out[key] += value
    return out


def _runs(idx: np.ndarray, select: np.ndarray) -> list[tuple[slice, slice]]:
    """(camera slice, grid slice) pairs covering the selected camera pixels, one per run of
    consecutive selected pixels whose grid indices are consecutive too."""
    k = np.flatnonzero(select)
    if k.size == 0:
        return []
    # a run breaks where the camera index or the grid index jumps
    breaks = np.flatnonzero((np.diff(k) != 1) | (np.diff(idx[k]) != 1)) + 1
    out = []
    for run in np.split(k, breaks):
        a, b = int(run[0]), int(run[-1]) + 1
        out.append((slice(a, b), slice(int(idx[a]), int(idx[b - 1]) + 1)))
    return out


# ----------------------------------------------------------------------------------------------
# FITS access with errors that name the file
# ----------------------------------------------------------------------------------------------

def _get_data(hdul: fits.HDUList, name: str, path: Path) -> Any:
    """Data of HDU ``name``; SpectrumError naming the file and listing its HDUs if absent."""
    if name not in hdul:
        raise SpectrumError(f"{path}: no HDU '{name}'; the file has {_hdu_names(hdul)}")
    try:
        return hdul[name].data
    except Exception as exc:
        raise SpectrumError(f"{path}: HDU '{name}' cannot be read (truncated or corrupt?): "
                            f"{type(exc).__name__}: {exc}") from exc


def _read_cameras(hdul: fits.HDUList, path: Path, n_rows: int) -> tuple[dict, dict, dict, dict]:
    """Reads {camera: wave [Lc]}, {camera: flux [N, Lc]}, ivar and MASK for every camera present."""
    cams = [c for c in CAMERA_NAMES if f"{c}_WAVELENGTH" in hdul]
    if not cams:
        looked_for = [f"{c}_WAVELENGTH" for c in CAMERA_NAMES]
        raise SpectrumError(f"{path}: no camera found (looked for {looked_for}); "
                            f"the file has {_hdu_names(hdul)}")
    waves, fluxes, ivars, masks = {}, {}, {}, {}
    for cam in cams:  # as in the file (big-endian): the merge converts while it copies
        waves[cam] = np.asarray(_get_data(hdul, f"{cam}_WAVELENGTH", path), np.float64)
        fluxes[cam] = np.asarray(_get_data(hdul, f"{cam}_FLUX", path))
        ivars[cam] = np.asarray(_get_data(hdul, f"{cam}_IVAR", path))
        masks[cam] = np.asarray(_get_data(hdul, f"{cam}_MASK", path))
        for name, arr in (("FLUX", fluxes[cam]), ("IVAR", ivars[cam]), ("MASK", masks[cam])):
            if arr.shape != (n_rows, waves[cam].size):
                raise SpectrumError(
                    f"{path}: {cam}_{name} has shape {arr.shape}, expected "
                    f"{(n_rows, waves[cam].size)} (FIBERMAP rows × {cam}_WAVELENGTH length)")
    return waves, fluxes, ivars, masks


def read_redshifts(path: str | Path, *, hdu: str | None = None) -> dict[str, np.ndarray]:
    """Reads a redrock REDSHIFTS (or older zbest ZBEST) table as {column: [M] array}; TARGETID
    and Z are required.

    String columns (SPECTYPE, SUBTYPE) come back stripped ``str``; vector columns (COEFF) are
    kept as [M, K] arrays. ``hdu`` None takes the first of :data:`REDSHIFT_HDUS` the file has.
    Raises SpectrumError naming the file if the HDU or a column is missing.
    """
    path = Path(path)
    with _open_fits(path) as hdul:
        if hdu is None:
            hdu = next((h for h in REDSHIFT_HDUS if h in hdul), REDSHIFT_HDUS[0])
        table = _get_data(hdul, hdu, path)
        return _table_columns(table, ("TARGETID", "Z"),
                              [c for c in table.columns.names if c not in ("TARGETID", "Z")],
                              f"{path} HDU {hdu}")


# ----------------------------------------------------------------------------------------------
# Coadd reader
# ----------------------------------------------------------------------------------------------

def _redshift_lookup(z_cols: Mapping[str, np.ndarray] | None,
                     counts: dict[str, int]) -> dict[int, int]:
    """TARGETID → first REDSHIFTS row with it (repeats counted as duplicate_redshift_targetid)."""
    if z_cols is None:
        return {}
    lookup: dict[int, int] = {}
    for row, tid in enumerate(z_cols["TARGETID"].tolist()):
        if tid in lookup:
            counts["duplicate_redshift_targetid"] = counts.get("duplicate_redshift_targetid", 0) + 1
        else:
            lookup[tid] = row
    return lookup


def _load_redshift_table(coadd_hdul: fits.HDUList, coadd_path: Path,
                         redrock_path: str | Path | None,
                         require_redshift: bool) -> dict[str, np.ndarray] | None:
    """The REDSHIFTS columns from ``redrock_path``, else from the coadd itself if it has them.

    Returns None when there is no redshift source and none is required.
    """
    if redrock_path is not None:
        return read_redshifts(redrock_path)
    for hdu in REDSHIFT_HDUS:
        if hdu in coadd_hdul:
            table = _get_data(coadd_hdul, hdu, coadd_path)
            return _table_columns(table, ("TARGETID", "Z"), REDSHIFT_META,
                                  f"{coadd_path} HDU {hdu}")
    if require_redshift:
        raise SpectrumError(
            f"{coadd_path}: require_redshift=True but no redrock file was given and the coadd "
            f"has no REDSHIFTS HDU (it has {_hdu_names(coadd_hdul)}); pass redrock_path=")
    return None


def _bump(counts: dict[str, int], key: str, by: int = 1) -> None:
    counts[key] = counts.get(key, 0) + by


def read_desi_coadd(coadd_path: str | Path, redrock_path: str | Path | None = None, *,
                    require_redshift: bool = False) -> ReadResult:
    """Reads a DESI coadd, merges its cameras and joins redrock redshifts by TARGETID.

    Rows are skipped, and counted, when they are sky fibres (FIBERMAP OBJTYPE == 'SKY') or have
    TARGETID < 0 (unassigned/stuck positioners), repeat a TARGETID already read (the first
    is kept), have no valid merged pixel, or (with ``require_redshift``) have no REDSHIFTS row.

    Args:
      coadd_path: a desispec ``coadd-*.fits``.
      redrock_path: the matching ``redrock-*.fits``; when None, a REDSHIFTS HDU in the coadd
        itself is used if present.
      require_redshift: if True, a missing redshift source is an error and targets without a
        redshift are skipped; if False they are kept with label NaN.

    Returns:
      :class:`~spectrax.data.readers.common.ReadResult`: records on the 7781-pixel grid
      (``grid`` = :data:`spectrax.data.grids.DESI_GRID`; records carry no wavelength array),
      label ``("z",)`` = redrock Z (NaN when unknown), ``meta`` with the FIBERMAP columns and
      the redrock columns under ``REDROCK_`` (REDROCK_Z, REDROCK_ZWARN, ...), ``counts``: what
      was skipped and why (``sky_or_negative_targetid``, ``duplicate_targetid``,
      ``all_pixels_masked``, ``no_redshift_match``), targets kept without a redshift
      (``labels_missing``), camera pixels excluded before merging (``camera_flagged``,
      ``camera_nonfinite_flux``, ``camera_nonfinite_ivar``, ``camera_nonpositive_ivar``) and
      the :func:`sanitize_record` counts of the kept merged spectra, prefixed ``merged_``
      (``merged_flagged`` = grid pixels no camera covered validly).

    Raises:
      SpectrumError: naming the file (and row/TARGETID for per-record problems) when the file
        is missing, truncated or corrupt, or lacks an HDU or column (listing what it has).
    """
    path = Path(coadd_path)
    with _open_fits(path) as hdul:
        fibermap = _table_columns(_get_data(hdul, "FIBERMAP", path), ("TARGETID",),
                                  ("OBJTYPE", *FIBERMAP_META), f"{path} HDU FIBERMAP")
        n_rows = fibermap["TARGETID"].shape[0]
        waves, fluxes, ivars, masks = _read_cameras(hdul, path, n_rows)
        z_cols = _load_redshift_table(hdul, path, redrock_path, require_redshift)

    # Every skip reason is reported, zeros included, so callers can index counts directly.
    counts: dict[str, int] = dict.fromkeys(SKIP_REASONS, 0)
    z_row_of = _redshift_lookup(z_cols, counts)
    rows, z_rows = _rows_to_read(fibermap, z_row_of, require_redshift, counts)
    flux, ivar, good, camera = merge_and_count(waves, fluxes, ivars, masks)
    if len(rows) < len(flux):  # (a copy only when some rows are skipped)
        flux, ivar, good = flux[rows], ivar[rows], good[rows]
    # merge_cameras' output already obeys sanitize_record's rules (bad pixels: flux 0, ivar 0,
    # mask False; valid ones finite with ivar > 0; tested), so only its counts are taken here.
    valid = np.count_nonzero(good, axis=1)
    has_data = valid > 0
    counts["all_pixels_masked"] += int((~has_data).sum())
    counts["labels_missing"] = int(sum(1 for z, ok in zip(z_rows, has_data) if ok and z is None))
    pix = {"nonfinite_flux": 0, "nonfinite_ivar": 0, "nonpositive_ivar": 0,
           "flagged": int((DESI_NPIX - valid)[has_data].sum()),
           "valid_pixels": int(valid[has_data].sum())}
    for key, value in pix.items():
        _bump(counts, f"merged_{key}", value)
    fm = {k: v.tolist() for k, v in fibermap.items() if k in FIBERMAP_META and v.ndim == 1}
    zc = ({k: v.tolist() for k, v in z_cols.items() if k in REDSHIFT_META and v.ndim == 1}
          if z_cols is not None else {})
    records = []
    for i, (row, z_row) in enumerate(zip(rows, z_rows)):
        if not has_data[i]:
            continue
        meta = {k: v[row] for k, v in fm.items()}
        if z_row is not None:
            meta.update({REDROCK_PREFIX + k: v[z_row] for k, v in zc.items()})
        z = zc["Z"][z_row] if z_row is not None else np.nan
        records.append({"flux": flux[i], "ivar": ivar[i], "mask": good[i],
                        "labels": np.array([z], np.float32),
                        "id": np.int64(fibermap["TARGETID"][row]), "meta": meta})
    # Camera pixels excluded, over the kept spectra: the merge's totals minus those of the
    # rows not kept (sky fibres, repeats, all-masked rows: usually few).
    kept = np.zeros(len(fibermap["TARGETID"]), bool)
    kept[np.asarray(rows, np.int64)[has_data]] = True
    dropped = camera_excluded(fluxes, ivars, masks, np.flatnonzero(~kept)) if not kept.all() \
        else dict.fromkeys(CAMERA_COUNTS, 0)
    for key, total in camera.items():
        _bump(counts, key, total - dropped[key])
    paths = [str(path)] + ([str(redrock_path)] if redrock_path is not None else [])
    return ReadResult(records, counts, LABEL_NAMES, paths, grid=dict(DESI_GRID))


def _rows_to_read(fibermap: Mapping[str, np.ndarray], z_row_of: Mapping[int, int],
                  require_redshift: bool, counts: dict[str, int]
                  ) -> tuple[list[int], list[int | None]]:
    """FIBERMAP rows to make records of, and their REDSHIFTS rows (None: no redshift).

    Skipped, and counted in ``counts``: sky fibres and negative TARGETIDs, repeats of a
    TARGETID already taken (the first is kept) and, with ``require_redshift``, rows without a
    redshift."""
    tids = fibermap["TARGETID"].tolist()
    objtype = fibermap["OBJTYPE"].tolist() if "OBJTYPE" in fibermap else [""] * len(tids)
    rows, z_rows, seen = [], [], set()
    for row, (tid, kind) in enumerate(zip(tids, objtype)):
        if tid < 0 or kind == "SKY":
            _bump(counts, "sky_or_negative_targetid")
            continue
        if tid in seen:
            _bump(counts, "duplicate_targetid")
            continue
        seen.add(tid)
        z_row = z_row_of.get(tid)
        if z_row is None and require_redshift:
            _bump(counts, "no_redshift_match")
            continue
        rows.append(row)
        z_rows.append(z_row)
    return rows, z_rows


# ----------------------------------------------------------------------------------------------
# Sample cuts
# ----------------------------------------------------------------------------------------------

class CutReport(dict):
    """``{cut name: rows it removed}`` (a plain dict[str, int]) plus the cuts that were skipped.

    Cuts are applied in order, each to the rows that survived the previous ones, so
    ``sum(report.values()) + keep.sum() == number of input rows``.

    Attributes:
      skipped: names of cuts not applied because their column(s) are missing.
    """

    def __init__(self, removed: Mapping[str, int], skipped: Sequence[str]):
        super().__init__(removed)
        self.skipped = tuple(skipped)


def _catalogue_columns(catalogue: Any) -> dict[str, np.ndarray]:
    """{column: [M] array} from records (dicts with "meta"), a ReadResult, a FITS/astropy
    table or a dict of arrays. A column missing from some records is NaN / '' there. Record
    meta holds redrock values as REDROCK_<name>; they are returned under the plain redrock
    names, as a REDSHIFTS table has them, so the cuts read one set of names."""
    if isinstance(catalogue, ReadResult):
        catalogue = catalogue.records
    if isinstance(catalogue, Mapping):
        return {k: np.asarray(v) for k, v in catalogue.items()}
    if isinstance(catalogue, (list, tuple)):
        metas = [{k.removeprefix(REDROCK_PREFIX): v for k, v in r.get("meta", r).items()}
                 for r in catalogue]
        names = sorted({k for m in metas for k in m})
        cols = {}
        for k in names:
            vals = [m.get(k) for m in metas]
            is_str = any(isinstance(v, str) for v in vals)
            cols[k] = np.array(["" if v is None else v for v in vals] if is_str else
                               [np.nan if v is None else v for v in vals])
        return cols
    names = getattr(getattr(catalogue, "columns", None), "names", None) or \
        getattr(catalogue, "colnames", None)
    if names is None:
        raise TypeError(f"cannot read catalogue columns from {type(catalogue).__name__}; pass "
                        "records, a ReadResult, a FITS/astropy table or a dict of arrays")
    return _table_columns(catalogue, (), list(names), "catalogue")


def _num_rows(cols: Mapping[str, np.ndarray], catalogue: Any) -> int:
    if cols:
        return len(next(iter(cols.values())))
    return len(catalogue.records if isinstance(catalogue, ReadResult) else catalogue)


def _apply_cuts(catalogue: Any,
                cuts: Sequence[tuple[str, tuple[str, ...], Any]]) -> tuple[np.ndarray, CutReport]:
    """Applies named cuts in order. Each cut is (name, columns needed, fn(cols) -> [M] bool)."""
    cols = _catalogue_columns(catalogue)
    keep = np.ones(_num_rows(cols, catalogue), bool)
    removed, skipped = {}, []
    for name, needed, passes in cuts:
        if not all(c in cols for c in needed):
            skipped.append(name)
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            ok = np.asarray(passes(cols), bool)
        removed[name] = int((keep & ~ok).sum())
        keep &= ok
    return keep, CutReport(removed, skipped)


def _float(cols: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    return np.asarray(cols[name], np.float64)


def bgs_quality_cuts(catalogue: Any) -> tuple[np.ndarray, CutReport]:
    """BGS redshift-quality cuts of Hahn et al. (2023), as used for SpecPT's BGS sample.

    In order: ZWARN == 0; SPECTYPE == 'GALAXY'; ZERR < 0.0005 (1 + Z); DELTACHI2 > 40. A cut
    whose column is absent is skipped and listed in ``report.skipped``. NaN values fail a cut.

    Args:
      catalogue: records from :func:`read_desi_coadd` (their ``meta``), a ReadResult, a
        REDSHIFTS FITS table / astropy Table, or a dict {column: [M] array}.

    Returns:
      (keep [M] bool, report): ``report[cut]`` = rows that cut removed among those the earlier
      cuts kept, so the numbers add up to the rows dropped.
    """
    return _apply_cuts(catalogue, (
        ("ZWARN", ("ZWARN",), lambda c: _float(c, "ZWARN") == 0),
        ("SPECTYPE", ("SPECTYPE",), lambda c: np.char.strip(c["SPECTYPE"].astype(str)) == "GALAXY"),
        ("ZERR", ("ZERR", "Z"), lambda c: _float(c, "ZERR") < 0.0005 * (1.0 + _float(c, "Z"))),
        ("DELTACHI2", ("DELTACHI2",), lambda c: _float(c, "DELTACHI2") > 40.0),
    ))


def elg_oii_criterion(foii_snr: np.ndarray, deltachi2: np.ndarray) -> np.ndarray:
    """Raichoor et al. (2023, AJ 165, 126) ELG redshift-success criterion, [M] bool:

        log10(FOII_SNR) > 0.9 − 0.2 · log10(DELTACHI2)

    FOII_SNR is the [OII] λλ3726,29 flux S/N (emline catalogue: OII_FLUX · sqrt(OII_FLUX_IVAR)),
    DELTACHI2 redrock's Δχ² to the next-best fit. Where either is <= 0 or NaN the logarithm is
    undefined and the row fails (a non-detection is not a confident redshift).
    """
    foii_snr = np.asarray(foii_snr, np.float64)
    deltachi2 = np.asarray(deltachi2, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = np.log10(foii_snr) > 0.9 - 0.2 * np.log10(deltachi2)
    return ok & (foii_snr > 0) & (deltachi2 > 0)


def elg_quality_cuts(catalogue: Any) -> tuple[np.ndarray, CutReport]:
    """ELG cuts: ZWARN == 0, then the [OII]/Δχ² criterion of :func:`elg_oii_criterion`.

    Same inputs, outputs and missing-column behaviour as :func:`bgs_quality_cuts`; the second
    cut is named ``FOII_SNR_DELTACHI2`` and needs both columns.
    """
    return _apply_cuts(catalogue, (
        ("ZWARN", ("ZWARN",), lambda c: _float(c, "ZWARN") == 0),
        ("FOII_SNR_DELTACHI2", ("FOII_SNR", "DELTACHI2"),
         lambda c: elg_oii_criterion(c["FOII_SNR"], c["DELTACHI2"])),
    ))
