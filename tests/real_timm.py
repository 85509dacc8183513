"""Import the real timm (and torchvision) on a CPU-only torch 2.13.

The trap: timm imports torchvision when it is imported (``timm.layers`` takes
``FrozenBatchNorm2d`` from ``torchvision.ops.misc``, ``timm.data`` its transforms).
PyPI's only torchvision for torch 2.13.0 is 0.28.0, a CUDA 13 build: its C extension
``torchvision/_C.so`` links ``libtorch_cuda.so``, which the CPU build of torch does not
ship, so it cannot load. torchvision tolerates that (``torchvision.extension`` then reports
no ops), but ``torchvision/_meta_registrations.py``, imported by ``torchvision/__init__``,
registers fake (meta) kernels for the extension's operators (``torchvision::nms`` first)
and raises ``RuntimeError: operator torchvision::nms does not exist``, so
``import torchvision`` and ``import timm`` fail.

The arrangement: when (and only when) that import fails, put an empty module in place of
``torchvision._meta_registrations`` and import again. Everything else is the real code:
timm's layers and models, torchvision's ``FrozenBatchNorm2d``, transforms, models. What
is lost is only what never worked here: the C++ operators (nms, roi_align,
deform_conv2d, ...) raise torchvision's "Couldn't load custom C++ ops" when called, and
have no fake kernels for torch.compile. With a torchvision whose extension loads (a CPU
wheel from PyTorch's own index) the plain import succeeds and nothing is replaced.
"""

from __future__ import annotations

import sys
import types

_STUBBED = "torchvision._meta_registrations"


def import_timm():
    """The real ``timm`` module (raises ImportError when timm is not installed)."""
    try:
        import timm
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")
                     or n == "timm" or n.startswith("timm.")]:
            del sys.modules[name]
        sys.modules[_STUBBED] = types.ModuleType(_STUBBED)
        import timm
    return timm
