"""Simulated multi-survey, multi-class samples: the embedded default data of the tokenizer (and
of every model that reads spectra on their native grids).

A *mixture* is a list of components ``(survey, class, fraction)``; each component is drawn by
the simulator of that class on that survey's native grid (no resampling):

===========  =====================================================  =========================
class        simulator                                              grids
===========  =====================================================  =========================
GALAXY       :mod:`spectrax.data.synthetic` (DESI BGS) or           DESI; SDSS / LAMOST
             :mod:`spectrax.data.sim_galaxies` (SDSS-like z)        (per-spectrum slices)
QSO          :mod:`spectrax.data.sim_quasars`                       DESI, SDSS, LAMOST
STAR         :mod:`spectrax.data.sim_stars` (optical; APOGEE H)     every survey
===========  =====================================================  =========================

Every record carries the label columns :data:`LABELS` (NaN where a label does not apply:
no Teff for a galaxy) and its wavelength grid as a compact descriptor
(:func:`spectrax.data.grids.grid_array`), so SDSS spectra of ~4000 pixels and APOGEE spectra of
7514 pixels sit in one shard directory, each on its own grid. GALAH-like spectra use
:data:`GALAH_PIXELS_PER_CCD` pixels per CCD (real GALAH: 4096) so CPU runs stay tractable; the
four CCD windows are the real ones.

Determinism: component ``k`` of a mixture draws its rows from seed ``seed * 100 + k`` of its
simulator, so a sample is a function of (name, n, seed) only.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from spectrax.data import grids, sim_galaxies, sim_quasars, sim_stars, synthetic
from spectrax.data import survey_grids as sg
from spectrax.spectra import CLASS_IDS, SURVEY_IDS

LABELS = ("z", "class", "teff", "logg", "feh", "survey")
C_KMS = 299_792.458
GALAH_PIXELS_PER_CCD = 1024
CHUNK = 128  # spectra simulated per call (one SDSS/LAMOST grid slice per chunk)


@dataclasses.dataclass(frozen=True)
class Component:
    survey: str
    cls: str
    fraction: float


MIXTURES: dict[str, tuple[Component, ...]] = {
    # Tokenizer pre-training: four surveys, three classes, shared batches (SPECS.md §3).
    "multisurvey": (
        Component("sdss", "GALAXY", 0.14), Component("sdss", "QSO", 0.10),
        Component("sdss", "STAR", 0.11), Component("desi", "GALAXY", 0.14),
        Component("desi", "QSO", 0.10), Component("desi", "STAR", 0.11),
        Component("galah", "STAR", 0.15), Component("apogee", "STAR", 0.15)),
    # Classification galaxy / QSO / star on DESI-like spectra (the paper's DESI task).
    "desi_classes": (Component("desi", "GALAXY", 1 / 3), Component("desi", "QSO", 1 / 3),
                     Component("desi", "STAR", 1 / 3)),
    # Classification on SDSS-like and LAMOST-like spectra (the ViT paper's SLOMOST mix).
    "slomost": (Component("sdss", "GALAXY", 0.2), Component("sdss", "QSO", 0.15),
                Component("sdss", "STAR", 0.15), Component("lamost", "GALAXY", 0.15),
                Component("lamost", "QSO", 0.1), Component("lamost", "STAR", 0.25)),
    # Redshifts of SDSS- and LAMOST-like galaxies and quasars; stars of the same surveys.
    "slomost_z": (Component("sdss", "GALAXY", 0.35), Component("sdss", "QSO", 0.25),
                  Component("lamost", "GALAXY", 0.25), Component("lamost", "QSO", 0.15)),
    "slomost_stars": (Component("sdss", "STAR", 0.5), Component("lamost", "STAR", 0.5)),
    # Stellar parameters from APOGEE-like (real-like) spectra.
    "apogee_stars": (Component("apogee", "STAR", 1.0),),
}


def component_counts(name: str, n: int) -> list[int]:
    """Rows per component of mixture ``name`` for ``n`` spectra (largest-remainder rounding,
    so the counts sum to n exactly)."""
    comps = mixture(name)
    raw = np.array([c.fraction for c in comps]) * n / sum(c.fraction for c in comps)
    counts = np.floor(raw).astype(int)
    for k in np.argsort(-(raw - counts))[: n - counts.sum()]:
        counts[k] += 1
    return counts.tolist()


def mixture(name: str) -> tuple[Component, ...]:
    if name not in MIXTURES:
        raise ValueError(f"unknown mixture {name!r}; known: {sorted(MIXTURES)}")
    return MIXTURES[name]


# ------------------------------------------------------------------------------------------------
# Grid descriptors
# ------------------------------------------------------------------------------------------------
def describe_grid(wave: np.ndarray) -> dict | None:
    """A :func:`spectrax.data.grids.grid_array` descriptor reproducing ``wave`` to 1e-9
    relative, or None (then the array itself is stored). Handles linear, log-linear and gapped
    (CCDs, chips) grids."""
    wave = np.asarray(wave, np.float64)
    segs = sg.contiguous_segments(wave)
    descs = [_describe_segment(wave[a:b]) for a, b in segs]
    if any(d is None for d in descs):
        return None
    desc = descs[0] if len(descs) == 1 else {"kind": "segments", "segments": descs}
    return desc if np.allclose(grids.grid_array(desc), wave, rtol=1e-9, atol=0) else None


def _describe_segment(w: np.ndarray) -> dict | None:
    n = w.size
    if n < 2:
        return {"kind": "linear", "start": float(w[0]), "step": 1.0, "n": int(n)}
    k = np.arange(n)
    step = (w[-1] - w[0]) / (n - 1)
    if np.allclose(w[0] + step * k, w, rtol=1e-10, atol=0):
        return {"kind": "linear", "start": float(w[0]), "step": float(step), "n": int(n)}
    lw = np.log10(w)
    lstep = (lw[-1] - lw[0]) / (n - 1)
    if np.allclose(10 ** (lw[0] + lstep * k), w, rtol=1e-10, atol=0):
        return {"kind": "loglinear", "log10_start": float(lw[0]), "log10_step": float(lstep),
                "n": int(n)}
    return None


# ------------------------------------------------------------------------------------------------
# Components -> records
# ------------------------------------------------------------------------------------------------
def _labels(n: int, survey: str, cls: str, **columns) -> np.ndarray:
    """[n, len(LABELS)] float32, NaN where a label does not apply."""
    out = np.full((n, len(LABELS)), np.nan, np.float32)
    out[:, LABELS.index("class")] = CLASS_IDS[cls]
    out[:, LABELS.index("survey")] = SURVEY_IDS[survey]
    for key, value in columns.items():
        out[:, LABELS.index(key)] = value
    return out


def _chunk_grid(survey: str, seed: int, chunk_index: int) -> np.ndarray:
    """The native grid of one chunk: SDSS / LAMOST spectra start and end at different pixels,
    drawn per chunk; other surveys have one grid."""
    rng = np.random.default_rng([seed, 7, chunk_index])
    if survey == "galah":
        return sg.galah_wavelength(GALAH_PIXELS_PER_CCD)
    return sg.get_survey(survey).wavelength(rng if survey in ("sdss", "lamost") else None)


def _simulate_chunk(comp: Component, seed: int, start: int, n: int, chunk_index: int) -> dict:
    """Rows [start, start + n) of one component as arrays + per-row grids."""
    survey, cls = comp.survey, comp.cls
    if survey == "apogee":
        if cls != "STAR":
            raise ValueError("APOGEE components can only be stars")
        d = sim_stars.simulate_apogee_stars(n, seed, start=start, version="real_like")
        labels = _labels(n, survey, cls, teff=d["TEFF"], logg=d["LOGG"], feh=d["FE_H"], z=0.0)
        return {"flux": d["flux"], "ivar": d["ivar"], "mask": d["mask"],
                "wavelength": d["wavelength"], "labels": labels, "id": d["id"]}
    if survey == "desi" and cls == "GALAXY":
        d = synthetic.desi_galaxy_rows(start, start + n, "bgs", seed)
        return {"flux": d["flux"], "ivar": d["ivar"], "mask": d["mask"],
                "wavelength": sg.desi_wavelength(), "id": d["id"],
                "labels": _labels(n, survey, cls, z=d["z"])}
    wave = _chunk_grid(survey, seed, chunk_index)
    inst = sg.get_survey(survey)
    r = inst.resolution(wave)
    if cls == "GALAXY":
        d = sim_galaxies.simulate_galaxies(n, wave, seed, resolving_power=r, start=start)
        labels = _labels(n, survey, cls, z=d["z"])
    elif cls == "QSO":
        d = sim_quasars.simulate_quasars(n, wave, seed, resolving_power=r, start=start)
        labels = _labels(n, survey, cls, z=d["z"])
    elif cls == "STAR":
        d = sim_stars.simulate_optical_stars(n, wave, seed, survey=survey, start=start)
        labels = _labels(n, survey, cls, teff=d["teff"], logg=d["logg"], feh=d["feh"],
                         z=d["rv"] / C_KMS)
    else:
        raise ValueError(f"unknown class {cls!r}")
    return {"flux": d["flux"], "ivar": d["ivar"], "mask": d["mask"], "wavelength": wave,
            "labels": labels, "id": d["id"]}


def num_chunks(name: str, n: int, chunk: int = CHUNK) -> int:
    """Round-robin chunk indices of an ``n``-spectrum sample of mixture ``name``."""
    return max((-(-c // chunk) for c in component_counts(name, n)), default=0)


def mixture_chunk(name: str, n: int, seed: int, c: int, chunk: int = CHUNK) -> list[dict]:
    """The shard records of round-robin chunk index ``c`` of an ``n``-spectrum sample: chunk
    ``c`` of every component that has one (component order), each record with flux, ivar,
    mask, a grid descriptor (or wavelength), labels [len(LABELS)] and an id unique within the
    sample (component index × 10^12 + the simulator's id modulo 10^12). Depends only on
    (name, n, seed, c): chunks can be simulated in any order, by any worker."""
    records = []
    for k, (comp, count) in enumerate(zip(mixture(name), component_counts(name, n))):
        start = c * chunk
        if start >= count:
            continue
        m = min(chunk, count - start)
        d = _simulate_chunk(comp, seed * 100 + k, start, m, c)
        desc = describe_grid(d["wavelength"])
        for i in range(m):
            rec = {"flux": d["flux"][i], "ivar": d["ivar"][i], "mask": d["mask"][i],
                   "labels": d["labels"][i],
                   "id": np.int64((k + 1) * 10**12 + int(d["id"][i]) % 10**12)}
            if desc is not None:
                rec["grid"] = desc
            else:
                rec["wavelength"] = d["wavelength"]
            records.append(rec)
    return records


def iter_mixture(name: str, n: int, seed: int = 0, chunk: int = CHUNK) -> Iterator[list[dict]]:
    """Yields the ``n`` spectra of mixture ``name`` as lists of shard records, one round-robin
    chunk index at a time (:func:`mixture_chunk`)."""
    for c in range(num_chunks(name, n, chunk)):
        yield mixture_chunk(name, n, seed, c, chunk)


# ------------------------------------------------------------------------------------------------
# APOGEE-like stars for SpectraFM: the same stars as clean synthetic spectra or real-like ones
# ------------------------------------------------------------------------------------------------
APOGEE_LABELS = ("TEFF", "LOGG", "O_FE", "MG_FE", "FE_H")
APOGEE_SETS = {"apogee_clean": "clean", "apogee_real": "real_like"}


def apogee_label_names() -> list[str]:
    return list(APOGEE_LABELS) + [f"{n}_ERR" for n in APOGEE_LABELS]


def apogee_rows(name: str, seed: int, start: int, stop: int) -> list[dict]:
    """Records of stars ``[start, stop)`` of APOGEE set ``name``
    (:func:`spectrax.data.sim_stars.simulate_apogee_stars` in version ``APOGEE_SETS[name]``):
    normalised flux, ivar, mask, the 7514-pixel grid as a descriptor, labels
    :func:`apogee_label_names`. The same (seed, row) gives the same star (same labels) in both
    versions: the synthetic gap of SpectraFM's paper."""
    if name not in APOGEE_SETS:
        raise ValueError(f"unknown APOGEE set {name!r}; known: {sorted(APOGEE_SETS)}")
    desc = describe_grid(sg.apogee_wavelength())
    d = sim_stars.simulate_apogee_stars(stop - start, seed, start=start,
                                        version=APOGEE_SETS[name])
    labels = np.stack([d[k] for k in APOGEE_LABELS]
                      + [d[f"{k}_ERR"] for k in APOGEE_LABELS], 1).astype(np.float32)
    return [{"flux": d["flux"][i], "ivar": d["ivar"][i], "mask": d["mask"][i], "grid": desc,
             "labels": labels[i], "id": np.int64(d["id"][i])} for i in range(stop - start)]


def iter_apogee(name: str, n: int, seed: int = 0, chunk: int = CHUNK) -> Iterator[list[dict]]:
    """Records of ``n`` simulated APOGEE stars, ``chunk`` at a time (:func:`apogee_rows`)."""
    for start in range(0, n, chunk):
        yield apogee_rows(name, seed, start, min(start + chunk, n))
