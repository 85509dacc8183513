"""Every layer kind leaves through the deployment routes as standard graphs: torch.export
then run_decompositions() (core ATen only), torch.onnx.export with the default (dynamo)
exporter run by onnxruntime, and torch.export in training mode, whose program updates the
running statistics as eager does. Fold-then-export gives the smallest graph."""

import operator
import warnings

import onnx  # test dependencies (pyproject's extra "test"), pinned in constraints.txt
import onnxruntime as ort
import pytest
import torch

import batchnorm

C = 4


def _trained(m):
    """A layer with non-trivial parameters and running statistics (so eval means something)."""
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if name in ("weight", "bias", "running_mean"):
                t.copy_(torch.randn(C) * 0.5 + (1.0 if name == "weight" else 0.0))
            elif name == "running_var":
                t.copy_(torch.rand(C) + 0.5)
    return m


# kind -> (layer factory, whether forward takes a mask, the activation's ONNX op or None)
KINDS = {
    "plain": (lambda: batchnorm.BatchNorm2d(C), False, None),
    "renorm": (lambda: batchnorm.BatchRenorm2d(C, warmup_steps=2), False, None),
    "ghost": (lambda: batchnorm.GhostBatchNorm2d(C, virtual_batch_size=2), False, None),
    "masked": (lambda: batchnorm.MaskedBatchNorm2d(C), True, None),
    "frozen": (lambda: batchnorm.FrozenBatchNorm2d(C, act="leaky_relu"), False, "LeakyRelu"),
    "act_relu": (lambda: batchnorm.BatchNormAct2d(C, act="relu"), False, "Relu"),
    "act_elu": (lambda: batchnorm.BatchNormAct2d(C, act="elu"), False, "Elu"),
    "sync": (lambda: batchnorm.SyncBatchNorm(C), False, None),
}


def _args(kind, n=6):
    x = torch.randn(n, C, 5, 5)
    if KINDS[kind][1]:
        return x, torch.tensor([1.0, 1.0, 0.0, 0.5, 1.0, 2.0])[:n]
    return (x,)


def _ops(ep):
    return {n.target for n in ep.graph.nodes if n.op == "call_function"}


def _not_core(ops):
    """Ops of a decomposed graph that are neither core ATen nor tuple indexing."""
    return sorted(
        str(op) for op in ops
        if op is not operator.getitem and torch.Tag.core not in getattr(op, "tags", ())
        # run-time checks: of the input's values (traced.check) and export's own check of
        # a tensor's dtype after .to(); kept by torch.export, dropped by the ONNX exporter
        and op not in (torch.ops.aten._assert_async.msg,
                       torch.ops.aten._assert_tensor_metadata.default)
    )


@pytest.mark.parametrize("kind", KINDS)
def test_eval_export_is_core_aten(kind):
    torch.manual_seed(0)
    layer = _trained(KINDS[kind][0]()).eval()
    args = _args(kind)
    ep = torch.export.export(layer, args).run_decompositions()
    ops = _ops(ep)
    assert _not_core(ops) == []
    assert torch.ops.aten._native_batch_norm_legit_no_training.default in ops
    assert not any("batchnorm" in str(op) for op in ops)
    torch.testing.assert_close(ep.module()(*args), layer(*args))


@pytest.mark.parametrize("kind", KINDS)
def test_eval_onnx_runs_in_onnxruntime(kind, tmp_path):
    torch.manual_seed(0)
    layer = _trained(KINDS[kind][0]()).eval()
    args = _args(kind)
    path = tmp_path / f"{kind}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(layer, args, str(path), dynamo=True, verbose=False)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    types = [node.op_type for node in model.graph.node]
    assert "BatchNormalization" in types
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node), types
    act = KINDS[kind][2]
    if act is not None:
        assert act in types
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    (out,) = session.run(None, feeds)
    torch.testing.assert_close(torch.from_numpy(out), layer(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "frozen"])
def test_training_export_updates_running_stats_as_eager(kind):
    """Two training steps through the exported program, then a non-finite batch: outputs
    and buffers (num_batches_tracked included) equal eager's, and the non-finite batch
    changes nothing. (Renorm's warm-up reads num_batches_tracked: its second step runs
    with other limits than the first.)"""
    torch.manual_seed(0)
    eager = _trained(KINDS[kind][0]()).train()
    exported_from = KINDS[kind][0]()
    exported_from.load_state_dict(eager.state_dict())
    before = {k: v.clone() for k, v in exported_from.state_dict().items()}
    program = torch.export.export(exported_from, _args(kind)).module()
    for k, v in exported_from.state_dict().items():  # exporting runs nothing for real
        assert torch.equal(v, before[k]), k
    for step in range(2):
        args = _args(kind)
        args = (args[0] * (step + 1) + step, *args[1:])
        torch.testing.assert_close(program(*args), eager(*args), rtol=1e-5, atol=1e-5)
        for name, buf in eager.named_buffers():
            torch.testing.assert_close(program.get_buffer(name), buf, msg=f"{name}, step {step}")
    bad = _args(kind)
    bad[0][0, 0, 0, 0] = float("nan")
    kept = {name: buf.clone() for name, buf in program.named_buffers()}
    program(*bad)
    for name, buf in program.named_buffers():
        assert torch.equal(buf, kept[name]), f"a non-finite batch changed {name}"


def test_training_export_frozen_is_eval():
    layer = _trained(batchnorm.FrozenBatchNorm2d(C)).train()
    x = torch.randn(6, C, 5, 5)
    ep = torch.export.export(layer, (x,))
    torch.testing.assert_close(ep.module()(x), layer.eval()(x))


def test_training_export_of_a_model_trains_like_eager():
    """A small CNN with every trainable kind, exported in training mode, gets the same
    gradients and buffers as eager after one step."""
    torch.manual_seed(0)

    def net():
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, C, 3, padding=1), batchnorm.BatchNormAct2d(C),
            torch.nn.Conv2d(C, C, 3, padding=1), batchnorm.BatchRenorm2d(C, warmup_steps=0),
            torch.nn.Conv2d(C, C, 3, padding=1), batchnorm.GhostBatchNorm2d(C, virtual_batch_size=4),
        )

    eager, source = net(), net()
    source.load_state_dict(eager.state_dict())
    x = torch.randn(8, 3, 6, 6)
    program = torch.export.export(source, (x,)).module()
    program(x).square().mean().backward()
    eager(x).square().mean().backward()
    grads = dict(program.named_parameters())
    for name, p in eager.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    for name, buf in eager.named_buffers():
        torch.testing.assert_close(program.get_buffer(name), buf, msg=name)


def test_masked_export_checks_the_mask_at_run_time():
    """The mask's values are data: the exported program checks them when it runs (and
    raises before any buffer changes)."""
    layer = batchnorm.MaskedBatchNorm2d(C).train()
    x, mask = _args("masked")
    program = torch.export.export(layer, (x, mask)).module()
    kept = {name: buf.clone() for name, buf in program.named_buffers()}
    with pytest.raises(RuntimeError, match="finite and >= 0"):
        program(x, -mask)
    with pytest.raises(RuntimeError, match="more than 1"):
        program(x, torch.tensor([0.0, 0, 0, 0, 0, 0]))
    for name, buf in program.named_buffers():
        assert torch.equal(buf, kept[name]), name


def test_fold_then_export_gives_the_smallest_graph(tmp_path):
    """Folding first removes BN from the graph: the ONNX model is the convolutions alone,
    with the original model's outputs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, C, 3), _trained(batchnorm.BatchNorm2d(C)), torch.nn.ReLU(),
        torch.nn.Conv2d(C, C, 3), _trained(batchnorm.BatchRenorm2d(C)),
    ).eval()
    x = torch.randn(2, 3, 9, 9)
    folded = batchnorm.fold(model).model
    path = tmp_path / "folded.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(folded, (x,), str(path), dynamo=True, verbose=False)
    types = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert types == ["Conv", "Relu", "Conv"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-4, atol=1e-5)


def test_strict_export_of_batch_renorm_in_training():
    """Dynamo-based (strict) export too: Batch Renorm's warm-up reads num_batches_tracked
    as a tensor, so no data-dependent guard stops it."""
    torch.manual_seed(0)
    eager = batchnorm.BatchRenorm2d(C, warmup_steps=3).train()
    source = batchnorm.BatchRenorm2d(C, warmup_steps=3).train()
    x = torch.randn(6, C, 5, 5)
    program = torch.export.export(source, (x,), strict=True).module()
    for step in range(3):
        torch.testing.assert_close(program(x * (step + 1)), eager(x * (step + 1)))
    for name, buf in eager.named_buffers():
        torch.testing.assert_close(program.get_buffer(name), buf, msg=name)
