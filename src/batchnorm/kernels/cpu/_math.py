"""exp and erf for the numba element loops: vectorisable in float32, libm's in float64.

numba compiles ``math.exp`` and ``math.erf`` to one libm call per element, which stops
LLVM from vectorising the loop (the fourth session's fused BN + silu training step with
them took 11.8 ms against torch.nn's 4.8 ms at 8x256x28x28). In float32 these are written
out in arithmetic that vectorises:

* ``exp``: Cody and Waite's reduction e^v = 2^n e^r, n = round(v / ln 2),
  r = (v - n ln2_hi) - n ln2_lo (ln2_hi has few mantissa bits, so n ln2_hi is exact),
  e^r by Cephes' degree-7 polynomial for expf, and 2^n built from its exponent bits.
  Within 1.5 ulp of the exact value for results down to 2^-125 (about 2.4e-38; smaller
  ones, subnormal or nearly, come out as 0); overflow gives inf, and inf, -inf and NaN
  come out as from ``math.exp`` (tests/test_cpu_math.py).
* ``erf``: Abramowitz and Stegun 7.1.26, erf(a) = 1 - t P(t) e^(-a^2), t = 1/(1 + p a),
  absolute error below 1.5e-7 in exact arithmetic, 6e-7 with float32 rounding (the
  approximation ATen's own vectorised float32 erf uses), with the exp above.

The loops that call them are compiled without fast-math: reassociation would undo the
exact two-step reduction. float64 keeps ``math.exp``/``math.erf`` (correct, one call per
element); the CPU backend sends float64 BN + silu/gelu to ATen's activation kernels.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

_F = np.float32
_ONE, _TWO, _HALF, _ZERO = _F(1.0), _F(2.0), _F(0.5), _F(0.0)
_LOG2E = _F(1.4426950408889634)
_LN2_HI, _LN2_LO = _F(0.693359375), _F(-2.12194440e-4)
#: Arguments are clamped here first (e^89 overflows float32; e^-87.5 is below 2^-126), which
#: keeps n = round(v / ln 2) within [-126, 128] for the exponent arithmetic.
_CLAMP_LO, _CLAMP_HI = _F(-87.5), _F(89.0)
#: Cephes expf: e^r = 1 + r + r^2 (P5 + r (P4 + r (P3 + r (P2 + r (P1 + r P0))))).
_P0, _P1, _P2 = _F(1.9875691500e-4), _F(1.3981999507e-3), _F(8.3334519073e-3)
_P3, _P4, _P5 = _F(4.1665795894e-2), _F(1.6666665459e-1), _F(5.0000001201e-1)
#: Abramowitz and Stegun 7.1.26.
_AS_P = _F(0.3275911)
_A1, _A2, _A3 = _F(0.254829592), _F(-0.284496736), _F(1.421413741)
_A4, _A5 = _F(-1.453152027), _F(1.061405429)


@intrinsic
def _pick(typingctx, cond, a, b):
    """``a if cond else b`` as one select instruction (no branch)."""
    if not isinstance(cond, types.Boolean) or a != b:
        return None

    def codegen(context, builder, signature, args):
        return builder.select(args[0], args[1], args[2])

    return a(cond, a, b), codegen


@intrinsic
def _pow2(typingctx, n):
    """2^n as float32 from its exponent bits, for an integer n in [-126, 127] (and 0 for
    n = -127, whose bits are those of 0)."""
    if not isinstance(n, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        v = args[0]
        if n.bitwidth > 32:
            v = builder.trunc(v, i32)
        elif n.bitwidth < 32:
            v = builder.sext(v, i32) if n.signed else builder.zext(v, i32)
        bits = builder.shl(builder.add(v, i32(127)), i32(23))
        return builder.bitcast(bits, ir.FloatType())

    return types.float32(n), codegen


def _exp32(v):
    """e^v of a float32 v (see the module docstring); ``vexp``'s float32 body."""
    x = _pick(v > _CLAMP_LO, v, _CLAMP_LO)  # NaN compares false: clamped, not converted
    x = _pick(x < _CLAMP_HI, x, _CLAMP_HI)
    n = np.floor(x * _LOG2E + _HALF)
    r = x - n * _LN2_HI
    r = r - n * _LN2_LO
    p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
    p = p * (r * r) + r + _ONE
    # 2^n = 2^(n - 1) * 2, n in [-126, 128]: 2^128 overflows to inf as e^89 should, and
    # n = -126 gives 2^-127, whose bits are those of 0 (the flush below 2^-125)
    e = p * _pow2(np.int32(n) - 1) * _TWO
    return _pick(v != v, v, e)


def _erf32_from(a, e):
    """erf(a) of a float32 a, given e = exp(-a * a); ``verf_from``'s float32 body."""
    t = _ONE / (_AS_P * abs(a) + _ONE)
    q = (((_A5 * t + _A4) * t + _A3) * t + _A2) * t + _A1
    r = _ONE - q * t * e
    return _pick(a < _ZERO, -r, r)


# The float32 bodies are plain functions that the overloads below hand to numba, which
# inlines them into the element loops; they choose with ``_pick``, not ``a if c else b``:
# the branches of a conditional expression, inlined two levels deep, trip numba's SSA
# checks with a warning per variable.


def vexp(v):
    """e^v in the numba loops: the vectorisable float32 exp, ``math.exp`` for float64."""
    return math.exp(v)


def verf_from(a, e):
    """erf(a) given e = vexp(-a * a): A and S 7.1.26 for float32, ``math.erf`` for float64."""
    return math.erf(a)


def like(v, c):
    """The constant c in v's float dtype (a Python float would make float32 sums float64)."""
    return c


@overload(like, inline="always")
def _like(v, c):
    if v == types.float32:
        return lambda v, c: np.float32(c)
    return lambda v, c: np.float64(c)


@overload(vexp, inline="always")
def _vexp(v):
    if v == types.float32:
        return _exp32
    return lambda v: math.exp(v)


@overload(verf_from, inline="always")
def _verf_from(a, e):
    if a == types.float32:
        return _erf32_from
    return lambda a, e: math.erf(a)
