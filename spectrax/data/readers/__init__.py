"""Readers that turn survey files (DESI, SDSS, LAMOST, APOGEE, GALAH, MMU) into spectrax records.

Every reader returns a :class:`~spectrax.data.readers.common.ReadResult` (records in the form
:func:`spectrax.spectra.sanitize_record` produces, counts of what it skipped and why, label
names, and a shared wavelength grid where the records have one), so no spectrum is dropped
silently and every caller handles every survey the same way.

:data:`READERS` maps a survey name to a :class:`SurveyReader`. A reader works on *units*: the
files that together give one set of records (a DESI coadd and the redrock file beside it; the
four CCD files of a GALAH star and the catalogue; one file for the other surveys).
``reader.units(files)`` groups any list of files into units, ``reader.read(unit)`` reads one,
so a survey of thousands of files is read one unit at a time in bounded memory
(:mod:`spectrax.data.inputs` does that for prepare, predict and embeddings).
:func:`detect_survey` tells a file's survey from its name.
"""
from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import h5py
from astropy.io import fits

from spectrax.data.readers import apogee, desi, galah, lamost, mmu, sdss
from spectrax.data.readers.common import ReadResult, bump
from spectrax.spectra import SpectrumError

Unit = tuple[Path, ...]  # the files of one unit, the main file first


@dataclasses.dataclass(frozen=True)
class SurveyReader:
    """One registry entry.

    Attributes:
      name: survey key (``--survey``).
      read_unit: reads the files of ONE unit into a ReadResult.
      LABEL_NAMES: the label columns its records carry (MMU: the default; see ReadResult).
      group: files -> units (default: one file per unit); files that only accompany others
        (redrock files, catalogues) are attached to the units that need them.
      native_grid: False only for DESI, whose records share the 7781-pixel grid.
      count: spectra a unit holds, from headers only (cheap; to size pipeline elements before
        reading), or None when it cannot tell.

    Which files of a directory belong to a survey is decided by :func:`detect_survey` (file
    names); files given one by one are taken as the survey's whatever their names.
    """

    name: str
    read_unit: Callable[[Unit], ReadResult]
    LABEL_NAMES: tuple[str, ...]
    group: Callable[[list[Path]], list[Unit]] = lambda files: [(f,) for f in sorted(files)]
    native_grid: bool = True
    count: Callable[[Unit], int | None] = lambda unit: 1

    def units(self, files: Sequence[str | Path]) -> list[Unit]:
        """The units of ``files`` (any order, duplicates ignored), sorted by main file."""
        return sorted(self.group(sorted({Path(f) for f in files})), key=lambda u: str(u[0]))

    def read(self, unit: Sequence[str | Path]) -> ReadResult:
        """Reads one unit (its files as given by :meth:`units`)."""
        return self.read_unit(tuple(Path(p) for p in unit))

    def __call__(self, paths: Sequence[str | Path]) -> ReadResult:
        """Reads every unit of ``paths`` into one ReadResult (small inputs, tools and tests;
        survey-scale work goes unit by unit through :mod:`spectrax.data.inputs`)."""
        results = [self.read(u) for u in self.units(paths)]
        counts: dict[str, int] = {}
        for r in results:
            for k, v in r.counts.items():
                bump(counts, k, v)
        names = {r.label_names for r in results} or {self.LABEL_NAMES}
        if len(names) > 1:
            raise SpectrumError(f"{self.name} files with different label columns "
                                f"{sorted(names)}; read them separately")
        grids = {str(r.grid) for r in results}
        return ReadResult([rec for r in results for rec in r.records], counts, names.pop(),
                          [p for r in results for p in r.paths],
                          grid=results[0].grid if results and len(grids) == 1 else None)


# ----------------------------------------------------------------------------------------------
# Units
# ----------------------------------------------------------------------------------------------
def _suffix(path: Path) -> str:
    return path.name.split("-", 1)[-1]


def units_desi(files: list[Path]) -> list[Unit]:
    """(coadd, redrock) pairs: every file that is not a ``redrock-*`` / ``zbest-*`` file is a
    coadd and takes the ``redrock-<suffix>`` (or older ``zbest-<suffix>``) file of its own
    directory, among ``files`` or on disk beside it; a coadd without one is a unit of its own
    (its spectra are kept without redshift unless the coadd carries a REDSHIFTS HDU). Redshift
    files without a coadd are in no unit (callers report them)."""
    is_z = lambda f: f.name.startswith(("redrock-", "zbest-"))
    redshifts = {(f.parent, _suffix(f)): f for f in sorted(files, reverse=True)
                 if is_z(f)}  # reverse name order: redrock-* wins over zbest-*
    out = []
    for f in files:
        if not is_z(f):
            z = redshifts.get((f.parent, _suffix(f))) or next(
                (c for c in (f.with_name(f"{p}-{_suffix(f)}") for p in ("redrock", "zbest"))
                 if c.exists()), None)
            out.append((f,) if z is None else (f, z))
    return out


def _count_desi(unit: Unit) -> int | None:
    try:
        return int(fits.getheader(unit[0], "FIBERMAP")["NAXIS2"])
    except Exception:  # unreadable: the reader will say why when the unit is read
        return None


def _count_mmu(unit: Unit) -> int | None:
    try:
        with h5py.File(unit[0], "r") as f:
            return int(f["object_id"].shape[0])
    except Exception:
        return None


def _read_desi(unit: Unit) -> ReadResult:
    coadd, *redrock = unit
    return desi.read_desi_coadd(coadd, redrock[0] if redrock else None)


def units_galah(files: list[Path]) -> list[Unit]:
    """One unit per star: its CCD files (CCD order), then the catalogue (``dr6.0.fits`` among
    the files, or next to the star's files) when there is one."""
    catalogues = {f.parent: f for f in files if f.name == galah.CATALOGUE_NAME}
    stars: dict[tuple[Path, int], list[tuple[int, Path]]] = defaultdict(list)
    for f in files:
        try:
            sid, ccd = galah.split_name(f)
        except SpectrumError:  # the catalogue, or not a CCD file: in no unit (reported)
            continue
        stars[(f.parent, sid)].append((ccd, f))
    out = []
    for (parent, _), ccds in stars.items():
        cat = catalogues.get(parent) or (parent / galah.CATALOGUE_NAME)
        unit = tuple(f for _, f in sorted(ccds))
        out.append(unit + ((cat,) if cat.exists() else ()))
    return out


def _read_galah(unit: Unit) -> ReadResult:
    return galah.read_galah(list(unit))


def _read_mmu(unit: Unit) -> ReadResult:
    (path,) = unit
    return mmu.read_mmu(path)


READERS: dict[str, SurveyReader] = {
    "desi": SurveyReader("desi", _read_desi, desi.LABEL_NAMES, group=units_desi,
                         native_grid=False, count=_count_desi),
    "sdss": SurveyReader("sdss", sdss.read_sdss, sdss.LABEL_NAMES),
    "lamost": SurveyReader("lamost", lamost.read_lamost, lamost.LABEL_NAMES),
    "apogee": SurveyReader("apogee", apogee.read_apogee, apogee.LABEL_NAMES),
    "galah": SurveyReader("galah", _read_galah, galah.LABEL_NAMES, group=units_galah),
    "mmu": SurveyReader("mmu", _read_mmu, mmu.LABEL_NAMES, count=_count_mmu),
}

# File names of each survey (what :func:`detect_survey` goes by). SDSS and LAMOST both name
# files spec-*.fits: SDSS as spec-PLATE-MJD-FIBER, LAMOST as spec-MJD-PLANID_spSP-FIBER.
_NAME_RULES = (
    ("desi", re.compile(r"^(coadd|redrock|zbest)-.+\.fits(\.gz)?$")),
    ("sdss", re.compile(r"^spec-\d{4,6}-\d{5}-\d{3,5}\.fits(\.gz)?$")),
    ("lamost", re.compile(r"^spec-\d{5}-[^-]+_sp\d{1,2}-\d{3}\.fits(\.gz)?$")),
    ("apogee", re.compile(r"^(aspcapStar|apStar|asStar)-.+\.fits(\.gz)?$")),
    ("galah", re.compile(r"^(\d{15}[1-4]|dr\d+(\.\d+)?)\.fits$")),
    ("mmu", re.compile(r"^.+\.(hdf5|h5)$")),
)


def detect_survey(path: str | Path) -> str | None:
    """The survey whose file naming ``path`` follows (see :data:`_NAME_RULES`), or None."""
    name = Path(path).name
    for survey, rule in _NAME_RULES:
        if rule.match(name):
            return survey
    return None
