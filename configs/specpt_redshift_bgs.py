"""SpecPT redshift model on the simulated DESI BGS-like sample, starting from the encoder of
`configs/specpt_bgs.py` trained with the same variant (run that first).

    python -m spectrax.train --config=configs/specpt_redshift_bgs.py[:variant=tokens|small|paper_text|paper_count|tokens_paper]
"""
from spectrax.config_lib import specpt_redshift


def get_config(arg=None):
    return specpt_redshift("bgs", arg)
