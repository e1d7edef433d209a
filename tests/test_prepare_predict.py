"""Real DESI files through `spectrax.prepare` and `spectrax.predict`."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from spectrax import predict, prepare, train
from spectrax.config_lib import load
from spectrax.data import inputs, shards
from helpers import FIXTURES, ROOT  # tests/helpers.py

DESI = FIXTURES / "desi"
pytestmark = pytest.mark.skipif(not DESI.exists(),
                                reason=f"real DESI fixtures not found at {DESI}")
TARGET = 39633345008634465


def test_prepare_real_desi_files(tmp_path):
    out = tmp_path / "desi"
    report = prepare.prepare([str(DESI / "coadd-4-80613-thru20210324.fits"),
                              str(DESI / "redrock-4-80613-thru20210324.fits"),
                              str(DESI / "coadd-sv3-dark-26065.fits")], out, cuts="bgs")
    # the sv3 file has 2 real targets without a redshift file: dropped and counted; its sky and
    # unassigned fibres are skipped by the reader and counted
    assert report["reader"]["no_redshift"] == 2
    assert report["reader"]["sky_or_negative_targetid"] == 3
    assert report["kept"] == 1 and sum(report["splits"].values()) == 1
    assert set(report["cuts"]) == {"ZWARN", "SPECTYPE", "ZERR", "DELTACHI2"}
    assert sum(report["cuts"].values()) == 0
    manifest = shards.read_manifest(out)
    assert manifest.report["kept"] == 1 and manifest.label_names == ["z"]
    (split,) = [s for s, n in report["splits"].items() if n]
    (rec,) = list(shards.iter_records(out, split))
    assert int(rec["id"]) == TARGET
    assert rec["labels"][0] == pytest.approx(0.368744, abs=1e-5)
    assert len(rec["flux"]) == 7781 and rec["mask"].mean() > 0.99
    # the merged flux in the b-only region equals the camera flux read directly
    with fits.open(DESI / "coadd-4-80613-thru20210324.fits") as h:
        b_wave, b_flux = h["B_WAVELENGTH"].data, h["B_FLUX"].data[0]
    idx = np.rint((b_wave - 3600.0) / 0.8).astype(int)
    only_b = (b_wave < 5750)
    np.testing.assert_allclose(rec["flux"][idx[only_b]], b_flux[only_b], rtol=1e-6)


def test_prepare_cli_reports_and_refuses_bad_paths(tmp_path):
    res = subprocess.run([sys.executable, "-m", "spectrax.prepare", "--input=/no/such/dir",
                          f"--output={tmp_path / 'x'}"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 2 and "/no/such/dir" in res.stderr
    res = subprocess.run([sys.executable, "-m", "spectrax.prepare",
                          f"--input={DESI / 'coadd-4-80613-thru20210324.fits'},"
                          f"{DESI / 'redrock-4-80613-thru20210324.fits'}",
                          f"--output={tmp_path / 'ok'}", "--cuts=bgs"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "DELTACHI2" in res.stdout and "kept 1 spectra" in res.stdout


def test_predict_writes_a_catalogue_for_coadds_and_shards(tmp_path):
    c = load("configs/specpt_redshift_bgs.py", "variant=tiny")
    c.unlock()
    c.data.n_train, c.data.n_val, c.data.n_test = 64, 8, 20
    c.data.cache_dir = str(tmp_path / "data")
    c.num_steps, c.batch_size, c.eval_batch_size, c.log_every = 2, 8, 8, 1
    c.init.from_workdir = ""
    c.lock()
    run = tmp_path / "run"
    train.train(c, run)

    cat = tmp_path / "cat.fits"
    summary = predict.run(c, str(run), [str(DESI / "coadd-4-80613-thru20210324.fits")], cat,
                          batch_size=8)
    t = Table.read(cat)
    assert summary["rows"] == 1 and len(t) == 1
    assert int(t["TARGETID"][0]) == TARGET
    # known values: the label, and the redrock file's own columns, under their prefixes
    assert t["LABEL_Z"][0] == pytest.approx(0.368744, abs=1e-5)
    assert t["REDROCK_Z"][0] == pytest.approx(0.368744, abs=1e-5)
    assert np.isfinite(t["Z"][0]) and t["Z"][0] > 0
    assert t["REDROCK_SPECTYPE"][0] == "GALAXY" and t.meta["SPXCONF"] == c.name

    data_dir = next((tmp_path / "data").iterdir())
    summary = predict.run(c, str(run), [str(data_dir)], tmp_path / "sim.fits", batch_size=8)
    t = Table.read(tmp_path / "sim.fits")
    assert len(t) == 64 + 8 + 20 == summary["rows"]
    assert len(np.unique(t["TARGETID"])) == len(t)          # one row per spectrum
    assert set(t["SPLIT"]) == {"train", "val", "test"}


def test_predict_refuses_spectra_on_another_grid(tmp_path):
    from spectrax.spectra import SpectrumError
    d = tmp_path / "short"
    splits = {"test": shards.write_split(d, "test", [{
        "flux": np.ones(500, np.float32), "ivar": np.ones(500, np.float32),
        "mask": np.ones(500, bool), "labels": [0.1], "id": 1}])}
    shards.write_manifest(d, shards.Manifest(label_names=["z"], splits=splits, grid={
        "kind": "linear", "start": 4000.0, "step": 1.0, "n": 500}))

    def refuse(message):
        raise SpectrumError(message)
    with pytest.raises(SpectrumError, match=r"test-00000-of-00001\.array_record.*500 pixels.*7781"):
        list(inputs.model_records(inputs.discover([str(d)]).units,
                                  inputs.LengthPolicy(length=7781), {}, refuse))
