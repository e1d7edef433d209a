"""SpectraFM training path: warm-restart schedule, the synthetic-gap data sets, the staged fine-tune
with frozen blocks (bitwise), statistics reused from the base model, chunked prediction inside
the task, attention maps, and bad inputs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spectrax import attention_maps, checkpoint, train
from spectrax.config_lib import load
from spectrax.data import mixture
from spectrax.models import spectrafm as fm
from spectrax.spectra import batch_from_arrays
from spectrax.tasks_spectrafm import SpectraFMTask


def test_cosine_warm_restarts_by_hand():
    sched = train.cosine_warm_restarts(1.0, 10, 0.0)
    values = np.array([float(sched(s)) for s in range(21)])
    assert values[0] == pytest.approx(1.0) and values[10] == pytest.approx(1.0)  # restart
    assert values[5] == pytest.approx(0.5, abs=1e-6)                             # half-way
    assert values[9] == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.9)), abs=1e-6)
    warm = train.cosine_warm_restarts(1.0, 10, 0.1, warmup=4)
    assert float(warm(2)) == pytest.approx(0.5) and float(warm(4)) == pytest.approx(1.0)


def test_clean_and_real_like_sets_hold_the_same_stars():
    clean = [r for c in mixture.iter_apogee("apogee_clean", 6, seed=3) for r in c]
    real = [r for c in mixture.iter_apogee("apogee_real", 6, seed=3) for r in c]
    for a, b in zip(clean, real):
        np.testing.assert_array_equal(a["labels"], b["labels"])
        assert a["id"] == b["id"]
        assert np.std(a["flux"] - b["flux"]) > 1e-3  # ... observed differently
    assert len(mixture.apogee_label_names()) == 10


def test_unknown_label_is_refused():
    with pytest.raises(ValueError, match="cannot request"):
        SpectraFMTask(labels=("TEFF", "AGE"))


def test_more_tokens_than_the_context_is_a_clear_error():
    model = fm.SpectraFM(fm.spectrafm_config("tiny"), rngs=nnx.Rngs(0))
    n = model.cfg.context_length + 1
    with pytest.raises(ValueError, match="chunked inference"):
        model(jnp.zeros((1, n)), jnp.full((1, n), 15500.0), jnp.ones((1, n), jnp.int32),
              jnp.array([model.cfg.label_token_ids["TEFF"]]))


def _task_with_stats(length, labels=("TEFF", "FE_H"), **kw):
    task = SpectraFMTask(labels=labels, context=16, **kw)
    task.stats = {"pixel_median": [1.0] * length, "pixel_mad": [0.05] * length,
                  "label_median": {"TEFF": 4700.0, "FE_H": -0.2},
                  "label_mad": {"TEFF": 500.0, "FE_H": 0.3}}
    return task


def test_task_predicts_all_nan_spectrum_as_nan_and_counts_chunks():
    model = fm.SpectraFM(fm.spectrafm_config("tiny"), rngs=nnx.Rngs(0))
    length = 40  # 3 chunks of 16
    task = _task_with_stats(length)
    rng = np.random.default_rng(0)
    flux = 1 - 0.1 * rng.random((2, length)).astype(np.float32)
    mask = np.ones((2, length), bool)
    mask[1] = False  # every pixel bad
    batch = batch_from_arrays(flux=flux, mask=mask,
                              wavelength=np.tile(np.linspace(15200, 16900, length), (2, 1)),
                              labels=np.array([[4800, -0.1], [4500, -1.5]], np.float32))
    out = jax.jit(lambda b: task.predict(model, b))(batch.for_device())
    assert np.all(np.isfinite(out["pred"][0])) and np.all(np.isnan(out["pred"][1]))
    # Chunk average by hand for star 0: three forward passes on the permuted pixels.
    z, ok = (np.asarray(a) for a in task._standardised(batch))
    order = fm.chunk_permutation(length)
    teff = np.array([model.cfg.label_token_ids["TEFF"]], np.int32)
    preds = []
    for c in range(3):
        sel = order[c * 16:(c + 1) * 16]
        pad = ((0, 0), (0, 16 - sel.size))
        pred, _ = model(np.pad(z[:1, sel], pad), np.pad(np.asarray(batch.wavelength)[:1, sel], pad),
                        np.pad(np.where(ok[:1, sel], 1, 0).astype(np.int32), pad), teff)
        preds.append(float(pred[0]))
    assert out["pred"][0, 0] == pytest.approx(np.mean(preds) * 500.0 + 4700.0, rel=1e-5)
    loss, _ = task.loss(model, batch, train=False)
    assert np.isfinite(float(loss))


def _tiny(c, tmp_path, steps, **data):
    c.unlock()
    c.data.n_train, c.data.n_val, c.data.n_test = 48, 8, 16
    c.data.cache_dir = str(tmp_path.parent / "spectrax-fm-data")
    c.data.update(data)
    c.num_steps, c.batch_size, c.eval_batch_size = steps, 8, 16
    c.log_every, c.ckpt_every, c.num_figures = 2, 100, 1
    c.optim.warmup_steps = 0
    return c


def _flat(tree):
    return {checkpoint.path_str(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_staged_fine_tune_freezes_blocks_bitwise_and_reuses_statistics(tmp_path):
    pre, fe = tmp_path / "pre", tmp_path / "fe"
    c = _tiny(load("configs/spectrafm_pretrain.py", "variant=tiny"), tmp_path, 3)
    # The tiny model's context is 16 tokens: chunked evaluation of all 7514 pixels would be
    # 470 chunks per label, so the test pre-trains on the Fe window only.
    c.task_kwargs.pixel_range = (4107, 4619)
    res = train.train(c.lock(), pre)
    assert "FE_H_scatter" in res and "TEFF_sigma_median" in res
    c = _tiny(load("configs/spectrafm_fe_100.py", "variant=tiny"), tmp_path, 3, train_limit=10)
    c.init.from_workdir = str(pre)
    res = train.train(c.lock(), fe)
    assert {"FE_H_rmse", "FE_H_rmse_iron_poor", "FE_H_rmse_iron_rich"} <= set(res)
    (raw0, meta0), (raw1, meta1) = (checkpoint.Checkpointer(d).restore_raw() for d in (pre, fe))
    before, after = _flat(raw0["params"]), _flat(raw1["params"])
    frozen = [k for k in before if k.startswith(("encoder/1/", "decoder/"))]
    trained = [k for k in before if k.startswith(("embedding/", "encoder/0/"))]
    assert frozen and trained
    for k in frozen:
        assert np.array_equal(before[k], after[k]), k
    assert any(not np.array_equal(before[k], after[k]) for k in trained)
    assert meta1["task_state"]["stats"] == meta0["task_state"]["stats"]
    # The training subset: 10 stars, all iron-rich.
    from spectrax.prepare import ensure_data
    from spectrax.data import shards
    d = ensure_data(c.data)
    feh = [r["labels"][4] for r in shards.iter_records(d, "train")]
    assert len(feh) == 10 and min(feh) > -1

    att = attention_maps.compute(c, str(fe), max_stars=4)
    assert att["attention"].shape == (1, 7514)
    inside = att["attention"][0, 4107:4619]
    assert inside.sum() > 0 and att["attention"][0, :4107].sum() == 0  # only the Fe window


def test_mlp_baseline_config_runs(tmp_path):
    c = _tiny(load("configs/spectrafm_mlp_fe_100.py", ""), tmp_path, 3, train_limit=10)
    res = train.train(c.lock(), tmp_path / "mlp")
    assert "FE_H_rmse_iron_poor" in res and np.isfinite(res["FE_H_rmse"])
