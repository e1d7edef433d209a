"""`spectrax.prepare` on every native-grid survey's real fixtures: manifests and records."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spectrax import prepare
from spectrax.data import shards
from spectrax.data.readers import READERS

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "real"
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"real fixtures not found at {REAL}")

# survey → (spectra kept, pixels per record or None when they differ, labels)
EXPECTED = {"sdss": (5, None, ["z", "class"]), "lamost": (24, 3904, ["z", "class"]),
            "apogee": (13, 7514, ["teff", "logg", "fe_h", "o_fe", "mg_fe"]),
            "galah": (2, 16384, ["teff", "logg", "fe_h"])}


@pytest.mark.parametrize("survey", sorted(EXPECTED))
def test_prepare_native_survey(tmp_path, survey):
    out = tmp_path / survey
    report = prepare.prepare_survey(survey, [str(REAL / survey)], out)
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
        assert report["reader"]["duplicate_id_across_files"] == 1
    # the split is the id hash: preparing again gives the same assignment
    again = prepare.prepare_survey(survey, [str(REAL / survey)], tmp_path / "again")
    assert again["splits"] == report["splits"]


def test_registry_covers_every_survey_and_cli_accepts_them():
    assert set(READERS) == {"desi", "sdss", "lamost", "apogee", "galah", "mmu"}
    assert prepare.FLAGS["survey"].parser.enum_values == sorted(READERS)
    assert READERS["desi"].native_grid is False and READERS["sdss"].LABEL_NAMES == ("z", "class")


def test_desi_through_the_registry_matches_the_desi_reader():
    desi = REAL / "desi"
    result = READERS["desi"]([desi / "coadd-4-80613-thru20210324.fits",
                              desi / "redrock-4-80613-thru20210324.fits"])
    (rec,) = result.records
    assert int(rec["id"]) == 39633345008634465 and len(rec["flux"]) == 7781
    assert rec["labels"][0] == pytest.approx(0.368744, abs=1e-5)


def test_prepare_refuses_unknown_survey_and_missing_input(tmp_path):
    with pytest.raises(ValueError, match="known"):
        prepare.prepare_survey("euclid", [str(REAL)], tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="no/such"):
        prepare.prepare_survey("sdss", [str(tmp_path / "no/such")], tmp_path / "y")


def test_cli_native_survey(tmp_path):
    res = subprocess.run([sys.executable, "-m", "spectrax.prepare", "--survey=sdss",
                          f"--input={REAL / 'sdss'}", f"--output={tmp_path / 'sdss'}"],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "spec-0854-52373-0369.fits" in res.stdout and "kept 5 spectra" in res.stdout
    assert "flagged" in res.stdout
