"""GALAH per-CCD reader: four CCD files → one record, labels from dr6.0.fits."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from spectrax.data.readers.common import air_to_vacuum
from spectrax.data.readers.galah import LABEL_NAMES, read_galah
from spectrax.spectra import SpectrumError
from fits_edit import edited_copy
from helpers import FIXTURES  # tests/helpers.py

REAL = FIXTURES / "galah"
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"GALAH fixtures not found at {REAL}")
STAR = 210115000101001
CCDS = [REAL / f"{STAR}{c}.fits" for c in range(1, 5)]


def _direct(path: Path, ext="normalized"):
    with fits.open(path) as h:
        hdu = h[ext]
        n = hdu.header["NAXIS1"]
        wave = hdu.header["CRVAL1"] + hdu.header["CDELT1"] * (np.arange(n) + 1 - hdu.header["CRPIX1"])
        return hdu.data.astype(float), h["relative_error"].data.astype(float), wave


def test_one_star_concatenates_its_ccds():
    result = read_galah(CCDS)
    (rec,) = result.records
    parts = [_direct(p) for p in CCDS]
    assert len(rec["flux"]) == sum(len(f) for f, _, _ in parts) == 4 * 4096
    wave_air = np.concatenate([w for _, _, w in parts])
    np.testing.assert_allclose(rec["wavelength"], air_to_vacuum(wave_air), rtol=1e-7)
    flux = np.concatenate([f for f, _, _ in parts])
    sigma = np.concatenate([f * r for f, r, _ in parts])
    good = np.isfinite(sigma) & (sigma > 0)
    np.testing.assert_array_equal(rec["mask"], good)
    np.testing.assert_allclose(rec["flux"][good], flux[good], rtol=1e-6)
    np.testing.assert_allclose(rec["ivar"][good], 1 / sigma[good] ** 2, rtol=1e-5)
    assert int(rec["id"]) == STAR and result.label_names == LABEL_NAMES
    t = fits.getdata(REAL / "dr6.0.fits", 1)
    row = t[t["sobject_id"] == STAR][0]
    np.testing.assert_allclose(rec["labels"], [row["teff_r"], row["logg_r"], row["fe_h_r"]])
    # CCD 4 has 8 non-positive normalised flux values → σ <= 0 → masked
    assert result.counts["flagged"] == int((~good).sum()) > 0


def test_two_stars_from_the_directory_and_vacuum_off():
    result = read_galah(sorted(REAL.glob("*.fits")), vacuum=False, extension="fluxed")
    assert [int(r["id"]) for r in result.records] == [STAR, 210115002201239]
    rec = result.records[0]
    flux, rel, wave = _direct(CCDS[0], 0)
    np.testing.assert_allclose(rec["wavelength"][:4096], wave, rtol=1e-7)
    np.testing.assert_allclose(rec["flux"][:4096], flux, rtol=1e-6)
    assert np.all(np.diff(rec["wavelength"]) > 0)   # ccd ranges are in order, with gaps
    assert result.counts["labels_missing"] == 0


def test_missing_label_and_missing_ccd(tmp_path):
    for p in CCDS[:3]:
        shutil.copy(p, tmp_path / p.name)
    result = read_galah(sorted(tmp_path.glob("*.fits")))   # no dr6.0.fits there
    (rec,) = result.records
    assert len(rec["flux"]) == 3 * 4096 and np.isnan(rec["labels"]).all()
    assert result.counts["missing_ccd"] == 1 and result.counts["labels_missing"] == 1


def test_bad_inputs(tmp_path):
    cut = tmp_path / f"{STAR}1.fits"
    cut.write_bytes(CCDS[0].read_bytes()[:60000])
    with pytest.raises(SpectrumError, match=f"{STAR}1.fits"):
        read_galah([cut])
    d = tmp_path / "b"
    d.mkdir()
    no_err = edited_copy(CCDS[0], d / f"{STAR}1.fits", lambda h: h.pop("relative_error"))
    with pytest.raises(SpectrumError, match=r"relative_error.*normalized"):
        read_galah([no_err])

    def short(h):
        h["relative_error"].data = h["relative_error"].data[:4000]
    d2 = tmp_path / "c"
    d2.mkdir()
    with pytest.raises(SpectrumError, match=r"shape.*4000"):
        read_galah([edited_copy(CCDS[0], d2 / f"{STAR}1.fits", short)])

    def spoil(h):
        h["normalized"].data[5] = np.nan
        h["relative_error"].data[6] = -0.1
        h["relative_error"].data[7] = np.inf
    d3 = tmp_path / "d"
    d3.mkdir()
    result = read_galah([edited_copy(CCDS[0], d3 / f"{STAR}1.fits", spoil)])
    assert not result.records[0]["mask"][[5, 6, 7]].any()

    def backwards(h):
        h["normalized"].header["CDELT1"] = -0.04
    d4 = tmp_path / "e"
    d4.mkdir()
    with pytest.raises(SpectrumError, match=r"wavelength.*increasing"):
        read_galah([edited_copy(CCDS[0], d4 / f"{STAR}1.fits", backwards)])
