"""Tokenizer pre-training on simulated SDSS + DESI + GALAH + APOGEE spectra (native grids)."""
from spectrax.config_lib import tokenizer_pretrain


def get_config(arg=None):
    return tokenizer_pretrain(arg)
