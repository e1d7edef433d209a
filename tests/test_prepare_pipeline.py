"""The preparation pipeline at scale: the same output for any number of workers (Beam and
in-process), a corrupt file between good ones, a killed run completed by a rerun, duplicates
across files, and memory that does not grow with the number of spectra."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.prepare_scale import write_files
from spectrax import prepare
from spectrax.data import shards

ROOT = Path(__file__).resolve().parents[1]
PER_FILE = 30


@pytest.fixture(scope="module")
def desi_files(tmp_path_factory) -> Path:
    """Eight DESI coadd + redrock pairs of 30 targets (240 spectra), real camera layout."""
    d = tmp_path_factory.mktemp("desi") / "files"
    write_files(d, 8, PER_FILE)
    return d


def _tree(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _cli(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spectrax.prepare", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_output_is_identical_for_any_number_of_workers(desi_files, tmp_path):
    """In-process, Beam with one worker and Beam with two worker processes write the same
    bytes: the same records, splits, shard files, statistics and counts."""
    outs = {}
    for name, workers, use_beam in (("local", 1, False), ("beam1", 1, True), ("beam2", 2, True)):
        report = prepare.prepare([str(desi_files)], tmp_path / name, cuts="none",
                                 spectra_per_group=60, workers=workers, use_beam=use_beam)
        assert report["kept"] == 8 * PER_FILE and not report["skipped"]
        outs[name] = _tree(tmp_path / name)
    manifest = shards.read_manifest(tmp_path / "local")
    assert len(manifest.splits["train"]["files"]) == 4  # 2 files of 30 per group of 60
    assert outs["beam1"] == outs["local"] and outs["beam2"] == outs["local"]
    assert manifest.stats["labels"]["z"]["n"] == manifest.count("train")


def test_corrupt_file_between_good_ones_is_skipped_and_named(desi_files, tmp_path):
    files = tmp_path / "files"
    shutil.copytree(desi_files, files)
    bad = files / "coadd-bench-00003.fits"
    bad.write_bytes(bad.read_bytes()[:50_000])  # truncated mid-HDU
    res = _cli([f"--input={files}", f"--output={tmp_path / 'out'}", "--workers=2",
                "--cuts=none"])
    assert res.returncode == 1, res.stderr[-3000:]
    assert "skipped" in res.stderr and "coadd-bench-00003.fits" in res.stderr
    manifest = shards.read_manifest(tmp_path / "out")
    (skipped,) = manifest.report["skipped"]
    assert skipped["file"].endswith("coadd-bench-00003.fits") and skipped["reason"]
    assert manifest.report["kept"] == 7 * PER_FILE  # every other file went through
    # --strict stops at the bad file and writes no output directory
    res = _cli([f"--input={files}", f"--output={tmp_path / 'strict'}", "--workers=1",
                "--cuts=none", "--strict"])
    assert res.returncode == 2 and "coadd-bench-00003.fits" in res.stderr
    assert not (tmp_path / "strict").exists()


def test_killed_run_leaves_no_output_and_the_same_command_completes_it(desi_files, tmp_path):
    out = tmp_path / "out"
    args = [f"--input={desi_files}", f"--output={out}", "--workers=1", "--cuts=none",
            "--spectra_per_group=30"]
    proc = subprocess.Popen([sys.executable, "-m", "spectrax.prepare", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    groups = Path(str(out) + ".partial") / "_groups"
    deadline = time.time() + 300
    while not (groups.exists() and any(groups.glob("*.npz"))):
        assert proc.poll() is None, "prepare finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # no half-written output directory
    done = {p.name: p.stat().st_mtime_ns for p in groups.glob("*.npz")}
    assert 0 < len(done) < 8
    res = _cli(args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not Path(str(out) + ".partial").exists()
    clean = tmp_path / "clean"
    assert _cli([*args[:1], f"--output={clean}", *args[2:]]).returncode == 0
    a, b = _tree(out), _tree(clean)
    assert {k for k in a if k != shards.MANIFEST} == {k for k in b if k != shards.MANIFEST}
    assert all(a[k] == b[k] for k in a if k != shards.MANIFEST)
    ma, mb = shards.read_manifest(out), shards.read_manifest(clean)
    assert (ma.splits, ma.stats, ma.report) == (mb.splits, mb.stats, mb.report)


def test_duplicate_targets_across_files_keep_one_by_rule(desi_files, tmp_path):
    files = tmp_path / "files"
    shutil.copytree(desi_files, files)
    for kind in ("coadd", "redrock"):  # the same 30 targets again, sorted between others
        shutil.copy(files / f"{kind}-bench-00000.fits", files / f"{kind}-bench-00003b.fits")
    report = prepare.prepare([str(files)], tmp_path / "out", cuts="none", spectra_per_group=60)
    assert report["duplicates"] == PER_FILE and report["kept"] == 8 * PER_FILE
    out = tmp_path / "out"
    ids = [int(r["id"]) for s in ("train", "val", "test") for r in shards.iter_records(out, s)]
    assert len(ids) == len(set(ids)) == 8 * PER_FILE
    # equal S/N²: the first in sorted input order stays; the copy shares its group (shard
    # files) with coadd-bench-00004, whose files were written again without the copy
    manifest = shards.read_manifest(out)
    assert any(".dedup." in f for e in manifest.splits.values() for f in e["files"])
    first = {int(r["id"]) for r in shards.iter_records(tmp_path / "out", "train")}
    bench4 = 39_600_000_000_000_000 + 4 * 1_000_000
    assert any(bench4 <= i < bench4 + PER_FILE for i in first)
    assert sum(manifest.splits[s]["count"] for s in manifest.splits) == 8 * PER_FILE


def _peak_rss_mib(n: int, out: Path) -> float:
    """Peak RSS (MiB) of a process that simulates ``n`` DESI galaxies and prepares them in
    groups of 256 (units of 128): both sizes below span many groups."""
    code = (
        "import resource\n"
        "from spectrax.data import inputs, preparation\n"
        f"units = inputs.simulated_units('desi_bgs', {{'train': {n}}}, 1, rows_per_unit=128)\n"
        f"settings = preparation.Settings(output={str(out)!r}, splits=(('train', 1.0),), "
        "spectra_per_group=256)\n"
        "preparation.run_local(preparation.make_plan(units, settings), progress=False)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return int(res.stdout.split()[-1]) / 1024


def test_memory_does_not_grow_with_the_number_of_spectra(tmp_path):
    """5× more spectra, the same peak memory: records stream to the shard files. Collecting
    them, as prepare once did, would add ~63 kB per spectrum: +290 MiB here."""
    small = _peak_rss_mib(1200, tmp_path / "small")
    large = _peak_rss_mib(6000, tmp_path / "large")
    assert shards.read_manifest(tmp_path / "large").count("train") == 6000
    assert large < 1.1 * small, (small, large)
