"""What the experiment configs in configs/ share: the defaults, the argument parser, a loader.

Every file in configs/ is a complete experiment (data, model, task, optimiser, schedule, steps,
evaluation and the run it starts from) defining ``get_config(arg: str | None)``; ``arg`` is what
follows the colon in ``--config=configs/x.py:variant=paper,steps=10`` and is parsed by
:func:`parse_arg`. Configs are locked after construction so that a misspelt override on the
command line is an error rather than a silently ignored key. :func:`load` reads a config file
from Python (tests, benchmarks, notebooks).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections

ROOT = Path(__file__).resolve().parents[1]


def parse_arg(arg: str | None, **defaults):
    """Parses ``"variant=paper,foo=1"`` into a ConfigDict of strings over ``defaults``.

    Unknown keys raise ValueError listing the known ones.
    """
    out = ml_collections.ConfigDict(dict(defaults))
    if not arg:
        return out
    for item in arg.split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config argument {item!r} is not of the form key=value")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        out[key] = _typed(key, value, defaults[key])
    return out


def _typed(key: str, value: str, default):
    """``value`` as the type of ``default`` (a bool from true/false/1/0/yes/no: ``bool("False")``
    would be True)."""
    if isinstance(default, bool):
        low = value.strip().lower()
        if low not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"config argument {key}={value!r}: expected true or false")
        return low in ("true", "1", "yes")
    return type(default)(value) if default is not None else value


def load(path: str | Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of a config file, e.g. ``load("configs/specpt_bgs.py",
    "variant=tiny")``; a relative path is taken from the repository root."""
    path = Path(path)
    path = path if path.is_absolute() or path.exists() else ROOT / path
    spec = importlib.util.spec_from_file_location(f"spectrax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every experiment; configs override what they need."""
    c = ml_collections.ConfigDict()
    c.name = "experiment"
    c.seed = 0
    c.workdir = ""            # default: runs/<name>[-<variant>]
    c.task = ""
    c.task_kwargs = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.name = ""
    c.model.variant = ""
    c.model.head = ""
    # Compute dtype: "auto" = bfloat16 on GPU/TPU, float32 on CPU; or "float32" / "bfloat16".
    # Parameters, optimiser state and losses stay float32.
    c.model.dtype = "auto"
    # Attention implementation: "auto" (= "deferred", softmax normalised after the value matmul),
    # "xla" (jax.nn.dot_product_attention) or "cudnn" (fused flash attention, GPU, bf16 only).
    c.model.attention = "auto"
    c.model.batch_mixing_attention = False
    c.model.num_outputs = 0       # classes or regressed labels of heads that need it
    c.model.pixel_range = ()      # window_mlp: (first, stop) pixels of its input window

    c.data = ml_collections.ConfigDict()
    c.data.path = ""              # a shard directory; empty = the embedded simulator
    c.data.simulator = ""         # e.g. "desi_bgs", "desi_elg"
    c.data.n_train = 8000
    c.data.n_val = 500
    c.data.n_test = 2000
    c.data.sim_seed = 0
    c.data.cache_dir = "data"
    c.data.length = 0             # pixel axis length; 0 = the manifest grid's
    c.data.buckets = ()           # length buckets (px) for variable-length spectra; () = none
    c.data.train_select = ""      # keep only train spectra with e.g. "FE_H > -1" ...
    c.data.train_limit = 0        # ... and at most this many of them (0 = all)
    c.data.num_threads = 2

    c.batch_size = 32             # global, over all devices and processes
    c.eval_batch_size = 64
    c.num_steps = 1000

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = 1e-4
    c.optim.weight_decay = 5e-5
    c.optim.clip_norm = 1.0
    c.optim.schedule = "cosine"   # cosine | constant | plateau
    c.optim.warmup_steps = 100
    c.optim.plateau_patience = 5
    c.optim.t0_epochs = 50        # cosine_restarts: epochs per cosine cycle (T_0) ...
    c.optim.eta_min = 1e-10       # ... and the floor it anneals to
    c.optim.freeze = ()           # parameter path prefixes never updated ("encoder/stem", ...)
    # Steps with a non-finite loss or gradient are always skipped. guard_update also skips the
    # parameter update when finite gradients give a non-finite update (an absurd learning rate);
    # it costs a pass over the update (~30 % of a CPU step for a 63 M-parameter model).
    c.optim.guard_update = False

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1              # -1 = all devices not used by the other axes
    c.mesh.fsdp = 1

    c.init = ml_collections.ConfigDict()
    c.init.from_workdir = ""      # start from another run's latest checkpoint
    c.init.prefix = ""            # ... copying only this subtree (e.g. "encoder")
    c.init.target = ""            # ... into this subtree of the new model (default: prefix)
    c.init.from_file = ""         # or a timm / Hugging Face ViT-B/16 file, into `backbone`

    c.log_every = 25
    c.ckpt_every = 200
    c.eval_every = 0              # 0 = only at the end
    c.keep_checkpoints = 2
    c.on_nonfinite = "stop"       # stop | skip
    c.memory_limit_gb = 0.0       # per-device memory the compiled step may use; 0 = the device's
    c.num_figures = 6
    return c
