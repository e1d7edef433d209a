"""ViT on spectra rendered as images: classify. Options after the colon, e.g.
    python -m spectrax.train --config=configs/vit_classify.py:variant=tiny,representation=overlap
(see spectrax.config_lib.vit_config)."""
from spectrax.config_lib import vit_config


def get_config(arg=None):
    return vit_config("classify", arg)
