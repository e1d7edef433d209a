"""The exact (erf) GELU, written the way PyTorch's CPU kernel computes it.

``jax.nn.gelu(x, approximate=False)`` is ``x/2 · erfc(-x/√2)``; XLA expands ``erfc`` with an
exponential and a select per element, and its derivative needs another exponential. This
:func:`gelu` is ``x/2 · (1 + erf(x/√2))`` (XLA's float32 ``erf`` is a rational polynomial, no
exponential) with the derivative ``Φ(x) + x·φ(x)`` given directly: forward 1.41 -> 0.56 ms and
forward + backward 1.61 -> 1.30 ms on [16, 197, 768] (2-core x86 VM, 2026-12-06).

Accuracy, against float64 ``x/2 · erfc(-x/√2)`` on [-12, 12]: absolute error ≤ 1.1e-6 in the value
and ≤ 2.1e-7 in the derivative (the erfc form: 3.8e-7 and 1.3e-7). For x < -4 the value, below
1.3e-4 in magnitude, loses its relative precision to the cancellation in ``1 + erf``, exactly as
PyTorch's ``nn.GELU()`` (the reference implementations' activation) does.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@jax.custom_jvp
def gelu(x):
    """Exact GELU, ``x · Φ(x)``, of a floating array (any shape; dtype kept)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(_SQRT_HALF, x.dtype)))


@gelu.defjvp
def _gelu_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    cdf = 0.5 * (1.0 + jax.lax.erf(x * np.asarray(_SQRT_HALF, x.dtype)))
    pdf = jnp.exp(-0.5 * x * x) * np.asarray(_INV_SQRT_2PI, x.dtype)
    return x * cdf, (cdf + x * pdf) * dx
