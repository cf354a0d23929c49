"""Private numbers of the closed form's fallback: float64 digits with an unbounded exponent.

An ``Extended`` x = m 2^e holds a float64 mantissa m and an integer-valued exponent e apart, so logit
gaps of thousands (rows e^{-10^4} of their scale, far below float64's 1e-308) keep every digit.  Each
operation is the float64 operation on the mantissas with an exact power-of-two rescaling: the digits
are float64's and the range is unbounded.  The exponents are constants for differentiation (the
mantissa carries every derivative), so JAX derives every derivative, any order, both modes, and vmap
batches it.  About 30 times slower than float64: ``gradflow.objective`` falls back to it only where
float64 cannot hold a solve.

``Numbers`` bundles the few operations a closed form's rows need, once for float64 (``FLOAT``: the
plain jax.numpy expressions) and once for ``Extended`` (``EXTENDED``), so the rows are written once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_ZERO_EXPONENT = -1e300  # the exponent of ``zeros``: below every other (V trained at |theta|/tau = 1e4 reaches 2^-3e6)
_FRACTION_MASK = (1 << 52) - 1  # a float64's fraction bits
_SQRT2_FRACTION = int(np.array(np.sqrt(2.0)).view(np.int64)) & _FRACTION_MASK  # sqrt 2's fraction bits (the cut of ``_normal``)
_LN2_HI, _LN2_LO = 0.6931471803691238, 1.9082149292705877e-10  # ln 2 = HI + LO, HI exact in 32 bits


class Extended(NamedTuple):
    """x = m 2^e: a float64 mantissa m (within a few binades of 1, renormalised by every sum; or 0) and an
    integer-valued exponent e (a constant for differentiation): float64's digits without float64's range."""

    m: jnp.ndarray
    e: jnp.ndarray


def _pow2(k):
    """2^k exactly for integer-valued k (0 for k <= -1023; k is clipped at 1023)."""
    k = jnp.clip(jax.lax.stop_gradient(k), -1023.0, 1023.0).astype(jnp.int64)
    return jax.lax.bitcast_convert_type((k + 1023) << 52, jnp.float64)


def _normal(m, e) -> Extended:
    """(m, e) rescaled exactly so that |m| is in [1/sqrt 2, sqrt 2) (a zero keeps its exponent: its tangent lives there).

    The cut sits at sqrt 2 2^j, never at a power of two: XLA may evaluate m once for the new mantissa and again
    (fused differently, an ulp apart) for the new exponent, and a sum landing on a power of two (1 + 1) would then
    take k from one copy and the mantissa from the other, a factor of 2 (issue 23)."""
    bits = jax.lax.bitcast_convert_type(jax.lax.stop_gradient(m), jnp.int64)
    biased, fraction = (bits >> 52) & 0x7FF, bits & _FRACTION_MASK
    k = (biased - 1023 + (fraction >= _SQRT2_FRACTION)).astype(m.dtype)  # |m| = f 2^k, f in [1/sqrt 2, sqrt 2)
    k = jnp.where(m == 0, 0.0, k)  # (denormals: part way)
    return Extended(m * _pow2(-k), jax.lax.stop_gradient(e + k))


def _aligned(a: Extended, b: Extended):
    """The exponent a sum of a and b is aligned to: the larger, but a zero never shifts a number out (two
    zeros: the larger, so that a zero's tangent, held at its own exponent, survives)."""
    larger = jnp.maximum(a.e, b.e)
    return jax.lax.stop_gradient(jnp.where(a.m == 0, jnp.where(b.m == 0, larger, b.e), jnp.where(b.m == 0, a.e, larger)))


def extended(x) -> Extended:
    """A float (array) as an ``Extended``; an ``Extended`` unchanged."""
    if isinstance(x, Extended):
        return x
    x = jnp.asarray(x, float)
    return _normal(x, jnp.zeros_like(x))


def extended_exp(log_x) -> Extended:
    """exp(log_x) for any finite log_x (no overflow, no underflow), the mantissa in [1/sqrt 2, sqrt 2].

    k rounds log_x / ln 2 to the nearest integer: its cuts sit at half-integers, where no exact ratio of weights
    lands (a floor would cut at ln(1/2), the log of an exact half: XLA may compute log_x once for k and again, an
    ulp apart, for the mantissa, and the two sides of the cut give a factor of 2: issue 23)."""
    k = jax.lax.stop_gradient(jnp.floor(log_x / np.log(2.0) + 0.5))
    return Extended(jnp.exp(log_x - k * _LN2_HI - k * _LN2_LO), k)


def to_float(x: Extended) -> jnp.ndarray:
    """The float64 nearest x: 0 below float64's range, +-inf above."""
    x = _normal(*x)
    e = jnp.clip(x.e, -2200.0, 1025.0)
    half = jnp.floor(e / 2.0)
    finite = x.m * _pow2(half) * _pow2(e - half)
    return jnp.where(x.e > 1024.0, jnp.where(x.m == 0, 0.0, jnp.sign(x.m) * jnp.inf), finite)


def add(a: Extended, b: Extended) -> Extended:
    """a + b (aligned to the larger exponent: the other mantissa is shifted exactly, or to 0)."""
    e = _aligned(a, b)
    return _normal(a.m * _pow2(a.e - e) + b.m * _pow2(b.e - e), e)


def mul(a: Extended, b: Extended) -> Extended:
    """a b (mantissas in [1/2, 2] stay unnormalised until the next sum)."""
    return Extended(a.m * b.m, a.e + b.e)


def div(a: Extended, b: Extended) -> Extended:
    return Extended(a.m / b.m, a.e - b.e)


def scale(a: Extended, factor) -> Extended:
    """a times a float (of moderate size: counts, 1/2, signs)."""
    return Extended(a.m * factor, a.e)


def where(condition, a: Extended, b: Extended) -> Extended:
    return Extended(*(jnp.where(condition, x, y) for x, y in zip(a, b)))


def zeros(shape) -> Extended:
    return Extended(jnp.zeros(shape), jnp.full(shape, _ZERO_EXPONENT))


def stack(xs, axis: int = 0) -> Extended:
    return Extended(*(jnp.stack(parts, axis) for parts in zip(*xs)))


def concatenate(xs, axis: int) -> Extended:
    return Extended(*(jnp.concatenate(parts, axis) for parts in zip(*xs)))


def apply(f, *xs: Extended) -> Extended:
    """f (indexing, reshaping, broadcasting, selecting: no arithmetic) applied to mantissa and exponent alike."""
    return Extended(*(f(*parts) for parts in zip(*xs)))


def signed_parts(x: Extended) -> Extended:
    """[x+ | x-] along the last axis: x = x+ - x-, both parts >= 0 (a signed right-hand side solved as two positive ones)."""
    return concatenate([Extended(jnp.maximum(sign * x.m, 0.0), x.e) for sign in (1.0, -1.0)], -1)


def parts_difference(x: Extended) -> Extended:
    """x+ - x- from [x+ | x-] along the last axis (what a linear solve of ``signed_parts``' columns gives)."""
    k = x.m.shape[-1] // 2
    return add(apply(lambda v: v[..., :k], x), scale(apply(lambda v: v[..., k:], x), -1.0))


def total(x: Extended, axis: int = -1) -> Extended:
    """The sum over ``axis``."""
    largest = lambda exponents: jnp.max(exponents, axis=axis, keepdims=True)
    nonzero = largest(jnp.where(x.m == 0, _ZERO_EXPONENT, x.e))  # a zero never shifts a number out
    e = jax.lax.stop_gradient(jnp.where(nonzero > _ZERO_EXPONENT, nonzero, largest(x.e)))
    return _normal(jnp.sum(x.m * _pow2(x.e - e), axis=axis), jnp.squeeze(e, axis))


def magnitude(x: Extended) -> Extended:
    """|x| with the sign taken as a constant (+1 at 0) for differentiation."""
    return Extended(jax.lax.stop_gradient(jnp.where(x.m < 0, -1.0, 1.0)) * x.m, x.e)


class Numbers(NamedTuple):
    """The operations a closed form's rows are written in: exp(logit), a + b, a * float, where, zeros, stack
    and ``apply`` (indexing and selecting, no arithmetic), in one kind of number; and for the noise moments'
    recursions (``gradflow.noise``) a * b, a / b, the sum over an axis, concatenate, a float as such a
    number (``of``) and back (``to_float``)."""

    exp: Callable
    add: Callable
    scale: Callable
    where: Callable
    zeros: Callable
    stack: Callable
    apply: Callable
    mul: Callable
    div: Callable
    total: Callable
    concatenate: Callable
    of: Callable
    to_float: Callable


def _float_total(x, axis: int = -1):
    return jnp.sum(x, axis=axis)


FLOAT = Numbers(
    jnp.exp,
    jnp.add,
    jnp.multiply,
    jnp.where,
    jnp.zeros,
    jnp.stack,
    lambda f, *xs: f(*xs),
    jnp.multiply,
    jnp.divide,
    _float_total,
    jnp.concatenate,
    lambda x: jnp.asarray(x, float),
    lambda x: x,
)
EXTENDED = Numbers(extended_exp, add, scale, where, zeros, stack, apply, mul, div, total, concatenate, extended, to_float)


def signed_magnitude(numbers: Numbers, x):
    """|x| in ``numbers`` with the sign a constant for differentiation (+1 at 0); an ``Extended`` takes its sign from
    its mantissa (one below float64's range keeps it)."""
    return magnitude(x) if numbers is EXTENDED else jax.lax.stop_gradient(jnp.where(x < 0, -1.0, 1.0)) * x
