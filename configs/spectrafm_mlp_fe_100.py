"""SpectraFM: see spectrax.config_lib.spectrafm_mlp_fe_100 for what this stage does.

    python -m spectrax.train --config=configs/spectrafm_mlp_fe_100.py[:variant=small|paper|tiny]
"""
from spectrax.config_lib import spectrafm_mlp_fe_100


def get_config(arg=None):
    return spectrafm_mlp_fe_100(arg)
