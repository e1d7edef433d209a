"""APOGEE aspcapStar / apStar reader against direct astropy reads of the real fixture files."""
from __future__ import annotations


import numpy as np
import pytest
from astropy.io import fits

from spectrax.data.readers.apogee import CHIP_PIXELS, LABEL_NAMES, read_apogee
from spectrax.data.readers.common import stable_id
from spectrax.spectra import SpectrumError
from fits_edit import edited_copy
from helpers import FIXTURES  # tests/helpers.py

REAL = FIXTURES / "apogee"
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"APOGEE fixtures not found at {REAL}")
ASPCAP = REAL / "aspcapStar-r6-l30e.2-2M05392474+4038437.fits"  # calibrated PARAM
APSTAR = REAL / "apStar-r6-2M00452143+1634446.fits"


def test_aspcapstar_matches_direct_read():
    result = read_apogee(ASPCAP)
    (rec,) = result.records
    with fits.open(ASPCAP) as h:
        flux, err, t = h[1].data.astype(float), h[2].data.astype(float), h[4].data
    k = CHIP_PIXELS
    assert len(rec["flux"]) == 7514 and k.size == 7514
    assert rec["wavelength"][0] == pytest.approx(10 ** (4.179 + 6e-6 * 246), rel=1e-7)
    assert rec["wavelength"][-1] == pytest.approx(10 ** (4.179 + 6e-6 * 8334), rel=1e-7)
    np.testing.assert_allclose(rec["wavelength"], 10 ** (4.179 + 6e-6 * k), rtol=1e-7)
    good = (flux[k] >= 0.05) & (flux[k] <= 1.2) & (err[k] > 0) & np.isfinite(flux[k])
    np.testing.assert_array_equal(rec["mask"], good)
    np.testing.assert_array_equal(rec["flux"][good], flux[k][good].astype(np.float32))
    np.testing.assert_allclose(rec["ivar"][good], 1 / err[k][good] ** 2, rtol=1e-6)
    assert result.counts["flux_out_of_range"] == int((~good).sum())
    param = t["PARAM"][0]
    assert rec["labels"][0] == pytest.approx(param[0]) and rec["labels"][1] == pytest.approx(param[1])
    x_h = t["X_H"][0]  # DR13 ELEM order: O 3, Mg 5, Fe 17
    np.testing.assert_allclose(rec["labels"][2:], [x_h[17], x_h[3] - x_h[17], x_h[5] - x_h[17]],
                               rtol=1e-5)
    assert rec["meta"]["FPARAM_TEFF"] == pytest.approx(t["FPARAM"][0][0])
    assert rec["meta"]["APOGEE_ID"] == "2M05392474+4038437"
    assert int(rec["id"]) == int(stable_id("2M05392474+4038437")) and rec["id"] >= 0


def test_model_flux_option():
    (rec,) = read_apogee(ASPCAP, use_model=True).records
    model = fits.getdata(ASPCAP, 3).astype(float)[CHIP_PIXELS]
    np.testing.assert_array_equal(rec["flux"][rec["mask"]], model[rec["mask"]].astype(np.float32))
    assert rec["meta"]["flux_source"] == "model"


def test_all_fixtures_uncalibrated_params_are_nan():
    result = read_apogee(sorted(REAL.glob("*.fits")))
    assert len(result.records) == 14 and result.label_names == LABEL_NAMES
    assert all(len(r["flux"]) == 7514 for r in result.records)
    by_file = {r["meta"]["file"]: r for r in result.records}
    m_dwarf = by_file["aspcapStar-r6-l30e.2-2M00452143+1634446.fits"]
    assert np.isnan(m_dwarf["labels"]).all()            # PARAM is −9999: never a number
    assert m_dwarf["meta"]["FPARAM_TEFF"] == pytest.approx(2500.6, abs=0.1)
    partial = by_file["aspcapStar-r6-l30e.2-2M08501918+1056436.fits"]
    assert partial["labels"][0] == pytest.approx(3170.5, abs=0.1) and np.isnan(partial["labels"][1])
    assert result.counts["labels_missing"] == 10         # 9 uncalibrated aspcapStar + apStar


def test_apstar_combined_row_and_bitmask():
    (rec,) = read_apogee(APSTAR).records
    with fits.open(APSTAR) as h:
        flux, err, bits = (h[i].data[0][CHIP_PIXELS] for i in (1, 2, 3))
    good = (bits == 0) & (err > 0)
    np.testing.assert_array_equal(rec["mask"], good)
    np.testing.assert_array_equal(rec["flux"][good], flux[good])
    assert rec["meta"]["product"] == "apStar" and np.isnan(rec["labels"]).all()


def test_bad_inputs(tmp_path):
    cut = tmp_path / "aspcapStar-cut.fits"
    cut.write_bytes(ASPCAP.read_bytes()[:50000])
    with pytest.raises(SpectrumError, match="aspcapStar-cut.fits"):
        read_apogee(cut)
    no_table = edited_copy(ASPCAP, tmp_path / "aspcapStar-notable.fits", lambda h: h.pop(4))
    with pytest.raises(SpectrumError, match=r"notable.fits.*no HDU 4.*4 HDUs"):
        read_apogee(no_table)

    def short_error(h):
        h[2].data = h[2].data[:8000]
    with pytest.raises(SpectrumError, match=r"short.fits.*HDU 2.*8000"):
        read_apogee(edited_copy(ASPCAP, tmp_path / "aspcapStar-short.fits", short_error))

    def spoil(h):
        h[1].data[300] = np.nan
        h[2].data[301] = -1.0
        h[2].data[302] = np.inf
    result = read_apogee(edited_copy(ASPCAP, tmp_path / "aspcapStar-bad.fits", spoil))
    rec = result.records[0]
    i = np.searchsorted(CHIP_PIXELS, [300, 301, 302])
    assert not rec["mask"][i].any() and not rec["ivar"][i].any()
    assert result.counts["nonpositive_ivar"] >= 2 and result.counts["nonfinite_flux"] == 0

    def decreasing(h):
        h[1].header["CDELT1"] = -6e-6
    with pytest.raises(SpectrumError, match=r"decr.fits.*wavelength.*increasing"):
        read_apogee(edited_copy(ASPCAP, tmp_path / "aspcapStar-decr.fits", decreasing))
