r"""Self-supervised pre-training of the universal spectral tokenizer (SPECS.md section 3) on a
mixture of simulated SDSS, DESI, GALAH and APOGEE spectra on their NATIVE grids, in shared,
length-bucketed batches; Gaussian NLL over valid pixels.

    python -m spectrax.train --config=configs/tokenizer_pretrain.py[:variant=small|paper|tiny,steps=N]

Variants: ``small`` (default; CPU), ``paper`` (37,880,352 parameters; batch 64, AdamW 1e-4
constant, weight decay 0.01, 600k steps as the paper), ``tiny`` (tests). The adaptation heads
(configs/tokenizer_classify.py, tokenizer_stellar.py) start from this run.
"""
from spectrax.config_lib import base_config, parse_arg


def get_config(arg=None):
    a = parse_arg(arg, variant="small", steps=0)
    c = base_config()
    c.name = "tokenizer_pretrain"

    # Data: the multi-survey mixture. SDSS (~3800–4600 px) and GALAH-like (4 × 1024 px) spectra
    # share the first length bucket, DESI (7781) and APOGEE (7514) the second (patch multiples).
    c.data.simulator = "multisurvey"
    c.data.n_train, c.data.n_val, c.data.n_test = 6000, 300, 1200
    c.data.buckets = (4608, 7808)

    c.model.name = "tokenizer"
    c.model.variant = a.variant
    c.task = "tokenizer_reconstruction"

    c.optim.weight_decay = 0.01
    if a.variant == "paper":
        c.batch_size, c.num_steps = 64, 600_000
        c.optim.lr, c.optim.schedule, c.optim.warmup_steps = 1e-4, "constant", 0
    else:  # a short CPU run needs a larger step than the paper's 1e-4 to get anywhere
        c.batch_size, c.num_steps = 32, 500
        c.optim.lr, c.optim.schedule, c.optim.warmup_steps = 1e-3, "cosine", 50
    c.num_steps = a.steps or c.num_steps

    c.eval_batch_size = 64
    c.ckpt_every = 250
    return c.lock()
