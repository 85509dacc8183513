"""The lab's experiments, one module per claim of docs/claims.md, in claim order.

To add an experiment: write a module with the interface of ``batchnorm.lab.experiment``
and add its name to ``MODULES`` (one line).
"""

from __future__ import annotations

import importlib
from types import ModuleType

MODULES = (
    "a1_formula",
    "a2_identity",
    "a6_vanishing",
    "c1_training",
    "c2_distribution",
    "c3_lr_multipliers",
    "c4_scale_invariance",
    "c5_learning_rate",
    "c6_noisy_bn",
    "c7_covariate_shift",
    "c8_smoothness",
    "c9_small_batches",
    "c10_ghost",
    "c11_precise_bn",
    "c12_adabn",
    "c13_tent",
    "c14_memory",
    "c15_placement",
    "c16_folding",
)


def all_experiments() -> list[ModuleType]:
    """The experiment modules, in claim order."""
    return [importlib.import_module(f"{__name__}.{name}") for name in MODULES]


def select(ids: list[str] | None) -> list[ModuleType]:
    """The experiments with these claim IDs (case-insensitive), in claim order; all when ``ids`` is empty."""
    experiments = all_experiments()
    if not ids:
        return experiments
    wanted = {i.upper() for i in ids}
    known = {e.ID for e in experiments}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"unknown claim IDs {unknown}: expected some of {', '.join(e.ID for e in experiments)}")
    return [e for e in experiments if e.ID in wanted]
