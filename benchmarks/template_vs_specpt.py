r"""Classical χ² template fitting (Redrock-style) against SpecPT, on the same test spectra.

    python -m benchmarks.template_vs_specpt [--n_test=500] [--n_train=2000]

Data: exactly the shard directory the SpecPT redshift config trains and evaluates on
(``spectrax.prepare.ensure_data(config.data)``, e.g. ``data/desi_bgs-<hash>``): templates are
fitted on the first ``--n_train`` spectra of its 'train' split, redshifts measured on the first
``--n_test`` of its 'test' split.

SpecPT: if ``--specpt_run`` (default ``runs/specpt_redshift_bgs-tokens``, written by the main job)
holds a checkpoint, its jitted predict runs on the same ``--n_test`` spectra; the figures in
its ``metrics.json`` (whole test split, evaluation loop including the input pipeline) are shown
as well. Without a run that column is skipped.

Timing: compile excluded for both (each runs once on a first chunk/batch before the clock
starts); the template fit is timed end to end on host arrays already in memory, and its result
is host numpy, so no device work is left in flight; SpecPT's predict is timed over host batches
already built, each result fetched to the host. One JSON line per method is appended to
``--out`` with the machine, jax version and date.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from spectrax import runtime

FLAGS = flags.FLAGS
flags.DEFINE_string("specpt_config", "configs/specpt_redshift_bgs.py",
                    "SpecPT redshift config[:arg] (its data are the benchmark's data).")
flags.DEFINE_string("specpt_run", "runs/specpt_redshift_bgs-tokens", "Trained SpecPT redshift run.")
flags.DEFINE_integer("n_train", 2000, "Training spectra for the templates (first of 'train').")
flags.DEFINE_integer("n_test", 500, "Test spectra (first of 'test'); 0 = the whole split.")
flags.DEFINE_integer("n_components", 6, "Template basis vectors (mean + n−1 components).")
flags.DEFINE_integer("chunk", 128, "Spectra per jitted template-fit call.")
flags.DEFINE_integer("specpt_batch", 64, "SpecPT predict batch size.")
flags.DEFINE_string("out", "benchmarks/results.jsonl", "Where result rows are appended.")


def machine() -> dict:
    """The machine fields of a results row (as benchmarks/run.py records them)."""
    import datetime
    import os
    import platform

    import jax

    dev = jax.devices()[0]
    return {"host": platform.node(), "cpu_count": os.cpu_count(), "platform": dev.platform,
            "device": dev.device_kind, "devices": jax.device_count(), "jax": jax.__version__,
            "date": datetime.date.today().isoformat()}


def load_config(spec: str):
    path, _, arg = spec.partition(":")
    ns: dict = {}
    exec(compile(Path(path).read_text(), path, "exec"), ns)
    return ns["get_config"](arg or None)


def specpt_on(config, run: Path, data_dir: Path, test_ids: np.ndarray, batch_size: int):
    """SpecPT's z for ``test_ids`` (the first records of the test split) and its spectra/s."""
    import jax

    from spectrax.data import inputs, pipeline
    from spectrax.inference import InferenceModel

    def refuse(message):
        raise RuntimeError(message)

    predictor = InferenceModel.from_checkpoint(config, run)
    rows = inputs.model_records(inputs.discover([str(data_dir)], split="test").units,
                                inputs.LengthPolicy.for_model(config.data), {}, refuse)
    batches, n = [], 0
    for batch, _ in pipeline.batches_by_length(rows, batch_size, ["z"]):
        batches.append(batch)
        n += int(batch.valid.sum())
        if n >= len(test_ids):
            break
    predictor(batches[0])                      # compile (excluded from the timing)
    t0 = time.perf_counter()
    outs = [predictor(b)["z_pred"] for b in batches]   # each fetched to the host
    jax.block_until_ready(outs)
    secs = time.perf_counter() - t0
    z = np.concatenate([o[np.asarray(b.valid)] for o, b in zip(outs, batches)])[:len(test_ids)]
    ids = np.concatenate([np.asarray(b.ids)[np.asarray(b.valid)] for b in batches])
    if not np.array_equal(ids[:len(test_ids)], test_ids):
        raise RuntimeError("SpecPT batches and the template fit read different test spectra")
    spectra = sum(int(b.valid.sum()) for b in batches)
    return z, spectra / secs, predictor.step


def main(argv):
    del argv
    import jax

    from spectrax import metrics
    from spectrax.baselines import template_fit as tf
    from spectrax.prepare import ensure_data

    config = load_config(FLAGS.specpt_config)
    data_dir = ensure_data(config.data)
    train = tf.load_split(data_dir, "train", FLAGS.n_train)
    test = tf.load_split(data_dir, "test", FLAGS.n_test or None)
    print(f"data {data_dir}: {len(train['z'])} train spectra for templates, "
          f"{len(test['z'])} test spectra", flush=True)

    t0 = time.perf_counter()
    templates = tf.fit_templates(train["flux"], train["ivar"], train["mask"],
                                 train["wavelength"], train["z"],
                                 n_components=FLAGS.n_components)
    t_templates = time.perf_counter() - t0
    res, secs, compile_s = tf.timed_fit(templates, test, chunk=FLAGS.chunk)
    z_true = test["z"]
    lo, hi = templates.z_limits(test["wavelength"])
    base = {"benchmark": "template_vs_specpt", "data": str(data_dir), "split": "test",
            "n": int(len(z_true)), **machine()}
    rows = [{**base, "method": "template_fit", "n_train": int(len(train["z"])),
             "n_components": FLAGS.n_components,
             "nmad": metrics.nmad(z_true, res["z"]),
             "eta": metrics.outlier_fraction(z_true, res["z"]),
             "spectra_per_s": len(z_true) / secs, "warmup_s": compile_s,
             "template_fit_s": t_templates, "z_range": [max(lo, 0.0), hi],
             "small_delta_chi2_frac": float(np.mean(res["delta_chi2"] < tf.SMALL_DELTA_CHI2)),
             "median_delta_chi2": float(np.median(res["delta_chi2"]))}]

    run = Path(FLAGS.specpt_run)
    recorded = None
    if (run / "metrics.json").exists():
        recorded = json.loads((run / "metrics.json").read_text())
        try:
            z_sp, rate, step = specpt_on(config, run, data_dir, test["id"], FLAGS.specpt_batch)
            rows.append({**base, "method": f"specpt:{config.model.variant}", "step": step,
                         "nmad": metrics.nmad(z_true, z_sp),
                         "eta": metrics.outlier_fraction(z_true, z_sp),
                         "spectra_per_s": rate})
        except Exception as e:  # a run of another architecture, a checkpoint being written...
            print(f"SpecPT predict skipped ({type(e).__name__}: {e}); showing metrics.json only")
    else:
        print(f"no trained SpecPT run at {run} (train configs/specpt_redshift_bgs.py first); "
              "SpecPT column skipped")

    with open(FLAGS.out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"\n{jax.devices()[0].platform}, {len(z_true)} test spectra of {data_dir.name}\n")
    print("| method | spectra | NMAD | η | spectra/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['n']} | {r['nmad']:.2e} | {r['eta']:.2%} | "
              f"{r['spectra_per_s']:.1f} |")
    if recorded:
        print(f"| SpecPT metrics.json ({run.name}, whole test split, eval loop) | "
              f"{recorded.get('n')} | {recorded['nmad']:.2e} | {recorded['eta']:.2%} | "
              f"{recorded.get('eval_spectra_per_s', float('nan')):.1f} |")
    print(f"\ntemplate fit: warm-up (compile + one chunk) {compile_s:.1f} s (excluded), "
          f"templates {t_templates:.1f} s, z range covered [{max(lo, 0):.4f}, {hi:.4f}], "
          f"median Δχ² {rows[0]['median_delta_chi2']:.0f}, "
          f"Δχ² < 9 for {rows[0]['small_delta_chi2_frac']:.1%}")


if __name__ == "__main__":
    runtime.configure()  # XLA:CPU flag and log levels, before any computation
    app.run(main)
