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
--config=configs/specpt_redshift_<sample>.py[:variant=...]``); the refinement mode's proposer is
the run of ``--refine_variant`` (default ``zscan_fast``: the χ² sets the precision, so the
proposer is chosen for speed), measured alone as well; a run that is missing skips its rows.

Rows: NMAD, η, success (|Δz| < 1000 km/s·(1+z)), ZERR coverage (fraction with |Δz| < ZERR,
0.683 when calibrated), the fraction with ZWARN = 0 and η among those, and spectra/s.

Timing (same process, same CPU, one after the other, the median of ``--reps`` runs of each
method): compile excluded for every method (each
runs once on a first chunk/batch before the clock starts; the refinement once over all batches,
as the shapes of its χ² calls depend on how far its windows walk); all inputs are host arrays already in
memory; every result is fetched to the host, so no device work is left in flight. The learned
rate is its jitted predict; the refined rate is that predict PLUS the χ² refinement, end to end,
pipelined as ``predict --refine`` runs them (:func:`spectrax.predict.predict_blocks`: the next
batch's predictions are dispatched before the current batch is refined).
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
flags.DEFINE_string("variant", "zscan", "Variant of the redshift configs: the learned row.")
flags.DEFINE_string("refine_variant", "zscan_fast", "Variant whose trained run proposes the "
                    "candidates of the learned + χ² refine row (runs/specpt_redshift_<sample>-"
                    "<refine_variant>).")
flags.DEFINE_list("runs", [], "Trained runs, one per sample (default runs/specpt_redshift_"
                  "<sample>-<variant>).")
flags.DEFINE_integer("n_train", 2000, "Training spectra for the templates (first of 'train').")
flags.DEFINE_integer("n_test", 1000, "Test spectra (first of 'test'); 0 = the whole split.")
flags.DEFINE_integer("n_components", 6, "Template basis vectors (mean + n−1 components).")
flags.DEFINE_integer("chunk", 128, "Spectra per jitted template-fit call.")
flags.DEFINE_integer("batch", 128, "Learned-model batch.")
flags.DEFINE_integer("reps", 3, "Timed runs per method; the median rate is reported (the "
                     "2-core VM's rates moved by ±15 % between single runs).")
flags.DEFINE_integer("half_window", 1, "Refinement window: fine steps (1e-4) each side "
                     "(the window walks where its minimum is on an edge).")
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


def learned_and_refined(config, run: Path, test: dict, batch_size: int, half_window: int,
                        refine: bool):
    """(learned result, learned seconds, refined result or None, refined seconds, checkpoint
    step, ZERR calibration) on ``test``; with ``refine`` also ``predict --refine``'s refinement
    (:class:`spectrax.predict.Refiner`: templates of the first --n_train training spectra, ZERR
    calibration fitted on the validation split, both cached in the run directory)."""
    import jax

    from spectrax.inference import InferenceModel
    from spectrax.predict import Refiner

    predictor = InferenceModel.from_checkpoint(config, run)
    refiner = Refiner.for_run(config, run, predictor, n_templates=FLAGS.n_train,
                              half_window=half_window) if refine else None
    batches = host_batches(test, batch_size)
    n = len(test["z"])

    predictor(batches[0])                        # compile predict (excluded)
    if refiner:  # one untimed pass: the χ² calls' shapes depend on how far windows walk
        for b in batches:
            refiner(b, predictor(b))
    times = []
    for _ in range(FLAGS.reps):
        t0 = time.perf_counter()
        outs = [predictor(b) for b in batches]   # each fetched to the host (np.asarray)
        jax.block_until_ready(jax.numpy.zeros(()))
        times.append(time.perf_counter() - t0)
    t_learned = float(np.median(times))
    cat = lambda key, parts: np.concatenate([p[key] for p in parts])[:n]  # noqa: E731
    learned = {k: cat(k, outs) for k in ("z_pred", "zwarn")}
    learned["z_err"] = np.concatenate([predictor.task.zerr(o) for o in outs])[:n]  # catalogue's
    if not refiner:
        return learned, t_learned, None, None, predictor.step, None
    times = []
    for _ in range(FLAGS.reps):
        # As predict --refine runs them: batch i + 1 is predicted while batch i is refined.
        t0 = time.perf_counter()
        cols, pending = [], predictor.dispatch(batches[0])
        for i, b in enumerate(batches):
            out = predictor.fetch(pending)
            if i + 1 < len(batches):
                pending = predictor.dispatch(batches[i + 1])
            cols.append(refiner(b, out))
        times.append(time.perf_counter() - t0)
    t_refined = float(np.median(times))
    refined = {k: cat(k, cols) for k in ("Z", "ZERR", "ZWARN", "DELTACHI2")}
    return learned, t_learned, refined, t_refined, predictor.step, refiner.zerr_calibration


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
    runs = [tf.timed_fit(templates, test, chunk=FLAGS.chunk) for _ in range(FLAGS.reps)]
    res, compile_s = runs[0][0], runs[0][2]
    secs = float(np.median([r[1] for r in runs]))
    z_true = test["z"]
    snr = M.median_snr(test["flux"], test["ivar"], test["mask"])
    base = {**base, "sample": sample, "data": str(data_dir), "split": "test", "n": n}
    rows = [{**base, "method": "template fit (full grid)", "n_train": len(train["z"]),
             **scores(z_true, res["z"], res["zerr"], res["zwarn"], snr),
             "spectra_per_s": n / secs, "warmup_s": compile_s, "template_fit_s": t_templates}]
    # The learned model alone (--variant) and the refinement mode on its proposer
    # (--refine_variant); one pass when they are the same run.
    plan = {FLAGS.variant: (run, FLAGS.variant == FLAGS.refine_variant)}
    if FLAGS.refine_variant != FLAGS.variant:
        plan[FLAGS.refine_variant] = (
            Path(f"runs/specpt_redshift_{sample}-{FLAGS.refine_variant}"), True)
    for variant, (run_dir, refine) in plan.items():
        cfg = config_lib.load(f"configs/specpt_redshift_{sample}.py", f"variant={variant}")
        if not (run_dir / "metrics.json").exists():
            print(f"{sample}: no trained run at {run_dir} (train configs/specpt_redshift_"
                  f"{sample}.py:variant={variant} first); its rows are skipped", flush=True)
            continue
        learned, t_l, refined, t_r, step, calibration = learned_and_refined(
            cfg, run_dir, test, FLAGS.batch, FLAGS.half_window, refine)
        name = f"{cfg.model.name}:{cfg.model.variant}"
        rows.append({**base, "method": f"learned ({name})", "run": str(run_dir), "step": step,
                     **scores(z_true, learned["z_pred"], learned["z_err"], learned["zwarn"],
                              snr),
                     "spectra_per_s": n / t_l})
        if refined is not None:
            rows.append({**base, "method": f"learned ({name}) + χ² refine", "run": str(run_dir),
                         "step": step, "half_window": FLAGS.half_window,
                         "zerr_calibration": calibration,
                         **scores(z_true, refined["Z"], refined["ZERR"], refined["ZWARN"], snr),
                         "spectra_per_s": n / t_r})
    return rows


def main(argv):
    del argv
    import jax

    base = {"benchmark": "template_vs_specpt", **machine(), "reps": FLAGS.reps,
            "batch": FLAGS.batch}
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
