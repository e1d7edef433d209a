"""A corpus of bad inputs, table-driven: every case is (name, build, expectation).

``build(tmp_path)`` makes the bad input (synthetic DESI coadds and shards written here, or
mutations of the real DESI files in ../shared/fixtures/real/desi) and returns a zero-argument
callable that feeds it to one entry point: the DESI reader, ``spectrax.prepare``, the record path
of ``spectrax.predict``, the shard reader or the Grain pipeline. The expectation is either
``Refused(patterns)``: a SpectrumError whose message names the file (and the record, for record
problems); or ``Passes(check)``: bad records masked/dropped and counted, good ones through.

Policy for absurd redshifts (redrock Z < -0.01 or Z > 10): ``prepare`` masks the label and counts
``absurd_redshift``; with require_redshift (default) the spectrum is then dropped and counted in
``no_redshift`` too.
"""
from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import msgpack
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from spectrax import prepare
from spectrax.data import inputs, pipeline, shards
from spectrax.data.grids import desi_wavelength
from spectrax.data.readers import desi
from spectrax.spectra import SpectrumError

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "real" / "desi"
REAL_COADD = "coadd-4-80613-thru20210324.fits"
REAL_REDROCK = "redrock-4-80613-thru20210324.fits"


# ----------------------------------------------------------------------------------------------
# Expectations
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Refused:
    """The call raises ``exc`` whose message matches every regex in ``patterns``."""
    patterns: tuple[str, ...]
    exc: type = SpectrumError

    def check(self, act: Callable[[], Any]) -> None:
        with pytest.raises(self.exc) as info:
            act()
        for pattern in self.patterns:
            assert re.search(pattern, str(info.value)), (pattern, str(info.value))


@dataclasses.dataclass
class Passes:
    """The call returns; ``verify(result)`` asserts what was masked, dropped and counted."""
    verify: Callable[[Any], None]

    def check(self, act: Callable[[], Any]) -> None:
        self.verify(act())


# ----------------------------------------------------------------------------------------------
# Builders: a small synthetic DESI coadd (two overlapping cameras) and shard directories
# ----------------------------------------------------------------------------------------------
CAMS = {"B": np.arange(0, 120), "R": np.arange(100, 220)}


def coadd_arrays(n: int = 4, seed: int = 0) -> dict[str, Any]:
    """Editable contents of a good coadd of ``n`` targets with a REDSHIFTS HDU."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, Any] = {
        "TARGETID": np.arange(1000, 1000 + n, dtype=np.int64),
        "OBJTYPE": np.array(["TGT"] * n), "Z": np.linspace(0.1, 0.4, n)}
    for cam, idx in CAMS.items():
        arrays[f"{cam}_WAVELENGTH"] = desi_wavelength()[idx]
        arrays[f"{cam}_FLUX"] = rng.normal(5, 1, (n, idx.size)).astype(np.float32)
        arrays[f"{cam}_IVAR"] = np.ones((n, idx.size), np.float32)
        arrays[f"{cam}_MASK"] = np.zeros((n, idx.size), np.int32)
    return arrays


def write_coadd(path: Path, arrays: dict[str, Any], drop: tuple[str, ...] = ()) -> Path:
    """Writes ``arrays`` as a desispec-like coadd; HDUs or columns named in ``drop`` are left out."""
    hdus = [fits.PrimaryHDU()]
    fm = Table({k: arrays[k] for k in ("TARGETID", "OBJTYPE") if k not in drop})
    if "FIBERMAP" not in drop:
        hdus.append(fits.BinTableHDU(fm, name="FIBERMAP"))
    for cam in CAMS:
        for kind in ("WAVELENGTH", "FLUX", "IVAR", "MASK"):
            name = f"{cam}_{kind}"
            if name not in drop:
                hdus.append(fits.ImageHDU(arrays[name], name=name))
    if "REDSHIFTS" not in drop:
        z = Table({"TARGETID": arrays["TARGETID"], **({} if "Z" in drop else {"Z": arrays["Z"]})})
        hdus.append(fits.BinTableHDU(z, name="REDSHIFTS"))
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path


def coadd(tmp: Path, mutate: Callable[[dict], None] = lambda a: None, n: int = 4,
          drop: tuple[str, ...] = ()) -> Path:
    arrays = coadd_arrays(n)
    mutate(arrays)
    return write_coadd(tmp / "coadd-test-1.fits", arrays, drop)


def truncate(path: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])
    return path


def good_record(i: int, n: int = 220) -> dict:
    rng = np.random.default_rng(i)
    return {"flux": rng.normal(5, 1, n).astype(np.float32), "ivar": np.ones(n, np.float32),
            "mask": np.ones(n, bool), "labels": [0.2], "id": 5000 + i}


def shard_dir(tmp: Path, payloads: list[bytes], n: int = 220) -> Path:
    """A shard directory whose one test file holds ``payloads`` as raw records."""
    from array_record.python.array_record_module import ArrayRecordWriter

    d = tmp / "shards"
    d.mkdir(exist_ok=True)
    name = "test-00000-of-00001.array_record"
    writer = ArrayRecordWriter(str(d / name), "group_size:1")
    for p in payloads:
        writer.write(p)
    writer.close()
    grid = {"kind": "linear", "start": 3600.0, "step": 0.8, "n": n}
    shards.write_manifest(d, shards.Manifest(
        label_names=["z"], splits={"test": {"files": [name], "count": len(payloads)}}, grid=grid))
    return d


def good_payloads(k: int) -> list[bytes]:
    return [shards.encode_record(good_record(i)) for i in range(k)]


# ----------------------------------------------------------------------------------------------
# Entry points under test
# ----------------------------------------------------------------------------------------------
def read(path, redrock=None):
    return lambda: desi.read_desi_coadd(path, redrock)


def prep(tmp: Path, *files, **kw):
    return lambda: prepare.prepare([str(f) for f in files], tmp / "out", survey="desi",
                                   cuts="none", **kw)


def predict_records(item, length: int = 7781):
    """The input layer's record path of predict and embeddings (no model): returns (records,
    counts, refusals)."""
    def act():
        counts: dict[str, int] = {}
        refused: list[str] = []
        found = inputs.discover([str(item)])
        recs = list(inputs.model_records(found.units, inputs.LengthPolicy(length=length),
                                         counts, refused.append))
        return recs, counts, refused + [f"{f}: {r}" for f, r in found.skipped]
    return act


def shard_read(d):
    return lambda: list(shards.iter_records(d, "test"))


def pipeline_read(d):
    return lambda: list(pipeline.eval_batches(str(d), "test", batch_size=4))


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
def reader_counts(kept: int, **counts):
    def verify(result):
        assert len(result.records) == kept, (len(result.records), result.counts)
        for key, value in counts.items():
            assert result.counts.get(key, 0) == value, (key, result.counts)
        for r in result.records:
            assert np.all(np.isfinite(r["flux"])) and np.all(np.isfinite(r["ivar"]))
    return verify


def prepare_counts(kept: int, **counts):
    def verify(report):
        assert report["kept"] == kept, report
        assert not report["skipped"], report["skipped"]
        for key, value in counts.items():
            assert report["reader"].get(key, 0) == value, (key, report["reader"])
    return verify


def prepare_skipped(*patterns):
    """prepare carried on: the unreadable file is skipped, named with the reason."""
    def verify(report):
        assert report["kept"] == 0 and len(report["skipped"]) == 1, report
        text = f"{report['skipped'][0]['file']}: {report['skipped'][0]['reason']}"
        for pattern in patterns:
            assert re.search(pattern, text), (pattern, text)
    return verify


def predict_counts(kept: int, refused: int = 0, **counts):
    def verify(result):
        recs, got, messages = result
        assert len(recs) == kept and len(messages) == refused, (len(recs), messages)
        for key, value in counts.items():
            assert got.get(key, 0) == value, (key, got)
        for m in messages:  # every refusal names the file and the record
            assert ".array_record" in m or ".fits" in m, m
        for r in recs:
            assert np.all(np.isfinite(r.record["flux"])) and np.all(np.isfinite(r.record["ivar"]))
    return verify


def set_row(key, row, value):
    def mutate(a):
        a[key][row] = value
    return mutate


def set_all(keys, row, value):
    def mutate(a):
        for key in keys:
            a[key][row] = value
    return mutate


def chain(*mutations):
    def mutate(a):
        for m in mutations:
            m(a)
    return mutate


FLUXES, IVARS, MASKS = ("B_FLUX", "R_FLUX"), ("B_IVAR", "R_IVAR"), ("B_MASK", "R_MASK")


def _swap_wavelengths(a):
    w = a["B_WAVELENGTH"].copy()
    w[[3, 4]] = w[[4, 3]]
    a["B_WAVELENGTH"] = w


def _negative_wavelengths(a):
    a["B_WAVELENGTH"] = -a["B_WAVELENGTH"]


def _duplicate_tid(a):
    a["TARGETID"][2] = a["TARGETID"][0]


def _sky_and_unassigned(a):
    a["OBJTYPE"][1] = "SKY"
    a["TARGETID"][2] = -5


def _short_rows(a):
    a["R_FLUX"] = a["R_FLUX"][:-1]


def _nan_pixels(a):
    a["B_FLUX"][0, :10] = np.nan
    a["R_FLUX"][0, -5:] = np.inf


def _some_bad_ivar(a):
    a["B_IVAR"][1, :7] = 0
    a["R_IVAR"][1, -3:] = -1


def _absurd_z(a):
    a["Z"][1], a["Z"][2] = -0.5, 12.0


def _nan_z(a):
    a["Z"][3] = np.nan


# -- real-file mutations -----------------------------------------------------------------------
def real_copy(tmp: Path, name: str) -> Path:
    if not (REAL / name).exists():
        pytest.skip(f"real DESI fixtures not found at {REAL}")
    dst = tmp / name
    shutil.copy(REAL / name, dst)
    dst.chmod(0o644)
    return dst


def real_mutated(tmp: Path, name: str, edit: Callable[[fits.HDUList], None]) -> Path:
    path = real_copy(tmp, name)
    with fits.open(path, mode="update") as hdul:
        edit(hdul)
    return path


def _drop_hdu(name):
    def edit(hdul):
        del hdul[name]
    return edit


def _all_ivar_zero(hdul):
    for cam in ("B", "R", "Z"):
        hdul[f"{cam}_IVAR"].data[:] = 0


def _nan_b_flux(hdul):
    hdul["B_FLUX"].data[0, :] = np.nan


def _real_absurd_z(hdul):
    hdul["REDSHIFTS"].data["Z"][:] = 15.0


def _real_prepare(tmp, coadd_edit=None, redrock_edit=None):
    c = real_mutated(tmp, REAL_COADD, coadd_edit) if coadd_edit else real_copy(tmp, REAL_COADD)
    r = (real_mutated(tmp, REAL_REDROCK, redrock_edit) if redrock_edit
         else real_copy(tmp, REAL_REDROCK))
    return prep(tmp, c, r)


# -- shard payloads ----------------------------------------------------------------------------
def _length_mismatch_payload() -> bytes:
    rec = msgpack.unpackb(shards.encode_record(good_record(99)), raw=False)
    rec["flux"] = [10, rec["flux"][1][:40]]
    return msgpack.packb(rec, use_bin_type=True)


def _nan_record_payload() -> bytes:
    rec = good_record(77)
    rec["flux"][:12] = np.nan  # a shard written by another tool, not sanitised
    rec["ivar"][20:25] = -1
    return shards.encode_record(rec)


def _truncated_shard(tmp):
    d = shard_dir(tmp, good_payloads(6))
    truncate(d / "test-00000-of-00001.array_record", 0.6)
    return d


def _text_file(tmp):
    (tmp / "notes.txt").write_text("not a spectrum")
    return tmp / "notes.txt"


def _manifest_edit(tmp, text):
    d = shard_dir(tmp, good_payloads(2))
    (d / "manifest.json").write_text(text)
    return d


def _missing_shard_file(tmp):
    d = shard_dir(tmp, good_payloads(2))
    (d / "test-00000-of-00001.array_record").unlink()
    return d


# ----------------------------------------------------------------------------------------------
# The corpus
# ----------------------------------------------------------------------------------------------
NAMED_FILE = r"coadd-test-1\.fits"

CASES: list[tuple[str, Callable[[Path], Callable], Any]] = [
    # --- DESI reader: whole-file problems are refused naming the file ----------------------
    ("reader/truncated_fits", lambda t: read(truncate(coadd(t))),
     Refused((NAMED_FILE, "truncated|corrupt"))),
    ("reader/no_fibermap_hdu", lambda t: read(coadd(t, drop=("FIBERMAP",))),
     Refused((NAMED_FILE, "FIBERMAP"))),
    ("reader/no_camera_hdus", lambda t: read(coadd(t, drop=tuple(
        f"{c}_{k}" for c in CAMS for k in ("WAVELENGTH", "FLUX", "IVAR", "MASK")))),
     Refused((NAMED_FILE, "no camera"))),
    ("reader/camera_without_ivar", lambda t: read(coadd(t, drop=("R_IVAR",))),
     Refused((NAMED_FILE, "R_IVAR"))),
    ("reader/missing_targetid_column", lambda t: read(coadd(t, drop=("TARGETID",))),
     Refused((NAMED_FILE, "TARGETID"))),
    ("reader/redshifts_without_z", lambda t: read(coadd(t, drop=("Z",))),
     Refused((NAMED_FILE, "missing column.*'Z'"))),
    ("reader/flux_rows_disagree_with_fibermap", lambda t: read(coadd(t, _short_rows)),
     Refused((NAMED_FILE, "R_FLUX has shape"))),
    ("reader/unsorted_wavelengths", lambda t: read(coadd(t, _swap_wavelengths)),
     Refused(("camera B", "not strictly increasing"))),
    ("reader/negative_wavelengths", lambda t: read(coadd(t, _negative_wavelengths)),
     Refused(("camera B", "outside the DESI grid"))),
    # --- DESI reader: record problems are masked or dropped, and counted ---------------------
    ("reader/nan_inf_pixels", lambda t: read(coadd(t, _nan_pixels)),
     Passes(reader_counts(4, camera_nonfinite_flux=15))),
    ("reader/nan_everywhere_in_a_row", lambda t: read(coadd(t, set_all(FLUXES, 1, np.nan))),
     Passes(reader_counts(3, all_pixels_masked=1))),
    ("reader/inf_ivar_everywhere_in_a_row", lambda t: read(coadd(t, set_all(IVARS, 0, np.inf))),
     Passes(reader_counts(3, all_pixels_masked=1))),
    ("reader/zero_ivar_row", lambda t: read(coadd(t, set_all(IVARS, 2, 0.0))),
     Passes(reader_counts(3, all_pixels_masked=1))),
    ("reader/zero_or_negative_ivar_pixels", lambda t: read(coadd(t, _some_bad_ivar)),
     Passes(reader_counts(4, camera_nonpositive_ivar=10))),
    ("reader/all_masked_row", lambda t: read(coadd(t, set_all(MASKS, 3, 1))),
     Passes(reader_counts(3, all_pixels_masked=1))),
    ("reader/everything_nan", lambda t: read(coadd(t, chain(*[set_all(FLUXES, r, np.nan)
                                                              for r in range(4)]))),
     Passes(reader_counts(0, all_pixels_masked=4))),
    ("reader/empty_table", lambda t: read(coadd(t, n=0)), Passes(reader_counts(0))),
    ("reader/duplicated_targetid", lambda t: read(coadd(t, _duplicate_tid)),
     Passes(reader_counts(3, duplicate_targetid=1))),
    ("reader/sky_and_unassigned_fibres", lambda t: read(coadd(t, _sky_and_unassigned)),
     Passes(reader_counts(2, sky_or_negative_targetid=2))),
    # --- prepare: label sanity and counts in the report ------------------------------------
    ("prepare/absurd_redshifts", lambda t: prep(t, coadd(t, _absurd_z)),
     Passes(prepare_counts(2, absurd_redshift=2, no_redshift=2))),
    ("prepare/absurd_redshift_kept_unlabelled", lambda t: prep(
        t, coadd(t, _absurd_z), require_redshift=False),
     Passes(prepare_counts(4, absurd_redshift=2, no_redshift=0))),
    ("prepare/nan_redshift", lambda t: prep(t, coadd(t, _nan_z)),
     Passes(prepare_counts(3, no_redshift=1))),
    ("prepare/nan_rows_and_duplicates", lambda t: prep(t, coadd(t, chain(
        set_all(FLUXES, 1, np.nan), _duplicate_tid))),
     Passes(prepare_counts(2, all_pixels_masked=1, duplicate_targetid=1))),
    ("prepare/empty_table", lambda t: prep(t, coadd(t, n=0)), Passes(prepare_counts(0))),
    ("prepare/truncated_fits", lambda t: prep(t, truncate(coadd(t))),
     Passes(prepare_skipped(NAMED_FILE, "truncated|corrupt"))),
    ("prepare/truncated_fits_strict", lambda t: prep(t, truncate(coadd(t)), strict=True),
     Refused((NAMED_FILE, "truncated|corrupt", "--strict"))),
    ("prepare/wrong_hdu_layout", lambda t: prep(t, coadd(t, drop=("FIBERMAP",))),
     Passes(prepare_skipped(NAMED_FILE, "FIBERMAP"))),
    # --- real DESI files, mutated -----------------------------------------------------------
    ("real/truncated_coadd", lambda t: read(truncate(real_copy(t, REAL_COADD), 0.3)),
     Refused((REAL_COADD, "truncated|corrupt"))),
    ("real/coadd_without_fibermap", lambda t: read(real_mutated(t, REAL_COADD,
                                                                  _drop_hdu("FIBERMAP"))),
     Refused((REAL_COADD, "FIBERMAP"))),
    ("real/b_flux_nan_in_row_0", lambda t: read(real_mutated(t, REAL_COADD, _nan_b_flux)),
     Passes(lambda r: (reader_counts(1)(r), r.counts["camera_nonfinite_flux"] > 0))),
    ("real/all_ivar_zero", lambda t: read(real_mutated(t, REAL_COADD, _all_ivar_zero)),
     Passes(reader_counts(0, all_pixels_masked=1))),
    ("real/redrock_without_redshifts_hdu", lambda t: read(
        real_copy(t, REAL_COADD), real_mutated(t, REAL_REDROCK, _drop_hdu("REDSHIFTS"))),
     Refused((REAL_REDROCK, "REDSHIFTS"))),
    ("real/prepare_absurd_redshift", lambda t: _real_prepare(t, redrock_edit=_real_absurd_z),
     Passes(prepare_counts(0, absurd_redshift=1, no_redshift=1))),
    ("real/prepare_truncated_redrock", lambda t: prep(
        t, real_copy(t, REAL_COADD), truncate(real_copy(t, REAL_REDROCK), 0.2)),
     # astropy drops the cut HDUs silently, so the reader reports the missing HDU by name
     Passes(prepare_skipped(REAL_COADD, "truncated|corrupt|no HDU 'REDSHIFTS'"))),
    # --- predict's record path: bad records masked or refused by name, good ones through -----
    ("predict/desi_nan_row", lambda t: predict_records(coadd(t, set_all(FLUXES, 1, np.nan))),
     Passes(predict_counts(3, all_pixels_masked=1))),
    ("predict/desi_truncated", lambda t: predict_records(truncate(coadd(t))),
     Passes(predict_counts(0, refused=1, refused_files=1))),
    ("predict/no_such_input", lambda t: predict_records(t / "nothing.txt"),
     Refused(("nothing.txt", "no such file"), exc=FileNotFoundError)),
    ("predict/not_a_survey_file", lambda t: predict_records(_text_file(t)),
     Passes(lambda r: (predict_counts(0)(([], r[1], [])),
                       re.search("notes.txt: cannot tell its survey", r[2][0])
                       or pytest.fail(str(r[2]))))),
    ("predict/shard_garbage_record", lambda t: predict_records(shard_dir(
        t, good_payloads(2) + [b"\x93garbage"] + good_payloads(2)), 220),
     Passes(predict_counts(4, refused=1, refused_records=1))),
    ("predict/shard_length_mismatch_record", lambda t: predict_records(shard_dir(
        t, good_payloads(3) + [_length_mismatch_payload()]), 220),
     Passes(predict_counts(3, refused=1, refused_records=1))),
    ("predict/shard_nan_record", lambda t: predict_records(shard_dir(
        t, good_payloads(2) + [_nan_record_payload()]), 220),
     Passes(predict_counts(3, masked_nonfinite_flux=12, masked_nonpositive_ivar=5))),
    ("predict/shard_wrong_grid", lambda t: predict_records(shard_dir(t, good_payloads(3))),
     Passes(predict_counts(0, refused=3, refused_records=3))),
    ("predict/truncated_shard", lambda t: predict_records(_truncated_shard(t), 220),
     Passes(lambda r: (r[2] and "array_record" in r[2][-1]
                       or pytest.fail(f"no refusal: {r[2]}")))),
    ("predict/corrupt_manifest", lambda t: predict_records(_manifest_edit(t, "{not json")),
     Refused(("manifest",))),
    # --- shard reader and pipeline ----------------------------------------------------------
    ("shards/garbage_record", lambda t: shard_read(shard_dir(
        t, good_payloads(1) + [b"\x93garbage"])),
     Refused((r"test-00000-of-00001\.array_record record 1", "corrupt record"))),
    ("shards/length_mismatch_record", lambda t: shard_read(shard_dir(
        t, [_length_mismatch_payload()])),
     Refused((r"\.array_record record 0", "corrupt"))),
    ("shards/truncated_file", lambda t: shard_read(_truncated_shard(t)),
     Refused((r"\.array_record", "corrupt or truncated"))),
    ("shards/missing_shard_file", lambda t: shard_read(_missing_shard_file(t)),
     Refused(("missing shard files",))),
    ("shards/no_manifest", lambda t: shard_read(t), Refused(("no manifest.json",))),
    ("shards/unknown_manifest_keys", lambda t: shard_read(_manifest_edit(t, '{"bogus": 1}')),
     Refused(("unreadable manifest",))),
    ("pipeline/garbage_record", lambda t: pipeline_read(shard_dir(
        t, good_payloads(2) + [b"\x93garbage"])),
     Refused((r"\.array_record record 2", "corrupt record"))),
    ("pipeline/truncated_file", lambda t: pipeline_read(_truncated_shard(t)),
     Refused((r"\.array_record", "corrupt or truncated"))),
    ("pipeline/too_few_spectra_to_train", lambda t: (lambda: pipeline.train_iterator(
        str(shard_dir(t, good_payloads(2))), split="test", batch_size=8, seed=0)),
     Refused(("fewer than one global batch",), exc=ValueError)),
]


def _params():
    for name, build, expect in CASES:
        if isinstance(expect, type(pytest.param(None))):
            yield pytest.param(name, build, *expect.values, marks=expect.marks, id=name)
        else:
            yield pytest.param(name, build, expect, id=name)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name,build,expect", list(_params()))
def test_bad_input(name, build, expect, tmp_path):
    expect.check(build(tmp_path))


def test_corpus_size():
    print(f"bad-input corpus: {len(CASES)} cases")
    assert len(CASES) >= 40
