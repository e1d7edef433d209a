"""SDSS spec-lite reader against direct astropy reads of the real fixture files."""
from __future__ import annotations


import numpy as np
import pytest
from astropy.io import fits

from spectrax.data.readers.sdss import LABEL_NAMES, read_sdss
from spectrax.spectra import CLASS_IDS, SpectrumError
from fits_edit import edited_copy
from helpers import FIXTURES  # tests/helpers.py

REAL = FIXTURES / "sdss"
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"SDSS fixtures not found at {REAL}")
EXPECTED = {"spec-0854-52373-0369.fits": (0.0365, "GALAXY"),
            "spec-0907-52373-0419.fits": (0.0740, "QSO"),
            "spec-1372-53062-0072.fits": (0.0419, "GALAXY"),
            "spec-1737-53055-0369.fits": (0.0616, "GALAXY"),
            "spec-0266-51602-0031.fits": (0.0, "STAR")}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_matches_direct_read(name):
    result = read_sdss(REAL / name)
    (rec,) = result.records
    with fits.open(REAL / name) as h:
        c, s = h["COADD"].data, h["SPECOBJ"].data
        good = (c["and_mask"] == 0) & (c["ivar"] > 0)
        assert len(rec["flux"]) == len(c)
        np.testing.assert_allclose(rec["wavelength"], 10.0 ** c["loglam"].astype(float), rtol=1e-6)
        np.testing.assert_array_equal(rec["mask"], good)
        np.testing.assert_array_equal(rec["flux"][good], c["flux"][good])
        np.testing.assert_array_equal(rec["ivar"][good], c["ivar"][good])
        assert not rec["flux"][~good].any() and not rec["ivar"][~good].any()
        assert int(rec["id"]) == int(s["SPECOBJID"][0])
    z, cls = EXPECTED[name]
    assert rec["labels"][0] == pytest.approx(z, abs=6e-4)
    assert rec["labels"][1] == CLASS_IDS[cls] and result.label_names == LABEL_NAMES
    assert rec["meta"]["CLASS"] == cls and rec["meta"]["file"] == name
    assert result.counts["flagged"] == int((c["and_mask"] != 0).sum())
    assert rec["wavelength"][0] > 3790 and rec["wavelength"][-1] < 9230


def test_white_dwarf_subclass_and_all_files():
    result = read_sdss(sorted(REAL.glob("*.fits")))
    assert len(result.records) == 5
    wd = [r for r in result.records if r["meta"]["file"] == "spec-0266-51602-0031.fits"][0]
    assert wd["meta"]["SUBCLASS"] == "WD"
    assert sum(result.counts[k] for k in ("flagged", "nonpositive_ivar", "valid_pixels")) == \
        sum(len(r["flux"]) for r in result.records)


def test_truncated_file_names_it(tmp_path):
    src = REAL / "spec-0854-52373-0369.fits"
    cut = tmp_path / "cut.fits"
    cut.write_bytes(src.read_bytes()[:40000])
    with pytest.raises(SpectrumError, match="cut.fits"):
        read_sdss(cut)


def test_missing_hdu_and_column_list_what_is_there(tmp_path):
    src = REAL / "spec-0854-52373-0369.fits"
    no_spec = edited_copy(src, tmp_path / "nospec.fits", lambda h: h.pop(2))
    with pytest.raises(SpectrumError, match=r"nospec.fits.*SPECOBJ.*COADD"):
        read_sdss(no_spec)

    def drop_ivar(h):
        cols = [c for c in h["COADD"].columns if c.name != "ivar"]
        h[1] = fits.BinTableHDU.from_columns(cols, name="COADD")
    no_ivar = edited_copy(src, tmp_path / "noivar.fits", drop_ivar)
    with pytest.raises(SpectrumError, match=r"noivar.fits.*\['ivar'\].*loglam"):
        read_sdss(no_ivar)


def test_bad_pixels_masked_and_counted(tmp_path):
    src = REAL / "spec-0854-52373-0369.fits"

    def spoil(h):
        c = h["COADD"].data
        c["flux"][10] = np.nan
        c["ivar"][20] = np.inf
        c["ivar"][30] = -1.0
        c["and_mask"][10:40] = 0
    bad = edited_copy(src, tmp_path / "bad.fits", spoil)
    (rec,) = (result := read_sdss(bad)).records
    assert not rec["mask"][[10, 20, 30]].any() and rec["flux"][10] == 0
    assert result.counts["nonfinite_flux"] == 1 and result.counts["nonfinite_ivar"] == 1
    assert result.counts["nonpositive_ivar"] >= 1


def test_unsorted_wavelength_refused_and_missing_specobjid_packs(tmp_path):
    src = REAL / "spec-0854-52373-0369.fits"

    def swap(h):
        c = h["COADD"].data
        c["loglam"][100], c["loglam"][101] = c["loglam"][101], c["loglam"][100]
    with pytest.raises(SpectrumError, match=r"swapped.fits.*wavelength.*not strictly increasing"):
        read_sdss(edited_copy(src, tmp_path / "swapped.fits", swap))

    def no_specobjid(h):
        cols = [c for c in h["SPECOBJ"].columns if c.name != "SPECOBJID"]
        h[2] = fits.BinTableHDU.from_columns(cols, name="SPECOBJ")
    result = read_sdss(edited_copy(src, tmp_path / "noid.fits", no_specobjid))
    assert int(result.records[0]["id"]) == 854 * 10**9 + 52373 * 10**4 + 369
    assert result.counts["id_from_plate_mjd_fiber"] == 1
