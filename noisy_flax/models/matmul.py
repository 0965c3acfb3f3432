"""Dense layers as one 2-D matmul, so their gradients need no transposes.

A Dense on (batch, tokens, width) contracts one axis, and its kernel
gradient contracts two (batch and tokens). XLA:CPU lowers a dot with two
contracting axes by first copying the activation into a transposed layout,
once per layer and step. Flattened to (batch * tokens, width) first (a free
reshape), the same gradient is a plain matmul with a transposed operand,
which the BLAS call takes as a flag. Same arithmetic, same parameters.
"""
from __future__ import annotations

import math

from jax import lax


def flat_dot_general(lhs, rhs, dimension_numbers, precision=None,
                     preferred_element_type=None):
    """``lax.dot_general`` for Flax's Dense / DenseGeneral, done as one matmul.

    Applies when the contracted axes are the trailing axes of ``lhs`` and the
    leading axes of ``rhs``, in order, with no batch axes (every Dense and
    DenseGeneral(axis=trailing) is of this form); anything else goes to
    ``lax.dot_general`` unchanged.
    """
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    lhs_contract = tuple(d % lhs.ndim for d in lhs_contract)
    rhs_contract = tuple(d % rhs.ndim for d in rhs_contract)
    n = len(lhs_contract)
    if (lhs_batch or rhs_batch or lhs_contract != tuple(range(lhs.ndim - n, lhs.ndim))
            or rhs_contract != tuple(range(n))):
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
    free_shape, contracted = lhs.shape[:lhs.ndim - n], math.prod(lhs.shape[lhs.ndim - n:])
    out = lax.dot_general(lhs.reshape(math.prod(free_shape), contracted),
                          rhs.reshape(contracted, -1), (((1,), (0,)), ((), ())),
                          precision=precision, preferred_element_type=preferred_element_type)
    return out.reshape(free_shape + rhs.shape[n:])
