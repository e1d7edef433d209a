"""Shared pieces of the ml_collections experiment configs in configs/.

Every config file defines ``get_config(arg: str | None)``; ``arg`` is what follows the colon in
``--config=configs/x.py:variant=paper,steps=10`` and is parsed by :func:`parse_arg`. Configs are
locked after construction so that a misspelt override on the command line is an error rather
than a silently ignored key.
"""
from __future__ import annotations

import ml_collections


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
        out[key] = type(defaults[key])(value) if defaults[key] is not None else value
    return out


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

    c.log_every = 25
    c.ckpt_every = 200
    c.eval_every = 0              # 0 = only at the end
    c.keep_checkpoints = 2
    c.on_nonfinite = "stop"       # stop | skip
    c.memory_limit_gb = 0.0       # per-device memory the compiled step may use; 0 = the device's
    c.num_figures = 6
    return c


# ----------------------------------------------------------------------------------------------
# SpecPT experiments (configs/specpt_*.py are thin wrappers around these)
# ----------------------------------------------------------------------------------------------
SPECPT_SAMPLES = {"bgs": "desi_bgs", "elg": "desi_elg"}


def specpt_autoencoder(sample: str, arg: str | None) -> ml_collections.ConfigDict:
    """The SpecPT autoencoder on the simulated DESI ``sample`` (bgs | elg).

    Variants: ``small`` (default; paper architecture, CPU widths), ``tokens`` (corrected
    architecture with real attention), ``paper`` (1,120,475,621 parameters; accelerators),
    ``tokens_paper``.
    """
    a = parse_arg(arg, variant="tokens")
    c = base_config()
    c.name = f"specpt_{sample}"
    c.task = "reconstruction"
    c.task_kwargs.loss_type = "l1"
    c.model.name = "specpt_autoencoder"
    c.model.variant = a.variant
    c.data.simulator = SPECPT_SAMPLES[sample]
    c.optim.lr = 1e-3 if a.variant in ("small", "tokens") else 1e-4
    c.num_steps = 300
    c.batch_size = 32
    if a.variant.startswith("paper") or a.variant == "tokens_paper":
        c.batch_size = 128          # the reference's batch; needs an accelerator
        c.num_steps = 20000
    return c.lock()


# The scanned redshift range of the ZScan models per simulated sample: a margin around the
# simulator's range (BGS 0.02–0.6, ELG 0.6–1.6) so that a galaxy beyond the trained range can
# still be located and flagged (ZWARN OUTSIDE_TRAINED_RANGE) instead of being mapped into it.
ZSCAN_RANGES = {"bgs": dict(z_min=0.0, z_max=0.7, prior_z_range=(0.02, 0.6)),
                "elg": dict(z_min=0.5, z_max=1.7, prior_z_range=(0.6, 1.6))}


def specpt_redshift(sample: str, arg: str | None) -> ml_collections.ConfigDict:
    """Redshifts of the simulated DESI ``sample`` (bgs | elg).

    Variants:

    * ``zscan`` (default): the learned matched filter (:mod:`spectrax.models.zscan`), a
      distribution over ln(1+z) bins trained by cross-entropy from scratch (it needs no
      autoencoder). CPU width, the quick start's redshift model.
    * ``zscan_long``: the same design wider (``base``), longer, on more simulated spectra: the
      ≤ 45-min CPU configuration.
    * ``zscan_tiny``: toy width, for tests.
    * The SpecPT heads, initialised from the autoencoder run of the same variant
      (``runs/specpt_<sample>-<variant>``; run ``configs/specpt_<sample>.py:variant=<v>``
      first): ``tokens``, ``small``, ``paper`` / ``paper_text`` (the head the paper's text
      describes, 77,103,617 parameters), ``paper_count`` (the head the paper's count matches,
      74,016,257), ``tokens_paper``.

    Arguments: ``steps`` overrides the number of training steps.
    """
    a = parse_arg(arg, variant="zscan", steps=0)
    c = base_config()
    c.name = f"specpt_redshift_{sample}"
    c.task = "redshift"
    c.data.simulator = SPECPT_SAMPLES[sample]
    if a.variant.startswith("zscan"):
        zscan_variants = {"zscan": "small", "zscan_long": "base", "zscan_tiny": "tiny"}
        if a.variant not in zscan_variants:
            raise ValueError(f"unknown variant {a.variant!r}; known ZScan variants: "
                             f"{sorted(zscan_variants)}")
        c.task_kwargs.target = "two_hot"
        # Named after the config variant: the model variants (small, base, tiny) share names
        # with SpecPT's, whose runs live in runs/specpt_redshift_<sample>-<variant> too.
        c.workdir = f"runs/specpt_redshift_{sample}-{a.variant}"
        c.model.name = "zscan"
        c.model.variant = zscan_variants[a.variant]
        c.model.scan = ml_collections.ConfigDict(ZSCAN_RANGES[sample])
        c.optim.lr = 3e-3
        c.optim.weight_decay = 1e-4
        c.optim.warmup_steps = 50
        c.batch_size = 32
        c.num_steps = 600
        if a.variant == "zscan_long":
            c.data.n_train = 40000
            c.num_steps = 4000
        c.num_steps = a.steps or c.num_steps
        return c.lock()
    heads = {"paper_text": ("paper", "paper_text"), "paper_count": ("paper", "paper_count"),
             "paper": ("paper", "paper_text"), "small": ("small", "paper_text"),
             "tokens": ("tokens", "tokens"), "tokens_paper": ("tokens_paper", "tokens"),
             "tiny": ("tiny", "tokens")}
    if a.variant not in heads:
        raise ValueError(f"unknown variant {a.variant!r}; known: "
                         f"{sorted(heads) + ['zscan', 'zscan_long', 'zscan_tiny']}")
    encoder_variant, head = heads[a.variant]
    c.task_kwargs.norm = "std"
    c.model.name = "specpt_redshift"
    c.model.variant = encoder_variant
    c.model.head = head
    c.init.from_workdir = f"runs/specpt_{sample}-{encoder_variant}"
    c.init.prefix = "encoder"
    c.optim.lr = 1e-3 if encoder_variant in ("small", "tokens") else 1e-4
    c.optim.weight_decay = 5e-5
    c.optim.warmup_steps = 50
    c.num_steps = 600
    c.batch_size = 32
    if encoder_variant in ("paper", "tokens_paper"):
        c.batch_size = 128
        c.optim.warmup_steps = 500   # the reference meant 500 warm-up steps (SPECS.md)
        c.num_steps = 20000
    c.num_steps = a.steps or c.num_steps
    return c.lock()


# ----------------------------------------------------------------------------------------------
# Universal spectral tokenizer (configs/tokenizer_*.py)
# ----------------------------------------------------------------------------------------------
# Length buckets for the multi-survey mixture: SDSS (~3800–4600 px) and GALAH-like (4 × 1024 px)
# share the first, DESI (7781 px) and APOGEE (7514 px) the second. Multiples of the patch size.
TOKENIZER_BUCKETS = (4608, 7808)


def tokenizer_pretrain(arg: str | None) -> ml_collections.ConfigDict:
    """Self-supervised pre-training of the tokenizer on a mixture of simulated SDSS, DESI,
    GALAH and APOGEE spectra on their native grids, in shared batches (SPECS.md §3).

    Variants: ``small`` (default; CPU), ``paper`` (37,880,352 parameters; accelerators, batch 64,
    AdamW 1e-4 constant, weight decay 0.01 as the paper), ``tiny`` (tests).
    """
    a = parse_arg(arg, variant="small", steps=0)
    c = base_config()
    c.name = "tokenizer_pretrain"
    c.task = "tokenizer_reconstruction"
    c.model.name = "tokenizer"
    c.model.variant = a.variant
    c.data.simulator = "multisurvey"
    c.data.n_train, c.data.n_val, c.data.n_test = 6000, 300, 1200
    c.data.buckets = TOKENIZER_BUCKETS
    c.optim.weight_decay = 0.01
    if a.variant == "paper":
        c.batch_size, c.num_steps = 64, 600_000
        c.optim.lr, c.optim.schedule, c.optim.warmup_steps = 1e-4, "constant", 0
    else:
        # CPU: a short run needs a larger step size than the paper's 1e-4 to get anywhere.
        c.batch_size, c.num_steps = 32, 500
        c.optim.lr, c.optim.schedule, c.optim.warmup_steps = 1e-3, "cosine", 50
    c.num_steps = a.steps or c.num_steps
    c.ckpt_every = 250
    return c.lock()


def tokenizer_adapt(kind: str, arg: str | None) -> ml_collections.ConfigDict:
    """The adaptation head on the FROZEN pre-trained tokenizer (``runs/tokenizer_pretrain-<v>``;
    train it first). ``kind``: "classify" (galaxy / QSO / star on simulated DESI spectra) or
    "stellar" (Teff, log g, [Fe/H] from simulated APOGEE spectra)."""
    a = parse_arg(arg, variant="small", steps=0)
    c = base_config()
    c.name = f"tokenizer_{kind}"
    c.model.name = "tokenizer_adapted"
    c.model.variant = a.variant
    if kind == "classify":
        c.task = "classification"
        c.model.num_outputs = 3
        c.data.simulator = "desi_classes"
    elif kind == "stellar":
        c.task = "regression"
        c.task_kwargs.labels = ("teff", "logg", "feh")
        c.model.num_outputs = 3
        c.data.simulator = "apogee_stars"
    else:
        raise ValueError(f"unknown tokenizer adaptation {kind!r}")
    c.data.n_train, c.data.n_val, c.data.n_test = 4000, 300, 1000
    c.init.from_workdir = f"runs/tokenizer_pretrain-{a.variant}"
    c.init.prefix = ""            # the whole pre-trained tokenizer ...
    c.init.target = "tokenizer"   # ... becomes the frozen `tokenizer` of the adapted model
    c.optim.lr, c.optim.schedule, c.optim.warmup_steps = 1e-3, "cosine", 50
    c.optim.weight_decay = 0.01
    c.batch_size, c.num_steps = 32, (a.steps or 600)
    return c.lock()


# ----------------------------------------------------------------------------------------------
# SpectraFM (configs/spectrafm_*.py): the paper's three stages and the MLP baseline
# ----------------------------------------------------------------------------------------------
SPECTRAFM_FIRST_HALF = (0, 3757)      # stage 2: pixels 0–3756, 1.515–1.603 µm
SPECTRAFM_FE_WINDOW = (4107, 4619)    # stage 3: 512 pixels, 1.611–1.622 µm, two Fe lines


def _spectrafm_base(name: str, arg, **extra):
    a = parse_arg(arg, variant="small", steps=0, **extra)
    c = base_config()
    c.name = name
    c.task = "spectrafm"
    c.model.name = "spectrafm"
    c.model.variant = a.variant
    c.data.n_train, c.data.n_val, c.data.n_test = 4000, 200, 500
    c.optim.weight_decay = 0.01
    return a, c


def spectrafm_pretrain(arg: str | None) -> ml_collections.ConfigDict:
    """Stage 1: pre-training on CLEAN synthetic APOGEE-like spectra, all five labels, random
    subsets of up to 512 pixels, cosine annealing with warm restarts (SPECS.md §4).

    Variants: ``small`` (default; CPU: T_0 = 10 epochs, lr 1e-3), ``paper`` (11,870,722
    parameters; batch 64 per device, lr 1e-4, T_0 = 50 epochs, eta_min 1e-10), ``tiny``."""
    a, c = _spectrafm_base("spectrafm_pretrain", arg)
    c.data.simulator = "apogee_clean"
    c.optim.schedule, c.optim.eta_min, c.optim.warmup_steps = "cosine_restarts", 1e-10, 0
    if a.variant == "paper":
        c.batch_size, c.optim.lr, c.optim.t0_epochs = 64, 1e-4, 50
        c.data.n_train = 90_000
        c.num_steps = 325 * (90_000 // 64)
    else:
        # CPU (~23 spectra/s on 2 cores): 400 steps of 32 = 3.2 epochs, a restart every epoch.
        c.batch_size, c.optim.lr, c.optim.t0_epochs = 32, 1e-3, 1
        c.num_steps = 400
    c.num_steps = a.steps or c.num_steps
    c.ckpt_every = 400
    return c.lock()


def spectrafm_finetune_real(arg: str | None) -> ml_collections.ConfigDict:
    """Stage 2: fine-tuning on REAL-LIKE spectra of the same stars, first half of the wavelength
    range only (pixels 0–3756), all labels, nothing frozen; initialised from stage 1
    (``runs/spectrafm_pretrain-<variant>``), whose pixel and label statistics it reuses."""
    a, c = _spectrafm_base("spectrafm_finetune_real", arg)
    c.data.simulator = "apogee_real"
    c.task_kwargs.pixel_range = SPECTRAFM_FIRST_HALF
    c.init.from_workdir = f"runs/spectrafm_pretrain-{a.variant}"
    c.optim.lr = 1e-4 if a.variant == "paper" else 3e-4
    c.optim.schedule, c.optim.warmup_steps = "cosine", 20
    c.batch_size, c.num_steps = (64, a.steps or 20000) if a.variant == "paper" else (
        32, a.steps or 200)
    return c.lock()


def spectrafm_fe_100(arg: str | None) -> ml_collections.ConfigDict:
    """Stage 3: [Fe/H] from the 512-pixel Fe window (pixels 4107–4618), fine-tuned on 100
    iron-rich stars ([Fe/H] > −1) with the decoder and the second encoder block FROZEN (only the
    embeddings and the first encoder block train); the test split holds iron-poor stars too and
    reports their RMSE. Initialised from stage 2 (``runs/spectrafm_finetune_real-<variant>``)."""
    a, c = _spectrafm_base("spectrafm_fe_100", arg)
    c.data.simulator = "apogee_real"
    c.data.train_select, c.data.train_limit = "FE_H > -1", 100
    c.task_kwargs.labels = ("FE_H",)
    c.task_kwargs.pixel_range = SPECTRAFM_FE_WINDOW
    c.init.from_workdir = f"runs/spectrafm_finetune_real-{a.variant}"
    c.optim.freeze = ("encoder/1", "decoder")
    c.optim.lr, c.optim.schedule, c.optim.warmup_steps = 3e-4, "cosine", 10
    c.batch_size, c.num_steps = 20, (a.steps or 150)
    c.eval_batch_size = 64
    return c.lock()


def spectrafm_mlp_fe_100(arg: str | None) -> ml_collections.ConfigDict:
    """The from-scratch baseline of stage 3: an MLP on the same 512-pixel window, trained on the
    same 100 iron-rich stars, [Fe/H] only, evaluated on the same test split."""
    a = parse_arg(arg, variant="", steps=0)
    c = base_config()
    c.name = "spectrafm_mlp_fe_100"
    c.task = "regression"
    c.task_kwargs.labels = ("FE_H",)
    c.model.name = "window_mlp"
    c.model.num_outputs = 1
    c.model.pixel_range = SPECTRAFM_FE_WINDOW
    c.data.simulator = "apogee_real"
    c.data.n_train, c.data.n_val, c.data.n_test = 4000, 200, 500
    c.data.train_select, c.data.train_limit = "FE_H > -1", 100
    c.optim.lr, c.optim.schedule, c.optim.warmup_steps = 1e-3, "cosine", 10
    c.optim.weight_decay = 0.01
    c.batch_size, c.num_steps = 20, (a.steps or 500)
    return c.lock()


# ----------------------------------------------------------------------------------------------
# Spectra as images: ViT-B/16 (configs/vit_*.py) and the 1D transformer baseline
# ----------------------------------------------------------------------------------------------
SLOMOST_BUCKETS = (4640,)  # SDSS (≤ 4611 px) and LAMOST (~3909 px) spectra in one bucket


def vit_config(kind: str, arg: str | None) -> ml_collections.ConfigDict:
    """ViT fine-tuned on spectra rendered as images inside the model (SPECS.md §2), on simulated
    SDSS-like and LAMOST-like spectra. ``kind``: classify (galaxy / QSO / star), redshift
    (galaxies and quasars), stellar (``label=teff|logg|feh`` of stars).

    Arguments: ``variant`` b16 (default; 85,798,656 backbone parameters) | b16_timm | tiny;
    ``representation`` simple | overlap | map2d (default) | map2dnormal | map2dnormaldev;
    ``fill_order`` standard | boustrophedon; ``label`` for stellar. Pretrained weights:
    ``--config.model.init_from=<timm/HF ViT-B/16 file>`` (see spectrax.convert_weights).
    """
    a = parse_arg(arg, variant="b16", representation="map2d", fill_order="standard",
                  label="teff", steps=0)
    c = base_config()
    c.name = f"vit_{kind}" + (f"_{a.label}" if kind == "stellar" else "")
    c.model.name = "vit"
    c.model.variant = a.variant
    c.model.representation = a.representation
    c.model.init_from = ""
    c.model.freeze_backbone = False
    # Inputs are median-normalised, so the per-spectrum min–max colour scale replaces the paper's
    # fixed vmin/vmax (which assume SDSS flux units); longer spectra are cut as SPECS describes.
    c.model.render = ml_collections.ConfigDict(dict(
        map_scale="minmax", fit="truncate", fill_order=a.fill_order))
    c.data.buckets = SLOMOST_BUCKETS
    c.data.n_train, c.data.n_val, c.data.n_test = 3000, 200, 1000
    if kind == "classify":
        c.task, c.model.num_outputs, c.data.simulator = "classification", 3, "slomost"
    elif kind == "redshift":
        c.task, c.model.num_outputs, c.data.simulator = "regression", 1, "slomost_z"
        c.task_kwargs.labels = ("z",)
    elif kind == "stellar":
        c.task, c.model.num_outputs, c.data.simulator = "regression", 1, "slomost_stars"
        c.task_kwargs.labels = (a.label,)
    else:
        raise ValueError(f"unknown ViT task {kind!r}")
    # The reference fine-tunes with AdamW at a small learning rate.
    c.optim.lr, c.optim.schedule, c.optim.warmup_steps, c.optim.weight_decay = \
        (1e-4 if a.variant.startswith("b16") else 1e-3), "cosine", 50, 0.05
    c.batch_size = 32 if a.variant.startswith("b16") else 16
    c.num_steps = a.steps or (2000 if a.variant.startswith("b16") else 300)
    c.eval_batch_size = 32
    return c.lock()


def transformer1d_redshift(arg: str | None) -> ml_collections.ConfigDict:
    """The paper's 1D transformer baseline on the SAME data as ``vit_redshift`` (so the
    "2D map vs 1D transformer" comparison runs side by side). Variants: small (default; 8-pixel
    tokens on CPU), paper (one token per pixel, width 512, 6 layers), tiny."""
    a = parse_arg(arg, variant="small", steps=0)
    c = base_config()
    c.name = "transformer1d_redshift"
    c.task = "regression"
    c.task_kwargs.labels = ("z",)
    c.model.name = "transformer1d"
    c.model.variant = a.variant
    c.model.num_outputs = 1
    c.data.simulator = "slomost_z"
    c.data.buckets = SLOMOST_BUCKETS
    c.data.n_train, c.data.n_val, c.data.n_test = 3000, 200, 1000
    c.optim.lr, c.optim.schedule, c.optim.warmup_steps = 5e-4, "cosine", 50
    c.batch_size, c.num_steps = 32, (a.steps or 600)
    return c.lock()
