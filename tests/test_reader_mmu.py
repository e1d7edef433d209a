"""Multimodal Universe HDF5 reader on small files built here with h5py."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from spectrax.data.readers import READERS
from spectrax.data.readers.mmu import read_mmu
from spectrax.spectra import SpectrumError


def _write(path: Path, survey: str, *, drop: str | None = None, lengths=(6, 4)) -> Path:
    """Two rows padded to L = max(lengths): row i has lengths[i] real pixels."""
    n, big = len(lengths), max(lengths)
    flux = np.ones((n, big))
    ivar = np.zeros((n, big))
    lam = np.full((n, big), -1.0)
    mask = np.ones((n, big), bool)  # MMU: True = BAD (padding is True)
    for i, k in enumerate(lengths):
        lam[i, :k] = 5000.0 + np.arange(k)
        ivar[i, :k] = 2.0
        mask[i, :k] = False
    fields = {"object_id": np.array([b"obj-a", b"1234"]), "ra": np.array([1.0, 2.0]),
              "dec": np.array([3.0, 4.0]), "spectrum_flux": flux, "spectrum_ivar": ivar,
              "spectrum_lambda": lam, "spectrum_lsf_sigma": np.ones((n, big)),
              "Z": np.array([0.1, np.nan]), "teff": np.array([5000.0, 6000.0]),
              "logg": np.array([4.0, 2.5]), "fe_h": np.array([0.0, -1.0])}
    if survey != "galah":
        fields["spectrum_mask"] = mask
    fields.pop(drop, None)
    with h5py.File(path, "w") as f:
        for k, v in fields.items():
            f.create_dataset(k, data=v)
    return path


def test_padding_stripped_and_ids(tmp_path):
    result = read_mmu(_write(tmp_path / "sdss.hdf5", "sdss"), "sdss")
    a, b = result.records
    assert len(a["flux"]) == 6 and len(b["flux"]) == 4
    np.testing.assert_array_equal(b["wavelength"], 5000.0 + np.arange(4))
    assert result.counts["padding_pixels"] == 2 and a["mask"].all()
    assert int(b["id"]) == 1234 and a["meta"]["object_id"] == "obj-a" and int(a["id"]) >= 0
    assert result.label_names == ("z",) and a["labels"][0] == pytest.approx(0.1)
    assert result.counts["labels_missing"] == 1


@pytest.mark.parametrize("survey,rule_ivar,valid", [("sdss", 1e-6, False), ("desi", 1e-6, True),
                                                     ("apogee", 1e-6, True)])
def test_survey_ivar_thresholds(tmp_path, survey, rule_ivar, valid):
    path = _write(tmp_path / f"{survey}.hdf5", survey)
    with h5py.File(path, "a") as f:
        f["spectrum_ivar"][0, 2] = rule_ivar   # SDSS: ivar <= 1e-6 bad; DESI/APOGEE: < 1e-6 bad
        f["spectrum_ivar"][0, 3] = 1e-7
    result = read_mmu(path, survey)
    rec = result.records[0]
    assert rec["mask"][2] == valid and not rec["mask"][3]
    assert result.counts["low_ivar"] == (1 if valid else 2)


def test_bitmask_and_galah_derived_mask(tmp_path):
    path = _write(tmp_path / "apogee.hdf5", "apogee")
    with h5py.File(path, "a") as f:
        del f["spectrum_mask"]
        bits = np.zeros((2, 6), np.int32)
        bits[0, 1] = 4096
        bits[1, 4:] = 1  # padding
        f["spectrum_mask"] = bits
        f["spectrum_flux"][0, 5] = np.nan
    result = read_mmu(path, "apogee", label_columns=("teff", "logg", "fe_h"))
    rec = result.records[0]
    assert not rec["mask"][1] and not rec["mask"][5] and rec["mask"].sum() == 4
    assert result.counts["flagged"] == 1 and result.label_names == ("teff", "logg", "fe_h")

    g = _write(tmp_path / "galah.hdf5", "galah")
    with h5py.File(g, "a") as f:
        f["spectrum_ivar"][0, 0] = 0.0
        f["spectrum_lambda"][0, 1] = -1.0   # inside the data: masked, not stripped
    res = read_mmu(g, "galah")
    rec = res.records[0]
    assert len(rec["flux"]) == 6 and not rec["mask"][:2].any() and rec["mask"][2:].all()
    assert res.counts["bad_wavelength"] == 1 and res.counts["nonpositive_ivar"] == 1
    np.testing.assert_allclose(rec["labels"], [5000.0, 4.0, 0.0])


def test_missing_field_shapes_order_and_corrupt_file(tmp_path):
    with pytest.raises(SpectrumError, match=r"nomask.hdf5.*spectrum_mask.*spectrum_flux"):
        read_mmu(_write(tmp_path / "nomask.hdf5", "desi", drop="spectrum_mask"), "desi")
    with pytest.raises(SpectrumError, match=r"noz.hdf5.*'Z'"):
        read_mmu(_write(tmp_path / "noz.hdf5", "sdss", drop="Z"), "sdss")
    bad = _write(tmp_path / "shape.hdf5", "sdss")
    with h5py.File(bad, "a") as f:
        del f["spectrum_ivar"]
        f["spectrum_ivar"] = np.ones((2, 5))
    with pytest.raises(SpectrumError, match=r"shape.hdf5.*spectrum_ivar.*\(2, 5\)"):
        read_mmu(bad, "sdss")
    unsorted = _write(tmp_path / "unsorted.hdf5", "sdss")
    with h5py.File(unsorted, "a") as f:
        f["spectrum_lambda"][0, 3] = 4000.0
    with pytest.raises(SpectrumError, match=r"unsorted.hdf5 row 0.*wavelength.*increasing"):
        read_mmu(unsorted, "sdss")
    cut = tmp_path / "cut.hdf5"
    cut.write_bytes(_write(tmp_path / "full.hdf5", "sdss").read_bytes()[:1500])
    with pytest.raises(SpectrumError, match="cut.hdf5"):
        read_mmu(cut, "sdss")


def test_registry_infers_survey_from_path(tmp_path):
    d = tmp_path / "desi" / "healpix=12"
    d.mkdir(parents=True)
    result = READERS["mmu"]([_write(d / "001-of-001.hdf5", "desi")])
    assert len(result.records) == 2 and result.records[0]["meta"]["survey"] == "mmu_desi"
    with pytest.raises(SpectrumError, match="cannot tell the survey"):
        READERS["mmu"]([_write(tmp_path / "x.hdf5", "desi")])
