"""SyncBatchNorm across processes (gloo over loopback) equals single-process BN on the
concatenated batch, and fails loudly instead of hanging.

Worker processes only run the layer and save what it produced; this process computes the
twin (torch.nn BN on the concatenated batch, float64) and compares. One spawn of 3
processes carries every check (process start-up dominates the cost): the 3-process checks
run on the default group, the 2-process ones on the group of ranks 0 and 1.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import traceback
import zlib
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import batchnorm
from batchnorm import stats
from batchnorm.distributed import SyncBatchNorm, all_reduce_moments

TOL = dict(rtol=1e-10, atol=1e-10)
ROOT = Path(__file__).resolve().parents[1]
TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}

# name: (per-sample shape (C, *), module kwargs, channels_last, offset of the data)
CASES = {
    "nc": ((3,), dict(momentum=0.1), False, 0.0),
    "ncl-cumulative": ((4, 5), dict(momentum=None), False, 0.0),
    "nchw-channels_last-no_affine": ((3, 4, 3), dict(affine=False), True, 0.0),
    "ncdhw-no_running": ((2, 2, 3, 2), dict(track_running_stats=False), False, 0.0),
    "nchw-mean_1e4": ((3, 3, 3), dict(), False, 1e4),  # a sum-of-squares pooling fails here
}
SPLITS = {2: [(4, 4), (5, 2), (0, 6)], 3: [(3, 3, 3), (1, 5, 2), (4, 0, 3)]}
STEPS = 2
SUBGROUP_SPLIT = (3, 2, 4)  # ranks 0, 1 pool together; rank 2 is a group of one
PRECISE_BATCHES = [[5, 3], [], [2, 7, 1]]  # PreciseBN: rank r holds batches of these sizes


def _seed(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _full_batch(case: str, n: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated batch and upstream gradient of one step (same on every process)."""
    tail, _, _, offset = CASES[case]
    g = _seed(case, n, step)
    x = torch.randn((n, *tail), generator=g, dtype=torch.float64) * 2 + offset
    return x, torch.randn((n, *tail), generator=g, dtype=torch.float64)


def _init_params(bn: nn.Module, case: str) -> None:
    g = _seed(case, "params")
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(bn.num_features, generator=g, dtype=torch.float64) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g, dtype=torch.float64))


def _shard(t: torch.Tensor, split, rank: int) -> torch.Tensor:
    start = sum(split[:rank])
    return t[start:start + split[rank]]


def _format(case: str) -> torch.memory_format:
    return torch.channels_last if CASES[case][2] else torch.contiguous_format


def _layout(x: torch.Tensor, case: str) -> torch.Tensor:
    return x.contiguous(memory_format=_format(case))


def _run_steps(bn: nn.Module, case: str, split, pos: int) -> list[dict]:
    """STEPS training steps of ``bn`` on this process's shard, then one eval forward."""
    out = []
    for step in range(STEPS):
        x, dy = (_shard(t, split, pos) for t in _full_batch(case, sum(split), step))
        x = _layout(x, case).requires_grad_(True)
        bn.zero_grad()
        y = bn(x)
        (y * _layout(dy, case)).sum().backward()
        out.append(dict(
            y=y.detach(), dx=x.grad, layout_kept=y.is_contiguous(memory_format=_format(case)),
            dw=None if bn.weight is None else bn.weight.grad.clone(),
            db=None if bn.bias is None else bn.bias.grad.clone(),
            running=None if bn.running_mean is None else
            (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()),
        ))
    x = _shard(_full_batch(case, sum(split), STEPS)[0], split, pos)
    with torch.no_grad():  # eval: no communication (batch statistics are local, as in torch)
        local_stats = bn.running_mean is None
        out.append(dict(eval_y=x if local_stats and not len(x) else bn.eval()(x)))
    bn.train()
    return out


def _sync_bn(case: str, group=None) -> SyncBatchNorm:
    tail, kwargs, _, _ = CASES[case]
    bn = SyncBatchNorm(tail[0], process_group=group, dtype=torch.float64, **kwargs)
    _init_params(bn, case)
    return bn


def _catch(fn) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test inspects what was raised
        return f"{type(exc).__name__}: {exc}"
    return "no error"


# -- worker side -----------------------------------------------------------------------------
WORLD = 3  # one spawn of 3 processes; the 2-process checks run on the group of ranks 0, 1


def _worker(rank: int, store: str, outdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    pair, single = dist.new_group([0, 1]), dist.new_group([2])  # every rank creates both
    res: dict = {}
    try:
        for world, group in ((3, None), (2, pair)):
            if rank < world:
                _faults_before(rank, world, group, res)
                for split in SPLITS[world]:
                    for case in CASES:
                        res[("exact", world, case, split)] = _run_steps(
                            _sync_bn(case, group), case, split, rank
                        )
        _subgroup_and_precise(rank, pair, single, res)
    except Exception:  # noqa: BLE001 - report it to the parent rather than hang the others
        res["worker_error"] = traceback.format_exc()
    torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    if "worker_error" not in res:
        _faults_dead_rank(rank, res, outdir)  # ends every process
    dist.destroy_process_group()


def _faults_before(rank: int, world: int, group, res: dict) -> None:
    """Faults that every rank must turn into a clear error, leaving the group usable."""
    # the last rank builds the layer with a different number of features
    features = 5 if rank == world - 1 else 4
    bn = SyncBatchNorm(features, process_group=group, dtype=torch.float64)
    res[("mismatch", world)] = _catch(lambda: bn(torch.randn(3, features, dtype=torch.float64)))
    # rank 1 feeds an input with the wrong number of channels
    bn = SyncBatchNorm(4, process_group=group, dtype=torch.float64)
    channels = 6 if rank == 1 else 4
    res[("bad_input", world)] = _catch(lambda: bn(torch.randn(3, channels, dtype=torch.float64)))
    res[("bad_input_state", world)] = (bn.running_mean.clone(), int(bn.num_batches_tracked))
    # every rank's batch is empty
    res[("all_empty", world)] = _catch(lambda: bn(torch.randn(0, 4, dtype=torch.float64)))
    # eps = 0 (built so on every rank) in training: refused on every rank, state untouched
    bn = SyncBatchNorm(4, eps=0.0, process_group=group, dtype=torch.float64)
    res[("eps_0", world)] = _catch(lambda: bn(torch.randn(3, 4, dtype=torch.float64)))
    res[("eps_0_state", world)] = (bn.running_mean.clone(), int(bn.num_batches_tracked))


def _subgroup_and_precise(rank: int, pair, single, res: dict) -> None:
    case = "nchw-channels_last-no_affine"
    if rank < 2:  # pooled over ranks 0 and 1 only
        res["subgroup"] = _run_steps(_sync_bn(case, pair), case, SUBGROUP_SPLIT[:2], rank)
    else:  # a group of one: plain BN on its own batch
        res["subgroup"] = _run_steps(_sync_bn(case, single), case, SUBGROUP_SPLIT[2:], 0)
        res["non_member"] = _catch(lambda: _sync_bn(case, pair)(torch.randn(2, 3, 4, 3)))
    parts = [stats.moments(x) for x in _precise_batches(rank)]
    empty = stats.Moments(*torch.zeros(3, 3, dtype=torch.float64))  # a rank with no batch
    local = stats.merge_all(parts) if parts else empty
    res["precise"] = all_reduce_moments(local)
    res["precise_pair"] = all_reduce_moments(local, pair if rank < 2 else single)


def _precise_batches(rank: int) -> list[torch.Tensor]:
    g = _seed("precise", rank)
    return [torch.randn(n, 3, 2, generator=g, dtype=torch.float64) * 3 + 100
            for n in PRECISE_BATCHES[rank]]


def _faults_dead_rank(rank: int, res: dict, outdir: str) -> None:
    """The last rank stalls past a short timeout, then dies; the others must raise."""
    short = timedelta(seconds=1)
    groups = [dist.new_group(list(range(WORLD)), timeout=short) for _ in ("stall", "death")]
    stall, death = (SyncBatchNorm(4, process_group=g, dtype=torch.float64) for g in groups)
    x = torch.randn(3, 4, dtype=torch.float64)
    dist.barrier()  # start together: the short timeout is for the fault, not for skew
    stall(x), death(x)  # all alive: the handshakes and one step go through
    if rank == WORLD - 1:
        time.sleep(2)
        os._exit(0)
    res["stalled"] = _catch(lambda: stall(x))  # the last rank is alive but does not call
    time.sleep(2)  # the last rank is gone now
    res["dead"] = _catch(lambda: death(x))  # a fresh group: the pairs see the dead peer
    torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    os._exit(0)


# -- parent side -------------------------------------------------------------------------------
def _loopback_env() -> None:
    """Make gloo use the loopback interface, whatever the host name resolves to."""
    if any(name == "lo" for _, name in socket.if_nameindex()):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def _spawn(tmp: Path, deadline_s: float = 150) -> list[dict]:
    _loopback_env()
    ctx = mp.start_processes(
        _worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=False,
        start_method="spawn",
    )
    end = time.monotonic() + deadline_s
    while not ctx.join(timeout=5):
        if time.monotonic() > end:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{WORLD} SyncBatchNorm processes hung for {deadline_s} s")
    results = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    errors = [r["worker_error"] for r in results if "worker_error" in r]
    assert not errors, errors[0]
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the 3 worker processes recorded (one spawn for the whole file)."""
    return _spawn(tmp_path_factory.mktemp("sync"))


def _twin_steps(case: str, split) -> list[dict]:
    """torch.nn BN on the concatenated batch: the reference of ``_run_steps``."""
    tail, kwargs, _, _ = CASES[case]
    bn = TORCH_BN[len(tail) + 1](tail[0], dtype=torch.float64, **kwargs)
    _init_params(bn, case)
    out = []
    for step in range(STEPS):
        x, dy = _full_batch(case, sum(split), step)
        x.requires_grad_(True)
        y = bn(x)
        (y * dy).sum().backward()
        out.append(dict(y=y.detach(), dx=x.grad,
                        dw=None if bn.weight is None else bn.weight.grad.clone(),
                        db=None if bn.bias is None else bn.bias.grad.clone(),
                        running=None if bn.running_mean is None else
                        (bn.running_mean.clone(), bn.running_var.clone(),
                         bn.num_batches_tracked.clone())))
        bn.zero_grad()
    x, _ = _full_batch(case, sum(split), STEPS)
    with torch.no_grad():
        if bn.running_mean is None:  # eval on batch statistics: each rank's own
            shards = [_shard(x, split, r) for r in range(len(split))]
            out.append(dict(eval_y=torch.cat([bn.eval()(s) if len(s) else s for s in shards])))
        else:
            out.append(dict(eval_y=bn.eval()(x)))
    return out


def _assert_equal_to_twin(ranks: list[list[dict]], twin: list[dict], label: str) -> None:
    """Per-rank results (in rank order) against the twin on the concatenated batch."""
    for step in range(STEPS):
        got = [r[step] for r in ranks]
        want = twin[step]
        where = f"{label}, step {step}"
        for key in ("y", "dx"):
            torch.testing.assert_close(torch.cat([g[key] for g in got]), want[key], **TOL,
                                       msg=lambda m, k=key: f"{where}: {k}: {m}")
        for key in ("dw", "db"):  # summed over ranks, as DDP does
            if want[key] is not None:
                total = sum(g[key] for g in got)
                torch.testing.assert_close(total, want[key], **TOL,
                                           msg=lambda m, k=key: f"{where}: summed {k}: {m}")
        for g in got:
            assert (g["running"] is None) == (want["running"] is None)
            if want["running"] is not None:
                for a, b in zip(g["running"], want["running"]):
                    torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{where}: running: {m}")
            assert g["layout_kept"], f"{where}: the output's memory format differs from the input's"
    eval_y = torch.cat([r[STEPS]["eval_y"] for r in ranks])
    torch.testing.assert_close(eval_y, twin[STEPS]["eval_y"], **TOL,
                               msg=lambda m: f"{label}, eval: {m}")


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("split_index", [0, 1, 2], ids=["even", "uneven", "empty_rank"])
@pytest.mark.parametrize("case", list(CASES))
def test_sync_equals_bn_on_the_concatenated_batch(world, split_index, case, ranks):
    split = SPLITS[world][split_index]
    got = [r[("exact", world, case, split)] for r in ranks[:world]]
    _assert_equal_to_twin(got, _twin_steps(case, split), f"{case} split {split}")
    for pos, n in enumerate(split):
        assert got[pos][0]["y"].shape[0] == n  # an empty rank returns an empty output


def test_process_subgroup_pools_only_its_members(ranks):
    case = "nchw-channels_last-no_affine"
    pair = [ranks[0]["subgroup"], ranks[1]["subgroup"]]
    _assert_equal_to_twin(pair, _twin_steps(case, SUBGROUP_SPLIT[:2]), f"{case} subgroup")
    _assert_equal_to_twin([ranks[2]["subgroup"]], _twin_steps(case, SUBGROUP_SPLIT[2:]),
                          f"{case} group of one")
    assert ranks[2]["non_member"].startswith("ValueError: rank 2 is not a member"), ranks[2]


def test_all_reduce_moments_pools_every_rank_exactly(ranks):
    every = torch.cat([x for r in range(3) for x in _precise_batches(r)])
    pair = torch.cat([x for r in range(2) for x in _precise_batches(r)])
    for got in (r["precise"] for r in ranks):
        for a, b in zip(got, stats.moments(every)):
            torch.testing.assert_close(a, b, **TOL)
    for r, x in ((0, pair), (1, pair), (2, torch.cat(_precise_batches(2)))):
        for a, b in zip(ranks[r]["precise_pair"], stats.moments(x)):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("world", [2, 3])
def test_mismatched_num_features_is_a_clear_error_on_every_rank(world, ranks):
    expected = "ValueError: SyncBatchNorm: the number of channels differs across the ranks"
    for r in ranks[:world]:
        assert r[("mismatch", world)].startswith(expected), r[("mismatch", world)]
        assert f"{[4] * (world - 1) + [5]} (one per rank)" in r[("mismatch", world)]


@pytest.mark.parametrize("world", [2, 3])
def test_bad_input_on_one_rank_stops_every_rank_clearly(world, ranks):
    for rank, r in enumerate(ranks[:world]):
        got = r[("bad_input", world)]
        if rank == 1:
            assert got.startswith("ValueError: SyncBatchNorm(4) expects 4 channels"), got
        else:
            assert got.startswith("RuntimeError: SyncBatchNorm: rank(s) [1] of the process"), got
        running_mean, tracked = r[("bad_input_state", world)]
        assert tracked == 0 and not running_mean.any()
        got = r[("all_empty", world)]
        assert got.startswith("ValueError: SyncBatchNorm got an empty batch on every rank"), got


@pytest.mark.parametrize("world", [2, 3])
def test_eps_0_in_training_is_refused_on_every_rank_in_torch_nn_words(world, ranks):
    with pytest.raises(ValueError) as e:
        nn.BatchNorm1d(4, eps=0.0)(torch.randn(3, 4))
    expected = str(e.value).split(" ", 1)[1]  # "eps must be positive during training, ..."
    for r in ranks[:world]:
        got = r[("eps_0", world)]
        assert got.startswith("ValueError: SyncBatchNorm: ") and expected in got, got
        running_mean, tracked = r[("eps_0_state", world)]
        assert tracked == 0 and not running_mean.any()


def test_a_rank_that_stalls_or_dies_makes_the_others_raise(ranks):
    # the spawn's deadline guards against a hang; here: the survivors raised, twice
    for r in ranks[:-1]:
        for key in ("stalled", "dead"):
            assert r[key].startswith("RuntimeError: SyncBatchNorm: the collective with"), r[key]
            assert "probably crashed, stalled past the group's timeout" in r[key], r[key]


# -- in-process checks (no spawn) ----------------------------------------------------------------
def _compare_with_plain_bn() -> None:
    case = "nchw-mean_1e4"
    _assert_equal_to_twin([_run_steps(_sync_bn(case), case, (6,), 0)], _twin_steps(case, (6,)),
                          "plain")


def test_not_initialised_is_plain_bn():
    assert not dist.is_initialized()
    _compare_with_plain_bn()


def test_world_of_one_is_plain_bn(tmp_path):
    _loopback_env()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        _compare_with_plain_bn()
        moments = stats.moments(torch.randn(4, 3, dtype=torch.float64))
        assert all_reduce_moments(moments) is moments
    finally:
        dist.destroy_process_group()


def test_empty_batch_without_sync_is_an_empty_output_and_counts_nothing():
    bn = SyncBatchNorm(3)
    y = bn(torch.randn(0, 3))
    assert y.shape == (0, 3) and int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_mean, torch.zeros(3))


def test_convert_sync_batchnorm_swaps_every_kind_and_keeps_tensors():
    variants = [batchnorm.GhostBatchNorm2d(4), batchnorm.BatchRenorm2d(4),
                batchnorm.BatchNormAct2d(4), batchnorm.FrozenBatchNorm2d(4)]
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(4, momentum=None)),
        nn.SyncBatchNorm(4, affine=False), batchnorm.BatchNorm3d(4, single_value="skip_update"),
        SyncBatchNorm(4, track_running_stats=False), *variants,
    ).eval()
    before = dict(model.state_dict(keep_vars=True))
    converted = batchnorm.convert.convert_sync_batchnorm(model, process_group=None)
    assert converted is model
    layers = [model[1], model[2][0], model[3], model[4], model[5]]
    assert all(type(m) is SyncBatchNorm and not m.training for m in layers)
    assert model[2][0].momentum is None and not model[3].affine
    assert model[4].single_value == "skip_update" and model[5].running_mean is None
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    assert all(model[6 + i] is v for i, v in enumerate(variants))  # variants keep their rule
    bare = batchnorm.convert.convert_sync_batchnorm(nn.BatchNorm1d(3))
    assert type(bare) is SyncBatchNorm and bare.training


def test_ddp_example_matches_single_process_training(tmp_path):
    _loopback_env()
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", str(ROOT / "examples/ddp_train.py"),
         "--steps", "3"],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "EQUAL" in proc.stdout, proc.stdout + proc.stderr
