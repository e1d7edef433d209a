r"""SpectraFM stage 3: [Fe/H] from the 512-pixel Fe window (pixels 4107–4618, two Fe lines),
fine-tuned on only 100 iron-rich stars ([Fe/H] > −1) with the decoder and the second encoder
block FROZEN; the test split holds iron-poor stars too and reports their RMSE apart.

    python -m spectrax.train --config=configs/spectrafm_fe_100.py[:variant=small|paper|tiny,steps=N]

Starts from stage 2 (configs/spectrafm_finetune_real.py, ``runs/spectrafm_finetune_real-<v>``).
Its from-scratch baseline on the same stars and window: configs/spectrafm_mlp_fe_100.py.
"""
from spectrax.config_lib import base_config, parse_arg
from spectrax.models.spectrafm import FE_WINDOW, IRON_POOR_FE_H


def get_config(arg=None):
    a = parse_arg(arg, variant="small", steps=0)
    c = base_config()
    c.name = "spectrafm_fe_100"

    c.data.simulator = "apogee_real"
    c.data.n_train, c.data.n_val, c.data.n_test = 4000, 200, 500
    c.data.train_select = f"FE_H > {IRON_POOR_FE_H:g}"  # the first 100 iron-rich train stars
    c.data.train_limit = 100

    c.model.name = "spectrafm"
    c.model.variant = a.variant
    c.task = "spectrafm"
    c.task_kwargs.labels = ("FE_H",)
    c.task_kwargs.pixel_range = FE_WINDOW

    c.init.from_workdir = f"runs/spectrafm_finetune_real-{a.variant}"  # the stage it starts from
    c.optim.freeze = ("encoder/1", "decoder")  # only the embeddings and encoder block 0 train

    c.optim.lr, c.optim.schedule, c.optim.warmup_steps = 3e-4, "cosine", 10
    c.optim.weight_decay = 0.01
    c.batch_size, c.num_steps = 20, (a.steps or 150)
    c.eval_batch_size = 64
    return c.lock()
