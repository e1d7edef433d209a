"""Tokenizer embeddings: the HDF5 export (ragged tokens, pooled vectors, labels, attributes),
the same embedding in any bucket or batch (against a direct encode at the native length), the
frozen tokenizer of an adapted run, the bucketed catalogue path of spectrax.predict, and the
projection plot."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from spectrax import checkpoint, embeddings, sharding, train, warm_start
from spectrax.config_lib import load
from spectrax.data import inputs, mixture, pipeline
from spectrax.inference import InferenceModel
from spectrax.spectra import SURVEY_IDS
from helpers import ROOT, shrunk  # tests/helpers.py

P = 32  # the tiny tokenizer's patch size


def _tiny(c, tmp):
    # val: one SDSS galaxy, DESI galaxy, GALAH and APOGEE star (both buckets); test: one
    # GALAH star (the final evaluation compiles one bucket only).
    return shrunk(c, tmp / "data", splits=(16, 4, 1), steps=1, batch_size=4, eval_batch_size=8,
                  log_every=1, ckpt_every=100, num_figures=1, warmup_steps=1)


def _raise(message):
    raise AssertionError(message)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny tokenizer trained one step on a tiny multi-survey mixture, and its export."""
    tmp = tmp_path_factory.mktemp("emb")
    c = _tiny(load("configs/tokenizer_pretrain.py", "variant=tiny"), tmp).lock()
    train.train(c, tmp / "pre")
    data_dir = next((tmp / "data").iterdir())
    out = tmp / "emb.h5"
    summary = embeddings.export_embeddings(c, tmp / "pre", [str(data_dir)], out, batch_size=8)
    found = inputs.discover([str(data_dir)])
    records = [r.record for r in inputs.model_records(found.units, inputs.LengthPolicy(), {},
                                                      _raise)]
    return {"config": c, "tmp": tmp, "workdir": tmp / "pre", "data": data_dir, "out": out,
            "summary": summary, "records": {int(r["id"]): r for r in records},
            "read_order": [int(r["id"]) for r in records]}


def test_layout_offsets_pooling_ids_and_labels(run):
    emb = embeddings.load_embeddings(run["out"], tokens=True)
    recs = run["records"]
    n = len(recs)
    assert n == 16 + 4 + 1 == run["summary"]["rows"] and not run["summary"]["refused"]
    d = emb["attrs"]["d_model"]
    assert emb["pooled"].shape == (n, d) and emb["pooled"].dtype == np.float32
    ids = emb["ids"].tolist()
    assert sorted(ids) == sorted(recs)
    # Ragged layout: offsets consistent with ceil(L / 32) tokens of each native length.
    lengths = np.array([len(recs[i]["flux"]) for i in ids])
    assert emb["n_pixels"].tolist() == lengths.tolist()
    assert emb["n_tokens"].tolist() == (-(-lengths // P)).tolist()
    off = emb["token_offsets"]
    assert off[0] == 0 and np.diff(off).tolist() == emb["n_tokens"].tolist()
    assert emb["tokens"].shape == (off[-1], d) and emb["token_mask"].shape == (off[-1],)
    assert len(set(lengths.tolist())) > 2, "the mixture has several native lengths"
    # Pooled = mean of the valid tokens recomputed from the stored sequence.
    for i in range(n):
        tok, m = emb["tokens"][off[i]:off[i + 1]], emb["token_mask"][off[i]:off[i + 1]]
        assert m.sum() == emb["n_valid_tokens"][i] > 0
        np.testing.assert_allclose(emb["pooled"][i], tok[m].mean(0), rtol=1e-5, atol=1e-6)
    # Every label column of the shards, by name, NaN where unknown.
    assert list(emb["labels"]) == list(mixture.LABELS)
    for j, name in enumerate(mixture.LABELS):
        want = np.array([recs[i]["labels"][j] for i in ids], np.float32)
        np.testing.assert_array_equal(emb["labels"][name], want)
    assert set(emb["split"]) == {"train", "val", "test"}
    assert set(emb["source"]) == {run["data"].name}
    # Rows are grouped by bucket; `order` restores the read order.
    assert emb["ids"][np.argsort(emb["order"])].tolist() == run["read_order"]
    with h5py.File(run["out"]) as f:
        assert json.loads(f["labels"]["class"].attrs["categories"]) == ["GALAXY", "QSO", "STAR"]


def test_attributes_describe_model_config_and_step(run):
    a = embeddings.load_embeddings(run["out"])["attrs"]
    assert a["format"] == "spectrax-embeddings" and a["format_version"] == 1
    assert a["config"] == "tokenizer_pretrain" and a["model"] == "tokenizer:tiny"
    assert a["step"] == 1 and a["patch_size"] == P and a["d_model"] == 32
    assert json.loads(a["buckets"]) == [4608, 7808] and a["tokens_stored"]
    assert json.loads(a["config_json"])["model"]["variant"] == "tiny"
    assert Path(a["checkpoint"]) == run["workdir"].absolute()
    assert a["n_spectra"] == len(run["records"]) and a["token_dtype"] == "float32"


def test_same_embedding_at_native_length(run):
    """A spectrum's stored tokens equal a direct encode at its native length (no bucket
    padding, batch of one), for a spectrum of each bucket."""
    import jax

    a = embeddings.load_embeddings(run["out"], tokens=True)
    model = InferenceModel.from_checkpoint(run["config"], run["workdir"])
    enc = embeddings.encoder_of(model.model())
    encode = jax.jit(lambda f, m, w, iv: enc.encode(f, m, w, ivar=iv))
    survey = a["labels"]["survey"]
    for name in ("sdss", "apogee"):  # 4608 and 7808 buckets; neither a multiple of 32 px
        k = int(np.flatnonzero(survey == SURVEY_IDS[name])[0])
        r = run["records"][int(a["ids"][k])]
        assert len(r["flux"]) % P
        tok, mask = encode(r["flux"][None], r["mask"][None], r["wavelength"][None],
                           r["ivar"][None])
        s = slice(a["token_offsets"][k], a["token_offsets"][k + 1])
        np.testing.assert_array_equal(np.asarray(mask[0]), a["token_mask"][s])
        np.testing.assert_allclose(a["tokens"][s], np.asarray(tok[0], np.float32), atol=1e-5)


def test_adapted_run_in_another_bucket_and_batch_gives_the_same_embeddings(run):
    """A tokenizer_adapted checkpoint (its frozen tokenizer copied from the pre-trained run, as
    its training starts), exported with ONE 7808-px bucket, 3 spectra per batch and float16
    tokens, gives the pre-trained export's embeddings: the encoder is its .tokenizer, and
    neither bucket padding nor batch composition changes an embedding."""
    c = _tiny(load("configs/tokenizer_classify.py", "variant=tiny"), run["tmp"])
    c.data.buckets = (7808,)
    c.lock()
    trainer = train.Trainer(c, sharding.make_mesh(1, 1), 1)
    state, _ = warm_start.load_pretrained(trainer.init_state(), trainer, str(run["workdir"]), "",
                                     target="tokenizer")
    ckpt = checkpoint.Checkpointer(run["tmp"] / "adapted", async_save=False)
    ckpt.save(0, state, {}, {"task_state": trainer.task.state()}, force=True)
    ckpt.wait()
    ckpt.close()
    out = run["tmp"] / "adapted.h5"
    embeddings.export_embeddings(c, run["tmp"] / "adapted", [str(run["data"])], out,
                                 batch_size=3, split="val", token_dtype="float16")
    a = embeddings.load_embeddings(run["out"], tokens=True)
    b = embeddings.load_embeddings(out, tokens=True)
    assert b["attrs"]["encoder"] == "tokenizer_adapted.tokenizer"
    assert json.loads(b["attrs"]["buckets"]) == [7808]
    assert b["tokens"].dtype == np.float16 and set(b["split"]) == {"val"}
    assert len(set(a["n_pixels"][a["split"] == "val"]) & {4096, 7514, 7781}) >= 2
    rows = {int(i): k for k, i in enumerate(a["ids"])}
    assert len(b["ids"]) == 4
    for k, i in enumerate(b["ids"]):
        j = rows[int(i)]
        np.testing.assert_allclose(b["pooled"][k], a["pooled"][j], atol=1e-5)
        ta = a["tokens"][a["token_offsets"][j]:a["token_offsets"][j + 1]]
        tb = b["tokens"][b["token_offsets"][k]:b["token_offsets"][k + 1]]
        np.testing.assert_allclose(tb, ta, rtol=2e-3, atol=2e-3)  # float16 storage


def test_pooled_only_export(run, tmp_path):
    embeddings.export_embeddings(run["config"], run["workdir"], [str(run["data"])],
                                 tmp_path / "pooled.h5", batch_size=8, split="test",
                                 tokens=False)
    with h5py.File(tmp_path / "pooled.h5") as f:
        assert "tokens" not in f and "token_offsets" not in f and not f.attrs["tokens_stored"]
        assert f["pooled"].shape == (1, 32)


def test_non_tokenizer_model_is_refused_clearly(tmp_path):
    c = load("configs/specpt_redshift_bgs.py", "variant=tiny")
    with pytest.raises(embeddings.EmbeddingsError,
                       match=r"model 'specpt_redshift'.*only for tokenizer models"):
        embeddings.export_embeddings(c, tmp_path / "no_run", ["x"], tmp_path / "e.h5")
    assert not (tmp_path / "e.h5").exists()


def test_catalogue_batches_of_a_bucketed_config(run):
    """predict's catalogue path pads each record to the smallest bucket holding it (as
    training does), one bucket per batch, and reads labels by name (SURVEY is the survey)."""
    policy = inputs.LengthPolicy.for_model(run["config"].data)
    assert policy.buckets == (4608, 7808)
    seen = []
    rows = inputs.model_records(inputs.discover([str(run["data"])]).units, policy, {}, _raise)
    for batch, _ in pipeline.batches_by_length(rows, 8, ["survey"]):
        v = batch.valid
        for i in np.flatnonzero(v):
            r = run["records"][int(batch.ids[i])]
            n = len(r["flux"])
            want = pipeline.bucket_plan([n], policy.buckets)
            assert batch.num_pixels == policy.buckets[want.assignment[0]]
            assert batch.labels[i, 0] == r["labels"][mixture.LABELS.index("survey")]
            seen.append(int(batch.ids[i]))
    assert sorted(seen) == sorted(run["records"])
    assert inputs.LengthPolicy(buckets=(64, 128)).target(129) is None
    assert "largest length bucket" in inputs.LengthPolicy(buckets=(64, 128)).refusal(129)


def test_projection_plot_pca_categorical_and_continuous(run, tmp_path, capsys):
    res = embeddings.plot(run["out"], "class", tmp_path / "class.png", method="pca")
    assert res["method"] == "pca" and res["plotted"] == len(run["records"])
    assert (tmp_path / "class.png").stat().st_size > 5000
    res = embeddings.plot(run["out"], "teff", tmp_path / "teff.png", method="pca")
    n_stars = sum(np.isfinite(r["labels"][mixture.LABELS.index("teff")])
                  for r in run["records"].values())
    assert res["plotted"] == n_stars and res["dropped_no_label"] == len(run["records"]) - n_stars
    out = capsys.readouterr().out
    assert "PCA" in out and f"left out {len(run['records']) - n_stars} spectra" in out
    with pytest.raises(embeddings.EmbeddingsError, match="no colour column 'colour'"):
        embeddings.plot(run["out"], "colour", tmp_path / "x.png")
    # PCA: orthogonal directions of decreasing variance.
    x = np.random.default_rng(0).normal(size=(200, 5)) * [5, 2, 1, 1, 1]
    xy = embeddings.pca(x)
    assert abs(np.corrcoef(xy.T)[0, 1]) < 1e-8 and xy[:, 0].var() > xy[:, 1].var()


def test_plot_command_line(run, tmp_path):
    png = tmp_path / "survey.png"
    res = subprocess.run([sys.executable, "-m", "spectrax.embeddings", "plot",
                          f"--embeddings={run['out']}", "--colour=survey", f"--out={png}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert png.exists() and ("PCA" in res.stdout or "UMAP" in res.stdout)
    res = subprocess.run([sys.executable, "-m", "spectrax.embeddings", "plot",
                          f"--embeddings={tmp_path / 'none.h5'}", f"--out={png}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and "none.h5: no such file" in res.stderr
