"""Tokenizer training path: length buckets in the pipeline, grid descriptors, the multi-survey
mixture, the tokenizer tasks, and the frozen tokenizer under an adaptation head (bitwise)."""
from __future__ import annotations

import numpy as np
import pytest

from spectrax import checkpoint, train
from spectrax.config_lib import load
from spectrax.data import grids, mixture, pipeline, shards, survey_grids
from spectrax.spectra import SpectrumError


def _write(tmp_path, lengths, split="train", num_shards=1, labels=1):
    recs = []
    for i, n in enumerate(lengths):
        recs.append({"flux": np.full(n, float(i), np.float32), "ivar": np.ones(n, np.float32),
                     "mask": np.ones(n, bool), "wavelength": 4000.0 + np.arange(n, dtype=np.float32),
                     "labels": np.full(labels, float(i), np.float32), "id": i})
    entry = shards.write_split(tmp_path, split, recs, num_shards=num_shards)
    shards.write_manifest(tmp_path, shards.Manifest(label_names=[f"l{j}" for j in range(labels)],
                                                    splits={split: entry}))
    return recs


# --- bucket policy ------------------------------------------------------------------------------
def test_bucket_plan_assignment_and_padding_waste_by_hand():
    plan = pipeline.bucket_plan([40, 64, 65, 100], (64, 128))
    assert plan.assignment.tolist() == [0, 0, 1, 1]
    # padded pixels: 64 + 64 + 128 + 128 = 384 for 269 real ones
    assert plan.padding_waste == pytest.approx(1 - 269 / 384)
    assert plan.padding_waste_single == pytest.approx(1 - 269 / 512)
    assert plan.summary()["spectra_per_bucket"] == [2, 2]


def test_spectrum_longer_than_every_bucket_is_refused_by_index():
    with pytest.raises(SpectrumError, match=r"record 1 with 300 px.*config.data.buckets"):
        pipeline.bucket_plan([10, 300], (64, 128), where="x")


def test_lengths_file_is_in_read_order_across_shards(tmp_path):
    lengths = [5, 6, 7, 8, 9, 10, 11]
    _write(tmp_path, lengths, num_shards=3)
    read = [len(r["flux"]) for r in shards.iter_records(tmp_path, "train")]
    assert shards.record_lengths(tmp_path, "train").tolist() == read
    assert sorted(read) == lengths


def test_bucketed_batches_hold_one_bucket_each_and_resume_exactly(tmp_path):
    lengths = [40] * 12 + [100] * 12
    _write(tmp_path, lengths)
    kw = dict(batch_size=4, seed=3, buckets=(64, 128), num_threads=1)
    it = pipeline.train_iterator(str(tmp_path), **kw)
    seen = []
    for _ in range(12):  # two epochs
        b = next(it)
        real = (b.wavelength > 0).sum(1)
        assert len(set(real.tolist())) == 1, "one bucket per batch"
        assert b.num_pixels == (64 if real[0] == 40 else 128)
        seen.append(b.ids.tolist())
    assert {len(x) for x in seen} == {4}
    assert sorted(sum(seen[:6], [])) == list(range(24)), "an epoch sees every spectrum once"
    assert seen[:6] != seen[6:12], "each epoch reshuffles"
    it = pipeline.train_iterator(str(tmp_path), **kw)
    for _ in range(5):
        next(it)
    state = it.get_state()
    again = pipeline.train_iterator(str(tmp_path), **kw)
    again.set_state(state)
    assert [next(again).ids.tolist() for _ in range(4)] == seen[5:9]


def test_processes_get_disjoint_rows_of_the_same_bucket(tmp_path):
    _write(tmp_path, [40] * 8 + [100] * 8)
    glob = pipeline.train_iterator(str(tmp_path), batch_size=4, seed=0,
                                            buckets=(64, 128), num_threads=1,
                                            process_index=0, process_count=1)
    parts = [pipeline.train_iterator(str(tmp_path), batch_size=2, seed=0,
                                              buckets=(64, 128), num_threads=1,
                                              process_index=p, process_count=2) for p in (0, 1)]
    for _ in range(4):
        g = next(glob)
        a, b = next(parts[0]), next(parts[1])
        assert a.num_pixels == b.num_pixels == g.num_pixels
        assert a.ids.tolist() + b.ids.tolist() == g.ids.tolist()


def test_bucketed_eval_sees_every_spectrum_once(tmp_path):
    _write(tmp_path, [40] * 5 + [100] * 3, split="test")
    batches = list(pipeline.eval_batches(str(tmp_path), "test", batch_size=4,
                                                  buckets=(64, 128)))
    assert len(batches) == pipeline.num_eval_batches(str(tmp_path), "test", 4,
                                                              (64, 128)) == 3
    ids = np.concatenate([b.ids[b.valid] for b in batches])
    assert sorted(ids.tolist()) == list(range(8))


# --- grids ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("wave", [survey_grids.apogee_wavelength(),
                                  survey_grids.galah_wavelength(1024),
                                  survey_grids.sdss_wavelength(np.random.default_rng(1)),
                                  survey_grids.desi_wavelength()],
                         ids=["apogee", "galah", "sdss", "desi"])
def test_grid_descriptors_reproduce_native_grids(wave):
    desc = mixture.describe_grid(wave)
    assert desc is not None
    np.testing.assert_allclose(grids.grid_array(desc), wave, rtol=1e-9)


def test_record_with_grid_descriptor_round_trips(tmp_path):
    wave = survey_grids.apogee_wavelength()
    desc = mixture.describe_grid(wave)
    rec = {"flux": np.ones(wave.size, np.float32), "ivar": np.ones(wave.size, np.float32),
           "mask": np.ones(wave.size, bool), "grid": desc, "labels": [1.0], "id": 7}
    back = shards.decode_record(shards.encode_record(rec))
    np.testing.assert_allclose(back["wavelength"], wave.astype(np.float32))
    assert len(shards.encode_record(rec)) < 2.2 * 4 * wave.size  # no 30 kB wavelength array


def test_unknown_grid_kind_names_the_descriptor():
    with pytest.raises(SpectrumError, match="unknown kind 'spline'"):
        grids.grid_array({"kind": "spline", "n": 3})


# --- the mixture ---------------------------------------------------------------------------------
def test_mixture_counts_labels_and_native_lengths():
    counts = mixture.component_counts("multisurvey", 101)
    assert sum(counts) == 101
    recs = [r for chunk in mixture.iter_mixture("multisurvey", 40, seed=1, chunk=8)
            for r in chunk]
    assert len(recs) == 40 and len({r["id"] for r in recs}) == 40
    lab = np.stack([r["labels"] for r in recs])
    survey = lab[:, mixture.LABELS.index("survey")].astype(int)
    lengths = np.array([len(r["flux"]) for r in recs])
    assert set(lengths[survey == 3]) == {7514}            # APOGEE after chip gaps
    assert set(lengths[survey == 1]) == {7781}            # DESI
    assert set(lengths[survey == 2]) == {4 * mixture.GALAH_PIXELS_PER_CCD}
    assert all(3700 < n < 4800 for n in lengths[survey == 0])  # SDSS slices
    cls = lab[:, mixture.LABELS.index("class")].astype(int)
    teff = lab[:, mixture.LABELS.index("teff")]
    assert np.all(np.isfinite(teff[cls == 2])) and np.all(np.isnan(teff[cls != 2]))
    for r in recs:
        assert np.all(np.isfinite(r["flux"])) and np.all(r["ivar"][~r["mask"]] == 0)


# --- training: tasks and the frozen tokenizer ------------------------------------------------
def _small(c, tmp_path, steps):
    c.unlock()
    c.data.n_train, c.data.n_val, c.data.n_test = 64, 16, 32
    c.data.cache_dir = str(tmp_path.parent / "spectrax-tok-data")
    c.num_steps, c.batch_size, c.eval_batch_size = steps, 8, 16
    c.log_every, c.ckpt_every, c.num_figures = 2, 100, 2
    c.optim.warmup_steps = 1
    return c


def test_pretrain_then_frozen_adaptation(tmp_path):
    pre_dir, cls_dir, st_dir = tmp_path / "pre", tmp_path / "cls", tmp_path / "stellar"
    c = _small(load("configs/tokenizer_pretrain.py", "variant=tiny"), tmp_path, 4).lock()
    res = train.train(c, pre_dir)
    per_survey = [k for k in res if k.startswith("nll_per_pixel_")]
    assert {"nll_per_pixel_sdss", "nll_per_pixel_apogee"} <= set(per_survey)
    assert res["bucketing"]["buckets"] == [4608, 7808]
    assert (pre_dir / "reconstructions_apogee.png").exists()

    c = _small(load("configs/tokenizer_classify.py", "variant=tiny"), tmp_path, 4)
    c.init.from_workdir = str(pre_dir)
    res = train.train(c.lock(), cls_dir)
    assert {"accuracy", "macro_f1", "recall_QSO"} <= set(res)
    assert (cls_dir / "confusion_matrix.png").exists()

    pre = checkpoint.Checkpointer(pre_dir).restore_raw()[0]["params"]
    ada = checkpoint.Checkpointer(cls_dir).restore_raw()[0]["params"]
    flat = lambda t: {"/".join(map(str, p)): np.asarray(v) for p, v in
                      __import__("jax").tree_util.tree_flatten_with_path(t)[0]}
    before, after = flat(pre), flat(ada["tokenizer"])
    assert before.keys() == after.keys() and len(before) > 10
    for k in before:  # frozen: bitwise equal to the pre-trained tokenizer after training
        assert np.array_equal(before[k], after[k]), k
    head = flat(ada["head"])
    biases = [v for k, v in head.items() if "bias" in k]
    assert biases and any(np.abs(b).max() > 0 for b in biases), \
        "the head trains (its zero-initialised biases moved)"

    c = _small(load("configs/tokenizer_stellar.py", "variant=tiny"), tmp_path, 4)
    c.init.from_workdir = str(pre_dir)
    res = train.train(c.lock(), st_dir)
    assert {"teff_scaled_mad", "logg_scaled_mad", "feh_scaled_mad"} <= set(res)
    meta = checkpoint.Checkpointer(st_dir).restore_raw()[1]
    stats = meta["task_state"]
    assert stats["label_names"] == ["teff", "logg", "feh"] and 3000 < stats["mean"][0] < 7000


# --- bad input on native grids ---------------------------------------------------------------
def test_padding_markers_inside_the_data_are_masked_and_counted():
    from spectrax.spectra import sanitize_record
    wave = np.linspace(4000, 5000, 64)
    wave[[10, 11]] = -1.0   # padding markers in the middle
    wave[20] = -300.0       # a negative wavelength
    clean, counts = sanitize_record({"flux": np.ones(64), "ivar": np.ones(64),
                                     "wavelength": wave}, where="f.fits row 3")
    assert counts["bad_wavelength"] == 3
    assert not clean["mask"][[10, 11, 20]].any() and clean["mask"].sum() == 61
    assert np.all(clean["wavelength"][[10, 11, 20]] == -1)


def test_unsorted_wavelengths_are_refused_naming_the_record():
    from spectrax.spectra import sanitize_record
    wave = np.linspace(4000, 5000, 64)
    wave[[30, 31]] = wave[[31, 30]]
    with pytest.raises(SpectrumError, match=r"f.fits row 3: 'wavelength' is not strictly "
                                            r"increasing \(pixel 31"):
        sanitize_record({"flux": np.ones(64), "ivar": np.ones(64), "wavelength": wave},
                        where="f.fits row 3")


def test_spectrum_shorter_than_one_patch_and_all_bad_patches_stay_finite():
    import jax
    from flax import nnx

    from spectrax.models.tokenizer import SpectralTokenizer, tokenizer_config
    model = SpectralTokenizer(tokenizer_config("tiny"), rngs=nnx.Rngs(0))
    # 20 of 32 pixels: the patch rule (bad when >= half its pixels are bad or padding) keeps
    # it; a spectrum under 16 pixels would have no valid token at all.
    flux = np.ones((2, 20), np.float32)
    mask = np.ones((2, 20), bool)
    mask[1] = False                            # a patch with no valid pixel
    wave = np.tile(np.linspace(4000, 4010, 20, dtype=np.float32), (2, 1))
    out = model(flux, mask, wave, ivar=np.ones_like(flux))
    assert out.tokens.shape[1] == 1 and out.token_mask.tolist() == [[True], [False]]
    assert np.all(np.isfinite(np.asarray(out.reconstruction)))
    assert np.isfinite(float(out.loss()))
    grads = nnx.grad(lambda m: m(flux, mask, wave, ivar=np.ones_like(flux)).loss())(model)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
