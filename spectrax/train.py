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
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags
from tqdm import tqdm

from spectrax import (checkpoint, evaluation, guards, inference, optim, plots, runtime, sharding,
                      tasks, warm_start)
from spectrax.data import pipeline, shards
from spectrax import models
from spectrax.models import registry
from spectrax.prepare import ensure_data

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and figures go.")
flags.DEFINE_bool("dry_run", False, "Print the model's parameter table and exit.")


# ==============================================================================================
# Model state: the pure pytrees a jitted step takes and returns
# ==============================================================================================
class Trainer:
    """Holds the static pieces of a run (graph definition, task, optimiser, mesh, shardings)
    and exposes pure jitted functions of the state pytree."""

    def __init__(self, config, mesh, num_steps: int, steps_per_epoch: int | None = None):
        self.config, self.mesh, self.num_steps = config, mesh, num_steps
        self.task = tasks.get_task(config.task, **config.task_kwargs.to_dict())
        self.model_fn = lambda seed: registry.build_model(config.model, rngs=nnx.Rngs(
            params=seed, dropout=seed + 1))
        self.abstract_model = nnx.eval_shape(lambda: self.model_fn(config.seed))
        self.graphdef, abstract_params, abstract_rngs, _ = nnx.split(
            self.abstract_model, nnx.Param, nnx.RngState, ...)
        self.frozen = (tuple(config.optim.freeze)
                       or registry.default_frozen(self.abstract_model))
        labels = optim.freeze_labels_for(abstract_params, self.frozen) if self.frozen else None
        if steps_per_epoch is None:  # the simulated train split's size
            steps_per_epoch = max(1, config.data.n_train // config.batch_size)
        self.optimizer = optim.build_optimizer(config, num_steps, labels, steps_per_epoch)

        self.abstract_state = jax.eval_shape(self._init)
        self.state_shardings = sharding.tree_shardings(self.abstract_state, mesh)
        self.batch_sharding = sharding.batch_sharding(mesh)
        # RNG streams are re-derived from (seed, step) each step, so they are not part of the
        # checkpointed state; this template only gives `merge` something concrete.
        self.rng_template = inference.rng_state_like(abstract_rngs)
        self.base_key = jax.random.key(config.seed)
        # One jitted evaluation function per run: re-wrapping the bound method at every
        # evaluation would recompile it each time (eval_every).
        self.jitted_eval_step = jax.jit(self.eval_step)

    # -- state ----------------------------------------------------------------------------
    def _init(self):
        model = self.model_fn(self.config.seed)
        _, params, _, other = nnx.split(model, nnx.Param, nnx.RngState, ...)
        return {"params": params, "other": other, "opt": self.optimizer.init(params),
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
            # Tasks that sample (SpectraFM: pixels and the requested label) use this key.
            loss, aux = self.task.loss(model, batch, train=True, rng=jax.random.fold_in(key, 1))
            _, _, _, new_other = nnx.split(model, nnx.Param, nnx.RngState, ...)
            return loss, (aux, new_other)

        (loss, (aux, new_other)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["other"], self.rng_template)
        # Clipping, AdamW and the guard: a step whose loss or gradient is non-finite changes
        # nothing, so no NaN from the data reaches the parameters; the host sees `bad_step` at
        # the next log and stops or carries on as configured (spectrax.optim.apply_step).
        new_params, new_opt, grad_norm, ok = optim.apply_step(
            self.optimizer, state["params"], state["opt"], grads, loss=loss,
            guard_update=self.config.optim.guard_update)
        new_state = {
            "params": new_params,
            "other": jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_other,
                                  state["other"]),
            "opt": new_opt,
            "step": step + 1,
            "bad_step": jnp.where(ok | (state["bad_step"] >= 0), state["bad_step"], step),
        }
        logs = {"loss": loss, "grad_norm": grad_norm, "lr": self.optimizer.lr_at(step), **aux}
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
        return compiled, seconds, guards.memory_text(compiled)


# ==============================================================================================
# Dry run: the parameter table, abstractly
# ==============================================================================================
def dry_run(config) -> dict:
    abstract = registry.abstract_model(config.model)
    table = registry.parameter_table(abstract)
    frozen = tuple(config.optim.freeze) or registry.default_frozen(abstract)
    print(f"{config.name}: model {config.model.name} variant={config.model.variant or '-'}"
          f"{' head=' + config.model.head if config.model.head else ''}")
    print(f"{'module':<40}{'parameters':>18}  note")
    for row in table["rows"]:
        note = []
        if any(models.is_under(row["path"], f) for f in frozen):
            note.append("frozen")
        if row["excluded"]:
            note.append("not counted (held outside the reference's registered modules)")
        print(f"{row['path']:<40}{row['count']:>18,}  {', '.join(note)}")
    print("-" * 70)
    print(f"Total parameters: {table['total']:,}")
    trainable = sum(r["count"] for r in table["rows"]
                    if not any(models.is_under(r["path"], f) for f in frozen))
    print(f"Trainable under this config: {trainable:,}"
          f"{'  (frozen: ' + ', '.join(frozen) + ')' if frozen else ''}")
    return {"total": table["total"], "trainable": trainable}


# ==============================================================================================
# The run
# ==============================================================================================
def default_workdir(config) -> Path:
    name = config.name + (f"-{config.model.variant}" if config.model.variant else "")
    return Path("runs") / name


def train(config, workdir: str | Path | None = None) -> dict:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns metrics.

    SIGTERM at any point saves a checkpoint after the current step and exits with status 0.
    """
    preempt = guards.Preemption()  # first: a SIGTERM during set-up must not kill the run
    try:
        return _train(config, workdir, preempt)
    finally:
        preempt.restore()


def _train(config, workdir, preempt: guards.Preemption) -> dict:
    """The body of :func:`train` (``preempt`` says whether SIGTERM has arrived)."""
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
    idx = evaluation.label_indices(manifest, trainer.task)
    buckets = pipeline.batch_lengths(config.data, data_dir)  # one fixed length: one bucket
    registry.check_input_length(trainer.abstract_model, max(buckets))

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
        state, pretrained_task_state = warm_start.initialise(trainer.init_state(), trainer,
                                                             config.init)
        # Fine-tunes reuse the statistics their base model was trained with (SpectraFM,
        # label standardisation); a fresh model takes them from this train split.
        trainer.task.fit_state(manifest.stats.get("labels", {}), data_dir)
        trainer.task.load_state(pretrained_task_state)
    start = int(state["step"])

    def next_global():
        host = next(data_iter)
        return host, pipeline.to_global(evaluation.select_labels(host, idx), trainer.batch_sharding)

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
            guards.check_memory(fn, config)  # before any step: fail in seconds, not at the first OOM
            compiled[key] = fn
        return compiled[key]

    host_batch, batch = next_global()
    step_for(batch)

    # -- loop -----------------------------------------------------------------------------
    logger = MetricLogger(workdir, enabled=is_main)
    grad_monitor = guards.GradNormMonitor()
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
            guards.check_finite(state, config, recent_ids)
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
            ev = evaluation.evaluate(trainer, state, data_dir, "val" if "val" in manifest.splits else "test",
                          config, idx)
            logger.write({"step": done, "eval_loss": ev["loss"],
                          **{f"val_{k}": v for k, v in ev["metrics"].items()}})
        if done == config.num_steps and evaluation.calibrate_task(trainer, state, data_dir,
                                                                  config, idx):
            meta["task_state"] = trainer.task.state()   # saved with the last checkpoint
        if done % config.ckpt_every == 0 or done == config.num_steps or stop:
            guards.refuse_nonfinite_parameters(state, done)
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
    ev = evaluation.evaluate(trainer, state, data_dir, split, config, idx)
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
        figs.append(plots.loss_curve(workdir / "metrics.jsonl", workdir / "loss.png"))
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (dict, list))},
                         indent=2))
        print("figures: " + ", ".join(str(f) for f in figs), flush=True)
    logger.close()
    ckpt.close()
    return result


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
