"""SpectraFM's transfer-learning table on the simulated APOGEE-like data, side by side:

    python -m benchmarks.spectrafm_transfer [--variant=small] [--train]

Rows: the from-scratch MLP on the 512-pixel Fe window (100 iron-rich stars), the pre-trained
model (stage 1, clean synthetic spectra), after stage 2 (real-like, first half of the range) and
after stage 3 (100 iron-rich stars, Fe window, decoder + encoder block 2 frozen). Every row is
evaluated the same way: [Fe/H] from the Fe window of the stage-3 config's real-like TEST split,
RMSE overall and for [Fe/H] < −1 (SPECS.md §4 quotes 0.763 / 0.254 / 0.210, 0.510 / 0.094,
0.232). With ``--train`` the missing runs are trained first (runs/<config>-<variant>).
Also prints the per-label scatter (median |Δ|) of stages 1 and 2 on the full real-like test set
next to the paper's table.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags

from spectrax import runtime

flags.DEFINE_string("variant", "small", "SpectraFM variant of the runs.")
flags.DEFINE_bool("train", False, "Train the runs that do not exist yet.")
flags.DEFINE_string("runs", "runs", "Directory holding the run directories.")
flags.DEFINE_integer("pretrain_steps", 0, "Stage-1 steps when training (0 = the config's).")
flags.DEFINE_integer("finetune_steps", 0, "Stage-2 steps when training (0 = the config's).")
flags.DEFINE_integer("scatter_spectra", 0, "Test stars for the scatter table (0 = all; the "
                     "chunked evaluation of 3757 pixels × 5 labels is slow on a CPU).")
FLAGS = flags.FLAGS

PAPER = {"mlp": (None, 0.763), "pretrain": (0.254, None), "finetune_real": (0.210, 0.510),
         "fe_100": (0.094, 0.232)}
PAPER_SCATTER = {"TEFF": (183, 19), "LOGG": (0.326, 0.056), "O_FE": (0.038, 0.021),
                 "MG_FE": (0.034, 0.019), "FE_H": (0.048, 0.019)}


def _evaluate(config, workdir: Path, max_spectra: int = 0) -> dict:
    """Metrics of ``workdir``'s latest parameters under ``config``'s task and test split."""
    from spectrax import sharding, train
    from spectrax.data import shards
    from spectrax.prepare import ensure_data

    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    trainer = train.Trainer(config, mesh, 1)
    data_dir = ensure_data(config.data)
    manifest = shards.read_manifest(data_dir)
    trainer.task.bind_labels(manifest.label_names)
    state, task_state = train.load_pretrained(trainer.init_state(), trainer, str(workdir), "")
    trainer.task.load_state(task_state)
    idx = train.label_indices(manifest, trainer.task)
    if not max_spectra:
        return train.evaluate(trainer, state, data_dir, "test", config, idx)["metrics"]
    import numpy as np

    from spectrax.data import pipeline
    outs = []
    for host in pipeline.eval_batches(str(data_dir), "test", batch_size=config.eval_batch_size,
                                      buckets=pipeline.batch_lengths(config.data, data_dir)):
        host = train._select_labels(host, idx)
        pred, _ = trainer.jitted_eval_step(state, host.for_device())
        outs.append({**{k: np.asarray(v) for k, v in pred.items()}, "labels": host.labels,
                     "label_mask": host.label_mask, "valid": host.valid})
        if sum(int(o["valid"].sum()) for o in outs) >= max_spectra:
            break
    cat = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    return trainer.task.metrics(cat)


def main(argv):
    del argv
    from spectrax import config_lib, train

    v = FLAGS.variant
    arg = f"variant={v}"
    runs = Path(FLAGS.runs)
    steps = lambda n: f"{arg},steps={n}" if n else arg  # noqa: E731
    load = lambda name, a: config_lib.load(f"configs/{name}.py", a)  # noqa: E731
    stages = {"mlp": (load("spectrafm_mlp_fe_100", ""), "spectrafm_mlp_fe_100"),
              "pretrain": (load("spectrafm_pretrain", steps(FLAGS.pretrain_steps)),
                           f"spectrafm_pretrain-{v}"),
              "finetune_real": (load("spectrafm_finetune_real", steps(FLAGS.finetune_steps)),
                                f"spectrafm_finetune_real-{v}"),
              "fe_100": (load("spectrafm_fe_100", arg), f"spectrafm_fe_100-{v}")}
    # Each stage starts from the previous stage's run in the same --runs directory.
    for key, previous in (("finetune_real", "pretrain"), ("fe_100", "finetune_real")):
        config = stages[key][0].unlock()
        config.init.from_workdir = str(runs / stages[previous][1])
        config.lock()
    for key in ("pretrain", "finetune_real", "fe_100", "mlp"):
        config, name = stages[key]
        if not (runs / name / "metrics.json").exists():
            if not FLAGS.train:
                raise SystemExit(f"{runs / name} has not finished; train it "
                                 f"(python -m spectrax.train --config=configs/"
                                 f"{config.name}.py:{arg}) or pass --train")
            t0 = time.time()
            train.train(config, runs / name)
            print(f"trained {name} in {time.time() - t0:.0f} s", flush=True)

    fe_cfg = config_lib.load("configs/spectrafm_fe_100.py", arg)
    rows = []
    for key, (config, name) in stages.items():
        cfg = stages["mlp"][0] if key == "mlp" else fe_cfg
        m = _evaluate(cfg, runs / name)
        rows.append((key, m.get("FE_H_rmse"), m.get("FE_H_rmse_iron_poor"), m.get("n_iron_poor")))
    lines = ["| model | [Fe/H] RMSE all | [Fe/H] RMSE iron-poor | paper all | paper iron-poor |",
             "|---|---|---|---|---|"]
    fmt = lambda x: "—" if x is None else f"{x:.3f}"
    for key, all_, poor, n_poor in rows:
        pa, pp = PAPER[key]
        lines.append(f"| {key} | {fmt(all_)} | {fmt(poor)} (n={n_poor}) | {fmt(pa)} | {fmt(pp)} |")
    scatter = ["| label | pre-trained (clean) | fine-tuned (real-like) | paper pre-trained | "
               "paper fine-tuned |", "|---|---|---|---|---|"]
    full = {}
    for key in ("pretrain", "finetune_real"):
        cfg = config_lib.load("configs/spectrafm_finetune_real.py", arg)  # real-like, first half
        full[key] = _evaluate(cfg, runs / stages[key][1], FLAGS.scatter_spectra)
    for label, (pp, pf) in PAPER_SCATTER.items():
        a = full["pretrain"].get(f"{label}_scatter_giants")
        b = full["finetune_real"].get(f"{label}_scatter_giants")
        scatter.append(f"| {label} | {fmt(a)} | {fmt(b)} | {pp} | {pf} |")
    print("\n".join(lines), flush=True)
    text = "\n".join(lines) + "\n\nScatter (median |Δ|, giants 1 < log g < 3.5), real-like test " \
        "split, first half of the range:\n\n" + "\n".join(scatter)
    print(text)
    out = Path("benchmarks") / "results.jsonl"
    with out.open("a") as f:
        f.write(json.dumps({"benchmark": "spectrafm_transfer", "variant": v, "runs": str(runs),
                            "steps": {k: stages[k][0].num_steps for k in stages},
                            "fe_rows": rows, "scatter": {k: {kk: vv for kk, vv in m.items()
                                                             if "scatter" in kk}
                                                         for k, m in full.items()},
                            "date": time.strftime("%Y-%m-%d")}) + "\n")


if __name__ == "__main__":
    runtime.configure()  # XLA:CPU flag and log levels, before any computation
    app.run(main)
