r"""Throughput of the data pipeline, the training step and the jitted predict function.

    python -m benchmarks.throughput --configs=configs/specpt_bgs.py:variant=tokens,configs/specpt_bgs.py:variant=small

For each config: compile time (reported separately), then the median over ``--repeats`` timed
blocks of ``--steps`` steps each, with a single host synchronisation at the end of each block
(warm-up excluded). The pipeline is measured alone (Grain from ArrayRecord, per thread count).
Results are appended as JSON lines to ``benchmarks/results.jsonl`` with the machine, jax version
and date.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", ["configs/specpt_bgs.py:variant=tokens"], "Config files[:arg].")
flags.DEFINE_integer("steps", 10, "Steps per timed block.")
flags.DEFINE_integer("repeats", 3, "Timed blocks (median reported).")
flags.DEFINE_list("threads", ["1", "2", "4"], "Grain reader thread counts for the pipeline.")
flags.DEFINE_string("out", "benchmarks/results.jsonl", "Where results are appended.")


def machine() -> dict:
    dev = jax.devices()[0]
    return {"host": platform.node(), "cpu_count": os.cpu_count(), "platform": dev.platform,
            "device": dev.device_kind, "devices": jax.device_count(), "jax": jax.__version__,
            "date": datetime.date.today().isoformat()}


def bench_pipeline(data_dir: str, batch_size: int, threads: int, batches: int = 40) -> float:
    from spectrax.data import pipeline

    it = pipeline.train_iterator(data_dir, batch_size=batch_size, seed=0, num_threads=threads)
    next(it)  # start-up excluded
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - t0)


def bench_config(config) -> dict:
    from spectrax import sharding
    from spectrax.data import pipeline, shards
    from spectrax.prepare import ensure_data
    from spectrax.train import Trainer, _select_labels, label_indices

    data_dir = ensure_data(config.data)
    manifest = shards.read_manifest(data_dir)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    trainer = Trainer(config, mesh, 10**6)
    idx = label_indices(manifest, trainer.task)
    it = pipeline.train_iterator(str(data_dir), batch_size=config.batch_size, seed=0)
    # A fixed set of device batches, so the step is timed without the input pipeline.
    batches = [pipeline.to_global(_select_labels(next(it), idx), trainer.batch_sharding)
               for _ in range(4)]
    step, compile_s, mem = trainer.compile(batches[0])
    state = trainer.init_state()
    state, _ = step(state, batches[0])  # warm-up
    jax.block_until_ready(state)
    times = []
    for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        for i in range(FLAGS.steps):
            state, logs = step(state, batches[i % len(batches)])
        jax.block_until_ready(state)
        times.append((time.perf_counter() - t0) / FLAGS.steps)
    step_s = statistics.median(times)

    predict = jax.jit(lambda st, b: trainer.task.predict(trainer.model(st), b))
    jax.block_until_ready(predict(state, batches[0]))
    ptimes = []
    for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        for i in range(FLAGS.steps):
            out = predict(state, batches[i % len(batches)])
        jax.block_until_ready(out)
        ptimes.append((time.perf_counter() - t0) / FLAGS.steps)
    pred_s = statistics.median(ptimes)
    pipe = {t: bench_pipeline(str(data_dir), config.batch_size, int(t)) for t in FLAGS.threads}
    train_rate = config.batch_size / step_s
    return {"config": config.name, "variant": config.model.variant, "batch": config.batch_size,
            "compile_s": round(compile_s, 2), "step_ms": round(step_s * 1e3, 1),
            "train_spectra_per_s": round(train_rate, 1),
            "predict_spectra_per_s": round(config.batch_size / pred_s, 1),
            "pipeline_spectra_per_s": {t: round(v, 1) for t, v in pipe.items()},
            "bottleneck": "pipeline" if max(pipe.values()) < train_rate else "step",
            "memory": mem, **machine()}


def main(argv):
    del argv
    rows = []
    for spec in FLAGS.configs:
        path, _, arg = spec.partition(":")
        ns: dict = {}
        exec(compile(Path(path).read_text(), path, "exec"), ns)
        config = ns["get_config"](arg or None)
        row = bench_config(config)
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(FLAGS.out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"\n| config | variant | batch | compile s | step ms | train spectra/s | "
          f"predict spectra/s | pipeline spectra/s (threads) |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        pipe = ", ".join(f"{v:.0f} ({t})" for t, v in r["pipeline_spectra_per_s"].items())
        print(f"| {r['config']} | {r['variant']} | {r['batch']} | {r['compile_s']} | "
              f"{r['step_ms']} | {r['train_spectra_per_s']} | {r['predict_spectra_per_s']} | "
              f"{pipe} |")


if __name__ == "__main__":
    app.run(main)
