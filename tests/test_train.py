"""The training loop: end to end, resume after a kill, 1 vs 8 devices, NaN guard, bad configs,
checkpoint compatibility, and the dry-run parameter counts."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from spectrax import checkpoint, train, warm_start
from spectrax.config_lib import load
from spectrax.sharding import make_mesh
from helpers import ROOT, tiny_config  # tests/helpers.py



def _cli(*args, env=None, timeout=600):
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "spectrax.train", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def _params(workdir):
    ck = checkpoint.Checkpointer(workdir)
    raw, _ = ck.restore_raw()
    ck.close()
    return raw["params"]


# --- end to end ------------------------------------------------------------------------------
def test_autoencoder_then_redshift_end_to_end(tmp_path):
    ae_dir, z_dir = tmp_path / "ae", tmp_path / "z"
    result = train.train(tiny_config(tmp_path), ae_dir)
    assert result["n"] == 24 and np.isfinite(result["recon_l1"])
    for f in ("metrics.json", "metrics.jsonl", "config.json", "reconstructions.png", "loss.png"):
        assert (ae_dir / f).exists(), f
    rows = [json.loads(l) for l in (ae_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert checkpoint.Checkpointer(ae_dir).latest_step() == 6

    zc = tiny_config(tmp_path, stage="redshift")
    zc.unlock()
    zc.init.from_workdir, zc.init.prefix = str(ae_dir), "encoder"
    zc.lock()
    result = train.train(zc, z_dir)
    for key in ("nmad", "eta", "r2"):
        assert np.isfinite(result[key]), key
    assert (z_dir / "z_pred_vs_true.png").exists() and (z_dir / "z_residuals.png").exists()
    # The per-S/N-bin success table: every test spectrum lands in one bin, counts add up.
    table = result["success_by_snr"]
    assert table[-1]["snr_bin"] == "all" and table[-1]["n"] == result["n"]
    assert sum(r["n"] for r in table[:-1]) == result["n"]
    assert result["success"] == table[-1]["success"]
    assert "| all |" in (z_dir / "z_success_by_snr.md").read_text()
    assert result["eval_spectra_per_s"] > 0


def test_pretrained_encoder_is_copied_exactly(tmp_path):
    ae_dir = tmp_path / "ae"
    train.train(tiny_config(tmp_path, steps=2), ae_dir)
    zc = tiny_config(tmp_path, stage="redshift")
    trainer = train.Trainer(zc, make_mesh(), zc.num_steps)
    state, _ = warm_start.load_pretrained(trainer.init_state(), trainer, str(ae_dir), "encoder")
    src = _params(ae_dir)["encoder"]
    got = jax.tree.map(np.asarray, nnx.to_pure_dict(state["params"]))["encoder"]
    flat_src = jax.tree_util.tree_leaves(checkpoint.strip_value(src))
    flat_got = jax.tree_util.tree_leaves(got)
    assert len(flat_src) == len(flat_got)
    for a, b in zip(flat_src, flat_got):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_pretrained_from_other_architecture_lists_mismatches(tmp_path):
    ae_dir = tmp_path / "ae"
    train.train(tiny_config(tmp_path, steps=2), ae_dir)
    zc = load("configs/specpt_redshift_bgs.py", "variant=tokens")
    trainer = train.Trainer(zc, make_mesh(), 1)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="does not match"):
        warm_start.load_pretrained(trainer.init_state(), trainer, str(ae_dir), "encoder")


def test_restoring_into_a_different_architecture_fails_clearly(tmp_path):
    ae_dir = tmp_path / "ae"
    train.train(tiny_config(tmp_path, steps=2), ae_dir)
    other = load("configs/specpt_bgs.py", "variant=tokens")
    trainer = train.Trainer(other, make_mesh(), 1)
    ck = checkpoint.Checkpointer(ae_dir)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="shape differs"):
        ck.restore(trainer.abstract_with_shardings())


# --- resume after a kill ---------------------------------------------------------------------
# --- 1 device vs 8 devices -------------------------------------------------------------------
def test_one_and_eight_devices_give_the_same_losses(tmp_path):
    cfg = tiny_config(tmp_path, steps=4)
    common = ["--config=configs/specpt_bgs.py:variant=tiny",
              *[f"--config.{k}={v}" for k, v in {
                  "data.n_train": 96, "data.n_val": 16, "data.n_test": 24, "num_steps": 4,
                  "batch_size": 8, "log_every": 1, "ckpt_every": 4, "optim.warmup_steps": 2,
                  "data.cache_dir": cfg.data.cache_dir}.items()]]
    cfg.unlock()
    cfg.log_every = 1
    cfg.lock()
    train.train(cfg, tmp_path / "one")  # makes the data too
    # FSDP meshes: tests/test_distributed.py (fsdp=8 vs 1 device) and tests/test_reliability.py
    # (resume from 1 device onto data x fsdp).
    for name, mesh in (("dp8", ["--config.mesh.data=8"]),):
        res = _cli(*common, *mesh, f"--workdir={tmp_path / name}",
                   env={"JAX_NUM_CPU_DEVICES": "8", "XLA_FLAGS":
                        "--xla_force_host_platform_device_count=8"})
        assert res.returncode == 0, res.stderr[-3000:]
        assert json.loads((tmp_path / name / "metrics.json").read_text())["devices"] == 8
        one = [json.loads(l)["loss"] for l in (tmp_path / "one" / "metrics.jsonl").read_text()
               .splitlines() if "loss" in l]
        many = [json.loads(l)["loss"] for l in (tmp_path / name / "metrics.jsonl").read_text()
                .splitlines() if "loss" in l]
        np.testing.assert_allclose(many, one, rtol=2e-4, err_msg=name)


# --- guards ----------------------------------------------------------------------------------
def test_nonfinite_update_is_skipped_and_stops_the_run(tmp_path):
    c = tiny_config(tmp_path, steps=4)
    c.unlock()
    c.optim.name, c.optim.lr, c.optim.clip_norm, c.optim.warmup_steps = "sgd", 1e38, 0.0, 0
    c.optim.guard_update = True
    c.lock()
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step 0"):
        train.train(c, tmp_path / "nan")
    # no checkpoint holds NaN: none was written at all before the stop
    assert checkpoint.Checkpointer(tmp_path / "nan").latest_step() is None


def test_skip_mode_keeps_parameters_finite(tmp_path):
    c = tiny_config(tmp_path, steps=2)
    c.unlock()
    c.optim.name, c.optim.lr, c.optim.clip_norm, c.optim.warmup_steps = "sgd", 1e38, 0.0, 0
    c.optim.guard_update = True
    c.on_nonfinite = "skip"
    c.lock()
    train.train(c, tmp_path / "skip")
    for leaf in jax.tree_util.tree_leaves(_params(tmp_path / "skip")):
        assert np.all(np.isfinite(np.asarray(leaf)))


def test_overflowing_update_without_guard_never_reaches_a_checkpoint(tmp_path):
    """Without optim.guard_update an absurd learning rate makes the parameters non-finite; the
    next step's non-finite loss is skipped, and the checkpoint writer refuses the state."""
    c = tiny_config(tmp_path, steps=2)
    c.unlock()
    # 1e39 is inf in float32: every update is ±inf or NaN.
    c.optim.name, c.optim.lr, c.optim.clip_norm, c.optim.warmup_steps = "sgd", 1e39, 0.0, 0
    c.on_nonfinite = "skip"
    c.lock()
    with pytest.raises(FloatingPointError, match="parameters are non-finite at step 2"):
        train.train(c, tmp_path / "noguard")
    assert checkpoint.Checkpointer(tmp_path / "noguard").latest_step() is None


def test_unknown_config_key_is_an_error_naming_it():
    res = _cli("--config=configs/specpt_bgs.py", "--config.data.no_such_key=1", "--dry_run",
               timeout=120)
    assert res.returncode != 0 and "no_such_key" in res.stderr


def test_unknown_variant_is_an_error_listing_known_ones():
    res = _cli("--config=configs/specpt_bgs.py:variant=huge", "--dry_run", timeout=120)
    assert res.returncode != 0 and "huge" in res.stderr and "tokens" in res.stderr


def test_wrong_grid_length_for_a_fixed_grid_model(tmp_path):
    c = tiny_config(tmp_path)
    c.unlock()
    c.model.variant = "small"
    c.data.length = 5000
    c.lock()
    with pytest.raises(ValueError, match="7781"):
        train.train(c, tmp_path / "len")


# --- parameter counts through the CLI ---------------------------------------------------------
def test_dry_run_prints_the_paper_count():
    res = _cli("--config=configs/specpt_bgs.py:variant=paper", "--dry_run", timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Total parameters: 1,120,475,621" in res.stdout


@pytest.mark.parametrize("variant,total", [("paper_text", 77_103_617),
                                           ("paper_count", 74_016_257)])
def test_dry_run_redshift_heads(variant, total):
    counts = train.dry_run(load("configs/specpt_redshift_bgs.py", f"variant={variant}"))
    assert counts["total"] == total


def test_configure_sets_the_xla_cpu_flag_unless_the_user_chose_and_import_does_not():
    import subprocess
    import sys
    show = "import os; print(os.environ.get('XLA_FLAGS', ''))"
    code = f"import spectrax.runtime; spectrax.runtime.configure(); {show}"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",
                                                              "SPECTRAX_KEEP_XLA_FLAGS")}
    run = lambda code=code, **extra: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
        timeout=120).stdout.strip()
    # importing spectrax (and its training module) changes nothing process-wide
    assert run(f"import spectrax, spectrax.train; {show}") == ""
    from importlib import metadata
    if metadata.version("jaxlib").startswith("0.10."):
        assert run() == "--xla_cpu_experimental_ynn_fusion_type="
        assert run(XLA_FLAGS="--xla_force_host_platform_device_count=2") == (
            "--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type=")
    assert run(SPECTRAX_KEEP_XLA_FLAGS="1") == ""
    mine = "--xla_cpu_experimental_ynn_fusion_type=dot"
    assert run(XLA_FLAGS=mine) == mine


def test_parse_arg_reads_booleans_and_refuses_unknown_keys():
    from spectrax.config_lib import parse_arg
    assert parse_arg("flag=False", flag=True).flag is False  # bool("False") would be True
    assert parse_arg("flag=1,steps=5", flag=False, steps=0).to_dict() == {"flag": True, "steps": 5}
    with pytest.raises(ValueError, match="true or false"):
        parse_arg("flag=maybe", flag=True)
    with pytest.raises(ValueError, match="unknown config argument"):
        parse_arg("nope=1", flag=True)


def test_every_config_file_is_a_complete_experiment():
    """Each configs/*.py builds a locked config with data, model, task and optimiser set."""
    from spectrax.config_lib import load
    for path in sorted((ROOT / "configs").glob("*.py")):
        c = load(path)
        assert c.name and c.task and c.model.name and c.optim.lr > 0, path
        assert c.data.simulator or c.data.path, path
        with pytest.raises(AttributeError):
            c.no_such_key = 1  # locked: a misspelt override is an error


def test_configure_makes_glibc_keep_freed_memory_unless_asked_not_to():
    """The allocator setting (runtime.retain_freed_memory) takes: a 64 MiB block freed and
    allocated again is not faulted in again page by page."""
    import subprocess
    import sys
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    code = """
import ctypes, resource, sys, spectrax.runtime as r
r.configure(keep_freed_memory=sys.argv[1] == "1")
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def cycle():   # 64 MiB from malloc, touched, freed (numpy would ask for huge pages itself)
    block = libc.malloc(1 << 26)
    ctypes.memset(block, 1, 1 << 26)
    libc.free(block)
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    env = {k: v for k, v in os.environ.items() if k != "SPECTRAX_SYSTEM_MALLOC"}
    count = lambda flag: int(subprocess.run(  # noqa: E731
        [sys.executable, "-c", code, flag], env=env, capture_output=True, text=True,
        timeout=120, check=True).stdout.split()[-1])
    kept, returned = count("1"), count("0")
    pages = 5 * (1 << 26) // 4096
    assert returned > 0.9 * pages      # every block faulted in again: the test can tell
    assert kept < 0.05 * pages
