"""DESI coadd reader, camera merge and sample cuts, checked against the real fixture files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table, vstack

from spectrax.data.grids import DESI_NPIX, desi_wavelength
from spectrax.data.readers.desi import (
    bgs_quality_cuts, elg_oii_criterion, elg_quality_cuts, merge_cameras, read_desi_coadd)
from spectrax.spectra import SpectrumError
from fits_edit import edited_copy

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "real" / "desi"
COADD = REAL / "coadd-4-80613-thru20210324.fits"
REDROCK = REAL / "redrock-4-80613-thru20210324.fits"
SV3 = REAL / "coadd-sv3-dark-26065.fits"
REDROCK_TEST = REAL / "redrock-test.fits"
TID = 39633345008634465

needs_real = pytest.mark.skipif(not REAL.is_dir(),
                                reason=f"real DESI fixtures not found at {REAL} (../shared absent)")


@pytest.fixture(scope="module")
def real_result():
    return read_desi_coadd(COADD, REDROCK, require_redshift=True)


def _direct_cameras(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Camera arrays read straight with astropy: {cam: (wave, flux[0], ivar[0], mask[0])}."""
    with fits.open(path) as h:
        return {c: (h[f"{c}_WAVELENGTH"].data.astype(float), h[f"{c}_FLUX"].data[0].astype(float),
                    h[f"{c}_IVAR"].data[0].astype(float), h[f"{c}_MASK"].data[0])
                for c in "BRZ"}


def _on_grid(wave: np.ndarray, values: np.ndarray, fill=np.nan) -> np.ndarray:
    """Places camera values onto the 7781 grid by matching wavelengths (searchsorted, not rint)."""
    grid = desi_wavelength()
    idx = np.searchsorted(grid, wave - 0.01)
    assert np.allclose(grid[idx], wave, atol=1e-6)
    out = np.full(DESI_NPIX, fill, dtype=float)
    out[idx] = values
    return out


# ---------------------------------------------------------------------------------------------
# Real files
# ---------------------------------------------------------------------------------------------

@needs_real
def test_real_target_redshift_and_meta(real_result):
    assert len(real_result.records) == 1
    rec = real_result.records[0]
    assert rec["id"] == TID and rec["id"].dtype == np.int64
    assert rec["labels"].dtype == np.float32 and rec["labels"].shape == (1,)
    assert abs(rec["labels"][0] - 0.368744) < 1e-5
    # the redrock file's values travel under REDROCK_ (never the names of predictions)
    assert abs(rec["meta"]["REDROCK_Z"] - 0.368744) < 1e-5
    assert rec["meta"]["REDROCK_ZWARN"] == 0
    assert rec["meta"]["REDROCK_SPECTYPE"] == "GALAXY"
    assert rec["meta"]["REDROCK_DELTACHI2"] > 1e5
    assert {"TARGET_RA", "TARGET_DEC", "REDROCK_ZERR"} <= set(rec["meta"])
    assert not {"Z", "ZERR", "ZWARN", "DELTACHI2", "SPECTYPE"} & set(rec["meta"])
    for key in ("flux", "ivar", "mask"):
        assert rec[key].shape == (DESI_NPIX,)
    assert rec["flux"].dtype == np.float32 and rec["mask"].dtype == bool
    assert real_result.wavelength.shape == (DESI_NPIX,)


@needs_real
def test_real_merge_matches_direct_read(real_result):
    rec = real_result.records[0]
    cams = _direct_cameras(COADD)
    grid = desi_wavelength()
    flux = {c: _on_grid(w, f) for c, (w, f, _, _) in cams.items()}
    ivar = {c: _on_grid(w, np.where(m == 0, iv, 0.0), fill=0.0)
            for c, (w, _, iv, m) in cams.items()}
    covered = {c: _on_grid(w, np.ones_like(w), fill=0.0) > 0 for c, (w, _, _, _) in cams.items()}

    only_b = covered["B"] & ~covered["R"] & ~covered["Z"]
    only_r = covered["R"] & ~covered["B"] & ~covered["Z"]
    only_z = covered["Z"] & ~covered["B"] & ~covered["R"]
    for cam, region in (("B", only_b), ("R", only_r), ("Z", only_z)):
        sel = region & rec["mask"]
        assert sel.sum() > 1500
        # One camera only: the merged flux is that camera's float32 value, bit for bit.
        np.testing.assert_array_equal(rec["flux"][sel], flux[cam][sel].astype(np.float32))

    br = covered["B"] & covered["R"] & rec["mask"]
    rz = covered["R"] & covered["Z"] & rec["mask"]
    assert 40 <= br.sum() <= 60 and 115 <= rz.sum() <= 135   # 5760–5800 Å and 7520–7620 Å
    assert grid[br].min() >= 5760 and grid[br].max() <= 5800
    for a, b, sel in (("B", "R", br), ("R", "Z", rz)):
        expected = (ivar[a] * flux[a] + ivar[b] * flux[b]) / (ivar[a] + ivar[b])
        np.testing.assert_allclose(rec["flux"][sel], expected[sel], rtol=1e-6, atol=1e-7)

    total_ivar = ivar["B"] + ivar["R"] + ivar["Z"]
    np.testing.assert_allclose(rec["ivar"], total_ivar.astype(np.float32), rtol=1e-6)
    assert rec["mask"].mean() > 0.95
    assert not np.isnan(rec["flux"]).any()


@needs_real
def test_sv3_only_real_targets():
    result = read_desi_coadd(SV3)
    ids = sorted(int(r["id"]) for r in result.records)
    assert ids == [39627866878511337, 39627866878514741]
    # Two unassigned fibres (TARGETID -2713437, -2713415) and one SKY fibre.
    assert result.counts["sky_or_negative_targetid"] == 3
    assert result.counts["labels_missing"] == 2
    # 16 R + 19 Z pixels are flagged in MASK for target 39627866878511337.
    assert result.counts["camera_flagged"] == 35
    for rec in result.records:
        assert np.isnan(rec["labels"]).all()
        assert np.isfinite(rec["flux"]).all() and np.isfinite(rec["ivar"]).all()
        assert rec["mask"].mean() > 0.99
    with pytest.raises(SpectrumError, match="REDSHIFTS"):
        read_desi_coadd(SV3, require_redshift=True)


@needs_real
def test_redrock_test_quality_cuts():
    with fits.open(REDROCK_TEST) as h:
        table = h["REDSHIFTS"].data.copy()
    keep, removed = bgs_quality_cuts(table)
    # Row 0 is the sky fibre with ZWARN 1 (and DELTACHI2 14); the two galaxies pass every cut.
    np.testing.assert_array_equal(keep, [False, True, True])
    assert removed == {"ZWARN": 1, "SPECTYPE": 0, "ZERR": 0, "DELTACHI2": 0}
    assert removed.skipped == ()
    assert sum(removed.values()) + keep.sum() == len(table)
    keep_t, removed_t = bgs_quality_cuts(Table(table))
    np.testing.assert_array_equal(keep_t, keep)
    keep_e, removed_e = elg_quality_cuts(table)
    np.testing.assert_array_equal(keep_e, [False, True, True])
    assert removed_e == {"ZWARN": 1} and removed_e.skipped == ("FOII_SNR_DELTACHI2",)


@needs_real
def test_quality_cuts_on_records(real_result):
    keep, removed = bgs_quality_cuts(real_result.records)
    np.testing.assert_array_equal(keep, [True])
    keep2, _ = bgs_quality_cuts(real_result)
    np.testing.assert_array_equal(keep2, [True])


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

@needs_real
@pytest.mark.parametrize("fraction", [0.02, 0.6, 0.95])
def test_truncated_coadd_names_file(tmp_path, fraction):
    data = COADD.read_bytes()
    cut = int(len(data) * fraction)
    if fraction == 0.95:
        cut -= cut % 2880   # truncated on a FITS block boundary: astropy only warns
    bad = tmp_path / "truncated-coadd.fits"
    bad.write_bytes(data[:cut])
    with pytest.raises(SpectrumError, match="truncated-coadd.fits"):
        read_desi_coadd(bad, REDROCK)


@needs_real
def test_missing_redshift_hdu_is_clear(tmp_path):
    with pytest.raises(SpectrumError, match=r"coadd-4-80613.*REDSHIFTS"):
        read_desi_coadd(COADD, None, require_redshift=True)
    no_z = edited_copy(REDROCK, tmp_path / "redrock-noz.fits",
                        lambda h: h.pop(h.index_of("REDSHIFTS")))
    with pytest.raises(SpectrumError, match=r"redrock-noz.fits: no HDU 'REDSHIFTS'.*FIBERMAP"):
        read_desi_coadd(COADD, no_z)


@needs_real
def test_missing_camera_hdu_lists_what_file_has(tmp_path):
    bad = edited_copy(COADD, tmp_path / "coadd-nor.fits", lambda h: h.pop(h.index_of("R_IVAR")))
    with pytest.raises(SpectrumError, match=r"coadd-nor.fits: no HDU 'R_IVAR'.*R_FLUX"):
        read_desi_coadd(bad)


@needs_real
def test_nonfinite_camera_pixels_are_masked_and_counted(tmp_path):
    grid = desi_wavelength()

    def inject(h):
        h["B_FLUX"].data[0, 100:110] = np.nan      # B-only region: 3680–3687 Å
        h["Z_FLUX"].data[0, -3:] = np.inf          # Z-only region, last pixels
        h["R_IVAR"].data[0, 5] = np.nan            # R pixel 5764 Å, inside the b/r overlap

    bad = edited_copy(COADD, tmp_path / "coadd-nan.fits", inject)
    result = read_desi_coadd(bad, REDROCK)
    rec = result.records[0]
    assert np.isfinite(rec["flux"]).all() and np.isfinite(rec["ivar"]).all()
    assert result.counts["camera_nonfinite_flux"] == 13
    assert result.counts["camera_nonfinite_ivar"] == 1
    assert not rec["mask"][100:110].any() and not rec["mask"][-3:].any()
    assert (rec["flux"][100:110] == 0).all() and (rec["ivar"][-3:] == 0).all()
    assert result.counts["merged_flagged"] == 13
    # The overlap pixel survives on the B camera alone.
    k = int(np.argmin(np.abs(grid - 5764.0)))
    b = _direct_cameras(COADD)["B"]
    kb = int(np.argmin(np.abs(b[0] - 5764.0)))
    assert rec["mask"][k] and rec["flux"][k] == np.float32(b[1][kb])
    assert rec["ivar"][k] == np.float32(b[2][kb])


@needs_real
def test_duplicate_targetids_kept_once_and_join_by_targetid(tmp_path):
    def duplicate(h):
        fm = Table(h["FIBERMAP"].data)
        new = fits.table_to_hdu(vstack([fm, fm]))
        new.name = "FIBERMAP"
        h[h.index_of("FIBERMAP")] = new
        for c in "BRZ":
            for kind in ("FLUX", "IVAR", "MASK"):
                h[f"{c}_{kind}"].data = np.repeat(h[f"{c}_{kind}"].data, 2, axis=0)

    def decoy_first(h):
        # A decoy TARGETID in row 0 so that a join by row order would pick the wrong Z.
        z = Table(h["REDSHIFTS"].data)
        decoy = z.copy()
        decoy["TARGETID"] = 123
        decoy["Z"] = 2.5
        new = fits.table_to_hdu(vstack([decoy, z]))
        new.name = "REDSHIFTS"
        h[h.index_of("REDSHIFTS")] = new

    coadd = edited_copy(COADD, tmp_path / "coadd-dup.fits", duplicate)
    redrock = edited_copy(REDROCK, tmp_path / "redrock-decoy.fits", decoy_first)
    result = read_desi_coadd(coadd, redrock)
    assert len(result.records) == 1
    assert result.counts["duplicate_targetid"] == 1
    assert abs(result.records[0]["labels"][0] - 0.368744) < 1e-5


@needs_real
def test_require_redshift_skips_unmatched(tmp_path):
    def other_id(h):
        h["REDSHIFTS"].data["TARGETID"][:] = 7
    redrock = edited_copy(REDROCK, tmp_path / "redrock-other.fits", other_id)
    result = read_desi_coadd(COADD, redrock, require_redshift=True)
    assert result.records == [] and result.counts["no_redshift_match"] == 1
    kept = read_desi_coadd(COADD, redrock)
    assert np.isnan(kept.records[0]["labels"][0]) and kept.counts["labels_missing"] == 1


def test_missing_file_names_it(tmp_path):
    with pytest.raises(SpectrumError, match="nope.fits"):
        read_desi_coadd(tmp_path / "nope.fits")


# ---------------------------------------------------------------------------------------------
# merge_cameras on synthetic cameras
# ---------------------------------------------------------------------------------------------

def test_merge_weights_by_ivar_and_never_invents_flux():
    grid = desi_wavelength()
    waves = {"b": grid[0:4], "r": grid[2:6]}     # overlap on grid pixels 2 and 3
    fluxes = {"b": np.array([[1.0, 2.0, 3.0, 4.0]]), "r": np.array([[10.0, 20.0, 30.0, 40.0]])}
    ivars = {"b": np.array([[1.0, 1.0, 1.0, 0.0]]), "r": np.array([[2.0, 2.0, 2.0, 2.0]])}
    masks = {"b": np.zeros((1, 4), int), "r": np.array([[0, 4, 0, 0]])}
    flux, ivar, mask = merge_cameras(waves, fluxes, ivars, masks)
    assert flux.shape == ivar.shape == mask.shape == (1, DESI_NPIX)
    # pixel 2: b (3, ivar 1) + r (10, ivar 2) → (3 + 20) / 3; pixel 3: b has ivar 0, r flagged.
    # pixel 4: r (30, 2) alone; pixel 5: r (40, 2) alone; pixel 6+: nothing.
    np.testing.assert_allclose(flux[0, :6], [1, 2, 23 / 3, 0, 30, 40], rtol=1e-6)
    np.testing.assert_allclose(ivar[0, :6], [1, 1, 3, 0, 2, 2])
    np.testing.assert_array_equal(mask[0, :7], [1, 1, 1, 0, 1, 1, 0])
    assert (flux[0, 6:] == 0).all() and (ivar[0, 6:] == 0).all()


def test_merge_rejects_off_grid_camera():
    grid = desi_wavelength()
    with pytest.raises(SpectrumError, match="not on the DESI 0.8 Å grid"):
        merge_cameras({"b": grid[:10] + 0.3}, {"b": np.ones((1, 10))}, {"b": np.ones((1, 10))})
    with pytest.raises(SpectrumError, match="outside the DESI grid"):
        merge_cameras({"z": np.array([9900.0])}, {"z": np.ones((1, 1))}, {"z": np.ones((1, 1))})


# ---------------------------------------------------------------------------------------------
# Cuts on synthetic catalogues
# ---------------------------------------------------------------------------------------------

def test_bgs_cuts_sequential_counts_and_skipped_columns():
    cat = {"ZWARN": np.array([0, 4, 0, 0, 0, 0]),
           "SPECTYPE": np.array(["GALAXY", "GALAXY", "STAR", "GALAXY", "GALAXY", "GALAXY"]),
           "Z": np.array([0.2, 0.2, 0.0, 0.2, 0.2, 0.2]),
           # limit 0.0005 × 1.2 = 0.0006
           "ZERR": np.array([1e-4, 1e-4, 1e-4, 7e-4, 1e-4, np.nan]),
           "DELTACHI2": np.array([100.0, 100.0, 100.0, 100.0, 30.0, 100.0])}
    keep, removed = bgs_quality_cuts(cat)
    np.testing.assert_array_equal(keep, [True, False, False, False, False, False])
    assert removed == {"ZWARN": 1, "SPECTYPE": 1, "ZERR": 2, "DELTACHI2": 1}
    del cat["DELTACHI2"]
    keep, removed = bgs_quality_cuts(cat)
    assert removed.skipped == ("DELTACHI2",) and "DELTACHI2" not in removed
    np.testing.assert_array_equal(keep, [True, False, False, False, True, False])


def test_elg_criterion_by_hand():
    # DELTACHI2 = 100 → threshold 0.9 − 0.2·2 = 0.5 → FOII_SNR must exceed 10**0.5 ≈ 3.162.
    # DELTACHI2 = 1e4 → threshold 0.1 → FOII_SNR > 1.259.
    snr = np.array([4.0, 3.0, 1.3, 1.2, 10.0, -1.0, 5.0])
    dchi2 = np.array([100.0, 100.0, 1e4, 1e4, 0.0, 100.0, 100.0])
    np.testing.assert_array_equal(elg_oii_criterion(snr, dchi2),
                                  [True, False, True, False, False, False, True])
    cat = {"ZWARN": np.array([0, 0, 0, 0, 0, 0, 4]), "FOII_SNR": snr, "DELTACHI2": dchi2}
    keep, removed = elg_quality_cuts(cat)
    np.testing.assert_array_equal(keep, [True, False, True, False, False, False, False])
    assert removed == {"ZWARN": 1, "FOII_SNR_DELTACHI2": 4}
