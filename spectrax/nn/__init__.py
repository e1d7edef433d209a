"""Layers shared by the spectrax models: wavelength embeddings, masked attention, transformer
blocks (post-/pre-LN, PyTorch-compatible layouts), byte-resolution dropout, the exact GELU, a
Linear layer that trains fast on CPU with few rows."""
from spectrax.nn.activations import gelu
from spectrax.nn.attention import (IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS,
                                   MultiHeadAttention, attend)
from spectrax.nn.dropout import Dropout
from spectrax.nn.embeddings import (DEFAULT_MAX_PERIOD, DEFAULT_MIN_PERIOD, WavelengthEmbedding,
                                    sinusoidal_embedding)
from spectrax.nn.linear import Linear
from spectrax.nn.transformer import (ACTIVATIONS, TransformerDecoder, TransformerDecoderLayer,
                                     TransformerEncoder, TransformerEncoderLayer)

__all__ = [
    "ACTIVATIONS", "ATTENTION_IMPLEMENTATIONS", "DEFAULT_MAX_PERIOD", "DEFAULT_MIN_PERIOD",
    "Dropout", "Linear", "MultiHeadAttention", "TransformerDecoder", "TransformerDecoderLayer",
    "TransformerEncoder", "TransformerEncoderLayer", "WavelengthEmbedding", "attend", "gelu",
    "sinusoidal_embedding",
]
