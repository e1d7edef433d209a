"""The one batch type of spectrax, its record form, and the validation every input goes through.

Conventions (stated once, used everywhere):
- Masks: ``True`` means VALID (use this pixel / label / row). A pixel is valid only when its
  mask says so AND its flux and ivar are finite AND ivar > 0.
- Bad pixels carry flux = 0 and ivar = 0 after :func:`sanitize_record`, so a NaN can never reach
  a convolution, a matmul or a loss, whatever the model does with the mask.
- Wavelengths are vacuum Å in the observed frame. Padding pixels carry wavelength −1 and are
  masked.
- Labels are a float vector per spectrum whose names live in the shard manifest
  (e.g. ``("z",)`` for redshift, ``("class",)`` for galaxy/QSO/star ids 0/1/2); unknown labels are
  NaN in records and masked out in batches.
- Target ids (DESI TARGETID, SDSS specobjid, …) are int64 and stay on the host: JAX runs in
  32-bit, so ids never enter a jitted function.

A *record* is one spectrum as a dict of numpy arrays (what shards store, what readers and the
simulator produce). A :class:`SpectrumBatch` is B records stacked for a device step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np
from flax import struct

PAD_WAVELENGTH = -1.0

# Class label ids shared by every classifier (alphabetical, as in the reference codes).
CLASS_NAMES = ("GALAXY", "QSO", "STAR")
CLASS_IDS = {name: i for i, name in enumerate(CLASS_NAMES)}
# Survey ids of the ``survey`` label column of multi-survey shards.
SURVEY_NAMES = ("sdss", "desi", "galah", "apogee", "lamost")
SURVEY_IDS = {name: i for i, name in enumerate(SURVEY_NAMES)}


class SpectrumError(ValueError):
    """A spectrum or record that cannot be used, with the place it came from in the message."""


@struct.dataclass
class SpectrumBatch:
    """B spectra on a common pixel axis of length L, K labels each.

    Attributes:
      flux: [B, L] float32, flux in the survey's units (DESI: 1e-17 erg/s/cm²/Å); 0 where bad.
      ivar: [B, L] float32, inverse variance of ``flux``; 0 where bad.
      wavelength: [B, L] float32, vacuum Å; −1 on padding pixels.
      mask: [B, L] bool, True = valid pixel.
      labels: [B, K] float32, 0 where unknown.
      label_mask: [B, K] bool, True = label known.
      valid: [B] bool, False for padding rows that only fill the last batch of an epoch.
      ids: [B] int64 numpy array on the host, or None inside jitted code.
    """

    flux: Any
    ivar: Any
    wavelength: Any
    mask: Any
    labels: Any
    label_mask: Any
    valid: Any
    ids: Any = None

    @property
    def batch_size(self) -> int:
        return self.flux.shape[0]

    @property
    def num_pixels(self) -> int:
        return self.flux.shape[1]

    def for_device(self) -> "SpectrumBatch":
        """The batch without host-only fields, ready to be passed to a jitted function."""
        return self.replace(ids=None)


RECORD_ARRAYS = ("flux", "ivar", "mask")


def sanitize_record(record: Mapping[str, Any], where: str = "record") -> tuple[dict, dict]:
    """Checks one record and returns a cleaned copy plus counts of what was masked.

    Args:
      record: dict with ``flux`` [L], ``ivar`` [L], optional ``mask`` [L] (True = valid),
        optional ``wavelength`` [L] (Å), ``labels`` [K], ``id``.
      where: names the record in error messages, e.g. ``"coadd-x.fits row 3 (TARGETID 42)"``.

    Returns:
      (clean, counts): ``clean`` has float32 flux/ivar with 0 at bad pixels, a bool mask that is
      False wherever flux or ivar was non-finite, ivar <= 0 or the input mask was False, and
      float32 labels with NaN where unknown. ``counts`` says how many pixels each rule masked.

    Raises:
      SpectrumError: when arrays are missing, not 1-D, or of mismatched lengths.
    """
    for key in ("flux", "ivar"):
        if key not in record:
            raise SpectrumError(f"{where}: missing array '{key}' (have {sorted(record)})")
    flux = np.asarray(record["flux"])
    ivar = np.asarray(record["ivar"])
    n = flux.shape[0] if flux.ndim == 1 else -1
    if flux.ndim != 1 or n == 0:
        raise SpectrumError(f"{where}: flux must be a non-empty 1-D array, got shape {flux.shape}")
    mask = np.asarray(record.get("mask", np.ones(n, bool)), dtype=bool)
    arrays = {"flux": flux, "ivar": ivar, "mask": mask}
    if "wavelength" in record and record["wavelength"] is not None:
        arrays["wavelength"] = np.asarray(record["wavelength"], dtype=np.float64)
    for key, arr in arrays.items():
        if arr.shape != (n,):
            raise SpectrumError(
                f"{where}: '{key}' has shape {arr.shape} but flux has {(n,)}; arrays of one "
                "spectrum must have equal lengths")

    flux32, ivar32, good, rows = sanitize_rows(flux[None], ivar[None], mask[None])
    counts = {k: int(v[0]) for k, v in rows.items() if k != "valid_pixels"}
    good = good[0]
    clean = dict(record)
    if "wavelength" in arrays:
        wave = arrays["wavelength"]
        wave_ok = np.isfinite(wave) & (wave > 0)
        counts["bad_wavelength"] = int(np.sum(~wave_ok & good))
        good = good & wave_ok  # a pixel without a wavelength carries no usable flux either
        # Patches are runs of neighbouring pixels: a grid out of order would mix distant
        # wavelengths in one token, so it is refused rather than silently embedded.
        known = np.flatnonzero(wave_ok)
        step = np.diff(wave[known])
        if np.any(step <= 0):
            i = int(known[1:][step <= 0][0])
            raise SpectrumError(
                f"{where}: 'wavelength' is not strictly increasing (pixel {i}: {wave[i]:g} Å "
                f"after {wave[known[known < i][-1]]:g} Å); sort the spectrum first")
        clean["wavelength"] = np.where(wave_ok, wave, PAD_WAVELENGTH).astype(np.float32)
    clean["flux"] = np.where(good, flux32[0], np.float32(0))
    clean["ivar"] = np.where(good, ivar32[0], np.float32(0))
    clean["mask"] = good
    if "labels" in record:
        clean["labels"] = np.atleast_1d(np.asarray(record["labels"], dtype=np.float32))
    counts["valid_pixels"] = int(clean["mask"].sum())
    return clean, counts


def sanitize_rows(flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The pixel rules of :func:`sanitize_record` for N spectra at once.

    Args:
      flux, ivar: [N, L] any float dtype; mask: [N, L] bool, True = valid.

    Returns:
      (flux [N, L] float32, ivar [N, L] float32, good [N, L] bool, counts): ``good`` is False
      wherever flux or ivar is non-finite (or beyond float32's range), ivar <= 0 or the mask is
      False; flux and ivar are 0 there. ``counts`` maps each rule to [N] int pixel counts:
      nonfinite_flux, nonfinite_ivar, nonpositive_ivar (among pixels the mask allowed),
      flagged (mask False), valid_pixels.
    """
    flux, ivar, mask = np.asarray(flux), np.asarray(ivar), np.asarray(mask, bool)
    if flux.dtype == np.float32 and ivar.dtype == np.float32:
        flux_ok, ivar_ok = np.isfinite(flux), np.isfinite(ivar)  # float32 cannot overflow it
    else:
        # float32 is what shards and models hold: finite float64 values beyond its range would
        # become inf there, so they count as non-finite here.
        f32_max = float(np.finfo(np.float32).max)
        flux = np.asarray(flux, np.float64)
        ivar = np.asarray(ivar, np.float64)
        with np.errstate(invalid="ignore"):
            flux_ok = np.abs(flux) <= f32_max  # False for NaN and ±inf too
            ivar_ok = np.abs(ivar) <= f32_max
    with np.errstate(invalid="ignore"):
        positive = ivar > 0
    good = mask & flux_ok & ivar_ok & positive

    def per_row(bad):  # [N] pixels where ``bad`` and the mask allowed them
        return np.count_nonzero(bad & mask, axis=-1)

    zeros = np.zeros(flux.shape[:-1], np.int64)
    all_finite = (flux_ok.all(), ivar_ok.all())  # the usual case: two passes saved
    counts = {"nonfinite_flux": zeros if all_finite[0] else per_row(~flux_ok),
              "nonfinite_ivar": zeros if all_finite[1] else per_row(~ivar_ok),
              "nonpositive_ivar": per_row(ivar_ok & ~positive),
              "flagged": mask.shape[-1] - np.count_nonzero(mask, axis=-1),
              "valid_pixels": np.count_nonzero(good, axis=-1)}
    zero = np.float32(0)
    return (np.where(good, flux, zero).astype(np.float32, copy=False),
            np.where(good, ivar, zero).astype(np.float32, copy=False), good, counts)


def stack_records(records: list[Mapping[str, Any]], num_labels: int,
                  grid: np.ndarray | None = None, length: int | None = None) -> SpectrumBatch:
    """Stacks records into a host :class:`SpectrumBatch`, padding each to ``length`` pixels.

    Records without their own ``wavelength`` take ``grid``. Padding pixels are masked with
    wavelength −1; rows are all valid (pad rows are added by the pipeline, not here).
    """
    if not records:
        raise SpectrumError("cannot stack an empty list of records")
    length = length or max(len(r["flux"]) for r in records)
    b = len(records)
    flux = np.zeros((b, length), np.float32)
    ivar = np.zeros((b, length), np.float32)
    wave = np.full((b, length), PAD_WAVELENGTH, np.float32)
    mask = np.zeros((b, length), bool)
    labels = np.zeros((b, num_labels), np.float32)
    label_mask = np.zeros((b, num_labels), bool)
    ids = np.zeros((b,), np.int64)
    for i, r in enumerate(records):
        n = len(r["flux"])
        if n > length:
            raise SpectrumError(
                f"record {r.get('id', i)} has {n} pixels, more than the batch length {length}")
        flux[i, :n] = r["flux"]
        ivar[i, :n] = r["ivar"]
        mask[i, :n] = r["mask"]
        w = r.get("wavelength")
        if w is None:
            if grid is None or len(grid) != n:
                raise SpectrumError(
                    f"record {r.get('id', i)} has no wavelength and the shard grid "
                    f"({None if grid is None else len(grid)} px) does not match its {n} pixels")
            w = grid
        wave[i, :n] = w
        lab = np.asarray(r.get("labels", np.full(num_labels, np.nan)), np.float32)
        if lab.shape != (num_labels,):
            raise SpectrumError(
                f"record {r.get('id', i)} has {lab.shape[0]} labels, the manifest names "
                f"{num_labels}")
        known = np.isfinite(lab)
        labels[i] = np.where(known, lab, 0.0)
        label_mask[i] = known
        ids[i] = int(r.get("id", -1))
    return SpectrumBatch(flux=flux, ivar=ivar, wavelength=wave, mask=mask, labels=labels,
                         label_mask=label_mask, valid=np.ones((b,), bool), ids=ids)


def pad_batch_rows(batch: SpectrumBatch, size: int) -> SpectrumBatch:
    """Pads a host batch with invalid rows up to ``size`` rows (for the last partial batch)."""
    b = batch.batch_size
    if b == size:
        return batch
    if b > size:
        raise SpectrumError(f"batch of {b} rows cannot be padded down to {size}")

    def pad(x, fill):
        extra = np.full((size - b,) + x.shape[1:], fill, dtype=x.dtype)
        return np.concatenate([x, extra], axis=0)

    return SpectrumBatch(
        flux=pad(batch.flux, 0), ivar=pad(batch.ivar, 0),
        wavelength=pad(batch.wavelength, PAD_WAVELENGTH), mask=pad(batch.mask, False),
        labels=pad(batch.labels, 0), label_mask=pad(batch.label_mask, False),
        valid=pad(batch.valid, False),
        ids=None if batch.ids is None else pad(batch.ids, -1))


def batch_from_arrays(**arrays: Any) -> SpectrumBatch:
    """Builds a batch from keyword arrays, filling what is not given (handy in tests).

    ``flux`` [B, L] is required; ``ivar`` defaults to ones, ``mask`` to all valid,
    ``wavelength`` to the pixel index + 1, ``labels`` to an empty [B, 0] array.
    """
    flux = np.asarray(arrays.pop("flux"), np.float32)
    b, n = flux.shape
    fields = {f.name for f in dataclasses.fields(SpectrumBatch)}
    unknown = set(arrays) - fields
    if unknown:
        raise SpectrumError(f"unknown batch fields {sorted(unknown)}; known: {sorted(fields)}")
    labels = np.asarray(arrays.get("labels", np.zeros((b, 0))), np.float32)
    return SpectrumBatch(
        flux=flux,
        ivar=np.asarray(arrays.get("ivar", np.ones_like(flux)), np.float32),
        wavelength=np.asarray(arrays.get("wavelength", np.broadcast_to(
            np.arange(1, n + 1, dtype=np.float32), (b, n))), np.float32),
        mask=np.asarray(arrays.get("mask", np.ones((b, n), bool)), bool),
        labels=labels,
        label_mask=np.asarray(arrays.get("label_mask", np.isfinite(labels)), bool),
        valid=np.asarray(arrays.get("valid", np.ones((b,), bool)), bool),
        ids=arrays.get("ids"))
