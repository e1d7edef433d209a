r"""The from-scratch baseline of SpectraFM's stage 3: an MLP on the same 512-pixel Fe window,
trained on the same 100 iron-rich stars, [Fe/H] only, evaluated on the same test split
(iron-poor stars reported apart).

    python -m spectrax.train --config=configs/spectrafm_mlp_fe_100.py[:steps=N]
"""
from spectrax.config_lib import base_config, parse_arg
from spectrax.models.spectrafm import FE_WINDOW, IRON_POOR_FE_H


def get_config(arg=None):
    a = parse_arg(arg, variant="", steps=0)
    c = base_config()
    c.name = "spectrafm_mlp_fe_100"

    c.data.simulator = "apogee_real"
    c.data.n_train, c.data.n_val, c.data.n_test = 4000, 200, 500
    c.data.train_select = f"FE_H > {IRON_POOR_FE_H:g}"
    c.data.train_limit = 100

    c.model.name = "window_mlp"
    c.model.num_outputs = 1
    c.model.pixel_range = FE_WINDOW
    c.task = "regression"
    c.task_kwargs.labels = ("FE_H",)

    c.optim.lr, c.optim.schedule, c.optim.warmup_steps = 1e-3, "cosine", 10
    c.optim.weight_decay = 0.01
    c.batch_size, c.num_steps = 20, (a.steps or 500)
    return c.lock()
