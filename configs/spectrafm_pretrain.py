"""SpectraFM: see spectrax.config_lib.spectrafm_pretrain for what this stage does.

    python -m spectrax.train --config=configs/spectrafm_pretrain.py[:variant=small|paper|tiny]
"""
from spectrax.config_lib import spectrafm_pretrain


def get_config(arg=None):
    return spectrafm_pretrain(arg)
