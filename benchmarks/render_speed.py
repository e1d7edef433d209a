r"""Images per second: the jitted jax renderer vs one matplotlib figure per spectrum.

    python -m benchmarks.render_speed [--batch 64] [--repeats 5] [--mpl-spectra 16]

Input: simulated DESI BGS spectra (7781 pixels; block maps with ``fit="truncate"``, the
reference's dropping of values beyond 5476). jax: ``jax.jit(partial(render, rep, ...))`` on a
device-resident batch; compile time reported apart; then the median over ``--repeats`` calls
of one batch each, ``block_until_ready`` inside the timing. matplotlib: what a user of the
reference does per spectrum — a 2.24 in figure at 100 dpi, ``plot`` (simple) or block fill +
``imshow`` with viridis (map2d), ``savefig`` to an in-memory PNG, ``close`` — timed over
``--mpl-spectra`` spectra, median of ``--repeats`` passes. One JSON line per representation is
appended to ``benchmarks/results.jsonl`` with the machine, jax version, load average and date.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import io
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spectrax import runtime
from spectrax import render
from spectrax.data import grids, synthetic


def machine() -> dict:
    dev = jax.devices()[0]
    return {"host": platform.node(), "cpu_count": os.cpu_count(), "platform": dev.platform,
            "device": dev.device_kind, "devices": jax.device_count(), "jax": jax.__version__,
            "loadavg_1min": round(os.getloadavg()[0], 2),
            "date": datetime.date.today().isoformat()}


def bench_jax(rep: str, flux, mask, wave, repeats: int, **options) -> tuple[float, float]:
    """(compile + first call seconds, median seconds per batch)."""
    fn = jax.jit(functools.partial(render.render, rep, **options))
    args = [jax.device_put(jnp.asarray(a)) for a in (flux, mask, wave)]
    t0 = time.perf_counter()
    fn(*args).block_until_ready()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    return compile_s, statistics.median(times)


def _mpl_simple(plt, wave, flux) -> bytes:
    fig = plt.figure(figsize=(2.24, 2.24))
    plt.plot(wave, flux, linewidth=0.5)
    plt.axis("off")
    plt.tight_layout(pad=0)
    buf = io.BytesIO()
    plt.savefig(buf, format="png", dpi=100, bbox_inches="tight", pad_inches=0)
    plt.close(fig)
    return buf.getvalue()


def _mpl_map2d(plt, wave, flux) -> bytes:
    nb, bs = 74, 3
    values = np.zeros(nb * nb)
    values[:min(len(flux), nb * nb)] = flux[:nb * nb]
    image = np.zeros((224, 224))
    # The block fill, vectorised (the reference loops in Python, which is slower still).
    image[:nb * bs, :nb * bs] = np.repeat(np.repeat(values.reshape(nb, nb), bs, 0), bs, 1)
    fig = plt.figure(figsize=(2.24, 2.24))
    plt.imshow(image, cmap="viridis", vmin=render.PAPER_VMIN, vmax=render.PAPER_VMAX)
    plt.axis("off")
    plt.gca().set_position([0, 0, 1, 1])
    buf = io.BytesIO()
    plt.savefig(buf, format="png", dpi=100, bbox_inches="tight", pad_inches=0)
    plt.close(fig)
    return buf.getvalue()


def bench_matplotlib(rep: str, flux, wave, n: int, repeats: int) -> float:
    """Median seconds per image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    draw = {"simple": _mpl_simple, "map2d": _mpl_map2d}[rep]
    draw(plt, wave, flux[0])                                    # warm-up (font cache, imports)
    per_image = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n):
            draw(plt, wave, flux[i % len(flux)])
        per_image.append((time.perf_counter() - t0) / n)
    return statistics.median(per_image)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.render_speed")
    parser.add_argument("--representations", default="simple,map2d")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mpl-spectra", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results.jsonl")
    args = parser.parse_args(argv)

    sim = synthetic.simulate_desi_galaxies(args.batch, "bgs", 0)
    wave = grids.desi_wavelength().astype(np.float32)
    flux, mask = sim["flux"], sim["mask"]
    waves = np.broadcast_to(wave, flux.shape)
    info = machine()
    rows = []
    for rep in [r.strip() for r in args.representations.split(",") if r.strip()]:
        compile_s, batch_s = bench_jax(rep, flux, mask, waves, args.repeats, fit="truncate")
        mpl_s = bench_matplotlib(rep, flux, wave, args.mpl_spectra, max(1, args.repeats // 2))
        row = {"benchmark": "render_speed", "representation": rep, "batch": args.batch,
               "length": int(flux.shape[1]), "jax_compile_s": round(compile_s, 2),
               "jax_batch_ms": round(1e3 * batch_s, 1),
               "jax_images_per_s": round(args.batch / batch_s, 1),
               "matplotlib_images_per_s": round(1.0 / mpl_s, 1),
               "speedup": round(mpl_s * args.batch / batch_s, 1), **info}
        rows.append(row)
    print(f"\n{info['device']} ({info['platform']}, {info['cpu_count']} CPUs, load "
          f"{info['loadavg_1min']}), jax {info['jax']}, batch {args.batch}, L = "
          f"{flux.shape[1]}\n")
    print("| representation | jax images/s | jax ms/batch | compile s | matplotlib images/s "
          "| speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['representation']} | {r['jax_images_per_s']:,} | {r['jax_batch_ms']:,} | "
              f"{r['jax_compile_s']} | {r['matplotlib_images_per_s']:,} | {r['speedup']}× |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    print(f"\nappended {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    runtime.configure()  # XLA:CPU flag and log levels, before any computation
    raise SystemExit(main())
