"""1D transformer baseline for redshifts on the same data as configs/vit_redshift.py."""
from spectrax.config_lib import transformer1d_redshift


def get_config(arg=None):
    return transformer1d_redshift(arg)
