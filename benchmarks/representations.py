"""Spectra as images: accuracy per representation, and 2D map vs the 1D transformer, in one table.

    python -m benchmarks.representations [--variant=tiny] [--steps=200] [--n_train=1500]

Trains ``configs/vit_classify.py`` once per representation (simple, overlap, map2d,
map2dnormal, map2dnormaldev) and ``configs/vit_redshift.py`` (map2d) next to
``configs/transformer1d_redshift.py`` on the same simulated SDSS-/LAMOST-like data, then prints
a markdown table (accuracy, macro F1 for classification; R², NMAD for redshift) and appends it
to benchmarks/results.jsonl. The paper's numbers (SPECS.md §2) come from ViT-B/16 pretrained on
ImageNet/DINO and millions of spectra; the CPU default here is a randomly initialised tiny ViT
trained for minutes, so compare the rows with each other, not with the paper.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from absl import app, flags

from spectrax import runtime

flags.DEFINE_string("variant", "tiny", "ViT variant (tiny on CPU, b16 on accelerators).")
flags.DEFINE_integer("steps", 200, "Training steps per run.")
flags.DEFINE_integer("n_train", 1500, "Simulated training spectra.")
flags.DEFINE_integer("n_test", 500, "Simulated test spectra.")
flags.DEFINE_list("representations", ["simple", "overlap", "map2d", "map2dnormal",
                                      "map2dnormaldev"], "Representations to train.")
flags.DEFINE_string("runs", "runs/representations", "Where the runs go.")
FLAGS = flags.FLAGS


def _run(config, workdir: Path) -> dict:
    from spectrax import train
    if (workdir / "metrics.json").exists():
        return json.loads((workdir / "metrics.json").read_text())
    config.unlock()
    config.data.n_train, config.data.n_test = FLAGS.n_train, FLAGS.n_test
    config.num_steps = FLAGS.steps
    config.ckpt_every = FLAGS.steps
    return train.train(config.lock(), workdir)


def main(argv):
    del argv
    from spectrax import config_lib
    runs = Path(FLAGS.runs)
    rows = []
    for rep in FLAGS.representations:
        t0 = time.time()
        m = _run(config_lib.load("configs/vit_classify.py",
                                 f"variant={FLAGS.variant},representation={rep}"),
                 runs / f"vit_classify_{rep}")
        rows.append({"model": f"ViT-{FLAGS.variant} {rep}", "task": "classify",
                     "accuracy": m.get("accuracy"), "macro_f1": m.get("macro_f1"),
                     "train_spectra_per_s": m.get("train_spectra_per_s"),
                     "seconds": time.time() - t0})
    for name, cfg in (("ViT map2d", config_lib.load(
            "configs/vit_redshift.py", f"variant={FLAGS.variant},representation=map2d")),
                      ("1D transformer", config_lib.load("configs/transformer1d_redshift.py",
                                                         "variant=small"))):
        t0 = time.time()
        m = _run(cfg, runs / cfg.name.replace(" ", "_"))
        rows.append({"model": name, "task": "redshift", "r2": m.get("z_r2"),
                     "nmad": m.get("z_nmad"), "outliers": m.get("z_eta"),
                     "success": m.get("z_success"), "success_by_snr": m.get("z_success_by_snr"),
                     "train_spectra_per_s": m.get("train_spectra_per_s"),
                     "seconds": time.time() - t0})
    fmt = lambda x: "—" if x is None else f"{x:.3f}"
    print("| model | task | accuracy | macro F1 | R² | NMAD | success | train spectra/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['task']} | {fmt(r.get('accuracy'))} | "
              f"{fmt(r.get('macro_f1'))} | {fmt(r.get('r2'))} | {fmt(r.get('nmad'))} | "
              f"{fmt(r.get('success'))} | {fmt(r.get('train_spectra_per_s'))} |")
    from spectrax.metrics import format_table
    for r in rows:
        if r.get("success_by_snr"):
            print(f"\n{r['model']}: redshift success per median-S/N bin\n")
            print(format_table(r["success_by_snr"]))
    with open(Path("benchmarks") / "results.jsonl", "a") as f:
        f.write(json.dumps({"benchmark": "representations", "rows": rows,
                            "steps": FLAGS.steps, "n_train": FLAGS.n_train,
                            "machine": platform.machine(), "cpus": os.cpu_count(),
                            "date": time.strftime("%Y-%m-%d")}) + "\n")


if __name__ == "__main__":
    runtime.configure()  # XLA:CPU flag and log levels, before any computation
    app.run(main)
