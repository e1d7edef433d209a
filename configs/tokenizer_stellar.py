r"""The tokenizer's adaptation head on its FROZEN pre-trained encoder: Teff, log g and [Fe/H]
of simulated APOGEE-like stars.

    python -m spectrax.train --config=configs/tokenizer_stellar.py[:variant=small|paper|tiny,steps=N]

Starts from configs/tokenizer_pretrain.py of the same variant (``runs/tokenizer_pretrain-<v>``;
train it first): the whole pre-trained tokenizer is copied into the ``tokenizer`` of the
adapted model and stays frozen (its parameters bitwise unchanged); only the head trains.
"""
from spectrax.config_lib import base_config, parse_arg


def get_config(arg=None):
    a = parse_arg(arg, variant="small", steps=0)
    c = base_config()
    c.name = "tokenizer_stellar"

    # Data and task: simulated APOGEE-like stars; Teff, log g, [Fe/H], standardised labels.
    c.data.simulator = "apogee_stars"
    c.task = "regression"
    c.task_kwargs.labels = ("teff", "logg", "feh")
    c.model.num_outputs = 3
    c.data.n_train, c.data.n_val, c.data.n_test = 4000, 300, 1000

    c.model.name = "tokenizer_adapted"
    c.model.variant = a.variant
    # The stage it starts from: the pre-trained tokenizer, whole ("" = every parameter) ...
    c.init.from_workdir = f"runs/tokenizer_pretrain-{a.variant}"
    c.init.prefix = ""
    c.init.target = "tokenizer"  # ... as the frozen `tokenizer` of the adapted model

    c.optim.lr, c.optim.schedule, c.optim.warmup_steps = 1e-3, "cosine", 50
    c.optim.weight_decay = 0.01
    c.batch_size, c.num_steps = 32, (a.steps or 600)
    c.eval_batch_size = 64
    return c.lock()
