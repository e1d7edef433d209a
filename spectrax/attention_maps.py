"""SpectraFM attention maps: where in the spectrum the model looks when asked for each label.

    python -m spectrax.attention_maps --config=configs/spectrafm_finetune_real.py \\
        --checkpoint=runs/spectrafm_finetune_real-small --split=test \\
        [--select="FE_H < -1"] [--max_stars=200] --out=attention.png

Per label: the last decoder block's cross-attention of the request token, averaged over heads,
for every chunk of the chunked inference (each star's pixels permuted once and cut into chunks of
512); padded keys zeroed and each chunk's weights renormalised; scattered back to pixel
positions and averaged over the stars of the group (:func:`spectrax.models.spectrafm.attention_map`).
The figure draws the group's mean spectrum with each label's attention beneath it; the arrays
go to ``<out>.npz`` (wavelength, mean_flux, attention [K, L], labels).
"""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from spectrax import plots, runtime, sharding, train  # train defines --config (a run's config)
from spectrax.data import pipeline, shards
from spectrax.models import spectrafm as fm
from spectrax.prepare import ensure_data, parse_selection


def compute(config, checkpoint: str, *, split: str = "test", select: str = "",
            max_stars: int = 200, batch_size: int = 32) -> dict:
    """Returns {"wavelength" [L], "mean_flux" [L], "attention" [K, L], "labels", "n_stars"}."""
    if config.task != "spectrafm":
        raise ValueError(f"attention maps are SpectraFM's; config {config.name!r} has task "
                         f"{config.task!r}")
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    trainer = train.Trainer(config, mesh, 1)
    data_dir = ensure_data(config.data)
    manifest = shards.read_manifest(data_dir)
    task = trainer.task
    task.bind_labels(manifest.label_names)
    state, task_state = train.load_pretrained(trainer.init_state(), trainer, checkpoint, "")
    task.load_state(task_state)
    idx = train.label_indices(manifest, task)
    sel = parse_selection(select)

    @jax.jit
    def attend(state, batch):
        model = trainer.model(state)
        _, _, att, oks = task.predict_standardised(model, batch, return_attention=True)
        return att, oks

    sums = counts = None
    flux_sum = flux_n = None
    wavelength, n_stars = None, 0
    for host in pipeline.eval_batches(str(data_dir), split, batch_size=batch_size,
                                      buckets=pipeline.batch_lengths(config.data, data_dir)):
        keep = host.valid.copy()
        if sel:
            j = manifest.label_names.index(sel[0])
            value = np.where(host.label_mask[:, j], host.labels[:, j], np.nan)
            ops = {"<": np.less, "<=": np.less_equal, ">": np.greater,
                   ">=": np.greater_equal, "==": np.equal}
            with np.errstate(invalid="ignore"):
                keep &= ops[sel[1]](value, sel[2])
        if not keep.any():
            continue
        batch = train._select_labels(host, idx).replace(valid=keep)
        att, oks = jax.device_get(attend(state, batch.for_device()))   # [C,K,B,ctx], [C,B,ctx]
        layout = task.chunk_layout(trainer.model(state), host.num_pixels)
        context, n_chunks = layout.context, layout.n_chunks
        positions = np.maximum(layout.positions(), 0)  # padding slots are masked anyway
        length = host.num_pixels
        if sums is None:
            sums = np.zeros((att.shape[1], length))
            counts = np.zeros(length)
            flux_sum, flux_n = np.zeros(length), np.zeros(length)
            wavelength = np.asarray(host.wavelength[0], np.float64)
        rows = np.flatnonzero(keep)
        # Rows = (chunk, star) pairs: each forward pass's attention is renormalised on its own.
        mask = np.concatenate([oks[c][rows] for c in range(n_chunks)])
        pix = np.concatenate([np.broadcast_to(positions[c], (rows.size, context))
                              for c in range(n_chunks)])
        for k in range(att.shape[1]):
            a = np.concatenate([att[c, k][rows] for c in range(n_chunks)])
            sums[k] += fm.attention_map(a, mask, pix, length) * rows.size
        counts += rows.size
        good = host.mask[rows]
        flux_sum += np.where(good, host.flux[rows], 0.0).sum(0)
        flux_n += good.sum(0)
        n_stars += rows.size
        if n_stars >= max_stars:
            break
    if not n_stars:
        raise ValueError(f"no {split} spectra of {data_dir} satisfy {select!r}")
    return {"wavelength": wavelength, "mean_flux": flux_sum / np.maximum(flux_n, 1),
            "attention": sums / np.maximum(counts, 1), "labels": list(task.labels),
            "n_stars": n_stars}


def figure(result: dict, path: Path, title: str = "") -> Path:
    """Mean spectrum on top, one attention panel per label below, sharing the wavelength axis."""
    plt = plots.plt
    k = len(result["labels"])
    fig, axes = plt.subplots(k + 1, 1, figsize=(12, 1.6 * (k + 1)), sharex=True)
    w = np.asarray(result["wavelength"], np.float64).copy()
    # Chip gaps stay gaps: a NaN where the wavelength jumps breaks the lines there.
    jumps = np.flatnonzero(np.diff(w) > 20 * np.median(np.diff(w))) + 1
    gapped = lambda y: np.insert(np.asarray(y, np.float64), jumps, np.nan)
    w = gapped(w)
    axes[0].plot(w, gapped(result["mean_flux"]), lw=0.5, color="k")
    axes[0].set_ylabel("mean flux")
    axes[0].set_title(title or f"attention of the request token, {result['n_stars']} stars",
                      fontsize=9)
    for ax, name, att in zip(axes[1:], result["labels"], result["attention"]):
        ax.plot(w, gapped(att), lw=0.5, color="C3")
        ax.set_ylabel(name, fontsize=8)
    axes[-1].set_xlabel("wavelength [Å]")
    return plots._save(fig, path)


flags.DEFINE_string("checkpoint", None, "Run directory of a SpectraFM run.")
flags.DEFINE_string("split", "test", "Split of the config's data.")
flags.DEFINE_string("select", "", "Group of stars, e.g. 'FE_H < -1' (a label of the shards).")
flags.DEFINE_integer("max_stars", 200, "Stars averaged.")
flags.DEFINE_string("out", "attention.png", "Figure to write (arrays go to <out>.npz).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if FLAGS.config is None or not FLAGS.checkpoint:
        raise app.UsageError("--config and --checkpoint are required")
    try:
        res = compute(FLAGS.config, FLAGS.checkpoint, split=FLAGS.split, select=FLAGS.select,
                      max_stars=FLAGS.max_stars)
    except (ValueError, FileNotFoundError) as e:
        print(f"spectrax.attention_maps: error: {e}", file=sys.stderr)
        sys.exit(2)
    out = Path(FLAGS.out)
    np.savez(out.with_suffix(".npz"), **{k: np.asarray(v) for k, v in res.items()})
    figure(res, out, f"{FLAGS.select or 'all stars'}: {res['n_stars']} stars")
    print(f"wrote {out} and {out.with_suffix('.npz')}")


if __name__ == "__main__":
    runtime.configure()  # XLA:CPU flag and log levels, before any computation
    app.run(main)
