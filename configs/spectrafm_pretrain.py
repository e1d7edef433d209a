r"""SpectraFM stage 1: pre-training on CLEAN synthetic APOGEE-like spectra (SPECS.md section 4):
every pixel a token, random subsets of up to 512 pixels, one requested label per star per step
(all five), loss with predicted uncertainty, cosine annealing with warm restarts.

    python -m spectrax.train --config=configs/spectrafm_pretrain.py[:variant=small|paper|tiny,steps=N]

Variants: ``small`` (default; CPU: lr 1e-3, a restart every epoch), ``paper`` (11,870,722
parameters; batch 64, lr 1e-4, T_0 = 50 epochs, eta_min 1e-10, 325 epochs of 90k stars),
``tiny`` (tests). Next stage: configs/spectrafm_finetune_real.py.
"""
from spectrax.config_lib import base_config, parse_arg


def get_config(arg=None):
    a = parse_arg(arg, variant="small", steps=0)
    paper = a.variant == "paper"
    c = base_config()
    c.name = "spectrafm_pretrain"

    # Data: noiseless model-grid spectra of simulated stars (the same stars, real-like, are the
    # next stage's data: the synthetic gap).
    c.data.simulator = "apogee_clean"
    c.data.n_train, c.data.n_val, c.data.n_test = (90_000 if paper else 4000), 200, 500

    c.model.name = "spectrafm"
    c.model.variant = a.variant
    c.task = "spectrafm"

    c.optim.weight_decay = 0.01
    c.optim.schedule, c.optim.eta_min, c.optim.warmup_steps = "cosine_restarts", 1e-10, 0
    if paper:
        c.batch_size, c.optim.lr, c.optim.t0_epochs = 64, 1e-4, 50
        c.num_steps = 325 * (90_000 // 64)
    else:  # CPU (~23 spectra/s on 2 cores): 400 steps of 32 = 3.2 epochs
        c.batch_size, c.optim.lr, c.optim.t0_epochs = 32, 1e-3, 1
        c.num_steps = 400
    c.num_steps = a.steps or c.num_steps

    c.eval_batch_size = 64
    c.ckpt_every = 400
    return c.lock()
