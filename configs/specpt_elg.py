r"""SpecPT autoencoder on the simulated DESI ELG-like sample (SPECS.md section 1).

    python -m spectrax.train --config=configs/specpt_elg.py[:variant=tokens|small|paper|tokens_paper]

Variants: ``tokens`` (default; the corrected architecture: conv stem positions as tokens with
wavelength embeddings and real masked attention, trained as a masked autoencoder; CPU widths),
``small`` (the paper's architecture at CPU widths), ``paper`` (1,120,475,621 parameters) and
``tokens_paper`` (accelerators), ``tiny`` (tests). The redshift model starts from this run's
encoder: configs/specpt_redshift_elg.py.
"""
from spectrax.config_lib import base_config, parse_arg


def get_config(arg=None):
    a = parse_arg(arg, variant="tokens")
    on_accelerator = a.variant in ("paper", "tokens_paper")
    c = base_config()
    c.name = "specpt_elg"

    # Data: simulated DESI ELG galaxies on the 7781-pixel coadd grid, cached under data/.
    c.data.simulator = "desi_elg"
    c.data.n_train, c.data.n_val, c.data.n_test = 8000, 500, 2000

    # Model and task: reconstruct the median-normalised flux, L1 loss.
    c.model.name = "specpt_autoencoder"
    c.model.variant = a.variant
    c.task = "reconstruction"
    c.task_kwargs.loss_type = "l1"

    # Optimiser: AdamW, gradient clip 1.0, cosine schedule with warm-up. The reference's batch
    # of 128 and lr 1e-4 need an accelerator; the CPU variants take a larger step.
    c.optim.lr = 1e-3 if a.variant in ("tokens", "small") else 1e-4
    c.optim.weight_decay = 5e-5
    c.optim.schedule, c.optim.warmup_steps = "cosine", 100
    c.batch_size = 128 if on_accelerator else 32
    c.num_steps = 20000 if on_accelerator else 300

    # Evaluation: the test split at the end (metrics.json, reconstructions.png).
    c.eval_batch_size = 64
    c.eval_every = 0
    return c.lock()
