r"""Redshifts three ways on the same test spectra: the full-grid χ² template fit (Redrock-style),
the learned model alone, and learned proposals refined by χ² over narrow windows.

    python -m benchmarks.template_vs_specpt [--samples=bgs,elg] [--n_test=1000] [--n_train=2000]

For each sample (simulated DESI BGS / ELG): the data are exactly the shard directory the
redshift config trains and evaluates on (``spectrax.prepare.ensure_data(config.data)`` of
``configs/specpt_redshift_<sample>.py:variant=<--variant>``); the χ² templates are fitted on the
first ``--n_train`` spectra of its 'train' split (as the refinement mode does,
:func:`spectrax.redshift.templates_for`); all three methods measure the first ``--n_test``
spectra of its 'test' split. The learned model is the run ``--runs`` (default
``runs/specpt_redshift_<sample>-<variant>``, written by ``python -m spectrax.train
--config=configs/specpt_redshift_<sample>.py[:variant=...]``); without it that sample's learned
rows are skipped.

Rows: NMAD, η, success (|Δz| < 1000 km/s·(1+z)), ZERR coverage (fraction with |Δz| < ZERR,
0.683 when calibrated), the fraction with ZWARN = 0 and η among those, and spectra/s.

Timing (same process, same CPU, one after the other): compile excluded for every method (each
runs once on a first chunk/batch before the clock starts); all inputs are host arrays already in
memory; every result is fetched to the host, so no device work is left in flight. The learned
rate is its jitted predict; the refined rate is that predict PLUS the χ² refinement, end to end.
One JSON line per row is appended to ``--out`` with the machine, jax version, date and load.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from spectrax import runtime

FLAGS = flags.FLAGS
# Median-S/N bins of the ZERR coverage: finer than the evaluation's (0, 3, 5, 10, 20, 50) because
# every simulated ELG has a median S/N below 3 (faint continua; the redshift is in the lines).
SNR_EDGES = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, np.inf)
flags.DEFINE_list("samples", ["bgs", "elg"], "Simulated samples (configs/specpt_redshift_<s>.py).")
flags.DEFINE_string("variant", "zscan", "Variant of the redshift configs.")
flags.DEFINE_list("runs", [], "Trained runs, one per sample (default runs/specpt_redshift_"
                  "<sample>-<variant>).")
flags.DEFINE_integer("n_train", 2000, "Training spectra for the templates (first of 'train').")
flags.DEFINE_integer("n_test", 1000, "Test spectra (first of 'test'); 0 = the whole split.")
flags.DEFINE_integer("n_components", 6, "Template basis vectors (mean + n−1 components).")
flags.DEFINE_integer("chunk", 128, "Spectra per jitted template-fit call.")
flags.DEFINE_integer("batch", 128, "Learned-model batch (and refinement chunk).")
flags.DEFINE_integer("half_window", 4, "Refinement window: fine steps (1e-4) each side.")
flags.DEFINE_string("out", "benchmarks/results.jsonl", "Where result rows are appended.")


def machine() -> dict:
    """The machine fields of a results row (as benchmarks/run.py records them)."""
    import datetime
    import platform

    import jax

    dev = jax.devices()[0]
    return {"host": platform.node(), "cpu_count": os.cpu_count(), "platform": dev.platform,
            "device": dev.device_kind, "devices": jax.device_count(), "jax": jax.__version__,
            "date": datetime.date.today().isoformat(), "load_avg_1m": os.getloadavg()[0]}


def host_batches(test: dict, batch_size: int):
    """The test arrays as SpectrumBatches of ``batch_size`` rows (the last padded, valid False)."""
    from spectrax.spectra import SpectrumBatch

    n, length = test["flux"].shape
    wave = np.broadcast_to(test["wavelength"].astype(np.float32), (batch_size, length))
    out = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        pad = batch_size - (stop - start)
        take = lambda a, fill=0: np.concatenate(  # noqa: E731
            [a[start:stop], np.full((pad,) + a.shape[1:], fill, a.dtype)]) if pad else a[start:stop]
        valid = np.arange(batch_size) < stop - start
        out.append(SpectrumBatch(
            flux=take(test["flux"]).astype(np.float32), ivar=take(test["ivar"]).astype(np.float32),
            wavelength=np.array(wave), mask=take(test["mask"]).astype(bool),
            labels=take(test["z"].astype(np.float32))[:, None],
            label_mask=valid[:, None].copy(), valid=valid, ids=take(test["id"])))
    return out


def scores(z_true, z_pred, zerr=None, zwarn=None, snr=None) -> dict:
    """NMAD, η, success, ZERR coverage (also per median-S/N bin when ``snr`` [N] is given:
    "zerr_coverage_by_snr" {bin: coverage}), ZWARN = 0 fraction and η among those."""
    from spectrax import metrics as M

    row = {"nmad": M.nmad(z_true, z_pred), "eta": M.outlier_fraction(z_true, z_pred),
           "success": M.redshift_success_rate(z_true, z_pred, np.zeros(len(z_true), bool))}
    if zerr is not None:
        # A NaN ZERR (template fit: minimum not bracketed) counts as not covered.
        row["zerr_finite_frac"] = float(np.isfinite(zerr).mean())
        zerr = np.nan_to_num(np.asarray(zerr, np.float64), nan=0.0)
        row["zerr_coverage"] = M.zerr_coverage(z_true, z_pred, zerr)
        if snr is not None:
            table = M.success_by_snr(z_true, z_pred, np.zeros(len(z_true), bool), snr,
                                     edges=SNR_EDGES, zerr=zerr)
            row["zerr_coverage_by_snr"] = {t["snr_bin"]: t.get("zerr_coverage")
                                           for t in table if t["n"]}
            row["n_by_snr"] = {t["snr_bin"]: t["n"] for t in table if t["n"]}
    if zwarn is not None:
        good = zwarn == 0
        row["zwarn0_frac"] = float(good.mean())
        row["zwarn0_eta"] = M.outlier_fraction(z_true, z_pred, valid=good) if good.any() \
            else None
    return row


def learned_and_refined(config, run: Path, test: dict, batch_size: int, half_window: int):
    """(learned result, learned seconds, refined result, refined seconds, checkpoint step,
    ZERR calibration) on ``test``; the refinement is ``predict --refine``'s
    (:class:`spectrax.predict.Refiner`: templates of the first --n_train training spectra,
    ZERR calibration fitted on the validation split, both cached in the run directory)."""
    import jax

    from spectrax.inference import InferenceModel
    from spectrax.predict import Refiner

    predictor = InferenceModel.from_checkpoint(config, run)
    refine = Refiner.for_run(config, run, predictor, n_templates=FLAGS.n_train,
                             half_window=half_window)
    batches = host_batches(test, batch_size)
    n = len(test["z"])

    warm = predictor(batches[0])                 # compile predict and the χ² window (excluded)
    refine(batches[0], warm)
    t0 = time.perf_counter()
    outs = [predictor(b) for b in batches]       # each fetched to the host (np.asarray)
    jax.block_until_ready(jax.numpy.zeros(()))
    t_learned = time.perf_counter() - t0
    t0 = time.perf_counter()
    cols = []
    for b in batches:
        cols.append(refine(b, predictor(b)))
    t_refined = time.perf_counter() - t0
    cat = lambda key, parts: np.concatenate([p[key] for p in parts])[:n]  # noqa: E731
    learned = {k: cat(k, outs) for k in ("z_pred", "z_err", "zwarn")}
    refined = {k: cat(k, cols) for k in ("Z", "ZERR", "ZWARN", "DELTACHI2")}
    return learned, t_learned, refined, t_refined, predictor.step, refine.zerr_calibration


def run_sample(sample: str, run: Path, base: dict) -> list[dict]:
    from spectrax import metrics as M
    from spectrax.baselines import template_fit as tf
    from spectrax import config_lib
    from spectrax.prepare import ensure_data

    config = config_lib.load(f"configs/specpt_redshift_{sample}.py", f"variant={FLAGS.variant}")
    data_dir = ensure_data(config.data)
    train = tf.load_split(data_dir, "train", FLAGS.n_train)
    test = tf.load_split(data_dir, "test", FLAGS.n_test or None)
    n = len(test["z"])
    print(f"{sample}: data {data_dir}: {len(train['z'])} train spectra for templates, "
          f"{n} test spectra", flush=True)
    t0 = time.perf_counter()
    templates = tf.fit_templates(train["flux"], train["ivar"], train["mask"],
                                 train["wavelength"], train["z"],
                                 n_components=FLAGS.n_components)
    t_templates = time.perf_counter() - t0
    res, secs, compile_s = tf.timed_fit(templates, test, chunk=FLAGS.chunk)
    z_true = test["z"]
    snr = M.median_snr(test["flux"], test["ivar"], test["mask"])
    base = {**base, "sample": sample, "data": str(data_dir), "split": "test", "n": n}
    rows = [{**base, "method": "template fit (full grid)", "n_train": len(train["z"]),
             **scores(z_true, res["z"], res["zerr"], res["zwarn"], snr),
             "spectra_per_s": n / secs, "warmup_s": compile_s, "template_fit_s": t_templates}]
    if not (run / "metrics.json").exists():
        print(f"{sample}: no trained run at {run} (train configs/specpt_redshift_{sample}.py "
              "first); learned rows skipped", flush=True)
        return rows
    learned, t_l, refined, t_r, step, calibration = learned_and_refined(
        config, run, test, FLAGS.batch, FLAGS.half_window)
    rows.append({**base, "method": f"learned ({config.model.name}:{config.model.variant})",
                 "run": str(run), "step": step,
                 **scores(z_true, learned["z_pred"], learned["z_err"], learned["zwarn"], snr),
                 "spectra_per_s": n / t_l})
    rows.append({**base, "method": "learned + χ² refine", "run": str(run), "step": step,
                 "half_window": FLAGS.half_window, "zerr_calibration": calibration,
                 **scores(z_true, refined["Z"], refined["ZERR"], refined["ZWARN"], snr),
                 "spectra_per_s": n / t_r})
    return rows


def main(argv):
    del argv
    import jax

    base = {"benchmark": "template_vs_specpt", **machine()}
    runs = FLAGS.runs or [f"runs/specpt_redshift_{s}-{FLAGS.variant}" for s in FLAGS.samples]
    if len(runs) != len(FLAGS.samples):
        raise app.UsageError("--runs needs one run per sample")
    rows = []
    for sample, run in zip(FLAGS.samples, runs):
        rows += run_sample(sample, Path(run), base)
    with open(FLAGS.out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    print(f"\n{jax.devices()[0].platform}, {os.cpu_count()} CPUs, load {base['load_avg_1m']:.1f}"
          f" at the start\n")
    print("| sample | method | spectra | NMAD | η | success | ZERR cov. | ZWARN=0 | η (ZWARN=0) "
          "| spectra/s |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sample']} | {r['method']} | {r['n']} | {r['nmad']:.2e} | {r['eta']:.2%} | "
              f"{r['success']:.2%} | {fmt(r.get('zerr_coverage'), '.3f')} | "
              f"{fmt(r.get('zwarn0_frac'), '.1%')} | {fmt(r.get('zwarn0_eta'), '.2%')} | "
              f"{r['spectra_per_s']:.1f} |")
    print("\nZERR coverage (fraction with |Δz| < ZERR; 0.683 when calibrated) per median-S/N "
          "bin:\n")
    bins = sorted({b for r in rows for b in r.get("zerr_coverage_by_snr", {})},
                  key=lambda b: (b == "all", 0.0 if b == "all" else float(
                      b.split("-")[0].lstrip(">="))))
    print("| sample | method | " + " | ".join(bins) + " |\n|---|---|" + "---|" * len(bins))
    for r in rows:
        cov, n = r.get("zerr_coverage_by_snr", {}), r.get("n_by_snr", {})
        print(f"| {r['sample']} | {r['method']} | " + " | ".join(
            f"{fmt(cov.get(b), '.3f')} (n={n.get(b, 0)})" for b in bins) + " |")


if __name__ == "__main__":
    runtime.configure()  # XLA:CPU flag and log levels, before any computation
    app.run(main)
