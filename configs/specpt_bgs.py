"""SpecPT autoencoder on the simulated DESI BGS-like sample.

    python -m spectrax.train --config=configs/specpt_bgs.py[:variant=tokens|small|paper|tokens_paper]
"""
from spectrax.config_lib import specpt_autoencoder


def get_config(arg=None):
    return specpt_autoencoder("bgs", arg)
