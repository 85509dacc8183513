"""The fused channel-major kernels (``_nchw``) called with tensors' addresses.

Handing a tensor to a numba kernel as a numpy array takes three new objects per tensor
(``detach``, ``numpy``, ``reshape``): about a microsecond each time, several right after a
kernel has streamed megabytes through the caches, and a BN layer's training forward and
backward hand over ten. These entries take each tensor's address (``Tensor.data_ptr()``:
an integer, no object) with its sizes, and view the memory as arrays inside compiled code
(``numba.carray``) before running the ``_nchw`` kernel: with ``cpu_backend._geometry``
+3.7% on a BN layer's training step against torch.nn at 8x1024x14x14, most of it
from the addresses (benchmarks/README.md, "Kernel entries by address").

What the caller guarantees (``cpu_backend``): every tensor is a contiguous CPU tensor,
alive for the call, in the dtype of ``like`` (an empty array of x's dtype): x, dy and the
output of (n, c, m) elements, per-channel vectors of ``c`` elements (or of 0, with any
address, for an absent weight or bias) - the same bounds the kernels trust in numpy views.
"""

from __future__ import annotations

import numba
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _nchw as NCHW


@intrinsic
def _pointer(typingctx, address):
    """An integer address as the ``void*`` that ``numba.carray`` views."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


@njit(cache=True, inline="always")
def _block(address, n, c, m, like):
    return numba.carray(_pointer(address), (n, c, m), like.dtype)


@njit(cache=True, inline="always")
def _vector(address, length, like):
    return numba.carray(_pointer(address), (length,), like.dtype)


@njit(error_model="numpy", cache=True)
def forward_fused(like, x, weight, nw, bias, nb, out, n, c, m, eps, code, alpha, block, tasks,
                  group):
    """``_nchw.forward_fused`` of the tensors at these addresses (``nw``/``nb``: the
    weight's and bias's lengths, c or 0)."""
    return NCHW.forward_fused(
        _block(x, n, c, m, like), _vector(weight, nw, like), _vector(bias, nb, like), eps,
        _block(out, n, c, m, like), code, alpha, block, tasks, group,
    )


@njit(error_model="numpy", cache=True)
def backward_fused(like, dy, x, mean, invstd, weight, nw, out, want_dx, n, c, m, block, tasks,
                   group):
    """``_nchw.backward_fused`` of the tensors at these addresses (``out`` unread without
    ``want_dx``)."""
    k = c if want_dx else 0
    return NCHW.backward_fused(
        _block(dy, n, c, m, like), _block(x, n, c, m, like), _vector(mean, c, like),
        _vector(invstd, c, like), _vector(weight, nw, like), _block(out, n, k, m, like),
        want_dx, block, tasks, group,
    )


@njit(error_model="numpy", cache=True)
def act_backward_fused(like, dz, x, mean, invstd, weight, nw, bias, nb, out, code, low,
                       training, n, c, m, block, tasks, group):
    """``_nchw.act_backward_fused`` of the tensors at these addresses."""
    return NCHW.act_backward_fused(
        _block(dz, n, c, m, like), _block(x, n, c, m, like), _vector(mean, c, like),
        _vector(invstd, c, like), _vector(weight, nw, like), _vector(bias, nb, like),
        _block(out, n, c, m, like), code, low, training, block, tasks, group,
    )
