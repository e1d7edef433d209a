"""LAMOST reader: the real DR1-style image files and a synthetic DR5+-style table file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from spectrax.data.readers.common import air_to_vacuum
from spectrax.data.readers.lamost import LABEL_NAMES, read_lamost
from spectrax.spectra import CLASS_IDS, SpectrumError
from helpers import FIXTURES  # tests/helpers.py

REAL = FIXTURES / "lamost"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"LAMOST fixtures not found at {REAL}")
FIRST = REAL / "spec-55862-B6212_sp06-003.fits"


def _table_file(path: Path, n: int = 50, vacuum: bool | None = True, **overrides) -> Path:
    """A DR5+-style file: primary header with labels, HDU 1 one-row table of vectors."""
    wave = 10 ** (3.5682 + 1e-4 * np.arange(n))
    cols = {"FLUX": np.linspace(1, 2, n), "IVAR": np.full(n, 4.0), "WAVELENGTH": wave,
            "ANDMASK": np.zeros(n, np.int32), "ORMASK": np.zeros(n, np.int32)}
    cols.update(overrides)
    hdr = fits.Header({"CLASS": "QSO", "SUBCLASS": "", "Z": 1.25, "Z_ERR": 0.01,
                       "OBSID": 123456789})
    if vacuum is not None:
        hdr["VACUUM"] = vacuum
    table = fits.BinTableHDU.from_columns(
        [fits.Column(name=k, format=f"{len(v)}{'J' if 'MASK' in k else 'D'}", array=[v])
         for k, v in cols.items()])
    fits.HDUList([fits.PrimaryHDU(header=hdr), table]).writeto(path)
    return path


@needs_real
def test_dr1_image_matches_direct_read():
    (rec,) = read_lamost(FIRST).records
    with fits.open(FIRST) as h:
        d, hdr = h[0].data.astype(float), h[0].header
    good = (d[3] == 0) & (d[1] > 0)
    assert len(rec["flux"]) == d.shape[1] == 3904
    np.testing.assert_allclose(rec["wavelength"], 10 ** (3.5682 + 1e-4 * np.arange(3904)),
                               rtol=1e-6)
    np.testing.assert_array_equal(rec["mask"], good)
    np.testing.assert_array_equal(rec["flux"][good], d[0][good].astype(np.float32))
    np.testing.assert_array_equal(rec["ivar"][good], d[1][good].astype(np.float32))
    assert rec["labels"][0] == pytest.approx(hdr["Z"]) and rec["labels"][1] == CLASS_IDS["STAR"]
    assert rec["meta"]["SUBCLASS"] == "F9" and rec["meta"]["wavelength_medium"] == "vacuum"
    assert rec["meta"]["layout"] == "image"


@needs_real
def test_all_real_files_are_stars_with_distinct_ids():
    result = read_lamost(sorted(REAL.glob("*.fits")))
    assert len(result.records) == 24 and result.label_names == LABEL_NAMES
    assert all(r["labels"][1] == CLASS_IDS["STAR"] for r in result.records)
    assert len({int(r["id"]) for r in result.records}) == 24
    total = 24 * 3904
    assert result.counts["valid_pixels"] + result.counts["nonpositive_ivar"] + \
        result.counts["flagged"] == total
    # the id is stable (a hash, not Python's salted hash)
    assert int(read_lamost(FIRST).records[0]["id"]) == int(result.records[0]["id"])


def test_table_layout_and_air_conversion(tmp_path):
    (rec,) = read_lamost(_table_file(tmp_path / "t.fits")).records
    assert rec["meta"]["layout"] == "table" and int(rec["id"]) == 123456789
    np.testing.assert_allclose(rec["wavelength"], 10 ** (3.5682 + 1e-4 * np.arange(50)), rtol=1e-6)
    assert rec["labels"][1] == CLASS_IDS["QSO"] and rec["labels"][0] == pytest.approx(1.25)
    air = read_lamost(_table_file(tmp_path / "air.fits", vacuum=False))
    np.testing.assert_allclose(air.records[0]["wavelength"],
                               air_to_vacuum(10 ** (3.5682 + 1e-4 * np.arange(50))), rtol=1e-6)
    assert air.counts["air_converted"] == 1
    assert air.records[0]["wavelength"][0] - rec["wavelength"][0] == pytest.approx(1.05, abs=0.05)
    none = read_lamost(_table_file(tmp_path / "none.fits", vacuum=None))
    assert none.counts["vacuum_keyword_missing"] == 1


def test_bad_pixels_lengths_and_order(tmp_path):
    flux = np.linspace(1, 2, 50)
    flux[3] = np.nan
    ivar = np.full(50, 4.0)
    ivar[[5, 6, 7]] = [np.inf, -1.0, 0.0]
    mask = np.zeros(50, np.int32)
    mask[9] = 4
    wave = 10 ** (3.5682 + 1e-4 * np.arange(50))
    wave[11] = -1.0
    result = read_lamost(_table_file(tmp_path / "bad.fits", FLUX=flux, IVAR=ivar, ANDMASK=mask,
                                     WAVELENGTH=wave))
    rec = result.records[0]
    assert not rec["mask"][[3, 5, 6, 7, 9, 11]].any() and rec["mask"].sum() == 44
    c = result.counts
    assert (c["nonfinite_flux"], c["nonfinite_ivar"], c["nonpositive_ivar"], c["flagged"],
            c["bad_wavelength"]) == (1, 1, 2, 1, 1)
    with pytest.raises(SpectrumError, match=r"short.fits.*equal lengths"):
        read_lamost(_table_file(tmp_path / "short.fits", IVAR=np.ones(49)))
    with pytest.raises(SpectrumError, match=r"unsorted.fits.*wavelength.*increasing"):
        read_lamost(_table_file(tmp_path / "unsorted.fits", WAVELENGTH=wave[::-1].clip(1)))


def test_missing_column_and_truncation(tmp_path):
    path = tmp_path / "nomask.fits"
    _table_file(path)
    with fits.open(path) as h:
        cols = [c for c in h[1].columns if c.name != "ANDMASK"]
        fits.HDUList([h[0].copy(), fits.BinTableHDU.from_columns(cols)]).writeto(
            tmp_path / "noand.fits")
    with pytest.raises(SpectrumError, match=r"noand.fits.*ANDMASK.*FLUX"):
        read_lamost(tmp_path / "noand.fits")
    if REAL.is_dir():
        cut = tmp_path / "cut.fits"
        cut.write_bytes(FIRST.read_bytes()[:30000])
        with pytest.raises(SpectrumError, match="cut.fits"):
            read_lamost(cut)
