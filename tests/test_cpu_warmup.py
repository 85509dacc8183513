"""``batchnorm warmup`` leaves every CPU kernel compiled for float32 and float64.

Checked in a fresh interpreter: in this one, other tests have already compiled kernels, so
a kernel the warm-up forgot would still look compiled here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("batchnorm.kernels.cpu.backend")

_PROBE = """
import json
from numba.core.registry import CPUDispatcher
from typer.testing import CliRunner
from batchnorm.cli import app
result = CliRunner().invoke(app, ["warmup"])
from batchnorm.kernels.cpu import _address, _nchw, _nhwc, _params, backup
kernels = {}
for mod in (_address, _nchw, _nhwc, _params, backup):
    for name, obj in vars(mod).items():
        if isinstance(obj, CPUDispatcher) and obj.py_func.__module__ == mod.__name__:
            kernels[mod.__name__.rsplit(".", 1)[1] + "." + name] = {
                "parallel": bool(obj.targetoptions.get("parallel")),
                "signatures": [str(s) for s in obj.signatures],
            }
print(json.dumps({"code": result.exit_code, "output": result.output, "kernels": kernels}))
"""

#: Called from Python by kernels/cpu/backend.py and backup.py (the others run inside the
#: parallel kernels).
_FROM_PYTHON = ("_params.finite_batch", "_params.running_update", "_params.affine",
                "_params.grad", "backup._save", "backup._finite", "backup._restore",
                "backup._update", "_address.forward_fused", "_address.backward_fused",
                "_address.act_backward_fused")
#: Parallel kernels that run only inside the ``_address`` entries (compiled into them: a
#: process that loads the entries from numba's cache never compiles these on their own).
_BY_ADDRESS = ("_nchw.forward_fused", "_nchw.backward_fused", "_nchw.act_backward_fused")


def test_warmup_compiles_every_kernel_for_both_dtypes():
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["code"] == 0, report["output"]
    assert "CPU kernels ready in" in report["output"]
    kernels = report["kernels"]
    wanted = [name for name, k in kernels.items() if k["parallel"] and name not in _BY_ADDRESS]
    wanted += _FROM_PYTHON
    assert len(wanted) >= 21, sorted(kernels)  # 5 channel-major, 6 channels-last, 11 more
    for name in wanted:
        signatures = " ".join(kernels[name]["signatures"])
        for dtype in ("float32", "float64"):
            assert f"Array({dtype}" in signatures, f"{name} not compiled for {dtype}"
