r"""Survey-scale data path: prepare and predict throughput and memory on DESI-format files.

    python -m benchmarks.prepare_scale --dir=/tmp/desi_bench --small=20 --large=200

1. Writes DESI coadd + redrock files of ``--per_file`` targets each (the real camera layout:
   B 3600–5800, R 5760–7620, Z 7520–9824 Å at 0.8 Å, FLUX/IVAR/MASK images, a FIBERMAP and a
   REDSHIFTS table; spectra from the embedded simulator, unique TARGETIDs per file; no
   RESOLUTION images, which neither the reader nor the raw read below touches).
2. The raw rate: a plain astropy read of the same arrays the reader reads (FIBERMAP, every
   camera's WAVELENGTH/FLUX/IVAR/MASK, REDSHIFTS), on one core.
3. ``python -m spectrax.prepare`` on ``--small`` files with 1 and 2 workers, and on ``--large``
   files with 1 and 2 workers, each in its own process: spectra/s and the peak resident memory
   of the whole process tree (driver + Beam workers, sampled every 0.1 s). Rates are of the
   whole command, start-up included (Python, JAX and Beam imports, worker processes: a few
   seconds), so the per-worker rate and the 2-worker speed-up are read on the large set.
4. ``python -m spectrax.predict`` with the SpecPT ``tokens`` redshift model (one training
   step, random-quality weights: the rate does not depend on them) over the ``--small`` files:
   spectra/s with reading next to the jitted step alone, at the same batch.
5. A projection to DESI DR1 (18 M spectra): hours and memory on one 2-core machine and on N
   Beam workers, from the measured per-worker rates.

Rows go to ``--out`` (results.jsonl) and a dated section to ``--results_md``.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from absl import app, flags
from astropy.io import fits
from astropy.table import Table

from benchmarks.run import loadavg, update_results_md
from spectrax import runtime
from spectrax.data import synthetic
from spectrax.data.grids import DESI_WAVE_MIN, DESI_WAVE_STEP

CAMERAS = {"B": (3600.0, 2751), "R": (5760.0, 2326), "Z": (7520.0, 2881)}
DR1_SPECTRA = 18_000_000
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def write_files(directory: Path, n_files: int, per_file: int, seed: int = 0) -> list[Path]:
    """DESI coadd + redrock pairs ``coadd-bench-<i>.fits`` (module docstring, step 1)."""
    directory.mkdir(parents=True, exist_ok=True)
    base = synthetic.desi_galaxy_rows(0, per_file, "bgs", seed)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_files):
        coadd = directory / f"coadd-bench-{i:05d}.fits"
        redrock = directory / f"redrock-bench-{i:05d}.fits"
        out.append(coadd)
        if coadd.exists() and redrock.exists():
            continue
        tid = np.int64(39_600_000_000_000_000 + i * 1_000_000) + np.arange(per_file)
        order = rng.permutation(per_file)  # each file its own order of the base spectra
        hdus = [fits.PrimaryHDU(), fits.BinTableHDU(Table({
            "TARGETID": tid, "OBJTYPE": np.array(["TGT"] * per_file),
            "TARGET_RA": rng.uniform(0, 360, per_file), "TARGET_DEC": rng.uniform(-10, 80, per_file),
            "FIBER": np.arange(per_file, dtype=np.int32), "TILEID": np.full(per_file, 80613),
            "COADD_FIBERSTATUS": np.zeros(per_file, np.int32)}), name="FIBERMAP")]
        for cam, (start, n) in CAMERAS.items():
            wave = start + DESI_WAVE_STEP * np.arange(n)
            idx = np.rint((wave - DESI_WAVE_MIN) / DESI_WAVE_STEP).astype(int)
            mask = (~base["mask"][order][:, idx]).astype(np.int32)
            hdus += [fits.ImageHDU(wave, name=f"{cam}_WAVELENGTH"),
                     fits.ImageHDU(base["flux"][order][:, idx], name=f"{cam}_FLUX"),
                     fits.ImageHDU(base["ivar"][order][:, idx], name=f"{cam}_IVAR"),
                     fits.ImageHDU(mask, name=f"{cam}_MASK")]
        fits.HDUList(hdus).writeto(coadd, overwrite=True)
        fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU(Table({
            "TARGETID": tid, "Z": base["z"][order].astype(np.float64),
            "ZERR": np.full(per_file, 1e-5), "ZWARN": np.zeros(per_file, np.int64),
            "SPECTYPE": np.array(["GALAXY"] * per_file), "DELTACHI2": np.full(per_file, 500.0),
            "CHI2": np.full(per_file, 7800.0)}), name="REDSHIFTS")]).writeto(redrock,
                                                                            overwrite=True)
    return out


def raw_read_rate(coadds: list[Path]) -> float:
    """Spectra/s of a plain astropy read of what the reader reads (one core)."""
    n, t0 = 0, time.perf_counter()
    for coadd in coadds:
        with fits.open(coadd, memmap=False) as h:
            tid = np.asarray(h["FIBERMAP"].data["TARGETID"])
            for cam in CAMERAS:
                for kind in ("WAVELENGTH", "FLUX", "IVAR", "MASK"):
                    np.asarray(h[f"{cam}_{kind}"].data).sum()
        with fits.open(coadd.with_name(coadd.name.replace("coadd", "redrock")),
                       memmap=False) as h:
            np.asarray(h["REDSHIFTS"].data["Z"]).sum()
        n += len(tid)
    return n / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# Runs in their own process, with the peak memory of the process tree
# ----------------------------------------------------------------------------------------------
def run_measured(args: list[str]) -> dict:
    """Runs ``python -m <args>``; returns seconds, exit code, peak RSS of the tree (MiB)."""
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample():
        p = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [p] + p.children(recursive=True)
                peak[0] = max(peak[0], sum(q.memory_info().rss for q in tree))
            except psutil.Error:
                pass
            time.sleep(0.1)

    t0 = time.perf_counter()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"seconds": seconds, "peak_rss_mib": peak[0] / 2**20, "stdout": out}


def prepare_run(coadds: list[Path], out: Path, workers: int) -> dict:
    files = [str(c) for c in coadds] + [str(c).replace("coadd-", "redrock-") for c in coadds]
    r = run_measured(["spectrax.prepare", "--survey=desi", "--cuts=none",
                      f"--workers={workers}", f"--output={out}", *[f"--input={f}" for f in files]])
    kept = json.loads((out / "manifest.json").read_text())["report"]["kept"]
    return {"workers": workers, "spectra": kept, "seconds": r["seconds"],
            "spectra_per_s": kept / r["seconds"], "peak_rss_mib": r["peak_rss_mib"]}


def predict_run(coadds: list[Path], tmp: Path, batch: int) -> dict:
    """Trains the SpecPT `tokens` redshift model for one step (its throughput does not depend on
    the weights), then predicts the files; returns the rates predict reports."""
    run = tmp / "run"
    over = ["--config=configs/specpt_redshift_bgs.py:variant=tokens", "--config.num_steps=1",
            "--config.init.from_workdir=", "--config.eval_every=0",
            "--config.data.n_train=256", "--config.data.n_val=32", "--config.data.n_test=32",
            f"--config.data.cache_dir={tmp / 'data'}"]
    if not (run / "checkpoints").exists():
        run_measured(["spectrax.train", *over, f"--workdir={run}"])
    r = run_measured(["spectrax.predict", *over, f"--checkpoint={run}",
                      f"--output={tmp / 'catalog.fits'}", f"--batch_size={batch}", "--restart",
                      *[f"--input={c}" for c in coadds]])
    line = [l for l in r["stdout"].splitlines() if l.startswith("wrote")][-1]
    # "wrote N rows to X (R spectra/s with reading; the jitted step alone S)"
    with_reading = float(line.split("(")[1].split(" spectra/s")[0].replace(",", ""))
    step = float(line.split("alone ")[1].rstrip(")").replace(",", ""))
    return {"batch": batch, "spectra_per_s_with_reading": with_reading,
            "step_spectra_per_s": step, "ratio": with_reading / step,
            "seconds": r["seconds"], "peak_rss_mib": r["peak_rss_mib"]}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def projection(per_worker: float, two_workers: float, rss_mib: float) -> dict:
    """DESI DR1 (18 M spectra) hours on one 2-core machine and per N Beam workers."""
    return {"spectra": DR1_SPECTRA,
            "hours_one_machine_2_workers": DR1_SPECTRA / two_workers / 3600,
            "hours_per_worker_count": {n: DR1_SPECTRA / (per_worker * n) / 3600
                                       for n in (1, 16, 64, 256)},
            "memory_per_worker_mib": rss_mib}


def markdown(row: dict) -> str:
    p = row["prepare"]
    s1, s2, big, big2 = p["small_1"], p["small_2"], p["large_1"], p["large_2"]
    pr = row["predict"]
    proj = row["projection"]
    lines = [
        f"## {row['date'][:10]} — `python -m benchmarks.prepare_scale` on {row['machine']}",
        "", f"Load average at the start {row['load']}; DESI-format files of {row['per_file']} "
        "targets (coadd + redrock), simulated spectra.", "",
        "| measurement | spectra | spectra/s | peak RSS (MiB, process tree) |",
        "|---|---|---|---|",
        f"| raw astropy read (one core) | {s1['spectra']:,} | {row['raw_read_per_s']:,.0f} | |",
        f"| prepare, 1 worker | {s1['spectra']:,} | {s1['spectra_per_s']:,.0f} "
        f"| {s1['peak_rss_mib']:,.0f} |",
        f"| prepare, 2 workers | {s2['spectra']:,} | {s2['spectra_per_s']:,.0f} "
        f"| {s2['peak_rss_mib']:,.0f} |",
        f"| prepare, 1 worker | {big['spectra']:,} | {big['spectra_per_s']:,.0f} "
        f"| {big['peak_rss_mib']:,.0f} |",
        f"| prepare, 2 workers | {big2['spectra']:,} | {big2['spectra_per_s']:,.0f} "
        f"| {big2['peak_rss_mib']:,.0f} |",
        "", f"- prepare per worker ÷ raw read ({big['spectra']:,} spectra): "
        f"**{row['per_worker_vs_raw']:.2f}** (goal ≥ 0.5); 2 workers ÷ 1: "
        f"**{row['two_vs_one']:.2f}** (goal ≥ 1.7); peak RSS (1 worker) "
        f"{big['spectra']:,} ÷ {s1['spectra']:,} spectra: **{row['rss_large_vs_small']:.2f}** "
        "(goal ≤ 1.2).",
        f"- predict (SpecPT `tokens` redshift, batch {pr['batch']}): **{pr['spectra_per_s_with_reading']:,.0f}"
        f"** spectra/s with reading, {pr['step_spectra_per_s']:,.0f} for the jitted step alone: "
        f"**{pr['ratio']:.2f}** (goal ≥ 0.9).",
        f"- DESI DR1 ({proj['spectra'] / 1e6:.0f} M spectra): prepare "
        f"{proj['hours_one_machine_2_workers']:,.1f} h on this 2-core machine; "
        + ", ".join(f"{h:,.2f} h on {n} workers" for n, h in
                    proj['hours_per_worker_count'].items() if n > 1)
        + f" (Beam, {proj['memory_per_worker_mib']:,.0f} MiB per worker process, independent "
        f"of the survey size); predict {DR1_SPECTRA / pr['spectra_per_s_with_reading'] / 3600:,.0f} "
        "h on this CPU.", ""]
    return "\n".join(lines)


FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Flags of the command only (tests import this module's functions)."""
    flags.DEFINE_string("dir", "/tmp/spectrax-prepare-bench", "Where the benchmark files go.")
    flags.DEFINE_integer("small", 20, "Files of the small set.")
    flags.DEFINE_integer("large", 200, "Files of the large set (≥ 10× small, memory check).")
    flags.DEFINE_integer("per_file", 500, "Targets per file.")
    flags.DEFINE_integer("batch", 64, "predict batch.")
    flags.DEFINE_string("out", "benchmarks/results.jsonl", "JSON lines appended here; '' = none.")
    flags.DEFINE_string("results_md", "benchmarks/RESULTS.md", "Markdown section; '' = none.")


def main(argv):
    del argv
    base = Path(FLAGS.dir)
    load = loadavg()
    coadds = write_files(base / "files", FLAGS.large, FLAGS.per_file)
    small = coadds[:FLAGS.small]
    raw = raw_read_rate(small)
    print(f"raw astropy read: {raw:,.0f} spectra/s", flush=True)
    prep = {"small_1": prepare_run(small, base / "out-s1", 1),
            "small_2": prepare_run(small, base / "out-s2", 2),
            "large_1": prepare_run(coadds, base / "out-l1", 1),
            "large_2": prepare_run(coadds, base / "out-l2", 2)}
    for k, v in prep.items():
        print(k, v, flush=True)
    pred = predict_run(small, base / "predict", FLAGS.batch)
    print("predict", pred, flush=True)
    row = {"benchmark": "prepare_scale", "date": datetime.datetime.now().isoformat("T", "seconds"),
           "machine": f"{platform.node()} ({os.cpu_count()} cores)", "load": load,
           "per_file": FLAGS.per_file, "raw_read_per_s": raw, "prepare": prep, "predict": pred,
           "per_worker_vs_raw": prep["large_1"]["spectra_per_s"] / raw,
           "two_vs_one": prep["large_2"]["spectra_per_s"] / prep["large_1"]["spectra_per_s"],
           "rss_large_vs_small": prep["large_1"]["peak_rss_mib"] / prep["small_1"]["peak_rss_mib"],
           "projection": projection(prep["large_1"]["spectra_per_s"],
                                    prep["large_2"]["spectra_per_s"],
                                    prep["large_1"]["peak_rss_mib"])}
    if FLAGS.out:
        with open(FLAGS.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    text = markdown(row)
    print(text)
    if FLAGS.results_md:
        update_results_md(Path(FLAGS.results_md), text, f"prepare_scale {row['date'][:10]}")


if __name__ == "__main__":
    runtime.configure()  # XLA:CPU flag and log levels, before any computation
    _define_flags()
    app.run(main)
