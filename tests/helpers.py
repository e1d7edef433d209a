"""What test files share (importable as ``helpers``: pytest puts tests/ on sys.path)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]               # the repository
FIXTURES = ROOT.parent / "shared" / "fixtures" / "real"  # real survey files (its README.md)


def shrunk(config, cache_dir, *, splits: tuple[int, int, int], steps: int, batch_size: int,
           eval_batch_size: int, log_every: int, ckpt_every: int, num_figures: int,
           warmup_steps: int, **data):
    """``config`` (unlocked and returned) made a seconds-long run: ``splits`` = simulated
    (train, val, test) spectra cached in ``cache_dir``, ``steps`` steps, and the rest as named;
    ``data`` overrides further ``config.data`` fields."""
    c = config
    c.unlock()
    c.data.n_train, c.data.n_val, c.data.n_test = splits
    c.data.cache_dir = str(cache_dir)
    c.data.update(data)
    c.num_steps, c.batch_size, c.eval_batch_size = steps, batch_size, eval_batch_size
    c.log_every, c.ckpt_every, c.num_figures = log_every, ckpt_every, num_figures
    c.optim.warmup_steps = warmup_steps
    return c


def tiny_config(tmp_path: Path, *, stage: str = "autoencoder", steps: int = 6, **data):
    """A seconds-long SpecPT run ('tiny' model) on a few hundred simulated BGS spectra: the
    autoencoder, or (``stage="redshift"``) the redshift model, not initialised from a run."""
    from spectrax.config_lib import load

    name = "specpt_bgs" if stage == "autoencoder" else "specpt_redshift_bgs"
    c = shrunk(load(f"configs/{name}.py", "variant=tiny"), tmp_path.parent / "spectrax-test-data",
               splits=(96, 16, 24), steps=steps, batch_size=8, eval_batch_size=16, log_every=2,
               ckpt_every=4, num_figures=2, warmup_steps=2, **data)
    c.init.from_workdir = ""
    return c.lock()
