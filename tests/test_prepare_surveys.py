"""`spectrax.prepare` on every survey's real fixtures; the reader registry and file layouts."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from astropy.io import fits

from spectrax import prepare
from spectrax.data import inputs, shards
from spectrax.data.readers import READERS, detect_survey
from spectrax.spectra import CLASS_IDS
from fits_edit import edited_copy

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "fixtures" / "real"
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"real fixtures not found at {REAL}")
DESI_COADD = REAL / "desi" / "coadd-4-80613-thru20210324.fits"
DESI_REDROCK = REAL / "desi" / "redrock-4-80613-thru20210324.fits"

# survey → (spectra kept, pixels per record or None when they differ, labels)
EXPECTED = {"sdss": (5, None, ["z", "class"]), "lamost": (24, 3904, ["z", "class"]),
            "apogee": (13, 7514, ["teff", "logg", "fe_h", "o_fe", "mg_fe"]),
            "galah": (2, 16384, ["teff", "logg", "fe_h"])}


@pytest.mark.parametrize("survey", sorted(EXPECTED))
def test_prepare_native_survey(tmp_path, survey):
    out = tmp_path / survey
    report = prepare.prepare([str(REAL / survey)], out, survey=survey)
    kept, npix, names = EXPECTED[survey]
    assert report["kept"] == kept == sum(report["splits"].values())
    manifest = shards.read_manifest(out)
    assert manifest.grid is None and manifest.label_names == names
    assert manifest.report["kept"] == kept and manifest.source["survey"] == survey
    records = [r for s in manifest.splits for r in shards.iter_records(out, s)]
    assert len(records) == kept and len({int(r["id"]) for r in records}) == kept
    for r in records:
        assert len(r["wavelength"]) == len(r["flux"]) == len(r["mask"])
        assert npix is None or len(r["flux"]) == npix
        assert np.all(np.diff(r["wavelength"][r["wavelength"] > 0]) > 0)
        assert len(r["labels"]) == len(names)
    if survey == "apogee":
        # apStar and aspcapStar of 2M00452143+1634446 share the APOGEE_ID hash: one is kept
        assert report["duplicates"] == 1
    # the split is the id hash: preparing again (survey told from the names) gives the same
    again = prepare.prepare([str(REAL / survey)], tmp_path / "again")
    assert again["splits"] == report["splits"]


def test_registry_covers_every_survey_and_cli_accepts_them():
    assert set(READERS) == {"desi", "sdss", "lamost", "apogee", "galah", "mmu"}
    fv = flags.FlagValues()
    prepare.define_flags(fv)
    assert fv["survey"].parser.enum_values == ["auto", *sorted(READERS)]
    assert READERS["desi"].native_grid is False and READERS["sdss"].LABEL_NAMES == ("z", "class")
    # every real fixture is recognised as its own survey's by name
    for survey in ("desi", "sdss", "lamost", "apogee", "galah"):
        for f in (REAL / survey).iterdir():
            assert detect_survey(f) == survey, f
    assert detect_survey("catalogue.csv") is None


def test_desi_through_the_registry_matches_the_desi_reader():
    result = READERS["desi"]([DESI_COADD, DESI_REDROCK])
    (rec,) = result.records
    assert int(rec["id"]) == 39633345008634465 and len(rec["flux"]) == 7781
    assert rec["labels"][0] == pytest.approx(0.368744, abs=1e-5)
    assert result.grid["n"] == 7781 and result.wavelength[0] == 3600.0


def test_prepare_refuses_unknown_survey_and_missing_input(tmp_path):
    with pytest.raises(ValueError, match="known"):
        prepare.prepare([str(REAL)], tmp_path / "x", survey="euclid")
    with pytest.raises(FileNotFoundError, match="no/such"):
        prepare.prepare([str(tmp_path / "no/such")], tmp_path / "y", survey="sdss")
    with pytest.raises(ValueError, match="several surveys"):
        prepare.prepare([str(REAL / "sdss"), str(REAL / "lamost")], tmp_path / "z")


def test_cli_native_survey(tmp_path):
    res = subprocess.run([sys.executable, "-m", "spectrax.prepare", "--survey=sdss",
                          f"--input={REAL / 'sdss'}", f"--output={tmp_path / 'sdss'}",
                          "--workers=1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "spec-0854-52373-0369.fits" in res.stdout and "kept 5 spectra" in res.stdout
    assert "flagged" in res.stdout


def test_boss_spec_file_with_spall_hdu(tmp_path):
    """BOSS/eBOSS spec files (DR9 on) name the catalogue HDU SPALL: every label still read."""
    src = REAL / "sdss" / "spec-0854-52373-0369.fits"
    boss = tmp_path / "boss" / "spec-0854-52373-0369.fits"
    boss.parent.mkdir()

    def rename(hdul):
        hdul["SPECOBJ"].name = "SPALL"
    edited_copy(src, boss, rename)
    with fits.open(boss) as h:
        assert "SPALL" in h and "SPECOBJ" not in h
    (old,) = READERS["sdss"]([src]).records
    (new,) = READERS["sdss"]([boss]).records
    assert int(new["id"]) == int(old["id"])
    np.testing.assert_array_equal(new["labels"], old["labels"])
    assert new["labels"][1] == CLASS_IDS["GALAXY"] and new["labels"][0] == pytest.approx(0.0365,
                                                                                          abs=6e-4)
    assert {k: v for k, v in new["meta"].items() if k != "file"} == \
        {k: v for k, v in old["meta"].items() if k != "file"}
    np.testing.assert_array_equal(new["flux"], old["flux"])
    report = prepare.prepare([str(boss.parent)], tmp_path / "out", survey="sdss")
    assert report["kept"] == 1 and not report["skipped"]


def test_desi_dr1_healpix_layout_and_zbest_files(tmp_path):
    """DR1 healpix layout (coadd-<survey>-<program>-<hp>.fits with redrock-... beside it, in
    nested directories) and older zbest files (HDU ZBEST) are read, pairs matched per
    directory."""
    hp = tmp_path / "healpix" / "main" / "bright" / "101" / "10123"
    hp.mkdir(parents=True)
    shutil.copy(DESI_COADD, hp / "coadd-main-bright-10123.fits")
    shutil.copy(DESI_REDROCK, hp / "redrock-main-bright-10123.fits")
    tile = tmp_path / "tiles" / "80613"
    tile.mkdir(parents=True)
    shutil.copy(DESI_COADD, tile / "coadd-4-80613-thru20210324.fits")

    def to_zbest(hdul):
        hdul["REDSHIFTS"].name = "ZBEST"
    edited_copy(DESI_REDROCK, tile / "zbest-4-80613-thru20210324.fits", to_zbest)
    found = inputs.discover([str(tmp_path)])
    assert found.surveys == ["desi"] and not found.skipped
    pairs = sorted(tuple(Path(p).name for p in u.paths) for u in found.units)
    assert pairs == [("coadd-4-80613-thru20210324.fits", "zbest-4-80613-thru20210324.fits"),
                     ("coadd-main-bright-10123.fits", "redrock-main-bright-10123.fits")]
    for u in found.units:
        (rec,) = u.open().records
        assert rec[1]["labels"][0] == pytest.approx(0.368744, abs=1e-5)
        assert rec[1]["meta"]["REDROCK_ZWARN"] == 0
    # the same target in both: prepared once, the duplicate counted
    report = prepare.prepare([str(tmp_path)], tmp_path / "out", cuts="bgs")
    assert report["kept"] == 1 and report["duplicates"] == 1 and not report["skipped"]
