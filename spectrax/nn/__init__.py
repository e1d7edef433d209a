"""Layers shared by the spectrax models: wavelength embeddings, masked attention, transformer
blocks (post-/pre-LN, PyTorch-compatible layouts)."""
from spectrax.nn.attention import MultiHeadAttention, attend, set_default_implementation
from spectrax.nn.embeddings import (DEFAULT_MAX_PERIOD, DEFAULT_MIN_PERIOD, WavelengthEmbedding,
                                    sinusoidal_embedding)
from spectrax.nn.transformer import (ACTIVATIONS, TransformerDecoder, TransformerDecoderLayer,
                                     TransformerEncoder, TransformerEncoderLayer)

__all__ = [
    "ACTIVATIONS", "DEFAULT_MAX_PERIOD", "DEFAULT_MIN_PERIOD", "MultiHeadAttention",
    "TransformerDecoder", "TransformerDecoderLayer", "TransformerEncoder",
    "TransformerEncoderLayer", "WavelengthEmbedding", "attend", "set_default_implementation",
    "sinusoidal_embedding",
]
