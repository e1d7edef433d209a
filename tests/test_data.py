"""Records, shards, the Grain pipeline and preprocessing."""
from __future__ import annotations

import numpy as np
import pytest

from spectrax.data import pipeline, shards
from spectrax.data.preprocess import median_normalise
from spectrax.spectra import SpectrumError, pad_batch_rows, sanitize_record, stack_records


def _record(i, n=50, rng=None):
    rng = rng or np.random.default_rng(i)
    return {"flux": rng.normal(5, 1, n).astype(np.float32), "ivar": np.ones(n, np.float32),
            "mask": rng.random(n) > 0.1, "labels": [0.1 * i], "id": 10**12 + i}


def _write_dir(tmp_path, n_train=40, n_test=13, n=50):
    splits = {"train": shards.write_split(tmp_path, "train", (_record(i, n) for i in range(n_train)),
                                          num_shards=3),
              "test": shards.write_split(tmp_path, "test",
                                         (_record(1000 + i, n) for i in range(n_test)))}
    shards.write_manifest(tmp_path, shards.Manifest(
        label_names=["z"], splits=splits,
        grid={"kind": "linear", "start": 4000.0, "step": 1.0, "n": n}))
    return tmp_path


# --- sanitize ---------------------------------------------------------------------------------
def test_sanitize_masks_and_counts_every_bad_pixel():
    flux = np.array([1, np.nan, 3, np.inf, 5, 6], np.float64)
    ivar = np.array([1, 1, 0, 1, -2, np.nan])
    mask = np.array([1, 1, 1, 1, 1, 0], bool)
    clean, counts = sanitize_record({"flux": flux, "ivar": ivar, "mask": mask}, "x")
    assert clean["mask"].tolist() == [True, False, False, False, False, False]
    assert counts == {"nonfinite_flux": 2, "nonfinite_ivar": 0, "nonpositive_ivar": 2,
                      "flagged": 1, "valid_pixels": 1}
    assert np.all(np.isfinite(clean["flux"])) and np.all(clean["flux"][~clean["mask"]] == 0)
    assert np.all(clean["ivar"][~clean["mask"]] == 0)


def test_sanitize_refuses_mismatched_lengths_naming_the_record():
    with pytest.raises(SpectrumError, match="file.fits row 7.*ivar"):
        sanitize_record({"flux": np.ones(5), "ivar": np.ones(4)}, "file.fits row 7")


def test_sanitize_masks_bad_wavelengths():
    clean, counts = sanitize_record({"flux": np.ones(3), "ivar": np.ones(3),
                                     "wavelength": [4000.0, -1.0, np.nan]})
    assert clean["mask"].tolist() == [True, False, False]
    assert counts["bad_wavelength"] == 2


# --- records and shards ----------------------------------------------------------------------
def test_record_roundtrip_is_exact():
    rec = _record(3)
    rec["wavelength"] = np.linspace(4000, 5000, 50)
    rec["meta"] = {"SPECTYPE": "GALAXY", "ZWARN": np.int64(0)}
    back = shards.decode_record(shards.encode_record(rec))
    np.testing.assert_array_equal(back["flux"], rec["flux"])
    np.testing.assert_array_equal(back["mask"], rec["mask"])
    np.testing.assert_array_equal(back["wavelength"], rec["wavelength"].astype(np.float32))
    assert back["id"] == rec["id"] and back["meta"] == {"SPECTYPE": "GALAXY", "ZWARN": 0}


def test_corrupt_record_bytes_name_the_place():
    with pytest.raises(SpectrumError, match="shard-x record 4: corrupt"):
        shards.decode_record(b"\x93garbage", where="shard-x record 4")


def test_shards_roundtrip_and_manifest(tmp_path):
    _write_dir(tmp_path)
    m = shards.read_manifest(tmp_path)
    assert m.count("train") == 40 and m.count("test") == 13
    assert len(m.splits["train"]["files"]) == 3
    ids = sorted(int(r["id"]) for r in shards.iter_records(tmp_path, "train"))
    assert ids == [10**12 + i for i in range(40)]
    np.testing.assert_allclose(m.grid_array()[[0, -1]], [4000.0, 4049.0])


def test_missing_manifest_and_truncated_shard_are_clear(tmp_path):
    with pytest.raises(SpectrumError, match="no manifest.json"):
        shards.read_manifest(tmp_path)
    _write_dir(tmp_path)
    path = tmp_path / shards.read_manifest(tmp_path).splits["test"]["files"][0]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SpectrumError, match=path.name):
        list(shards.iter_records(tmp_path, "test"))


def test_split_assignment_is_a_stable_hash():
    ids = np.arange(20000)
    a = shards.assign_split(ids, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=0)
    b = shards.assign_split(ids[::-1], {"train": 0.7, "val": 0.15, "test": 0.15}, seed=0)
    np.testing.assert_array_equal(a, b[::-1])  # independent of order and of the other ids
    frac = np.mean(a == "train")
    assert 0.68 < frac < 0.72


# --- batches ---------------------------------------------------------------------------------
def test_stack_pads_pixels_and_rows():
    recs = [dict(_record(0, 30), wavelength=np.arange(30.0) + 1),
            dict(_record(1, 20), wavelength=np.arange(20.0) + 1)]
    b = pad_batch_rows(stack_records(recs, num_labels=1), 4)
    assert b.flux.shape == (4, 30)
    assert not b.mask[1, 20:].any() and np.all(b.wavelength[1, 20:] == -1)
    assert b.valid.tolist() == [True, True, False, False]
    assert b.ids.tolist()[:2] == [10**12, 10**12 + 1]


def test_stack_refuses_a_record_without_wavelength_or_matching_grid():
    with pytest.raises(SpectrumError, match="no wavelength"):
        stack_records([_record(0, 30)], num_labels=1, grid=np.arange(31.0))


# --- Grain pipeline --------------------------------------------------------------------------
def _ids(it, k):
    return [next(it).ids.tolist() for _ in range(k)]


def test_train_stream_is_deterministic_and_resumable(tmp_path):
    _write_dir(tmp_path)
    kw = dict(batch_size=8, seed=3, num_threads=2, process_index=0, process_count=1)
    a = _ids(pipeline.train_iterator(str(tmp_path), **kw), 12)  # 2.4 epochs
    it = pipeline.train_iterator(str(tmp_path), **kw)
    _ids(it, 5)
    state = it.get_state()
    resumed = pipeline.train_iterator(str(tmp_path), **kw)
    resumed.set_state(state)
    assert _ids(resumed, 7) == a[5:]
    first_epoch = sorted(sum(a[:5], []))
    assert first_epoch == [10**12 + i for i in range(40)]  # every spectrum once per epoch
    assert a[:5] != a[5:10]  # a new permutation each epoch
    other = _ids(pipeline.train_iterator(str(tmp_path), **{**kw, "seed": 4}), 5)
    assert other != a[:5]


def test_processes_read_disjoint_slices(tmp_path):
    _write_dir(tmp_path)
    seen = []
    for pi in range(2):
        it = pipeline.train_iterator(str(tmp_path), batch_size=4, seed=0, process_index=pi,
                                     process_count=2)
        seen.append(set(sum(_ids(it, 5), [])))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 40


def test_eval_stream_covers_every_spectrum_once(tmp_path):
    _write_dir(tmp_path)
    batches = list(pipeline.eval_batches(str(tmp_path), "test", batch_size=5))
    assert len(batches) == pipeline.num_eval_batches(str(tmp_path), "test", 5) == 3
    ids = np.concatenate([b.ids[b.valid] for b in batches])
    assert sorted(ids.tolist()) == [10**12 + 1000 + i for i in range(13)]
    assert batches[-1].valid.tolist() == [True, True, True, False, False]


# --- preprocessing ---------------------------------------------------------------------------
def test_median_normalise_matches_numpy_and_survives_bad_medians():
    rng = np.random.default_rng(0)
    flux = rng.normal(10, 2, (4, 101)).astype(np.float32)
    mask = rng.random((4, 101)) > 0.2
    flux[1] -= 20          # median < 0: falls back to mean |flux|
    mask[2] = False        # nothing valid: scale 1, nothing NaN
    flux[3, ~mask[3]] = np.nan  # NaN under the mask never leaks
    fn, iv, scale, fb = (np.asarray(x) for x in median_normalise(
        flux, np.ones_like(flux), mask))
    assert np.all(np.isfinite(fn)) and np.all(np.isfinite(iv))
    assert scale[0] == pytest.approx(np.median(flux[0][mask[0]]), rel=1e-6)
    assert scale[1] == pytest.approx(np.mean(np.abs(flux[1][mask[1]])), rel=1e-5)
    assert scale[2] == 1.0 and fb.tolist() == [False, True, True, False]
    np.testing.assert_allclose(iv[0][mask[0]], scale[0] ** 2, rtol=1e-6)
    assert np.all(fn[~mask] == 0)
