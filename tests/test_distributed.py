"""Distributed training on CPU: two jax.distributed processes (gloo collectives) against one
process, FSDP over 8 simulated devices against 1 device, and bf16 against float32 compute.

Multi-process runs start ``python -m spectrax.train`` twice with ``SPECTRAX_COORDINATOR`` /
``SPECTRAX_NUM_PROCESSES`` / ``SPECTRAX_PROCESS_ID`` (read by
:func:`spectrax.sharding.initialize_distributed`), a coordinator on a free localhost port and
one CPU device per process, so the ('data', 'fsdp') mesh spans both processes.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spectrax import checkpoint, evaluation, train
from spectrax.data import pipeline, shards
from spectrax.prepare import ensure_data
from spectrax.sharding import make_mesh
from helpers import ROOT, tiny_config  # tests/helpers.py


# Two processes vs one: the same global batches through the same program, but the batch-axis
# reductions (loss mean, BatchNorm statistics, the gradient all-reduce over gloo) add in another
# order, so float32 rounding differs. Tolerances (measured on jax 0.10.2 CPU in brackets):
MULTIPROCESS_LOSS_RTOL = 1e-5   # per-step loss (7.7e-8)
MULTIPROCESS_PARAM_ATOL = 2e-5  # parameters after 6 AdamW steps (2.2e-6)
# FSDP over 8 devices vs 1 device (measured 7.5e-8; the 1-vs-8 data-parallel test uses 2e-4).
FSDP_LOSS_RTOL = 1e-5


def _zero_gradient(path: str) -> bool:
    """Parameters whose gradient is ZERO in exact arithmetic, held to a looser bound in the
    2-process comparison: conv biases right before a train-mode BatchNorm (the batch mean
    removes them) and attention key biases (softmax is invariant to the q.b_k added to every
    logit of a row); plus the BatchNorm running means, which inherit the conv bias. Their
    float32 gradients are rounding noise, which AdamW normalises into steps of up to ~lr each,
    so two roundings move them apart by up to the summed learning rate (3.0e-4 here; measured
    5.7e-5 for the biases, 1.1e-5 for the running means)."""
    return path.endswith("/k_proj/bias") or (
        "/stem/blocks/" in path and path.endswith(("/conv/bias", "/norm/mean")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_available() -> bool:
    """Whether this jaxlib has gloo CPU collectives (jax 0.10: yes, and the default of
    ``jax_cpu_collectives_implementation``). Unknown layouts count as available: the run
    itself then says what is missing."""
    try:
        from jax._src.lib import _jax
    except ImportError:
        return True
    return hasattr(_jax, "make_gloo_tcp_collectives")


def _cli_args(cfg, workdir: Path) -> list[str]:
    """Command-line flags reproducing the tiny test config."""
    keys = {"data.n_train": cfg.data.n_train, "data.n_val": cfg.data.n_val,
            "data.n_test": cfg.data.n_test, "data.cache_dir": cfg.data.cache_dir,
            "num_steps": cfg.num_steps, "batch_size": cfg.batch_size,
            "eval_batch_size": cfg.eval_batch_size, "log_every": cfg.log_every,
            "ckpt_every": cfg.ckpt_every, "optim.warmup_steps": cfg.optim.warmup_steps,
            "num_figures": cfg.num_figures}
    return ["-m", "spectrax.train", "--config=configs/specpt_bgs.py:variant=tiny",
            *[f"--config.{k}={v}" for k, v in keys.items()], f"--workdir={workdir}"]


def _launch(args: list[str], n: int, logs: Path, env_extra: dict) -> list[subprocess.Popen]:
    """Starts ``n`` processes of one jax.distributed job; stdout+stderr to logs/proc<i>.log."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}  # one CPU device per process
    env.update({"PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu",
                "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
                "SPECTRAX_COORDINATOR": f"127.0.0.1:{port}",
                "SPECTRAX_NUM_PROCESSES": str(n), **env_extra})
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(n):
        out = open(logs / f"proc{i}.log", "w")
        procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=out,
                                      stderr=subprocess.STDOUT,
                                      env={**env, "SPECTRAX_PROCESS_ID": str(i)}))
    return procs


def _wait(procs, logs: Path, timeout: float) -> list[str]:
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.time(), 1))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [(logs / f"proc{i}.log").read_text() for i in range(len(procs))]
    for i, (p, text) in enumerate(zip(procs, texts)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{text[-3000:]}"
    return texts


def _flat(tree) -> dict[str, np.ndarray]:
    tree = checkpoint.strip_value(jax.tree.map(np.asarray, tree))
    return {checkpoint.path_str(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _reference_run(cfg, data_dir: Path, n_proc: int):
    """One process, one device, the SAME global batches a ``n_proc``-process run sees
    (process p's rows are ``ds[p::n_proc]`` shuffled; the global batch is their concatenation
    in process order). Returns (per-step losses, learning rates, final params, final
    other)."""
    manifest = shards.read_manifest(data_dir)
    trainer = train.Trainer(cfg, make_mesh(), cfg.num_steps,
                            steps_per_epoch=max(1, manifest.count("train") // cfg.batch_size))
    trainer.task.bind_labels(manifest.label_names)
    trainer.task.fit_state(manifest.stats.get("labels", {}), data_dir)
    idx = evaluation.label_indices(manifest, trainer.task)
    iters = [pipeline.train_iterator(data_dir, batch_size=cfg.batch_size // n_proc,
                                     seed=cfg.seed, num_threads=1, process_index=p,
                                     process_count=n_proc) for p in range(n_proc)]
    state = trainer.init_state()
    step = jax.jit(trainer.train_step, donate_argnums=0)
    losses, lrs = [], []
    for _ in range(cfg.num_steps):
        parts = [next(it) for it in iters]
        host = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
        batch = pipeline.to_global(evaluation.select_labels(host, idx), trainer.batch_sharding)
        state, logs = step(state, batch)
        losses.append(float(logs["loss"]))
        lrs.append(float(logs["lr"]))
    return (losses, lrs, _flat(nnx.to_pure_dict(state["params"])),
            _flat(nnx.to_pure_dict(state["other"])))


def _losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


# --- two processes ----------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_sigterm_resume_and_match_one_process(tmp_path):
    """2 processes x 1 CPU device, data-parallel mesh over both: SIGTERM to ONE process makes
    BOTH save at the same step and exit 0 (JAX's preemption sync point); a restart of both
    resumes from that checkpoint (written by both processes into one directory) and finishes.
    Every step's loss and the final parameters equal a one-process run on the same global
    batches.

    Tolerances and measured differences: see MULTIPROCESS_* above."""
    if not _gloo_available():
        pytest.skip("this jaxlib has no gloo CPU collectives (make_gloo_tcp_collectives); "
                    "cross-process CPU training needs them")
    cfg = tiny_config(tmp_path, steps=6)
    cfg.unlock()
    cfg.log_every = 1
    cfg.lock()
    data_dir = ensure_data(cfg.data)  # simulated once, before any process starts
    workdir, logs = tmp_path / "two", tmp_path / "logs"
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    t0 = time.time()

    # Run 1: SIGTERM to process 1 only, once the job is up (after jax.distributed started).
    procs = _launch(_cli_args(cfg, workdir), 2, logs / "run1", cache)
    deadline = time.time() + 120
    while time.time() < deadline and "work directory" not in (
            logs / "run1" / "proc0.log").read_text():
        assert all(p.poll() is None for p in procs), (logs / "run1" / "proc0.log").read_text()
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    texts = _wait(procs, logs / "run1", 300)
    saved = checkpoint.Checkpointer(workdir).latest_step()
    assert saved is not None and saved < cfg.num_steps, texts[0][-2000:]
    assert f"SIGTERM: saved checkpoint at step {saved}" in texts[0]
    assert f"SIGTERM: saved checkpoint at step {saved}" in texts[1]
    t1 = time.time()

    # Run 2: both restart, resume from that step and finish (final evaluation included). The
    # one-process reference runs meanwhile in a thread (run 2 mostly loads cached executables,
    # which leaves a core idle).
    ref: dict = {}

    def reference():
        try:
            ref["out"] = _reference_run(cfg, data_dir, n_proc=2)
        except BaseException as e:  # re-raised below, in the test's thread
            ref["error"] = e

    thread = threading.Thread(target=reference)
    thread.start()
    texts = _wait(_launch(_cli_args(cfg, workdir), 2, logs / "run2", cache), logs / "run2", 300)
    t2 = time.time()
    thread.join()
    if "error" in ref:
        raise ref["error"]
    assert f"resumed from step {saved}" in texts[0]
    result = json.loads((workdir / "metrics.json").read_text())
    assert result["processes"] == 2 and result["devices"] == 2 and result["n"] == 24

    ref_losses, ref_lrs, ref_params, ref_other = ref["out"]
    got = _losses(workdir)
    assert sorted(got) == list(range(1, cfg.num_steps + 1))
    got_losses = [got[s] for s in range(1, cfg.num_steps + 1)]
    rel = np.max(np.abs(np.array(got_losses) - ref_losses) / np.abs(ref_losses))
    ck = checkpoint.Checkpointer(workdir)
    assert ck.latest_step() == cfg.num_steps
    raw, _ = ck.restore_raw()
    ck.close()
    got_state = {**{f"params/{k}": v for k, v in _flat(raw["params"]).items()},
                 **{f"other/{k}": v for k, v in _flat(raw["other"]).items()}}
    ref_state = {**{f"params/{k}": v for k, v in ref_params.items()},
                 **{f"other/{k}": v for k, v in ref_other.items()}}
    assert got_state.keys() == ref_state.keys()
    diff = {k: float(np.max(np.abs(got_state[k] - ref_state[k]))) for k in got_state}
    gauge = {k for k in diff if _zero_gradient(k)}
    assert len(gauge) == 2 + 3 + 3  # 2 attention layers; 3 stem convs and their BatchNorms
    lr_sum = sum(float(lr) for lr in ref_lrs)
    d_rest = max(v for k, v in diff.items() if k not in gauge)
    d_gauge = max((diff[k] for k in gauge), default=0.0)
    print(f"2 processes vs 1: SIGTERM stop at step {saved}; loss max rel diff {rel:.2e}; "
          f"parameters/BatchNorm max abs diff {d_rest:.2e} (zero-gradient ones {d_gauge:.2e}, "
          f"bound {lr_sum:.1e}); run 1 {t1 - t0:.0f} s, run 2 {t2 - t1:.0f} s, reference "
          f"done {time.time() - t2:.0f} s after run 2")
    np.testing.assert_allclose(got_losses, ref_losses, rtol=MULTIPROCESS_LOSS_RTOL)
    worst = max((k for k in diff if k not in gauge), key=diff.get)
    assert d_rest <= MULTIPROCESS_PARAM_ATOL, (worst, d_rest)
    assert d_gauge <= lr_sum, sorted(gauge, key=diff.get)[-1]


# --- FSDP over 8 simulated devices ------------------------------------------------------------
# The tiny model's largest kernels have 2,048 entries, below FSDP_MIN_SIZE (2**14), so FSDP
# would shard nothing; these tests lower the threshold so every kernel of >= 1,024 entries
# (32x32 projections, 32x64 / 64x32 feed-forward kernels, conv kernels) is sharded.
FSDP_TEST_MIN_SIZE = 1024
EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                 "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}
KERNEL = "decoder/layers/0/linear1/kernel"  # (32, 64): sharded along its 64 columns


def fsdp_steps(base: str, data: int, fsdp: int, steps: int = 3) -> dict:
    """``steps`` train steps of the tiny autoencoder on a (data, fsdp) mesh, through the same
    AOT-compiled step as :func:`spectrax.train.train`; returns the per-step losses and the
    shardings of the state. Runs in this process (1 device) and in an 8-device subprocess."""
    from spectrax import sharding

    cfg = tiny_config(Path(base) / "fsdp", steps=steps)
    data_dir = ensure_data(cfg.data)
    manifest = shards.read_manifest(data_dir)
    saved, sharding.FSDP_MIN_SIZE = sharding.FSDP_MIN_SIZE, FSDP_TEST_MIN_SIZE
    try:  # the shardings are fixed when the Trainer is built
        trainer = train.Trainer(cfg, make_mesh(data, fsdp), steps)
    finally:
        sharding.FSDP_MIN_SIZE = saved
    trainer.task.bind_labels(manifest.label_names)
    idx = evaluation.label_indices(manifest, trainer.task)
    it = pipeline.train_iterator(data_dir, batch_size=cfg.batch_size, seed=cfg.seed,
                                 num_threads=1, process_index=0, process_count=1)
    batches = [pipeline.to_global(evaluation.select_labels(next(it), idx), trainer.batch_sharding)
               for _ in range(steps)]
    compiled, _, memory = trainer.compile(batches[0])
    state = trainer.init_state()
    losses = []
    for b in batches:
        state, logs = compiled(state, b)
        losses.append(float(logs["loss"]))
    leaves = {checkpoint.path_str(p): x
              for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    info = {k: {"spec": str(x.sharding.spec), "shard": list(x.addressable_shards[0].data.shape),
                "shape": list(x.shape)} for k, x in leaves.items() if k.endswith(KERNEL)}
    sharded = [k for k, x in leaves.items()
               if x.ndim and x.addressable_shards[0].data.shape != x.shape]
    return {"losses": losses, "kernel": info, "n_sharded": len(sharded),
            "n_leaves": len(leaves), "devices": jax.device_count(), "memory": memory}


@pytest.mark.slow
def test_fsdp_on_eight_devices_matches_one_device(tmp_path):
    """mesh data=1 x fsdp=8: parameters AND AdamW moments are sharded 8 ways (each device holds
    (32, 8) of the (32, 64) kernel), and 3 steps give the losses of 1 device (FSDP_LOSS_RTOL)."""
    base = str(tmp_path)
    ensure_data(tiny_config(tmp_path / "fsdp").data)  # simulated once, before the subprocess
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from spectrax import runtime
        runtime.configure()  # the XLA:CPU settings of this process (tests/conftest.py)
        import test_distributed as T
        print("RESULT " + json.dumps(T.fsdp_steps({base!r}, data=1, fsdp=8)))
    """)
    env = {**os.environ, **EIGHT_DEVICES}
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    eight = json.loads(res.stdout.split("RESULT ", 1)[1])
    one = fsdp_steps(base, data=jax.device_count(), fsdp=1)
    assert eight["devices"] == 8
    # the parameter, and the optimiser's first and second moments of the same kernel
    kernel = eight["kernel"]
    assert any(p.startswith("params/") for p in kernel)
    assert any("mu/" in p for p in kernel) and any("nu/" in p for p in kernel), list(kernel)
    for path, k in kernel.items():
        assert k["shape"] == [32, 64] and k["shard"] == [32, 8], (path, k)
        assert "fsdp" in k["spec"], (path, k)
    assert eight["n_sharded"] >= 3 * 10, eight  # every large kernel, in params, mu and nu
    rel = np.max(np.abs(np.array(eight["losses"]) - one["losses"]) / np.abs(one["losses"]))
    print(f"fsdp=8 vs 1 device: losses {eight['losses']} vs {one['losses']}, max rel diff "
          f"{rel:.2e}; {eight['n_sharded']} of {eight['n_leaves']} state arrays sharded; "
          f"{eight['memory']}")
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=FSDP_LOSS_RTOL)


# --- bf16 compute -----------------------------------------------------------------------------
# bfloat16 keeps 8 significant bits (7 stored + 1 implicit): unit roundoff u = 2**-8 ≈ 3.9e-3,
# so each rounded activation carries a relative error up to u. The tiny models round a few
# layers deep and the loss averages thousands of such errors (which partly cancel), so the
# loss agrees with float32 to a few u at most: the tolerance is 4u = 2**-6 ≈ 1.6e-2
# (measured: SpecPT 1.9e-4, tokenizer 7.3e-4, SpectraFM 2.0e-3).
BF16_LOSS_RTOL = 2.0**-6


def _bf16_case(family: str):
    """(config, fixed batch) of the tiny ``family`` model: simulated DESI galaxies for SpecPT
    and the tokenizer, simulated APOGEE stars for SpectraFM."""
    from spectrax.config_lib import load
    from spectrax.data import grids, mixture, survey_grids, synthetic
    from spectrax.spectra import batch_from_arrays

    if family == "spectrafm":
        stars = [r for chunk in mixture.iter_apogee("apogee_clean", 8, seed=1) for r in chunk]
        stack = lambda k: np.stack([r[k] for r in stars])
        wave = survey_grids.apogee_wavelength().astype(np.float32)
        return load("configs/spectrafm_pretrain.py", "variant=tiny"), batch_from_arrays(
            flux=stack("flux"), ivar=stack("ivar"), mask=stack("mask"), labels=stack("labels"),
            wavelength=np.broadcast_to(wave, (len(stars), wave.size)))
    d = synthetic.simulate_desi_galaxies(8, "bgs", seed=1)
    wave = np.broadcast_to(grids.desi_wavelength().astype(np.float32), d["flux"].shape)
    if family == "specpt":
        return load("configs/specpt_bgs.py", "variant=tiny"), batch_from_arrays(
            flux=d["flux"], ivar=d["ivar"], mask=d["mask"], wavelength=wave)
    # the tokenizer takes 32-pixel patches: 7781 pixels padded to 7808 (masked, λ = -1)
    pad = lambda x, v: np.pad(x, ((0, 0), (0, 7808 - x.shape[1])), constant_values=v)
    return load("configs/tokenizer_pretrain.py", "variant=tiny"), batch_from_arrays(
        flux=pad(d["flux"], 0), ivar=pad(d["ivar"], 0), mask=pad(d["mask"], False),
        wavelength=pad(wave, -1))


def bf16_losses(config, batch) -> dict:
    """The loss of one fixed batch under float32 and bfloat16 compute, from the same init."""
    from flax import nnx

    from spectrax import tasks
    from spectrax.data import mixture
    from spectrax.models import registry
    from spectrax.models import spectrafm as fm

    out, params = {}, {}
    for dtype in ("float32", "bfloat16"):
        c = config.copy_and_resolve_references()
        c.unlock()
        c.model.dtype = dtype
        model = registry.build_model(c.model, rngs=nnx.Rngs(params=0, dropout=1))
        task = tasks.get_task(c.task, **c.task_kwargs.to_dict())
        if c.task == "spectrafm":  # its standardisation statistics, from this batch
            names = mixture.apogee_label_names()
            task.bind_labels(names)
            pm, pmad = fm.fit_standardizer(np.where(batch.mask, batch.flux, np.nan))
            lm, lmad = fm.fit_standardizer(np.where(batch.label_mask, batch.labels, np.nan))
            task.stats = {"pixel_median": pm.tolist(), "pixel_mad": pmad.tolist(),
                          "label_median": {n: float(lm[i]) for i, n in enumerate(names)},
                          "label_mad": {n: float(lmad[i]) for i, n in enumerate(names)}}
        else:
            task.bind_labels(())
        loss, _ = jax.jit(lambda b: task.loss(model, b, train=False, rng=jax.random.key(3)))(
            batch.for_device())
        out[dtype] = loss
        params[dtype] = _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    same_init = all(np.array_equal(params["float32"][k], params["bfloat16"][k])
                    for k in params["float32"])
    return {**out, "same_init": same_init}


@pytest.mark.parametrize("family", ["specpt", "tokenizer", "spectrafm"])
def test_bf16_loss_matches_float32(family):
    config, batch = _bf16_case(family)
    r = bf16_losses(config, batch)
    f32, bf16 = r["float32"], r["bfloat16"]
    assert r["same_init"]  # parameters are float32 and identical: only the compute differs
    assert f32.dtype == jnp.float32 and bf16.dtype == jnp.float32  # the loss is float32
    rel = abs(float(bf16) - float(f32)) / abs(float(f32))
    print(f"{family}: float32 loss {float(f32):.6g}, bf16 {float(bf16):.6g}, rel diff {rel:.2e}")
    assert float(bf16) != float(f32)  # bf16 compute really happened
    assert rel <= BF16_LOSS_RTOL, (family, float(f32), float(bf16), rel)


# --- prediction over two processes ------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_predict_disjoint_shares_into_one_catalogue(tmp_path):
    """``spectrax.predict`` as 2 jax.distributed processes: each predicts its own blocks on its
    own device, process 0 merges the parts into ONE catalogue equal to a one-process run's
    (same rows, same order, same predictions)."""
    from astropy.table import Table

    from spectrax import predict

    cfg = tiny_config(tmp_path, stage="redshift", steps=2)
    train.train(cfg, tmp_path / "run")
    data_dir = ensure_data(cfg.data)  # 136 simulated spectra, all splits
    one = tmp_path / "one.fits"
    predict.run(cfg, str(tmp_path / "run"), [str(data_dir)], one, batch_size=8,
                block_spectra=16, progress=False)
    two = tmp_path / "two.fits"
    keys = {"data.n_train": cfg.data.n_train, "data.n_val": cfg.data.n_val,
            "data.n_test": cfg.data.n_test, "data.cache_dir": cfg.data.cache_dir,
            "init.from_workdir": ""}
    args = ["-m", "spectrax.predict", "--config=configs/specpt_redshift_bgs.py:variant=tiny",
            *[f"--config.{k}={v}" for k, v in keys.items()], f"--checkpoint={tmp_path / 'run'}",
            f"--input={data_dir}", f"--output={two}", "--batch_size=8", "--block_spectra=16"]
    texts = _wait(_launch(args, 2, tmp_path / "logs", {}), tmp_path / "logs", 300)
    assert "wrote 136 rows" in texts[0] and "wrote" not in texts[1]
    a, b = Table.read(one), Table.read(two)
    assert len(a) == len(b) == 136
    np.testing.assert_array_equal(a["TARGETID"], b["TARGETID"])
    np.testing.assert_allclose(a["Z"], b["Z"], rtol=1e-6)
    assert not Path(str(two) + ".parts").exists()
