"""SpecPT redshift model on the simulated DESI ELG-like sample, starting from the encoder of
`configs/specpt_elg.py` trained with the same variant (run that first).

    python -m spectrax.train --config=configs/specpt_redshift_elg.py[:variant=tokens|small|paper_text|paper_count|tokens_paper]
"""
from spectrax.config_lib import specpt_redshift


def get_config(arg=None):
    return specpt_redshift("elg", arg)
