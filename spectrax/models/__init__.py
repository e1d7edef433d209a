"""spectrax models, each a pure NNX module plus its named variants, and parameter accounting.

Parameter counts include only ``nnx.Param`` leaves (BatchNorm running statistics are
``nnx.BatchStat`` and are not trainable parameters, as in PyTorch's ``numel`` over
``parameters()``). Count abstract models made with ``nnx.eval_shape`` to avoid allocating.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flax import nnx

from spectrax.models.specpt import (REDSHIFT_HEADS, VARIANTS as SPECPT_VARIANTS, SpecPTAutoencoder,
                                    SpecPTConfig, SpecPTEncoder, SpecPTRedshift, specpt_config,
                                    stem_lengths, stem_token_geometry)


def param_sizes(model_or_state) -> list[tuple[str, int]]:
    """(path 'a/b/c', number of elements) for every nnx.Param of a module or a State."""
    state = (nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module)
             else nnx.filter_state(model_or_state, nnx.Param))
    return [("/".join(str(part) for part in path), int(np.prod(variable.shape)))
            for path, variable in nnx.to_flat_state(state)]


def is_under(path: str, prefix: str) -> bool:
    """True when ``path`` is ``prefix`` or lies below it (component-wise, 'enc' ≠ 'encoder')."""
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def parameter_count(model_or_abstract, exclude: Iterable[str] = ()) -> int:
    """Number of trainable parameters (``nnx.Param`` elements) of a module or State.

    Args:
      model_or_abstract: an ``nnx.Module`` (real or from ``nnx.eval_shape``) or an ``nnx.State``.
      exclude: path prefixes to leave out, e.g. ``("encoder/stem",)``.
    """
    exclude = tuple(exclude)
    return sum(size for path, size in param_sizes(model_or_abstract)
               if not any(is_under(path, prefix) for prefix in exclude))


__all__ = [
    "REDSHIFT_HEADS", "SPECPT_VARIANTS", "SpecPTAutoencoder", "SpecPTConfig", "SpecPTEncoder",
    "SpecPTRedshift", "is_under", "param_sizes", "parameter_count", "specpt_config", "stem_lengths",
    "stem_token_geometry",
]
