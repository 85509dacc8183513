"""The lab's timing and testing helpers (``batchnorm.lab.measure``): what they do, not how
fast anything runs."""

from __future__ import annotations

import gc

import pytest

from batchnorm.lab.measure import paired_times, pin_allocator


def test_paired_times_takes_turns_with_the_collector_paused():
    log: list[tuple[str, bool]] = []

    def make(name):
        return lambda: log.append((name, gc.isenabled()))

    was = gc.isenabled()
    times = paired_times({"a": make("a"), "b": make("b")}, rounds=4, min_sample=0.0)
    assert gc.isenabled() == was
    assert set(times) == {"a", "b"} and all(len(t) == 4 and (t >= 0).all() for t in times.values())
    timed = log[2:]  # after one sizing call each, with min_sample 0 one call per sample
    assert [name for name, _ in timed] == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert not any(enabled for _, enabled in timed)


def test_paired_times_restores_the_collector_after_an_error():
    calls = []

    def fails():
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("boom")

    gc.enable()
    with pytest.raises(RuntimeError, match="boom"):
        paired_times({"f": fails}, rounds=2, min_sample=0.0)
    assert gc.isenabled()


def test_pin_allocator_applies_on_glibc_and_allocation_still_works():
    import platform

    import torch

    pinned = pin_allocator()
    if platform.libc_ver()[0] == "glibc":
        assert pinned is True
    t = torch.ones(3_000_000)  # 12 MB: now from the heap
    assert t.sum().item() == 3_000_000
