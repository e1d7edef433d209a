r"""Throughput, step-time breakdown, memory, FLOPs and MFU of the spectrax training steps, with
optional PyTorch baselines.

    python -m benchmarks.run [--configs=specpt_small,tokenizer_small,spectrafm_small,vit_tiny]
                             [--steps=20] [--reps=3] [--batch=N] [--torch]

Per config (names in :data:`CONFIGS`):

* **Data.** The config's simulated data with ``--n_train`` training spectra (small, so the
  simulation takes seconds; cached under ``--cache_dir``). A few host batches are drawn once
  through the config's own pipeline (bucketed where the config buckets; the longest bucket is
  kept, the costliest shape) and put on the devices once: the step is timed without the input
  pipeline.
* **Training step.** ``Trainer.compile`` (compile time reported apart, never timed), one
  warm-up step (its time is reported as ``first_step_s``), then ``--reps`` blocks of ``--steps``
  steps with one ``block_until_ready`` at the end of each block and no other host
  synchronisation; the median block gives ``step_ms`` (min and max reported too).
* **Breakdown.** The task's loss (forward) and its value-and-gradient (forward + backward),
  jitted apart, timed in blocks that alternate with the step's: ``fwd_ms``, ``bwd_ms`` =
  (fwd+bwd) − fwd and ``optimizer_ms`` = step − (fwd+bwd) (clipping, AdamW, the non-finite
  guards), each the median over repetitions of the difference within a repetition. Slow
  functions get fewer calls per block (about ``TARGET_BLOCK_S`` seconds, at most ``--steps``).
* **Inference.** ``task.predict`` under ``jax.jit`` on the same batches (SpectraFM's predict is
  its chunked full-spectrum inference: every pixel of the range, every label).
* **Memory.** The compiled step's ``memory_analysis()``: ``peak_bytes`` = arguments + outputs +
  temporaries − aliased per device (see :func:`benchmarks.flops.memory_fields`).
* **FLOPs and MFU.** ``compiled.cost_analysis()['flops']`` of the step, per device; MFU against
  :data:`benchmarks.flops.PEAK_FLOPS` (dense bf16 peaks); None on CPU.
* **Pipeline alone.** Grain from the shards to global device batches (what the training loop
  does per step), spectra/s per reader-thread count (``--threads``; Grain's ``ReadOptions
  num_threads``, the pipeline's only parallelism knob); the bottleneck is whichever of pipeline
  (at the config's ``data.num_threads``) and step delivers fewer spectra/s.
* **--torch.** :mod:`benchmarks.torch_models` (SpecPT, tokenizer, SpectraFM) on the same host
  batches, float32, ``torch.set_num_threads(os.cpu_count())``: forward + backward + clipping +
  AdamW, eager and under ``torch.compile`` (a failure is reported as ``failed: <reason>``; the
  optimiser stays eager). Their timed blocks alternate with spectrax's (spectrax, eager,
  compiled, spectrax, ...), and the ratio spectrax / torch of training spectra/s (> 1: spectrax
  faster) is the median of the per-repetition ratios, so load drift on a shared machine hits
  both sides alike.

Tokens per spectrum (``tokens_per_spectrum``): SpecPT, the conv stem's output positions (the
'tokens' architecture attends over them; the 'paper'/'small' architecture projects them to a
single vector, so its transformer sees one token); tokenizer, patches of the batch's pixel
length; SpectraFM, the 512-pixel context (the decoder's request token not counted); ViT, 197
(196 patches + CLS); transformer1d, pixel groups.

Results: one JSON line per config appended to ``--out`` (with the machine, CPU count, jax
version, device kind, date and load averages: the development machine shares its cores with other
jobs, so its figures are lower bounds) and a dated section added to ``--results_md``.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from benchmarks import flops as F

from spectrax import runtime

# Calls per timed block for the breakdown and predict functions: enough to last about this many
# seconds (at most --steps), so a slow function (SpectraFM's chunked predict) does not dominate
# the run while fast ones are still averaged over many calls.
TARGET_BLOCK_S = 8.0

# The fields every result row has (None where not measured); tests check them.
RESULT_FIELDS = (
    "config", "model", "variant", "task", "batch", "pixels", "tokens_per_spectrum",
    "token_definition", "params", "dtype", "attention", "steps", "reps",
    "compile_s", "first_step_s", "step_ms", "step_ms_min", "step_ms_max",
    "train_spectra_per_s", "train_tokens_per_s",
    "fwd_ms", "bwd_ms", "optimizer_ms", "breakdown_compile_s",
    "predict_compile_s", "predict_ms", "predict_spectra_per_s",
    "predict_tokens_per_spectrum", "predict_tokens_per_s",
    "flops_per_step", "fwdbwd_flops", "achieved_flops_per_s", "peak_flops_per_s", "mfu",
    "peak_bytes", "xla_peak_bytes", "memory",
    "pipeline_spectra_per_s", "pipeline_threads_configured", "bottleneck", "pipeline_headroom",
    "host", "cpu_count", "platform", "device_kind", "devices", "jax", "date",
    "loadavg_start", "loadavg_end",
)
# Added by --torch.
TORCH_FIELDS = (
    "torch", "torch_threads", "torch_params", "torch_fwdbwd_flops",
    "torch_eager_step_ms", "torch_eager_step_ms_min", "torch_eager_step_ms_max",
    "torch_eager_spectra_per_s", "torch_eager_first_step_s",
    "torch_compile_status", "torch_compile_s", "torch_compile_step_ms",
    "torch_compile_step_ms_min", "torch_compile_step_ms_max",
    "torch_compile_spectra_per_s", "ratio_vs_torch_eager", "ratio_vs_torch_compile",
)


# ==============================================================================================
# The configs
# ==============================================================================================
def _specpt_tokens(config, length: int) -> int:
    from spectrax.models import specpt
    return specpt.specpt_config(config.model.variant).num_tokens_for(length)


def _tokenizer_tokens(config, length: int) -> int:
    from spectrax.models import tokenizer
    return tokenizer.num_patches(length, tokenizer.tokenizer_config(config.model.variant)
                                 .patch_size)


def _spectrafm_tokens(config, length: int) -> int:
    from spectrax.models import spectrafm
    return spectrafm.spectrafm_config(config.model.variant).context_length


def _vit_tokens(config, length: int) -> int:
    from spectrax.models import vit
    return vit.vit_config(config.model.variant).num_tokens


def _transformer1d_tokens(config, length: int) -> int:
    from spectrax.models import transformer1d
    return -(-length // transformer1d.transformer1d_config(config.model.variant).patch_size)


def _spectrafm_predict_tokens(config, task, length: int) -> int:
    """Tokens SpectraFM's chunked predict runs through per spectrum: every chunk of the pixel
    range, once per requested label."""
    context = _spectrafm_tokens(config, length)
    a, b = task.pixel_range if task.pixel_range[1] > task.pixel_range[0] else (0, length)
    return -(-(b - a) // context) * context * len(task.labels)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """A benchmarked config: how to build it, and what a token is for its model."""

    make: Callable[[], Any]
    tokens: Callable[[Any, int], int]           # (config, pixel length) -> tokens per spectrum
    token_definition: str
    predict_tokens: Callable[[Any, Any, int], int] | None = None  # default: same as training


def _cfg(path: str, arg: str):
    def make():
        from spectrax import config_lib
        return config_lib.load(path, arg)
    return make


_SPECPT_DEF = "conv-stem positions (paper/small architecture: transformer sees 1 token)"
CONFIGS: dict[str, BenchConfig] = {
    "specpt_small": BenchConfig(_cfg("configs/specpt_bgs.py", "variant=small"),
                                _specpt_tokens, _SPECPT_DEF),
    "specpt_tokens": BenchConfig(_cfg("configs/specpt_bgs.py", "variant=tokens"),
                                 _specpt_tokens, "conv-stem positions (attended tokens)"),
    "specpt_tiny": BenchConfig(_cfg("configs/specpt_bgs.py", "variant=tiny"),
                               _specpt_tokens, "conv-stem positions (attended tokens)"),
    "tokenizer_small": BenchConfig(_cfg("configs/tokenizer_pretrain.py", "variant=small"),
                                   _tokenizer_tokens, "32-pixel patches"),
    "tokenizer_tiny": BenchConfig(_cfg("configs/tokenizer_pretrain.py", "variant=tiny"),
                                  _tokenizer_tokens, "32-pixel patches"),
    "spectrafm_small": BenchConfig(_cfg("configs/spectrafm_pretrain.py", "variant=small"),
                                   _spectrafm_tokens, "pixel tokens in the context",
                                   _spectrafm_predict_tokens),
    "spectrafm_tiny": BenchConfig(_cfg("configs/spectrafm_pretrain.py", "variant=tiny"),
                                  _spectrafm_tokens, "pixel tokens in the context",
                                  _spectrafm_predict_tokens),
    "vit_tiny": BenchConfig(_cfg("configs/vit_classify.py", "variant=tiny"), _vit_tokens,
                            "196 patches + CLS"),
    # The paper's backbone, 85.8 M parameters: pass a small --batch on a CPU.
    "vit_b16": BenchConfig(_cfg("configs/vit_classify.py", "variant=b16"), _vit_tokens,
                           "196 patches + CLS"),
    "transformer1d_small": BenchConfig(_cfg("configs/transformer1d_redshift.py", "variant=small"),
                                       _transformer1d_tokens, "8-pixel groups"),
}
DEFAULT_CONFIGS = ("specpt_small", "tokenizer_small", "spectrafm_small", "vit_tiny")


# ==============================================================================================
# Machine and timing helpers
# ==============================================================================================
def loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages of the host (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {"host": platform.node(), "cpu_count": os.cpu_count(), "platform": dev.platform,
            "device_kind": dev.device_kind, "devices": jax.device_count(),
            "jax": jax.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def _blocks(call: Callable[[int], Any], steps: int, reps: int) -> list[float]:
    """Seconds per call for ``reps`` blocks of ``steps`` calls of ``call(i)``; one
    ``block_until_ready`` on the last result of each block, nothing else synchronises."""
    per_call = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for i in range(steps):
            out = call(i)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) / steps)
    return per_call


def _calls_per_block(seconds_per_call: float, steps: int) -> int:
    return int(max(1, min(steps, round(TARGET_BLOCK_S / max(seconds_per_call, 1e-6)))))


def _timed_function(fn, args_for: Callable[[int], tuple], steps: int, reps: int
                    ) -> tuple[float, float, Any]:
    """AOT-compiles ``fn`` (a jax.jit) for ``args_for(0)``, runs it once (warm-up), then times
    blocks of calls. Returns (compile seconds, median seconds per call, compiled)."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args_for(0)).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args_for(0)))
    warm = time.perf_counter() - t0
    n = _calls_per_block(warm, steps)
    return compile_s, statistics.median(_blocks(lambda i: compiled(*args_for(i)), n, reps)), \
        compiled


def _round(x, nd=2):
    return None if x is None else round(float(x), nd)


# ==============================================================================================
# One config
# ==============================================================================================
def prepare(name: str, *, batch: int = 0, n_train: int = 512, cache_dir: str = "data"):
    """Builds config ``name`` with the benchmark's overrides; returns (config, data_dir,
    manifest, trainer, label indices). The task is bound to the shards' labels and fitted to
    their statistics as the training loop does."""
    from spectrax import sharding
    from spectrax.data import shards
    from spectrax.prepare import ensure_data
    from spectrax.train import Trainer, label_indices

    if name not in CONFIGS:
        raise ValueError(f"unknown benchmark config {name!r}; known: {sorted(CONFIGS)}")
    config = CONFIGS[name].make()
    with config.unlocked():
        # Few spectra: the benchmark needs a handful of batches and the statistics, not epochs.
        config.data.n_train, config.data.n_val, config.data.n_test = n_train, 16, 16
        config.data.cache_dir = cache_dir
        if batch:
            config.batch_size = batch
    data_dir = ensure_data(config.data)
    manifest = shards.read_manifest(data_dir)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    trainer = Trainer(config, mesh, 10**6,
                      steps_per_epoch=max(1, manifest.count("train") // config.batch_size))
    trainer.task.bind_labels(manifest.label_names)
    trainer.task.fit_state(manifest.stats.get("labels", {}), data_dir)
    return config, data_dir, manifest, trainer, label_indices(manifest, trainer.task)


def _iterator(config, data_dir, threads: int):
    from spectrax.data import pipeline

    local = config.batch_size // jax.process_count()
    return pipeline.train_iterator(str(data_dir), batch_size=local, seed=config.seed,
                                   buckets=pipeline.batch_lengths(config.data, data_dir),
                                   num_threads=threads)


def fixed_batches(config, data_dir, idx, count: int = 4, draw: int = 12) -> list:
    """``count`` host batches of one shape from the config's pipeline: of ``draw`` batches, those
    of the longest pixel length (the costliest bucket)."""
    from spectrax.train import _select_labels

    it = _iterator(config, data_dir, config.data.num_threads)
    drawn = [_select_labels(next(it), idx) for _ in range(draw if config.data.buckets
                                                            else count)]
    longest = max(b.num_pixels for b in drawn)
    return [b for b in drawn if b.num_pixels == longest][:count]


def bench_pipeline(config, data_dir, idx, sharding, threads: int, batches: int) -> float:
    """Spectra/s of the input pipeline alone: Grain reading, decoding, stacking, label
    selection and assembly of the global device batch (the loop's per-step host work). The
    first batch (iterator start-up) is excluded."""
    from spectrax.data import pipeline
    from spectrax.train import _select_labels

    it = _iterator(config, data_dir, threads)
    jax.block_until_ready(pipeline.to_global(_select_labels(next(it), idx), sharding))
    t0 = time.perf_counter()
    out = None
    for _ in range(batches):
        out = pipeline.to_global(_select_labels(next(it), idx), sharding)
    jax.block_until_ready(out)
    return batches * config.batch_size / (time.perf_counter() - t0)


def bench_config(name: str, *, steps: int = 20, reps: int = 3, batch: int = 0,
                 threads=(1, 2, 4), pipeline_batches: int = 20, n_train: int = 512,
                 cache_dir: str = "data", breakdown: bool = True, with_torch: bool = False,
                 torch_steps: int = 0, log=print) -> dict[str, Any]:
    """Measures config ``name`` (module docstring); returns a row with :data:`RESULT_FIELDS`
    (and :data:`TORCH_FIELDS` with ``with_torch``). Times: seconds (``_s``), milliseconds
    (``_ms``); rates per second; memory in bytes; FLOPs per call."""
    from flax import nnx

    from spectrax.data import pipeline
    from spectrax.models.registry import compute_dtype
    from spectrax.nn.attention import default_implementation

    load_start = loadavg()
    spec = CONFIGS[name]
    config, data_dir, manifest, trainer, idx = prepare(name, batch=batch, n_train=n_train,
                                                       cache_dir=cache_dir)
    host = fixed_batches(config, data_dir, idx)
    dev = [pipeline.to_global(b, trainer.batch_sharding) for b in host]
    length = host[0].num_pixels
    tokens = spec.tokens(config, length)
    bsz = config.batch_size
    log(f"[{name}] batch {bsz} x {length} px, {tokens} tokens/spectrum; compiling the step")

    # -- the training step ----------------------------------------------------------------
    step, compile_s, mem_text = trainer.compile(dev[0])
    step_flops = F.xla_flops(step)
    mem = F.memory_fields(step)
    state = trainer.init_state()
    params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state["params"])))
    t0 = time.perf_counter()
    state, logs = step(state, dev[0])
    jax.block_until_ready(state)
    first_step_s = time.perf_counter() - t0
    state, logs = step(state, dev[1 % len(dev)])  # second warm-up: steady-state buffers
    jax.block_until_ready(state)
    holder = {"state": state}

    def train_call(i):
        holder["state"], _ = step(holder["state"], dev[i % len(dev)])
        return holder["state"]

    # -- breakdown: the task's loss (forward) and its value-and-gradient (forward + backward),
    # jitted apart, compiled and warmed up here so their blocks can be timed next to the step's.
    fwdbwd_flops = breakdown_compile = None
    breakdown_fns: dict[str, tuple[Any, int]] = {}
    args = lambda i: (holder["state"], dev[i % len(dev)])  # noqa: E731
    if breakdown:
        key = jax.random.key(config.seed)

        def loss_of(params_, other, batch_):
            model = nnx.merge(trainer.graphdef, params_, trainer.rng_template, other, copy=True)
            nnx.reseed(model, dropout=key)
            extra = {"rng": jax.random.fold_in(key, 1)} if trainer.task_uses_rng else {}
            return trainer.task.loss(model, batch_, train=True, **extra)[0]

        fwd = jax.jit(lambda st, b: loss_of(st["params"], st["other"], b))
        fwdbwd = jax.jit(lambda st, b: jax.value_and_grad(loss_of)(st["params"], st["other"],
                                                                   b))
        breakdown_compile = 0.0
        for part, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
            t0 = time.perf_counter()
            compiled = fn.lower(*args(0)).compile()
            breakdown_compile += time.perf_counter() - t0
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args(0)))
            breakdown_fns[part] = (compiled,
                                   _calls_per_block(time.perf_counter() - t0, steps))
        fwdbwd_flops = F.xla_flops(breakdown_fns["fwdbwd"][0])

    # PyTorch baselines are built and warmed up (torch.compile compiles) first, so that their
    # timed blocks can alternate with spectrax's: on a machine shared with other jobs the load
    # drifts, and paired blocks keep it from favouring whichever framework ran in a quiet spell.
    # The breakdown's blocks alternate with the step's for the same reason.
    torch_info, torch_steps_fns, torch_batches = ({}, {}, [])
    if with_torch:
        from benchmarks.torch_models import time_block
        torch_info, torch_steps_fns, torch_batches = setup_torch(config, trainer, host, name,
                                                                 log)
    torch_blocks: dict[str, list[float]] = {m: [] for m in torch_steps_fns}
    parts: dict[str, list[float]] = {p: [] for p in breakdown_fns}
    per_step = []
    for _ in range(reps):
        per_step += _blocks(train_call, steps, 1)
        for mode, fn in torch_steps_fns.items():
            torch_blocks[mode].append(time_block(fn, torch_batches, torch_steps or steps))
        for part, (compiled, calls) in breakdown_fns.items():
            parts[part] += _blocks(lambda i, c=compiled: c(*args(i)), calls, 1)
    state = holder["state"]
    loss = float(jax.device_get(logs["loss"]))
    if not np.isfinite(loss):
        raise FloatingPointError(f"{name}: non-finite loss {loss} in the benchmark step")
    step_s = statistics.median(per_step)
    log(f"[{name}] step {step_s * 1e3:.1f} ms (compile {compile_s:.1f} s)")
    if with_torch:
        torch_info.update(torch_results(torch_blocks, per_step, bsz, name, log))
        torch_steps_fns.clear()  # free the PyTorch models before the next measurements
    # Shares of the step, each the median over repetitions of a within-repetition difference.
    # Noise (or XLA fusing the update into the backward pass of the whole step) can make the
    # optimiser's share come out slightly negative when it is small.
    fwd_s = bwd_s = opt_s = None
    if breakdown_fns:
        fwd_s = statistics.median(parts["fwd"])
        bwd_s = statistics.median(b - f for f, b in zip(parts["fwd"], parts["fwdbwd"]))
        opt_s = statistics.median(s_ - b for s_, b in zip(per_step, parts["fwdbwd"]))
        log(f"[{name}] forward {fwd_s * 1e3:.1f} ms, backward {bwd_s * 1e3:.1f} ms, "
            f"optimiser {opt_s * 1e3:.1f} ms")

    # -- inference ------------------------------------------------------------------------
    predict = jax.jit(lambda st, b: trainer.task.predict(trainer.model(st), b))
    predict_compile, predict_s, _ = _timed_function(
        predict, lambda i: (state, dev[i % len(dev)]), steps, reps)
    predict_tokens = (spec.predict_tokens(config, trainer.task, length)
                      if spec.predict_tokens else tokens)
    log(f"[{name}] predict {predict_s * 1e3:.1f} ms per batch")

    # -- the input pipeline alone ---------------------------------------------------------
    pipe = {str(t): bench_pipeline(config, data_dir, idx, trainer.batch_sharding, int(t),
                                   pipeline_batches) for t in threads}
    train_rate = bsz / step_s
    configured = str(config.data.num_threads)
    pipe_rate = pipe.get(configured, max(pipe.values()))
    log(f"[{name}] pipeline " + ", ".join(f"{v:.0f}/s ({t} threads)" for t, v in pipe.items()))

    info = machine()
    peak = F.device_peak_flops(info["device_kind"])
    row: dict[str, Any] = {
        "config": name, "model": config.model.name, "variant": config.model.variant,
        "task": config.task, "batch": bsz, "pixels": length, "tokens_per_spectrum": tokens,
        "token_definition": spec.token_definition, "params": params,
        "dtype": compute_dtype(config.model.dtype), "attention": default_implementation(), "steps": steps, "reps": reps,
        "compile_s": _round(compile_s), "first_step_s": _round(first_step_s, 3),
        "step_ms": _round(step_s * 1e3, 1), "step_ms_min": _round(min(per_step) * 1e3, 1),
        "step_ms_max": _round(max(per_step) * 1e3, 1),
        "train_spectra_per_s": _round(train_rate, 1),
        "train_tokens_per_s": _round(train_rate * tokens, 0),
        "fwd_ms": _round(fwd_s and fwd_s * 1e3, 1),
        "bwd_ms": _round(bwd_s and bwd_s * 1e3, 1),
        "optimizer_ms": _round(opt_s and opt_s * 1e3, 1),
        "breakdown_compile_s": _round(breakdown_compile),
        "predict_compile_s": _round(predict_compile), "predict_ms": _round(predict_s * 1e3, 1),
        "predict_spectra_per_s": _round(bsz / predict_s, 1),
        "predict_tokens_per_spectrum": predict_tokens,
        "predict_tokens_per_s": _round(bsz / predict_s * predict_tokens, 0),
        "flops_per_step": step_flops, "fwdbwd_flops": fwdbwd_flops,
        "achieved_flops_per_s": _round(step_flops and step_flops / step_s, 0),
        "peak_flops_per_s": peak,
        "mfu": _round(F.mfu(step_flops, step_s, info["device_kind"]), 4),
        "peak_bytes": mem["peak_bytes"], "xla_peak_bytes": mem["xla_peak_bytes"], "memory": mem_text,
        "pipeline_spectra_per_s": {t: _round(v, 1) for t, v in pipe.items()},
        "pipeline_threads_configured": int(configured),
        "bottleneck": "pipeline" if pipe_rate < train_rate else "step",
        "pipeline_headroom": _round(pipe_rate / train_rate, 2),
        **info,
    }
    if with_torch:
        row.update(torch_info)
    row["loadavg_start"], row["loadavg_end"] = load_start, loadavg()
    return row


# ==============================================================================================
# PyTorch baselines
# ==============================================================================================
def _failure(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return "failed: " + (text[:200] + "..." if len(text) > 200 else text)


def setup_torch(config, trainer, host_batches, name: str, log=print):
    """Builds the PyTorch baseline of ``config.model`` twice (eager, torch.compile) on the same
    host batches, checks its parameter count, counts its forward + backward FLOPs and warms
    both up. Returns (fields, {mode: step}, torch batches); a torch.compile failure is recorded
    as ``torch_compile_status = 'failed: <reason>'`` and that mode left out."""
    import torch

    from benchmarks import torch_models as T

    out: dict[str, Any] = {k: None for k in TORCH_FIELDS}
    out["torch"] = torch.__version__
    if config.model.name not in T.TORCH_MODEL_NAMES:
        out["torch_compile_status"] = f"no PyTorch baseline for {config.model.name}"
        return out, {}, []
    torch.set_num_threads(os.cpu_count() or 1)
    out["torch_threads"] = torch.get_num_threads()
    batches = [T.batch_to_torch(b) for b in host_batches]
    o = config.optim

    def fresh():
        torch.manual_seed(config.seed)
        return T.build(config.model, trainer.task)

    model, loss_fn = fresh()
    out["torch_params"] = T.check_parameter_count(model, config.model)
    model.train()
    out["torch_fwdbwd_flops"] = F.torch_flops(lambda: loss_fn(model, batches[0]).backward())
    del model
    steps = {}
    for mode in ("eager", "compile"):
        try:
            if mode == "compile":
                torch._dynamo.reset()  # a fresh cache per model: no recompilation limits hit
            model, loss_fn = fresh()
            step = T.TorchTrainStep(model, loss_fn, lr=o.lr, weight_decay=o.weight_decay,
                                    clip_norm=o.clip_norm, compile=mode == "compile")
            t0 = time.perf_counter()
            first = T.warm_up(step, batches)
            warm = time.perf_counter() - t0
        except Exception as e:  # torch.compile: report, never abort the benchmark
            if mode == "eager":
                raise
            out["torch_compile_status"] = _failure(e)
            log(f"[{name}] torch.compile {out['torch_compile_status']}")
            continue
        steps[mode] = step
        if mode == "eager":
            out["torch_eager_first_step_s"] = _round(first, 3)
        else:
            out["torch_compile_status"] = "ok"
            # The first call compiles; what it took beyond the second (a normal step) is the
            # compile time.
            out["torch_compile_s"] = _round(first - (warm - first))
        log(f"[{name}] torch {mode} ready (first step {first:.1f} s)")
    return out, steps, batches


def torch_results(blocks: dict[str, list[float]], jax_blocks: list[float], batch: int,
                  name: str, log=print) -> dict[str, Any]:
    """Median step times of the PyTorch blocks and the spectrax / PyTorch ratio of training
    spectra/s: the median over repetitions of the ratio within each repetition (paired blocks,
    so a load change between repetitions cancels)."""
    out: dict[str, Any] = {}
    for mode, times in blocks.items():
        step_s = statistics.median(times)
        out[f"torch_{mode}_step_ms"] = _round(step_s * 1e3, 1)
        out[f"torch_{mode}_step_ms_min"] = _round(min(times) * 1e3, 1)
        out[f"torch_{mode}_step_ms_max"] = _round(max(times) * 1e3, 1)
        out[f"torch_{mode}_spectra_per_s"] = _round(batch / step_s, 1)
        out[f"ratio_vs_torch_{mode}"] = _round(statistics.median(
            t / j for t, j in zip(times, jax_blocks)), 2)
        log(f"[{name}] torch {mode}: {step_s * 1e3:.1f} ms/step, spectrax/torch "
            f"{out[f'ratio_vs_torch_{mode}']}")
    return out


# ==============================================================================================
# Reports
# ==============================================================================================
def _fmt(x, spec: str = ",.0f", none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def _giga(x) -> str:
    """x / 1e9 with two significant decimals below 10 (tiny models), one above."""
    if x is None:
        return "n/a"
    g = x / 1e9
    return format(g, ",.2f" if g < 10 else ",.1f")


def markdown(rows: list[dict], command: str) -> str:
    """The dated RESULTS.md section for ``rows`` (one run of this module)."""
    r0 = rows[0]
    loads = [r["loadavg_start"] for r in rows if r.get("loadavg_start")] + [
        r["loadavg_end"] for r in rows if r.get("loadavg_end")]
    load = (f"1-min load average {min(l[0] for l in loads):.1f}–{max(l[0] for l in loads):.1f}"
            if loads else "load average unknown")
    torch_v = next((r["torch"] for r in rows if r.get("torch")), None)
    lines = [
        f"## {r0['date'][:10]} — `{command}`",
        "",
        f"{r0['host']}: {r0['cpu_count']} CPU cores, {r0['devices']} × {r0['device_kind']} "
        f"({r0['platform']}), jax {r0['jax']}" + (f", torch {torch_v}" if torch_v else "")
        + f"; {load} during the run (a load above the core count means other jobs competed "
        "for the cores and the rates are lower bounds). Step = median of the timed blocks, "
        "compile excluded; fwd / bwd / opt = forward, backward and optimiser (clipping, AdamW, "
        "non-finite guards) shares of it, timed in alternating blocks; MFU n/a where the device "
        "has no peak in the table (CPU); peak memory = arguments + outputs + temporaries − "
        "aliased of the compiled step. Raw rows: `results.jsonl`.",
        "",
        "| config | batch × px | tokens/spectrum | params | compile s | step ms (fwd / bwd / "
        "opt) | train spectra/s | train tokens/s | predict spectra/s | GFLOP/step | GFLOP/s "
        "| MFU | peak memory MiB | pipeline spectra/s (threads) | bottleneck |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bd = (f" ({_fmt(r['fwd_ms'], '.0f')} / {_fmt(r['bwd_ms'], '.0f')} / "
              f"{_fmt(r['optimizer_ms'], '.0f')})" if r.get("fwd_ms") is not None else "")
        pipe = ", ".join(f"{v:,.0f} ({t})" for t, v in r["pipeline_spectra_per_s"].items())
        lines.append(
            f"| {r['config']} | {r['batch']} × {r['pixels']} | {r['tokens_per_spectrum']} | "
            f"{r['params']:,} | {_fmt(r['compile_s'], '.1f')} | {_fmt(r['step_ms'], ',.0f')}"
            f"{bd} | {_fmt(r['train_spectra_per_s'], ',.1f')} | "
            f"{_fmt(r['train_tokens_per_s'])} | {_fmt(r['predict_spectra_per_s'], ',.1f')} | "
            f"{_giga(r['flops_per_step'])} | {_giga(r['achieved_flops_per_s'])} | "
            f"{_fmt(r['mfu'] and 100 * r['mfu'], '.1f') + ('%' if r['mfu'] else '')} | "
            f"{_fmt(r['peak_bytes'] and r['peak_bytes'] / 2**20, ',.0f')} | {pipe} | "
            f"{r['bottleneck']} ({_fmt(r['pipeline_headroom'], ',.0f')}×) |")
    torch_rows = [r for r in rows if r.get("torch_eager_step_ms") is not None]
    if torch_rows:
        lines += [
            "",
            "PyTorch baselines (`benchmarks/torch_models.py`, same architecture, parameter "
            "count asserted equal, same batches, float32, forward + backward + clipping + "
            f"AdamW, {torch_rows[0]['torch_threads']} threads), timed in blocks alternating "
            "with spectrax's. Ratio = spectrax spectra/s ÷ PyTorch spectra/s (> 1: spectrax "
            "faster), median of the per-repetition ratios. torch.compile covers model + loss "
            "(the optimiser stays eager); its compile s = first call − a normal step, shorter "
            "when inductor's on-disk cache holds an earlier run's kernels. FLOPs: XLA's count of "
            "the jax forward + backward (elementwise ops included) against torch's "
            "FlopCounterMode (matmuls, convolutions, attention).",
            "",
            "| config | params | spectrax step ms | torch eager step ms | torch.compile step ms "
            "(compile s) | spectrax / eager | spectrax / compile | fwd+bwd GFLOP xla / torch |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in torch_rows:
            if r["torch_compile_status"] == "ok":
                comp = (f"{_fmt(r['torch_compile_step_ms'], ',.0f')} "
                        f"({_fmt(r['torch_compile_s'], '.0f')})")
                comp_ratio = _fmt(r["ratio_vs_torch_compile"], ".2f")
            else:
                comp, comp_ratio = r["torch_compile_status"], "n/a"
            fl = f"{_giga(r['fwdbwd_flops'])} / {_giga(r['torch_fwdbwd_flops'])}"
            lines.append(
                f"| {r['config']} | {r['torch_params']:,} | {_fmt(r['step_ms'], ',.0f')} | "
                f"{_fmt(r['torch_eager_step_ms'], ',.0f')} | {comp} | "
                f"{_fmt(r['ratio_vs_torch_eager'], '.2f')} | {comp_ratio} | {fl} |")
    return "\n".join(lines) + "\n"


_SECTION = re.compile(r"<!-- benchmarks\.run (?P<key>[^>]*) -->.*?<!-- /benchmarks\.run -->\n?",
                      re.S)


def update_results_md(path: Path, section: str, key: str) -> None:
    """Adds ``section`` to ``path`` between markers named ``key``; a section with the same key
    (same date and host) written by an earlier run is replaced, anything else is kept."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Throughput results\n"
    block = f"<!-- benchmarks.run {key} -->\n{section}<!-- /benchmarks.run -->\n"
    existing = [m for m in _SECTION.finditer(text) if m.group("key") == key]
    if existing:
        m = existing[-1]
        text = text[:m.start()] + block + text[m.end():]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def run_benchmarks(configs=DEFAULT_CONFIGS, *, out: str | None = None,
                   results_md: str | None = None, command: str = "python -m benchmarks.run",
                   **kwargs) -> list[dict]:
    """Runs :func:`bench_config` for every name in ``configs``; appends the rows to ``out``
    (JSON lines) and a section to ``results_md`` when given. ``kwargs`` go to bench_config."""
    rows = []
    for name in configs:
        row = bench_config(name, **kwargs)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if out:  # row by row: a crash in a later config keeps the earlier results
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
        jax.clear_caches()  # compiled steps of earlier configs would only hold memory
    if results_md and rows:
        update_results_md(Path(results_md), markdown(rows, command),
                          f"{rows[0]['date'][:10]} {rows[0]['host']}")
    return rows


def main(argv):
    del argv
    from absl import flags
    f = flags.FLAGS
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:])
    rows = run_benchmarks(
        f.configs, out=f.out or None, results_md=f.results_md or None, command=command.strip(),
        steps=f.steps, reps=f.reps, batch=f.batch, threads=tuple(int(t) for t in f.threads),
        pipeline_batches=f.pipeline_batches, n_train=f.n_train, cache_dir=f.cache_dir,
        breakdown=f.breakdown, with_torch=f.torch, torch_steps=f.torch_steps)
    print("\n" + markdown(rows, command.strip()))


def _define_flags():
    from absl import flags
    flags.DEFINE_list("configs", list(DEFAULT_CONFIGS), f"Benchmark configs: {sorted(CONFIGS)}.")
    flags.DEFINE_integer("steps", 20, "Steps per timed block.")
    flags.DEFINE_integer("reps", 3, "Timed blocks (repetitions); the median is reported.")
    flags.DEFINE_integer("batch", 0, "Global batch size; 0 = each config's own.")
    flags.DEFINE_bool("torch", False, "Also time the PyTorch baselines (eager, torch.compile).")
    flags.DEFINE_integer("torch_steps", 0, "Steps per timed PyTorch block; 0 = --steps.")
    flags.DEFINE_list("threads", ["1", "2", "4"], "Grain reader threads for the pipeline.")
    flags.DEFINE_integer("pipeline_batches", 20, "Batches timed per pipeline measurement.")
    flags.DEFINE_integer("n_train", 512, "Simulated training spectra per config.")
    flags.DEFINE_string("cache_dir", "data", "Where simulated data are cached.")
    flags.DEFINE_bool("breakdown", True, "Time forward and forward+backward apart.")
    flags.DEFINE_string("out", "benchmarks/results.jsonl", "JSON lines appended here; '' = none.")
    flags.DEFINE_string("results_md", "benchmarks/RESULTS.md",
                        "Markdown file given a dated section; '' = none.")


if __name__ == "__main__":
    runtime.configure()  # XLA:CPU flag and log levels, before any computation
    from absl import app
    _define_flags()
    app.run(main)
