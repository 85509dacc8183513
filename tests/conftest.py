"""Shared test helpers."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Tolerances per dtype for comparing with torch.nn (same math, different summation order).
# bfloat16 outputs may differ by one bf16 rounding step (2^-8 relative).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}
