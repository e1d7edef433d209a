"""Galaxy / QSO / star classification by an adaptation head on the frozen tokenizer."""
from spectrax.config_lib import tokenizer_adapt


def get_config(arg=None):
    return tokenizer_adapt("classify", arg)
