"""`spectrax.predict` on every native-grid survey's real fixture files (SDSS, LAMOST, APOGEE,
GALAH), on one directory mixing surveys, and on a corrupt file among good ones.

The model is the tiny tokenizer classifier (configs/tokenizer_classify.py), which reads each
spectrum on its own grid, with length buckets that hold every survey: SDSS and LAMOST
(~3800-3900 px) share the first, APOGEE (7514) and a DESI coadd (7781) the second, a GALAH
star (4 CCDs, 16384 px) the third. What each catalogue must hold is taken from the reader
registry itself: one row per record the survey's reader yields, with its id, its source file,
its usable pixels, its labels and metadata.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table
from helpers import FIXTURES, ROOT, shrunk  # tests/helpers.py

from spectrax import checkpoint, predict, sharding, train
from spectrax.config_lib import load
from spectrax.data.readers import READERS
from spectrax.spectra import CLASS_NAMES, SpectrumError

SURVEYS = ("sdss", "lamost", "apogee", "galah")
pytestmark = pytest.mark.skipif(not all((FIXTURES / s).is_dir() for s in SURVEYS),
                                reason=f"real survey fixtures not found at {FIXTURES}")
CONFIG = "configs/tokenizer_classify.py"
BUCKETS = (4608, 7808, 16384)  # SDSS/LAMOST, APOGEE/DESI, GALAH (see the module docstring)
PREDICTED = ["CLASS_PRED", *[f"PROB_{c}" for c in CLASS_NAMES]]  # the task's columns


def _files(survey: str) -> list[Path]:
    return sorted(p for p in (FIXTURES / survey).iterdir() if p.is_file())


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(config, checkpoint directory) of the tiny tokenizer classifier, freshly initialised
    and checkpointed the way test_embeddings checkpoints its adapted model: predict's plumbing
    is under test here, not what the model learnt, and no training keeps the file fast."""
    tmp = tmp_path_factory.mktemp("predict-surveys")
    c = shrunk(load(CONFIG, "variant=tiny"), tmp / "data", splits=(16, 4, 4), steps=1,
               batch_size=8, eval_batch_size=8, log_every=1, ckpt_every=100, num_figures=0,
               warmup_steps=1)
    c.data.buckets = BUCKETS
    c.init.from_workdir = ""  # no pre-trained tokenizer: the whole model starts from its init
    c.lock()
    trainer = train.Trainer(c, sharding.make_mesh(1, 1), 1)
    ckpt = checkpoint.Checkpointer(tmp / "run", async_save=False)
    ckpt.save(0, trainer.init_state(), {}, {"task_state": trainer.task.state()}, force=True)
    ckpt.wait()
    ckpt.close()
    return c, tmp / "run"


@pytest.fixture(scope="module")
def predicted(model, tmp_path_factory):
    """``predicted(survey)``: (summary, catalogue) of predict run on the survey's fixture
    files given one by one; each survey is predicted once per module, whichever test asks
    first."""
    out_dir = tmp_path_factory.mktemp("catalogues")
    done: dict[str, tuple[dict, Table]] = {}

    def get(survey: str) -> tuple[dict, Table]:
        if survey not in done:
            out = out_dir / f"{survey}.fits"
            summary = predict.run(model[0], str(model[1]), [str(f) for f in _files(survey)],
                                  out, batch_size=8, progress=False)
            done[survey] = summary, read(out)
        return done[survey]

    return get


def expected(survey: str, files: list[Path]) -> tuple[dict, dict, tuple[str, ...]]:
    """What the registry's reader yields for ``files``: {(source file name, id): record}
    (the main file of the record's unit, as predict's SOURCE), the summed counts, and the
    label names."""
    reader = READERS[survey]
    records, counts, names = {}, {}, reader.LABEL_NAMES
    for unit in reader.units(files):
        result = reader.read(unit)
        names = result.label_names
        for rec in result.records:
            key = (unit[0].name, int(rec["id"]))
            assert key not in records, f"{key} twice: the test's keys must be unique"
            records[key] = rec
        for k, v in result.counts.items():
            counts[k] = counts.get(k, 0) + v
    return records, counts, names


def read(path: Path) -> Table:
    """A catalogue as plain columns: str (not bytes) text, NaN (not masked) floats."""
    return Table.read(path, mask_invalid=False, character_as_bytes=False)


def keys_of(table: Table) -> list[tuple[str, int]]:
    return [(str(s), int(i)) for s, i in zip(table["SOURCE"], table["TARGETID"])]


def _fits_text(value) -> str:
    """A metadata string as the catalogue stores it: FITS text is ASCII, other characters are
    kept as escapes (predict's rule)."""
    return str(value).encode("ascii", "backslashreplace").decode("ascii")


def check_predictions(table: Table) -> None:
    """Finite class probabilities that sum to one, and CLASS_PRED their most probable class."""
    probs = np.stack([np.asarray(table[f"PROB_{c}"], np.float64) for c in CLASS_NAMES], 1)
    assert np.all(np.isfinite(probs)) and np.all((probs >= 0) & (probs <= 1))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(table["CLASS_PRED"]),
                                  np.array(CLASS_NAMES)[probs.argmax(1)])


@pytest.mark.parametrize("survey", SURVEYS)
def test_predict_on_raw_survey_files(model, predicted, survey):
    config, _ = model
    summary, t = predicted(survey)
    records, counts, label_names = expected(survey, _files(survey))
    # one row per spectrum the reader yields, nothing refused, the reader's counts reported
    assert summary["rows"] == len(t) == len(records) > 0
    assert sorted(keys_of(t)) == sorted(records)
    assert not summary["refused"] and not summary["skipped"]
    assert summary["reader_counts"] == {k: v for k, v in counts.items() if v}
    # the documented columns: TARGETID, the task's predictions, the labels by name, NPIX_VALID,
    # the reader's metadata and SOURCE; SPLIT only for shard inputs
    assert {"TARGETID", *PREDICTED, "LABEL_CLASS", "NPIX_VALID", "SOURCE", "SURVEY"} <= \
        set(t.colnames)
    assert "SPLIT" not in t.colnames
    assert (t.meta["SPXCONF"], t.meta["SPXMODEL"]) == (config.name, "tokenizer_adapted:tiny")
    check_predictions(t)
    j = label_names.index("class") if "class" in label_names else None
    for row, key in zip(t, keys_of(t)):
        rec = records[key]
        assert row["NPIX_VALID"] == rec["mask"].sum() > 0, key
        want = rec["labels"][j] if j is not None else np.nan  # the class label, by name
        np.testing.assert_array_equal(row["LABEL_CLASS"], want, err_msg=str(key))
        for name, value in rec["meta"].items():  # every metadata value, in its own column
            got = row[name.upper()]
            if isinstance(got, str):
                assert got == ("" if value is None else _fits_text(value)), (key, name)
            else:
                np.testing.assert_array_equal(got, np.nan if value is None else float(value),
                                              err_msg=f"{key} {name}")
    assert set(t["SURVEY"]) == {survey}
    if survey in ("sdss", "lamost"):  # files with a class label: every row has it
        assert np.all(np.isfinite(t["LABEL_CLASS"]))
    if survey == "apogee":
        # predict does not deduplicate (prepare does): the apStar and the aspcapStar file of
        # 2M00452143+1634446 are two rows with one TARGETID, told apart by SOURCE
        assert len(set(t["TARGETID"])) == len(t) - 1
    if survey == "galah":
        # a star is one row, named by its first CCD file; the reader's "air→vacuum" survives
        # the ASCII-only FITS catalogue as an escape
        assert sorted(t["SOURCE"]) == ["2101150001010011.fits", "2101150022012391.fits"]
        assert set(t["WAVELENGTH_MEDIUM"]) == {"air\\u2192vacuum"}
        assert np.all(t["NPIX_VALID"] <= 16384) and max(t["NPIX_VALID"]) > 7808


def test_predict_on_a_directory_mixing_surveys(model, predicted, tmp_path):
    """One directory holding every native survey's files and a DESI coadd + redrock pair:
    predict (unlike prepare, which refuses several surveys) tells each file's survey from its
    name, reads each with its own reader, and writes one catalogue of them all; a column only
    some surveys have is NaN / '' in the others' rows."""
    config, run = model
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    inputs = {s: _files(s) for s in SURVEYS}
    inputs["desi"] = [FIXTURES / "desi" / "coadd-4-80613-thru20210324.fits",
                      FIXTURES / "desi" / "redrock-4-80613-thru20210324.fits"]
    for files in inputs.values():
        for f in files:
            (mixed / f.name).symlink_to(f)
    out = tmp_path / "mixed.fits"
    summary = predict.run(config, str(run), [str(mixed)], out, batch_size=8, progress=False)
    t = read(out)

    want = {s: expected(s, [mixed / f.name for f in files])[0] for s, files in inputs.items()}
    assert summary["rows"] == len(t) == sum(map(len, want.values())) == 5 + 24 + 14 + 2 + 1
    assert not summary["refused"] and not summary["skipped"]
    survey_of = {k: s for s, recs in want.items() for k in recs}
    assert sorted(keys_of(t)) == sorted(survey_of)
    survey = np.array([survey_of[k] for k in keys_of(t)])
    native = survey != "desi"  # the DESI reader's metadata has no survey key
    np.testing.assert_array_equal(np.asarray(t["SURVEY"])[native], survey[native])
    check_predictions(t)
    assert np.all(t["NPIX_VALID"] > 0)
    assert np.all(np.asarray(t["APOGEE_ID"])[survey == "apogee"] != "")
    assert np.all(np.asarray(t["APOGEE_ID"])[survey != "apogee"] == "")
    sdss = survey == "sdss"
    assert np.all(np.isfinite(t["PLATE"][sdss])) and np.all(np.isnan(t["PLATE"][~sdss]))
    assert np.isfinite(t["REDROCK_Z"][survey == "desi"]).all()
    # a spectrum's prediction does not depend on the other surveys sharing its batch
    row = {k: i for i, k in enumerate(keys_of(t))}
    for s in SURVEYS:
        _, alone = predicted(s)
        idx = [row[k] for k in keys_of(alone)]
        for c in CLASS_NAMES:
            np.testing.assert_allclose(np.asarray(t[f"PROB_{c}"])[idx], alone[f"PROB_{c}"],
                                       atol=1e-5, err_msg=f"{s} PROB_{c}")


@pytest.fixture
def with_corrupt_file(tmp_path):
    """A directory of the SDSS files and two LAMOST files, plus a truncated copy of a third
    LAMOST file under a LAMOST name of its own: (directory, corrupt file, good files)."""
    d = tmp_path / "in"
    d.mkdir()
    good = [*_files("sdss"), *_files("lamost")[:2]]
    for f in good:
        (d / f.name).symlink_to(f)
    corrupt = d / "spec-55862-B6212_sp06-099.fits"
    data = _files("lamost")[2].read_bytes()
    corrupt.write_bytes(data[:len(data) // 2])
    return d, corrupt, good


def test_corrupt_file_is_skipped_named_and_counted(model, with_corrupt_file, tmp_path):
    config, run = model
    d, corrupt, good = with_corrupt_file
    records = {k: r for s in ("sdss", "lamost")
               for k, r in expected(s, [f for f in good if f.parent.name == s])[0].items()}
    out = tmp_path / "cat.fits"
    summary = predict.run(config, str(run), [str(d)], out, batch_size=8, progress=False)
    t = read(out)
    assert summary["rows"] == len(t) == len(records) == 5 + 2
    assert sorted(keys_of(t)) == sorted(records)
    (message,) = summary["refused"]
    assert str(corrupt) in message and "truncated" in message and "skipped" in message
    assert summary["reader_counts"]["refused_files"] == 1
    check_predictions(t)

    # --strict: the first unusable file stops the run, named
    with pytest.raises(SpectrumError, match=corrupt.name):
        predict.run(config, str(run), [str(d)], tmp_path / "strict.fits", batch_size=8,
                    strict=True, progress=False)
    assert not (tmp_path / "strict.fits").exists()
    # nothing usable at all: no catalogue, an error naming the file
    with pytest.raises(SpectrumError, match=rf"no spectra found.*{corrupt.name}"):
        predict.run(config, str(run), [str(corrupt)], tmp_path / "none.fits", batch_size=8,
                    progress=False)
    assert not (tmp_path / "none.fits").exists()


def test_cli_writes_the_rest_and_exits_1_naming_the_corrupt_file(model, with_corrupt_file,
                                                                   tmp_path):
    _, run = model
    d, corrupt, good = with_corrupt_file
    out = tmp_path / "cli.fits"
    res = subprocess.run([sys.executable, "-m", "spectrax.predict",
                          f"--config={CONFIG}:variant=tiny", f"--config.data.buckets={BUCKETS}",
                          f"--checkpoint={run}",
                          f"--input={d}", f"--output={out}", "--batch_size=8"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert res.returncode == 1, res.stderr[-2000:]
    refused = [line for line in res.stderr.splitlines() if "spectrax.predict: refused:" in line]
    assert len(refused) == 1 and str(corrupt) in refused[0], res.stderr[-2000:]
    assert "wrote 7 rows" in res.stdout and "1 record(s)/file(s) refused" in res.stdout
    t = read(out)
    assert len(t) == 7 and set(t["SOURCE"]) == {f.name for f in good}
    assert not Path(str(out) + ".parts").exists()
