"""Readers that turn survey files (DESI, SDSS, LAMOST, APOGEE, GALAH) into spectrax records.

Each reader returns records in the form :func:`spectrax.spectra.sanitize_record` produces
(float32 flux/ivar with 0 at bad pixels, bool mask with True = valid) together with counts of
what it skipped and why, so that no spectrum is dropped silently.

:data:`READERS` maps a survey name to a :class:`SurveyReader`: a uniform
``reader(paths: list[Path]) -> result`` with ``result.records``, ``result.counts`` and
``result.label_names``, plus ``reader.LABEL_NAMES`` and ``reader.native_grid`` (False only for
DESI, whose records share the 7781-pixel grid and carry no wavelength of their own).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

from spectrax.data.readers.common import ReadResult


@dataclasses.dataclass(frozen=True)
class SurveyReader:
    """One registry entry: ``read(paths)`` plus what prepare needs to know about its output."""

    name: str
    read: Callable[[list[Path]], ReadResult]
    LABEL_NAMES: tuple[str, ...]
    native_grid: bool = True
    pattern: str = "*.fits"  # files taken from a directory given as input

    def __call__(self, paths: Sequence[str | Path]) -> ReadResult:
        return self.read([Path(p) for p in paths])


def _read_desi(paths: list[Path]) -> ReadResult:
    """DESI adapter: coadds joined with the redrock file of the same suffix, results merged."""
    from spectrax.data.readers import desi

    coadds = [p for p in paths if p.name.startswith("coadd")]
    redrocks = {p.name.split("-", 1)[-1]: p for p in paths
                if p.name.startswith(("redrock", "zbest"))}
    records, counts = [], {}
    for c in coadds:
        result = desi.read_desi_coadd(c, redrocks.get(c.name.split("-", 1)[-1]))
        records.extend(result.records)
        for k, v in result.counts.items():
            counts[k] = counts.get(k, 0) + v
    return ReadResult(records, counts, ("z",), [str(p) for p in coadds])


def _read_sdss(paths):
    from spectrax.data.readers.sdss import read_sdss
    return read_sdss(paths)


def _read_lamost(paths):
    from spectrax.data.readers.lamost import read_lamost
    return read_lamost(paths)


def _read_apogee(paths):
    from spectrax.data.readers.apogee import read_apogee
    return read_apogee(paths)


def _read_galah(paths):
    from spectrax.data.readers.galah import read_galah
    return read_galah(paths)


def _read_mmu(paths: list[Path]) -> ReadResult:
    """MMU adapter: the survey (mask rule) is inferred from each path; all files must agree
    on their label columns."""
    from spectrax.data.readers.mmu import read_mmu

    results = [read_mmu(p) for p in paths]
    names = {r.label_names for r in results}
    if len(names) > 1:
        from spectrax.spectra import SpectrumError
        raise SpectrumError(f"MMU files with different label columns {sorted(names)}; prepare "
                            "one survey at a time")
    counts: dict[str, int] = {}
    for r in results:
        for k, v in r.counts.items():
            counts[k] = counts.get(k, 0) + v
    return ReadResult([rec for r in results for rec in r.records], counts,
                      names.pop() if names else ("z",), [str(p) for p in paths])


READERS: dict[str, SurveyReader] = {
    "desi": SurveyReader("desi", _read_desi, ("z",), native_grid=False),
    "sdss": SurveyReader("sdss", _read_sdss, ("z", "class")),
    "lamost": SurveyReader("lamost", _read_lamost, ("z", "class")),
    "apogee": SurveyReader("apogee", _read_apogee, ("teff", "logg", "fe_h", "o_fe", "mg_fe")),
    "galah": SurveyReader("galah", _read_galah, ("teff", "logg", "fe_h")),
    "mmu": SurveyReader("mmu", _read_mmu, ("z",), pattern="*.hdf5"),
}
