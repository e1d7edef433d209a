"""SpectraFM: see spectrax.config_lib.spectrafm_finetune_real for what this stage does.

    python -m spectrax.train --config=configs/spectrafm_finetune_real.py[:variant=small|paper|tiny]
"""
from spectrax.config_lib import spectrafm_finetune_real


def get_config(arg=None):
    return spectrafm_finetune_real(arg)
