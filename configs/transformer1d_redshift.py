r"""The 1D transformer baseline of the spectra-as-images paper, on the SAME data as
configs/vit_redshift.py (so "2D map vs 1D transformer" runs side by side): linear projections
of flux and wavelength, sinusoidal positions, global average pooling, MLP regression head.

    python -m spectrax.train --config=configs/transformer1d_redshift.py[:variant=small|paper|tiny,steps=N]

Variants: ``small`` (default; 8-pixel tokens on CPU), ``paper`` (one token per pixel, width
512, 6 layers, 8 heads), ``tiny`` (tests).
"""
from spectrax.config_lib import base_config, parse_arg


def get_config(arg=None):
    a = parse_arg(arg, variant="small", steps=0)
    c = base_config()
    c.name = "transformer1d_redshift"

    c.data.simulator = "slomost_z"
    c.data.buckets = (4640,)  # SDSS- and LAMOST-like spectra in one bucket
    c.data.n_train, c.data.n_val, c.data.n_test = 3000, 200, 1000

    c.model.name = "transformer1d"
    c.model.variant = a.variant
    c.model.num_outputs = 1
    c.task = "regression"
    c.task_kwargs.labels = ("z",)

    c.optim.lr, c.optim.schedule, c.optim.warmup_steps = 5e-4, "cosine", 50
    c.batch_size, c.num_steps = 32, (a.steps or 600)
    return c.lock()
