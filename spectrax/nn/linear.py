"""A Linear layer whose input gradient XLA:CPU computes fast when the input has few rows.

The backward pass of ``y = x @ W`` (x [M, K], W [K, N]) needs ``dx = dy @ Wᵀ``: a product
that contracts the minor (contiguous) axis of both operands. When M is small next to the
weight (a batch of pooled or flattened spectra through a wide layer), XLA:CPU's Eigen kernel
for that operand order is several times slower than the same product taken as
``W · dyᵀ`` ([K, N] · [N, M] -> [K, M]) and transposed, and XLA folds the transpose back into
the slow order unless it is kept apart. Measured on the 2-core x86 development VM (2026-12-06,
jax 0.10.2, medians of 7-9 calls):

=====  ====  ====  =============  ==============  =====
M      K     N     dy @ Wᵀ (ms)   W·dyᵀ, then ᵀ   ratio
=====  ====  ====  =============  ==============  =====
32     7792  7781  63.9           25.0            2.6
128    7792  7781  448.7          92.0            4.9
512    7792  7781  478.2          303.8           1.6
256    2048  2048  23.4           13.1            1.8
64     512   512   0.96           0.51            1.9
1024   512   512   3.35           4.28            0.78
16384  128   512   11.9           49.6            0.24
=====  ====  ====  =============  ==============  =====

So :func:`dot_general` takes the second form on CPU when ``4·M ≤ K`` (and the weight has at
least 2¹⁶ elements: below that neither form costs anything); elsewhere, and on GPU/TPU (whose
matmul libraries take any operand order), it is ``jax.lax.dot_general``. The gradient is the
same sum of the same products; only the operand order handed to the matmul library differs,
and with it, possibly, the blocking of the sum (bit-identical in the shapes compared; the
tests require agreement with ``nnx.Linear`` to float32 rounding). SpecPT's flattened-spectrum
layers (32 × 7792 → 7781 in ``small``) are the case this is for.
"""
from __future__ import annotations

import math

import jax
from flax import nnx
from jax import lax

MIN_WEIGHT_ELEMENTS = 1 << 16


def few_rows(rows: int, weight_shape: tuple[int, int]) -> bool:
    """Whether the input gradient of ``[rows, K] @ [K, N]`` takes the ``W·dyᵀ`` form (CPU only;
    see the module docstring for the measurements behind the rule)."""
    k, n = weight_shape
    return 4 * rows <= k and k * n >= MIN_WEIGHT_ELEMENTS


@jax.custom_vjp
def _matmul_few_rows(x, w):
    """[M, K] @ [K, N] -> [M, N]; its VJP takes the input gradient as (W·dyᵀ)ᵀ."""
    return lax.dot_general(x, w, (((1,), (0,)), ((), ())))


def _matmul_few_rows_fwd(x, w):
    return _matmul_few_rows(x, w), (x, w)


def _matmul_few_rows_bwd(residuals, dy):
    x, w = residuals
    # [K, N] · [M, N] over N -> [K, M]. The barrier keeps XLA from folding the transpose
    # below into the dot, which would give back the slow dy·Wᵀ operand order.
    dx_t = lax.optimization_barrier(lax.dot_general(w, dy, (((1,), (1,)), ((), ()))))
    dw = lax.dot_general(x, dy, (((0,), (0,)), ((), ())))          # xᵀ·dy, as jax takes it
    return dx_t.T.astype(x.dtype), dw.astype(w.dtype)


_matmul_few_rows.defvjp(_matmul_few_rows_fwd, _matmul_few_rows_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                out_sharding=None):
    """``jax.lax.dot_general`` with :func:`few_rows` products on CPU routed through the faster
    input gradient; same signature (what ``nnx.Linear`` calls)."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    standard = (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
                and not lhs_batch and not rhs_batch and rhs.ndim == 2)
    if (standard and jax.default_backend() == "cpu" and precision is None
            and preferred_element_type is None and out_sharding is None
            and lhs.dtype == rhs.dtype
            and few_rows(math.prod(lhs.shape[:-1]), rhs.shape)):
        flat = lhs.reshape(-1, lhs.shape[-1])
        return _matmul_few_rows(flat, rhs).reshape(*lhs.shape[:-1], rhs.shape[1])
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type,
                           out_sharding=out_sharding)


class Linear(nnx.Linear):
    """``nnx.Linear`` (same parameters, same constructor, same values) computing its product
    with :func:`dot_general`: faster training on CPU when few rows pass through a wide layer.
    An explicit ``dot_general=`` argument still wins."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("dot_general", dot_general)
        super().__init__(*args, **kwargs)
