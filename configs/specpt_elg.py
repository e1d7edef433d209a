"""SpecPT autoencoder on the simulated DESI ELG-like sample.

    python -m spectrax.train --config=configs/specpt_elg.py[:variant=tokens|small|paper|tokens_paper]
"""
from spectrax.config_lib import specpt_autoencoder


def get_config(arg=None):
    return specpt_autoencoder("elg", arg)
