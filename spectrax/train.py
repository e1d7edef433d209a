r"""Training entry point: ``python -m spectrax.train --config=configs/specpt_bgs.py[:variant=...]``.

One loop for every model. It knows a model only through :mod:`spectrax.models.registry` and a
task only through the interface of :mod:`spectrax.tasks`; data come from
:mod:`spectrax.data.pipeline`, meshes from :mod:`spectrax.sharding`, checkpoints from
:mod:`spectrax.checkpoint`.

Flags: ``--config`` (ml_collections file with ``:arg`` variants; override any key with
``--config.key=value``), ``--workdir`` (default ``runs/<name>``), ``--dry_run`` (print the
parameter table abstractly and exit; no parameter memory is allocated).
"""
from __future__ import annotations

import collections
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags
from tqdm import tqdm

from spectrax import runtime

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and figures go.")
flags.DEFINE_bool("dry_run", False, "Print the model's parameter table and exit.")


# ==============================================================================================
# Model state: the pure pytrees a jitted step takes and returns
# ==============================================================================================
def cosine_warm_restarts(peak: float, period: int, eta_min: float, warmup: int = 0):
    """PyTorch's CosineAnnealingWarmRestarts with T_mult = 1 (SpectraFM's schedule), per step:
    lr = eta_min + ½ (peak − eta_min)(1 + cos(π · (t mod T) / T)), T = ``period`` steps, after
    an optional linear warm-up of ``warmup`` steps (t counts from its end)."""
    period = max(int(period), 1)

    def schedule(step):
        t = jnp.maximum(step - warmup, 0) % period
        lr = eta_min + 0.5 * (peak - eta_min) * (1.0 + jnp.cos(jnp.pi * t / period))
        if warmup:
            lr = jnp.where(step < warmup, peak * step / warmup, lr)
        return lr

    return schedule


def build_optimizer(config, num_steps: int, freeze_labels=None, steps_per_epoch: int = 1):
    """AdamW (or SGD) with warm-up + schedule, gradient clipping and optional frozen subtrees.

    Schedules: ``cosine`` (one decay to 1 % over the run), ``constant``, ``plateau``, and
    ``cosine_restarts`` (warm restarts every ``optim.t0_epochs`` epochs of ``steps_per_epoch``
    steps, down to ``optim.eta_min``). Frozen parameters go through ``optax.set_to_zero`` so
    they stay bitwise unchanged (no weight decay either).
    """
    o = config.optim
    warm = min(int(o.warmup_steps), max(num_steps - 1, 0))
    if o.schedule == "cosine_restarts":
        lr = cosine_warm_restarts(o.lr, o.t0_epochs * steps_per_epoch, o.eta_min, warm)
    elif o.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, o.lr, warm, max(num_steps, warm + 1),
                                                end_value=o.lr * 0.01)
    elif o.schedule in ("constant", "plateau"):
        lr = optax.join_schedules([optax.linear_schedule(0.0, o.lr, warm),
                                   optax.constant_schedule(o.lr)], [warm]) if warm else o.lr
    else:
        raise ValueError(f"config.optim.schedule {o.schedule!r}: use cosine, cosine_restarts, "
                         "constant or plateau")
    if o.name == "adamw":
        inner = optax.adamw(lr, weight_decay=o.weight_decay)
    elif o.name == "sgd":
        inner = optax.sgd(lr, momentum=0.9)
    else:
        raise ValueError(f"config.optim.name {o.name!r}: use adamw or sgd")
    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm else []
    parts.append(inner)
    if o.schedule == "plateau":
        # ReduceLROnPlateau as in the reference autoencoder; sees the loss via `value=`.
        parts.append(optax.contrib.reduce_on_plateau(patience=o.plateau_patience, factor=0.5))
    tx = optax.chain(*parts)
    if freeze_labels is not None:
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, freeze_labels)
    return tx, lr


def freeze_labels_for(params, prefixes) -> Any:
    """'frozen' for parameters whose path starts with one of ``prefixes``, else 'train'."""
    from spectrax.checkpoint import path_str

    def label(path, _):
        p = path_str(path)
        return "frozen" if any(p == f or p.startswith(f + "/") for f in prefixes) else "train"

    return jax.tree_util.tree_map_with_path(label, params)


class Trainer:
    """Holds the static pieces of a run (graph definition, task, optimiser, mesh, shardings)
    and exposes pure jitted functions of the state pytree."""

    def __init__(self, config, mesh, num_steps: int, steps_per_epoch: int | None = None):
        from spectrax import sharding, tasks
        from spectrax.models import registry

        self.config, self.mesh, self.num_steps = config, mesh, num_steps
        self.task = tasks.get_task(config.task, **config.task_kwargs.to_dict())
        self.model_fn = lambda seed: registry.build_model(config.model, rngs=nnx.Rngs(
            params=seed, dropout=seed + 1))
        abstract_model = nnx.eval_shape(lambda: self.model_fn(config.seed))
        self.graphdef, abstract_params, _, _ = nnx.split(abstract_model, nnx.Param,
                                                         nnx.RngState, ...)
        self.frozen = tuple(config.optim.freeze) or registry.default_frozen(config.model)
        labels = freeze_labels_for(abstract_params, self.frozen) if self.frozen else None
        if steps_per_epoch is None:  # the simulated train split's size
            steps_per_epoch = max(1, config.data.n_train // config.batch_size)
        self.tx, self.lr_schedule = build_optimizer(config, num_steps, labels, steps_per_epoch)
        self.uses_value = config.optim.schedule == "plateau"
        # Tasks that sample (SpectraFM: pixels and the requested label) take a per-step key.
        self.task_uses_rng = getattr(self.task, "uses_rng", False)

        self.abstract_state = jax.eval_shape(self._init)
        self.state_shardings = sharding.tree_shardings(self.abstract_state, mesh)
        self.batch_sharding = sharding.batch_sharding(mesh)
        # RNG streams are re-derived from (seed, step) each step, so they are not part of the
        # checkpointed state; this template only gives `merge` something concrete.
        self.rng_template = jax.jit(lambda: nnx.split(self.model_fn(config.seed), nnx.Param,
                                                      nnx.RngState, ...)[2])()
        self.base_key = jax.random.key(config.seed)
        # One jitted evaluation function per run: re-wrapping the bound method at every
        # evaluation would recompile it each time (eval_every).
        self.jitted_eval_step = jax.jit(self.eval_step)

    # -- state ----------------------------------------------------------------------------
    def _init(self):
        model = self.model_fn(self.config.seed)
        _, params, _, other = nnx.split(model, nnx.Param, nnx.RngState, ...)
        return {"params": params, "other": other, "opt": self.tx.init(params),
                "step": jnp.zeros((), jnp.int32), "bad_step": jnp.full((), -1, jnp.int32)}

    def init_state(self):
        return jax.jit(self._init, out_shardings=self.state_shardings)()

    def abstract_with_shardings(self):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state, self.state_shardings)

    def model(self, state, *, rngs=None):
        """A Module view of ``state`` (for eval and tools)."""
        return nnx.merge(self.graphdef, state["params"], rngs or self.rng_template,
                         state["other"], copy=True)

    # -- steps ----------------------------------------------------------------------------
    def train_step(self, state, batch):
        step = state["step"]
        key = jax.random.fold_in(self.base_key, step)

        def loss_fn(params, other, rngs):
            model = nnx.merge(self.graphdef, params, rngs, other, copy=True)
            nnx.reseed(model, dropout=key)
            extra = {"rng": jax.random.fold_in(key, 1)} if self.task_uses_rng else {}
            loss, aux = self.task.loss(model, batch, train=True, **extra)
            _, _, _, new_other = nnx.split(model, nnx.Param, nnx.RngState, ...)
            return loss, (aux, new_other)

        (loss, (aux, new_other)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["other"], self.rng_template)
        extra = {"value": loss} if self.uses_value else {}
        grad_norm = optax.tree.norm(grads)
        finite_gradient = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(params, opt, grads):
            updates, new_opt = self.tx.update(grads, opt, params, **extra)
            new_params = optax.apply_updates(params, updates)
            if not self.config.optim.guard_update:
                return new_params, new_opt, jnp.array(True)
            # Finite gradients can still give an overflowing update (an absurd learning rate);
            # with optim.guard_update the parameters then stay as they were (the optimiser
            # moments, functions of the finite gradients, advance). It costs a reduction over
            # the update and a select over the parameters: 0.3 s of SpecPT 'small''s 1 s CPU step.
            finite_update = jnp.isfinite(optax.tree.norm(updates))
            new_params = jax.tree.map(lambda new, old: jnp.where(finite_update, new, old),
                                      new_params, params)
            return new_params, new_opt, finite_update

        # A step whose loss or gradient is non-finite changes nothing and costs no optimiser
        # work (as optax.apply_if_finite): lax.cond skips the update instead of computing it and
        # selecting the old state afterwards. No NaN from the data reaches the parameters; the
        # host sees `bad_step` at the next log and stops or carries on as configured.
        new_params, new_opt, finite_update = jax.lax.cond(
            finite_gradient, apply, lambda params, opt, grads: (params, opt, jnp.array(False)),
            state["params"], state["opt"], grads)
        ok = finite_gradient & finite_update
        new_state = {
            "params": new_params,
            "other": jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_other,
                                  state["other"]),
            "opt": new_opt,
            "step": step + 1,
            "bad_step": jnp.where(ok | (state["bad_step"] >= 0), state["bad_step"], step),
        }
        lr = self.lr_schedule(step) if callable(self.lr_schedule) else self.lr_schedule
        logs = {"loss": loss, "grad_norm": grad_norm, "lr": jnp.asarray(lr, jnp.float32), **aux}
        return new_state, logs

    def eval_step(self, state, batch):
        model = nnx.merge(self.graphdef, state["params"], self.rng_template, state["other"],
                          copy=True)
        loss, _ = self.task.loss(model, batch, train=False)
        return self.task.predict(model, batch), loss

    def compile(self, example_batch):
        """Ahead-of-time compiles the train step; returns (compiled, seconds, memory text)."""
        abstract_batch = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), example_batch)
        t0 = time.perf_counter()
        jitted = jax.jit(self.train_step, in_shardings=(self.state_shardings, None),
                         out_shardings=(self.state_shardings, None), donate_argnums=0)
        compiled = jitted.lower(self.abstract_with_shardings(), abstract_batch).compile()
        seconds = time.perf_counter() - t0
        return compiled, seconds, memory_text(compiled)


def memory_text(compiled) -> str:
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return "memory analysis unavailable on this backend"
    if m is None:
        return "memory analysis unavailable on this backend"
    gib = 1 / 2**30
    return (f"per-device memory: arguments {m.argument_size_in_bytes * gib:.3f} GiB, outputs "
            f"{m.output_size_in_bytes * gib:.3f} GiB, temporaries {m.temp_size_in_bytes * gib:.3f} "
            f"GiB, aliased {m.alias_size_in_bytes * gib:.3f} GiB")


# ==============================================================================================
# Dry run: the parameter table, abstractly
# ==============================================================================================
def dry_run(config) -> dict:
    from spectrax.models import registry

    abstract = nnx.eval_shape(lambda: registry.build_model(config.model, rngs=nnx.Rngs(0)))
    table = registry.parameter_table(abstract, config.model)
    frozen = tuple(config.optim.freeze) or registry.default_frozen(config.model)
    print(f"{config.name}: model {config.model.name} variant={config.model.variant or '-'}"
          f"{' head=' + config.model.head if config.model.head else ''}")
    print(f"{'module':<40}{'parameters':>18}  note")
    for row in table["rows"]:
        note = []
        if any(row["path"] == f or row["path"].startswith(f + "/") for f in frozen):
            note.append("frozen")
        if row["excluded"]:
            note.append("not counted (held outside the reference's registered modules)")
        print(f"{row['path']:<40}{row['count']:>18,}  {', '.join(note)}")
    print("-" * 70)
    print(f"Total parameters: {table['total']:,}")
    trainable = sum(r["count"] for r in table["rows"]
                    if not any(r["path"] == f or r["path"].startswith(f + "/") for f in frozen))
    print(f"Trainable under this config: {trainable:,}"
          f"{'  (frozen: ' + ', '.join(frozen) + ')' if frozen else ''}")
    return {"total": table["total"], "trainable": trainable}


# ==============================================================================================
# The run
# ==============================================================================================
def default_workdir(config) -> Path:
    name = config.name + (f"-{config.model.variant}" if config.model.variant else "")
    return Path("runs") / name


def _select_labels(batch, idx):
    if batch.labels.shape[1] == len(idx) and list(idx) == list(range(len(idx))):
        return batch
    return batch.replace(labels=batch.labels[:, idx], label_mask=batch.label_mask[:, idx])


def label_indices(manifest, task) -> list[int]:
    missing = [n for n in task.label_names if n not in manifest.label_names]
    if missing:
        raise ValueError(f"task needs labels {missing} but the shards provide "
                         f"{manifest.label_names}")
    return [manifest.label_names.index(n) for n in task.label_names]


class _Preemption:
    """Turns SIGTERM (what schedulers send before preempting) into a clean save-and-exit.

    Installed at the very start of :func:`train`, so a SIGTERM that arrives while the data are
    prepared or the step compiles is not fatal: the loop sees the flag after its next step,
    saves and exits 0. :meth:`restore` puts the previous handler back (train() may run inside a
    longer-lived process such as a test runner or a notebook).
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread (e.g. inside a test runner thread)
            pass

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, steps_this_run: int, boundary: bool) -> bool:
        """Whether to save and exit after this step; with several processes, every process
        gets the same answer at the same step (one saving while another steps would hang).

        Once ``jax.distributed`` is initialised, SIGTERM reaches JAX's preemption notifier
        instead of :meth:`_handle`; its sync protocol picks a step every process reaches, so
        it is asked at every step, with a counter that starts at 1 in every run (a notice that
        arrives before the first step sets the sync point to 1). The flag :meth:`_handle` sets
        (SIGTERM before initialisation, or the preemption service turned off) is OR-reduced
        over processes at ``boundary`` steps (log steps, which every process reaches).
        """
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        try:
            if multihost_utils.reached_preemption_sync_point(steps_this_run):
                return True
        except RuntimeError:  # jax_enable_preemption_service is off
            pass
        return boundary and bool(np.any(multihost_utils.process_allgather(
            np.int32(self.requested))))

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


# A logged gradient norm this many times the running median of earlier ones is reported.
GRAD_SPIKE_FACTOR = 10.0


class GradNormMonitor:
    """Spots exploding gradient norms from values the log step has already fetched.

    Keeps the last ``window`` logged per-step norms; a new norm above ``factor`` × their median
    (once ``min_history`` are known) yields a warning naming the step. Host-side and only fed on
    log steps, so it costs nothing on the device.
    """

    def __init__(self, factor: float = GRAD_SPIKE_FACTOR, window: int = 200,
                 min_history: int = 4):
        self.factor, self.min_history = factor, min_history
        self.history: collections.deque = collections.deque(maxlen=window)

    def update(self, steps: list[int], norms: list[float]) -> list[str]:
        """Feeds one log window (step numbers, 1-based, and their norms); returns warnings."""
        warnings = []
        for step, norm in zip(steps, norms):
            if not np.isfinite(norm):
                continue  # non-finite steps are the job of the bad_step guard
            if len(self.history) >= self.min_history:
                med = float(np.median(self.history))
                if med > 0 and norm > self.factor * med:
                    warnings.append(f"warning: exploding gradient norm {norm:.4g} at step {step} "
                                    f"({norm / med:.1f}x the running median {med:.4g} of "
                                    "logged norms)")
            self.history.append(norm)
        return warnings


# ==============================================================================================
# Memory: refuse a config that cannot fit before the first step
# ==============================================================================================
def required_bytes(compiled) -> int | None:
    """Per-device bytes the compiled step needs (arguments + outputs + temporaries − aliased:
    donated state is counted once), or None when the backend has no memory analysis."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def available_bytes(config) -> tuple[int | None, str]:
    """(per-device bytes available, where that figure comes from).

    ``config.memory_limit_gb`` > 0 wins; else the accelerator's ``bytes_limit``; else (CPU)
    the host's available RAM shared by the local devices.
    """
    limit_gb = float(config.get("memory_limit_gb", 0) or 0)
    if limit_gb > 0:
        return int(limit_gb * 2**30), f"config.memory_limit_gb={limit_gb:g}"
    dev = jax.local_devices()[0]
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # CPU devices may not report memory statistics
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{dev.device_kind} bytes_limit"
    try:
        import psutil
    except ImportError:
        return None, "unknown (no psutil)"
    return (int(psutil.virtual_memory().available // max(jax.local_device_count(), 1)),
            "host RAM available / local devices")


def check_memory(compiled, config) -> None:
    """Raises MemoryError, quoting the compiled memory analysis, when the step cannot fit."""
    need = required_bytes(compiled)
    have, source = available_bytes(config)
    if need is None or have is None or need <= have:
        return
    raise MemoryError(
        f"this config needs {need / 2**30:.3f} GiB per device but {have / 2**30:.3f} GiB are "
        f"available ({source}); {memory_text(compiled)}. Lower config.batch_size, use a "
        "smaller model variant or shard parameters over more devices (config.mesh.fsdp)")


def train(config, workdir: str | Path | None = None) -> dict:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns metrics.

    SIGTERM at any point saves a checkpoint after the current step and exits with status 0.
    """
    preempt = _Preemption()  # first: a SIGTERM during set-up must not kill the run
    try:
        return _train(config, workdir, preempt)
    finally:
        preempt.restore()


def _train(config, workdir, preempt: _Preemption) -> dict:
    """The body of :func:`train` (``preempt`` says whether SIGTERM has arrived)."""
    from spectrax import checkpoint, sharding
    from spectrax.data import pipeline, shards
    from spectrax.models import registry
    from spectrax.prepare import ensure_data

    sharding.initialize_distributed()
    is_main = jax.process_index() == 0
    workdir = Path(workdir or config.workdir or default_workdir(config))
    workdir.mkdir(parents=True, exist_ok=True)
    if is_main:
        print(f"spectrax: {config.name} -> work directory {workdir.absolute()}", flush=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    # -- data -----------------------------------------------------------------------------
    data_dir = ensure_data(config.data)
    manifest = shards.read_manifest(data_dir)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    n_dev, n_proc = jax.device_count(), jax.process_count()
    if config.batch_size % n_dev:
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                         f"{n_dev} devices of the mesh")
    local_batch = config.batch_size // n_proc

    trainer = Trainer(config, mesh, config.num_steps,
                      steps_per_epoch=max(1, manifest.count("train") // config.batch_size))
    trainer.task.bind_labels(manifest.label_names)
    idx = label_indices(manifest, trainer.task)
    buckets = pipeline.batch_lengths(config.data, data_dir)  # one fixed length: one bucket
    registry.check_input_length(config.model, max(buckets))

    # -- state: resume, or initialise (optionally from another run) ----------------------
    ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
    plan = pipeline.bucket_plan(shards.record_lengths(data_dir, "train"), buckets,
                                where=f"{data_dir} split 'train'")
    if is_main and len(buckets) > 1:
        print(f"length buckets: {json.dumps(plan.summary())}", flush=True)
    data_iter = pipeline.train_iterator(data_dir, batch_size=local_batch, seed=config.seed,
                                        buckets=buckets, num_threads=config.data.num_threads)
    if ckpt.latest_step() is not None:
        state, data_state, old_meta = ckpt.restore(trainer.abstract_with_shardings())
        data_iter.set_state(data_state)
        trainer.task.load_state(old_meta.get("task_state"))
        if is_main:
            print(f"resumed from step {int(state['step'])} ({ckpt.directory})", flush=True)
    else:
        state = trainer.init_state()
        pretrained_task_state = None
        if config.model.get("init_from"):
            state = load_backbone_weights(state, trainer, config.model.init_from)
        if config.init.from_workdir:
            state, pretrained_task_state = load_pretrained(
                state, trainer, config.init.from_workdir, config.init.prefix,
                target=config.init.target or None)
        # Fine-tunes reuse the statistics their base model was trained with (SpectraFM,
        # label standardisation); a fresh model takes them from this train split.
        trainer.task.fit_state(manifest.stats.get("labels", {}), data_dir)
        trainer.task.load_state(pretrained_task_state)
    start = int(state["step"])

    def next_global():
        host = next(data_iter)
        return host, pipeline.to_global(_select_labels(host, idx), trainer.batch_sharding)

    t_start, steps_timed = None, 0
    compiled: dict[tuple, Any] = {}
    compile_total = compile_in_loop = 0.0  # the latter: inside the timed region (new buckets)

    def step_for(batch):
        """The train step compiled for this batch's shape (one per length bucket)."""
        nonlocal compile_total, compile_in_loop
        key = tuple(batch.flux.shape)
        if key not in compiled:
            fn, seconds, mem = trainer.compile(batch)
            compile_total += seconds
            if t_start is not None:
                compile_in_loop += seconds
            if is_main:
                print(f"compiled train step for batches of {key} in {seconds:.1f} s; {mem}",
                      flush=True)
            check_memory(fn, config)  # before any step: fail in seconds, not at the first OOM
            compiled[key] = fn
        return compiled[key]

    host_batch, batch = next_global()
    step_for(batch)

    # -- loop -----------------------------------------------------------------------------
    logger = MetricLogger(workdir, enabled=is_main)
    grad_monitor = GradNormMonitor()
    recent_ids = collections.deque(maxlen=max(config.log_every, 1))
    pending: list[dict] = []
    meta = {"config": config.name, "task": config.task, "model": config.model.to_dict(),
            "data_dir": str(data_dir), "label_names": list(trainer.task.label_names),
            "task_state": trainer.task.state()}
    bar = tqdm(total=config.num_steps, initial=start, desc=config.name, disable=not is_main,
               dynamic_ncols=True, mininterval=1.0)
    stop = False  # SIGTERM: save after this step and exit (agreed by every process)
    for step in range(start, config.num_steps):
        if step > start:
            host_batch, batch = next_global()
        recent_ids.append((step, host_batch.ids[host_batch.valid]))
        state, logs = step_for(batch)(state, batch)
        pending.append(logs)
        bar.update(1)
        done = step + 1
        if t_start is None:  # the first step includes dispatch warm-up: time from the second
            jax.block_until_ready(state["step"])
            t_start = time.perf_counter()
        else:
            steps_timed += 1
        stop = preempt.agreed(done - start, done % config.log_every == 0
                              or done == config.num_steps)
        if done % config.log_every == 0 or done == config.num_steps or stop:
            logged = jax.device_get(pending)
            pending = []
            _check_finite(state, config, recent_ids)
            for warning in grad_monitor.update(
                    list(range(done - len(logged) + 1, done + 1)),
                    [float(l["grad_norm"]) for l in logged]):
                if is_main:
                    print(warning, flush=True)
            row = {k: float(np.mean([l[k] for l in logged])) for k in logged[0]}
            row["step"] = done
            if steps_timed:
                row["train_spectra_per_s"] = steps_timed * config.batch_size / (
                    time.perf_counter() - t_start - compile_in_loop)
            logger.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4g}")
        if config.eval_every and done % config.eval_every == 0 and done != config.num_steps:
            ev = evaluate(trainer, state, data_dir, "val" if "val" in manifest.splits else "test",
                          config, idx)
            logger.write({"step": done, "eval_loss": ev["loss"],
                          **{f"val_{k}": v for k, v in ev["metrics"].items()}})
        if done % config.ckpt_every == 0 or done == config.num_steps or stop:
            _refuse_nonfinite_parameters(state, done)
            ckpt.save(done, state, data_iter.get_state(), meta, force=True)
        if stop:
            ckpt.wait()
            bar.close()
            print(f"SIGTERM: saved checkpoint at step {done}; exiting (restart to resume).",
                  flush=True)
            ckpt.close()
            sys.exit(0)
    bar.close()
    jax.block_until_ready(state)
    train_seconds = time.perf_counter() - t_start - compile_in_loop if t_start else 0.0
    ckpt.wait()
    # Arrived after the last step: its checkpoint is saved; skip eval (several processes: only
    # if agreed at the last step, else every process evaluates).
    if stop or (n_proc == 1 and preempt.requested):
        print(f"SIGTERM: checkpoint at step {config.num_steps} is saved; exiting before the "
              "final evaluation (restart to run it).", flush=True)
        ckpt.close()
        sys.exit(0)

    # -- final evaluation ----------------------------------------------------------------
    split = "test" if "test" in manifest.splits else "val"
    t0 = time.perf_counter()
    ev = evaluate(trainer, state, data_dir, split, config, idx)
    eval_seconds = time.perf_counter() - t0
    result = {"config": config.name, "split": split, "steps": config.num_steps,
              "eval_loss": ev["loss"], **ev["metrics"],
              "train_spectra_per_s": (steps_timed * config.batch_size / train_seconds
                                      if steps_timed else None),
              # Every evaluated spectrum (tasks name their counts differently: n, n_z, ...).
              "eval_spectra_per_s": int(np.sum(ev["outputs"]["valid"]))
              / max(eval_seconds, 1e-9),
              "compile_seconds": compile_total, "devices": n_dev, "processes": n_proc,
              "platform": jax.devices()[0].platform, "workdir": str(workdir),
              **({"bucketing": plan.summary()} if len(buckets) > 1 else {})}
    if is_main:
        (workdir / "metrics.json").write_text(json.dumps(result, indent=2))
        figs = trainer.task.figures(ev["outputs"], ev["examples"], workdir, config.num_figures)
        from spectrax import plots
        figs.append(plots.loss_curve(workdir / "metrics.jsonl", workdir / "loss.png"))
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (dict, list))},
                         indent=2))
        print("figures: " + ", ".join(str(f) for f in figs), flush=True)
    logger.close()
    ckpt.close()
    return result


def _check_finite(state, config, recent_ids) -> None:
    bad = int(state["bad_step"])
    if bad < 0:
        return
    ids = [i.tolist() for s, i in recent_ids if s == bad]
    msg = (f"non-finite loss or gradient at step {bad} (batch ids {ids[0][:16] if ids else '?'}"
           f"{' ...' if ids and len(ids[0]) > 16 else ''}); that update was skipped, so "
           "parameters and checkpoints hold no NaN")
    if config.on_nonfinite == "stop":
        raise FloatingPointError(msg + ". Set config.on_nonfinite='skip' to carry on.")
    print("warning: " + msg, flush=True)


@jax.jit
def _parameters_finite(params):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))


def _refuse_nonfinite_parameters(state, step: int) -> None:
    """Checkpoints never hold NaN: non-finite data are skipped by the step's guard, and this
    catches the one way left, an update that overflowed from finite gradients (an absurd
    learning rate, with ``optim.guard_update`` off)."""
    if not bool(_parameters_finite(state["params"])):
        raise FloatingPointError(
            f"parameters are non-finite at step {step}: an update overflowed although the "
            "gradients were finite (learning rate too large?); the checkpoint was not written. "
            "Lower config.optim.lr, or set config.optim.guard_update=True to skip such updates.")


def evaluate(trainer, state, data_dir, split, config, idx) -> dict:
    """Runs the task's predictions over every spectrum of ``split``; returns metrics etc.

    ``outputs`` concatenates per-spectrum predictions over all batches (per-pixel arrays of
    different bucket lengths cannot be concatenated and are left out); ``examples`` holds
    (host batch, predictions) of the first batch of each distinct pixel length, for figures.
    """
    from jax.experimental import multihost_utils

    from spectrax import sharding
    from spectrax.data import pipeline

    bs = sharding.round_up_batch(config.eval_batch_size, jax.device_count())
    step = trainer.jitted_eval_step
    outs, losses, examples = [], [], []
    pi, local = jax.process_index(), bs // jax.process_count()
    buckets = pipeline.batch_lengths(config.data, data_dir)
    n_batches = pipeline.num_eval_batches(data_dir, split, bs, buckets)
    batches = pipeline.eval_batches(data_dir, split, batch_size=bs, buckets=buckets)
    from spectrax import metrics as M
    from spectrax.data import shards

    label_names = shards.read_manifest(data_dir).label_names
    for host in tqdm(batches, total=n_batches, desc=f"eval {split}", leave=False,
                     disable=jax.process_index() != 0):
        # Per-spectrum context the task's metrics may group by (not model inputs): the median
        # S/N and every label column of the shards, NaN where unknown (e.g. ``context_class``
        # for the redshift success thresholds, which differ for QSOs).
        context = {"snr": M.median_snr(host.flux, host.ivar, host.mask)}
        for j, name in enumerate(label_names):
            context[f"context_{name}"] = np.where(host.label_mask[:, j], host.labels[:, j],
                                                  np.nan)
        host = _select_labels(host, idx)
        mine = jax.tree.map(lambda x: x[pi * local:(pi + 1) * local], host.for_device())
        pred, loss = step(state, pipeline.to_global(mine, trainer.batch_sharding))
        pred = jax.tree.map(np.asarray, multihost_utils.process_allgather(pred, tiled=True))
        if host.num_pixels not in {b.num_pixels for b, _ in examples}:
            examples.append((host, pred))
        outs.append({**pred, "labels": host.labels, "label_mask": host.label_mask,
                     "valid": host.valid, "ids": host.ids, **context})
        losses.append((float(loss), int(host.valid.sum())))
    cat = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]
           if len({o[k].shape[1:] for o in outs}) == 1}
    total = sum(n for _, n in losses)
    loss = sum(l * n for l, n in losses) / max(total, 1)
    metrics = trainer.task.metrics(cat)
    return {"loss": loss, "metrics": metrics, "outputs": cat, "examples": examples}


def load_pretrained(state, trainer, from_workdir: str, prefix: str, target: str | None = None):
    """Copies the subtree ``prefix`` of another run's latest parameters (and BatchNorm
    statistics) into ``state``, at ``target`` (default: the same path; "" = the whole tree).
    Shapes must agree; mismatches are listed in the error.

    Returns (state, that run's task state or None): fine-tunes reuse its statistics."""
    from spectrax import checkpoint

    target = prefix if target is None else target
    src = checkpoint.Checkpointer(from_workdir)
    if src.latest_step() is None:
        raise FileNotFoundError(
            f"config.init.from_workdir={from_workdir!r} holds no checkpoint; train that stage "
            "first (see the config's docstring for the command)")
    raw, meta = src.restore_raw()
    src.close()
    new = dict(state)
    for part in ("params", "other"):
        pure = nnx.to_pure_dict(state[part])
        src_tree = _strip_value(raw[part])
        try:
            src_sub = checkpoint.subtree(src_tree, prefix)
            dst_sub = checkpoint.subtree(pure, target)
        except KeyError as e:
            if part == "other":  # no BatchNorm statistics under the prefix
                continue
            raise checkpoint.CheckpointMismatchError(f"{from_workdir}: {e}") from e
        have, want = checkpoint.flat_shapes(src_sub), checkpoint.flat_shapes(dst_sub)
        if have != want:
            diff = sorted(set(have.items()) ^ set(want.items()))
            raise checkpoint.CheckpointMismatchError(
                f"{from_workdir}: '{prefix}' does not match '{target}' of this model (was trained as "
                f"{meta.get('model')}): " + "; ".join(f"{k} {v}" for k, v in diff[:20]))
        _assign(pure, target, src_sub)
        st = state[part]
        nnx.replace_by_pure_dict(st, pure)
        new[part] = jax.device_put(st, trainer.state_shardings[part])
    print(f"initialised '{target or 'everything'}' from '{prefix}' of {from_workdir} "
          f"(step {src.latest_step()})", flush=True)
    task_state = meta.get("task_state")
    if task_state and meta.get("task") != trainer.config.task:
        task_state = None  # another task's statistics mean nothing here
    return new, task_state


def load_backbone_weights(state, trainer, path: str):
    """Loads a timm / Hugging Face ViT-B/16 checkpoint file into the model's ``backbone``
    (:mod:`spectrax.convert_weights`); mismatched tensors are listed in the error."""
    from spectrax import convert_weights

    model = trainer.model(state)
    report = convert_weights.load_pretrained_vit(model.backbone, path)
    _, params, _, _ = nnx.split(model, nnx.Param, nnx.RngState, ...)
    print(f"backbone initialised from {path}: {report}", flush=True)
    return {**state, "params": jax.device_put(params, trainer.state_shardings["params"])}


def _strip_value(tree):
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return tree["value"]
        return {k: _strip_value(v) for k, v in tree.items()}
    return tree


def _assign(tree: dict, prefix: str, value) -> None:
    parts = [p for p in prefix.split("/") if p]
    if not parts:  # the whole tree
        tree.clear()
        tree.update(value)
        return
    for p in parts[:-1]:
        tree = tree[p]
    tree[parts[-1]] = value


class MetricLogger:
    """metrics.jsonl (one JSON object per log step) + TensorBoard event files."""

    def __init__(self, workdir: Path, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.file = open(Path(workdir) / "metrics.jsonl", "a")
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
        except ImportError:  # TensorBoard summaries are optional
            self.tb = None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def main(argv):
    del argv
    if FLAGS.config is None:
        raise app.UsageError("--config=configs/<experiment>.py is required")
    if FLAGS.dry_run:
        dry_run(FLAGS.config)
        return
    train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    runtime.configure()  # XLA:CPU flag and log levels, before any computation
    app.run(main)
