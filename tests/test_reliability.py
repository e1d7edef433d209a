"""Reliability (issue 7): preemption and crashes lose nothing, checkpoints are atomic and
reshard onto another mesh, prediction over many inputs resumes, and configs that cannot fit or
gradients that explode are reported.

Subprocess runs dominate the time (each JAX process spends ~10-20 s starting and compiling), so
one uninterrupted reference run is shared by every test that compares parameters with it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from spectrax import checkpoint, predict, train
from spectrax.config_lib import load
from spectrax.data import shards

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
EIGHT_DEVICES = {"JAX_NUM_CPU_DEVICES": "8",
                 "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


# ----------------------------------------------------------------------------------------------
# One tiny run, the same in-process and on the command line
# ----------------------------------------------------------------------------------------------
def overrides(cache_dir, **extra) -> dict:
    """Config overrides of a seconds-long run of the 'tiny' autoencoder on 136 spectra."""
    return {"data.n_train": 96, "data.n_val": 16, "data.n_test": 24, "num_steps": STEPS,
            "batch_size": 8, "eval_batch_size": 16, "log_every": 2, "ckpt_every": 4,
            "optim.warmup_steps": 2, "init.from_workdir": "", "num_figures": 1,
            "data.cache_dir": str(cache_dir), **extra}


def config(over: dict):
    c = load("configs/specpt_bgs.py", "variant=tiny")
    c.unlock()
    for key, value in over.items():
        node = c
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return c.lock()


def cli_args(over: dict) -> list[str]:
    return ["--config=configs/specpt_bgs.py:variant=tiny",
            *[f"--config.{k}={v}" for k, v in over.items()]]


def popen(module: str, args: list[str], env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def run_cli(module: str, args: list[str], env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    """Polls ``condition()`` until true; fails if the process ends or time runs out first."""
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended (rc {proc.returncode}) before the condition held:\n"
                        f"{out[-1500:]}\n{err[-1500:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the subprocess")
        time.sleep(0.02)


def logged_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(l)["step"] for l in path.read_text().splitlines() if '"loss"' in l]


def params(workdir: Path) -> list[np.ndarray]:
    ck = checkpoint.Checkpointer(workdir)
    raw, _ = ck.restore_raw()
    ck.close()
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(raw["params"])]


def assert_same_params(a: Path, b: Path, atol: float = 1e-6) -> None:
    pa, pb = params(a), params(b)
    assert len(pa) == len(pb)
    for x, y in zip(pa, pb):
        np.testing.assert_allclose(x, y, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(overrides, workdir) of an uninterrupted 12-step run (checkpoints at 8 and 12)."""
    root = tmp_path_factory.mktemp("reference")
    over = overrides(root / "data")
    train.train(config(over), root / "full")
    return over, root / "full"


# ----------------------------------------------------------------------------------------------
# 1. Preemption, crashes, atomic checkpoints
# ----------------------------------------------------------------------------------------------
def plant_incomplete_step(workdir: Path, step: int) -> Path:
    """What a kill during Orbax's save of ``step`` leaves: a temporary directory."""
    tmp = workdir / "checkpoints" / f"{step}.orbax-checkpoint-tmp-1732300000000000"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "half-written").write_bytes(b"\0" * 100)
    return tmp


def test_sigterm_saves_exits_cleanly_and_resumes_to_the_same_parameters(reference, tmp_path):
    over, full = reference
    work = tmp_path / "preempted"
    proc = popen("spectrax.train", [*cli_args(over), f"--workdir={work}"])
    wait_for(lambda: logged_steps(work), proc)  # training has started
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    saved = checkpoint.Checkpointer(work).latest_step()
    assert f"SIGTERM: saved checkpoint at step {saved}" in out
    assert saved is not None and saved < STEPS, f"SIGTERM came too late (step {saved})"

    # A save interrupted by a kill leaves a temporary directory of a later step: ignored.
    plant_incomplete_step(work, saved + 1)
    assert checkpoint.Checkpointer(work).latest_step() == saved

    res = run_cli("spectrax.train", [*cli_args(over), f"--workdir={work}"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed from step {saved}" in res.stdout
    assert_same_params(full, work)


def test_sigkill_at_a_random_moment_then_restart_gives_the_same_parameters(reference,
                                                                            tmp_path):
    over, full = reference
    over = {**over, "log_every": 1}  # logging cadence changes no parameter
    work = tmp_path / "crashed"
    delay = float(np.random.default_rng(20241122).uniform(0.0, 1.5))  # fixed seed: repeatable
    proc = popen("spectrax.train", [*cli_args(over), f"--workdir={work}"])
    # after the first checkpoint, so the restart exercises resuming (a kill before it would
    # only restart from scratch); the delay lands anywhere in the steps or saves that follow
    wait_for(lambda: (work / "checkpoints" / "4").is_dir(), proc)
    time.sleep(delay)
    assert proc.poll() is None, "the run finished before the kill; lower the delay"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = max(logged_steps(work), default=0)
    assert killed_at < STEPS or not (work / "metrics.json").exists()
    ckpt = checkpoint.Checkpointer(work).latest_step()
    assert ckpt is not None and ckpt < STEPS

    res = run_cli("spectrax.train", [*cli_args(over), f"--workdir={work}"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed from step {ckpt}" in res.stdout
    print(f"SIGKILL {delay:.2f} s after checkpoint 4 appeared, at logged step {killed_at}; "
          f"resumed from checkpoint {ckpt}")
    assert_same_params(full, work)


def test_latest_step_skips_temporary_and_partial_step_directories(tmp_path):
    ck = checkpoint.Checkpointer(tmp_path)
    ck.save(4, {"w": np.arange(3.0)}, {"position": 4}, {"note": "complete"}, force=True)
    ck.close()
    plant_incomplete_step(tmp_path, 8)                        # Orbax's temporary name
    (tmp_path / "checkpoints" / "12" / "state").mkdir(parents=True)  # a partial hand copy
    ck = checkpoint.Checkpointer(tmp_path)
    assert ck.latest_step() == 4
    state, data, meta = ck.restore({"w": jax.ShapeDtypeStruct((3,), np.float64)})
    np.testing.assert_array_equal(state["w"], np.arange(3.0))
    assert data == {"position": 4} and meta == {"note": "complete"}
    ck.close()


# ----------------------------------------------------------------------------------------------
# 6. A checkpoint from 1 device resumes on a 4x2 (data x fsdp) mesh of 8
# ----------------------------------------------------------------------------------------------
def test_resume_on_another_mesh_reshards_and_continues_the_same(reference, tmp_path):
    over, full = reference
    more = {**over, "num_steps": STEPS + 2, "log_every": 1}
    one, eight = tmp_path / "one", tmp_path / "eight"
    shutil.copytree(full, one)
    shutil.copytree(full, eight)
    train.train(config(more), one)
    res = run_cli("spectrax.train", [*cli_args(more), "--config.mesh.data=4",
                                     "--config.mesh.fsdp=2", f"--workdir={eight}"],
                  env=EIGHT_DEVICES)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from step {STEPS}" in res.stdout
    assert json.loads((eight / "metrics.json").read_text())["devices"] == 8

    def resumed_losses(workdir):
        rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r and r["step"] > STEPS]

    np.testing.assert_allclose(resumed_losses(eight), resumed_losses(one), rtol=2e-4)
    assert_same_params(one, eight, atol=2e-5)


# ----------------------------------------------------------------------------------------------
# 4. Prediction over many inputs is resumable and loses / duplicates nothing
# ----------------------------------------------------------------------------------------------
def write_input(directory: Path, records: list[dict], first_id: int) -> Path:
    """A shard directory of ``records`` re-numbered from ``first_id`` (DESI grid)."""
    from spectrax.data.grids import DESI_GRID

    recs = [{**r, "id": first_id + i} for i, r in enumerate(records)]
    splits = {"test": shards.write_split(directory, "test", recs)}
    shards.write_manifest(directory, shards.Manifest(label_names=["z"], splits=splits,
                                                     grid=DESI_GRID))
    return directory


def test_predict_killed_mid_run_resumes_with_one_row_per_spectrum(reference, tmp_path):
    over, full = reference
    cfg = config(over)
    from spectrax.prepare import ensure_data

    base = list(shards.iter_records(ensure_data(cfg.data), "test"))  # 24 simulated spectra
    inputs = [write_input(tmp_path / "a", base[:4], 10_000),
              write_input(tmp_path / "b", base * 12, 20_000),
              write_input(tmp_path / "c", base * 12, 30_000)]
    expected = set(range(10_000, 10_004)) | set(range(20_000, 20_288)) | set(
        range(30_000, 30_288))
    out = tmp_path / "catalog.fits"
    args = [*cli_args(over), f"--checkpoint={full}", f"--output={out}", "--batch_size=8",
            "--block_spectra=64", "--input=" + ",".join(str(i) for i in inputs)]
    proc = popen("spectrax.predict", args)
    parts = Path(str(out) + ".parts")
    wait_for(lambda: any(parts.glob("*.fits")), proc)
    running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert running and not out.exists(), "predict finished before the kill"

    summary = predict.run(cfg, str(full), [str(i) for i in inputs], out, batch_size=8,
                          block_spectra=64)
    from astropy.table import Table

    table = Table.read(out)
    ids = np.asarray(table["TARGETID"]).tolist()
    assert summary["blocks_resumed"] >= 1
    assert len(ids) == len(expected) == summary["rows"]     # none lost, none duplicated
    assert set(ids) == expected
    assert not parts.exists()                              # parts folded into the catalogue


def test_part_store_restart_and_other_model_discard_old_parts(tmp_path):
    from astropy.table import Table

    from spectrax.data.inputs import ShardUnit

    out = tmp_path / "cat.fits"
    store = predict.PartStore(out, {"config": "x", "step": 1})
    key = store.key([ShardUnit("d", "test", "d/test-0.array_record", 0, 2)])
    store.write(key, Table({"TARGETID": [1, 2]}), {"x": 1}, [])
    assert predict.PartStore(out, {"config": "x", "step": 1}).done(key)["rows"] == 2
    assert predict.PartStore(out, {"config": "x", "step": 2}).done(key) is None  # other model
    # another process's ledger is read too; each process writes only its own
    other = predict.PartStore(out, {"config": "x", "step": 1}, process=1)
    assert other.done(key)["rows"] == 2 and not other.mine
    store = predict.PartStore(out, {"config": "x", "step": 1})
    store.write(key, Table({"TARGETID": [1, 2]}), {}, [])
    assert predict.PartStore(out, {"config": "x", "step": 1}, restart=True).done(key) is None


# ----------------------------------------------------------------------------------------------
# 5. Guards: memory that cannot fit, exploding gradient norms
# ----------------------------------------------------------------------------------------------
def test_config_that_does_not_fit_fails_at_compile_time(reference, tmp_path):
    over, _ = reference
    cfg = config({**over, "memory_limit_gb": 1e-6, "num_steps": 2})
    with pytest.raises(MemoryError, match=r"needs .* GiB per device.*memory_limit_gb.*"
                                          r"per-device memory: arguments"):
        train.train(cfg, tmp_path / "oom")
    assert logged_steps(tmp_path / "oom") == []  # not a single step ran
    assert checkpoint.Checkpointer(tmp_path / "oom").latest_step() is None


def test_exploding_gradient_norm_is_reported_with_its_step():
    monitor = train.GradNormMonitor()
    assert monitor.update([1, 2, 3, 4, 5, 6], [1.0, 1.2, 0.9, 1.1, 1.0, 5.0]) == []
    warnings = monitor.update([7, 8], [1.1, 40.0])
    assert len(warnings) == 1 and "step 8" in warnings[0] and "exploding" in warnings[0]
    assert monitor.update([9], [float("nan")]) == []  # non-finite: the bad_step guard's job
