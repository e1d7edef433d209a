"""ViT on spectra rendered as images: stellar. Options after the colon, e.g.
    python -m spectrax.train --config=configs/vit_stellar.py:variant=tiny,representation=overlap
(see spectrax.config_lib.vit_config)."""
from spectrax.config_lib import vit_config


def get_config(arg=None):
    return vit_config("stellar", arg)
