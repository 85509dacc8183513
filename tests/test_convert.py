"""from_torch / to_torch swap layers in any model, keep names, tensors and state, and a
converted model trains step for step like the original."""

import copy

import torch
from torch import nn

import batchnorm


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.ModuleDict({"a": nn.Sequential(nn.Conv1d(8, 8, 1), nn.BatchNorm1d(8, momentum=None))})
        self.head = nn.Linear(8, 4)
        self.norm3 = nn.BatchNorm3d(2, affine=False)

    def forward(self, x):
        h = self.features(x).mean(-1)
        h = self.blocks["a"](h).mean(-1)
        return self.head(h)


def test_from_torch_swaps_every_batchnorm_and_keeps_the_same_tensors():
    model = Net()
    params_before = {k: v for k, v in model.named_parameters()}
    keys_before = list(model.state_dict())
    batchnorm.from_torch(model)
    assert isinstance(model.features[1], batchnorm.BatchNorm2d)
    assert isinstance(model.blocks["a"][1], batchnorm.BatchNorm1d)
    assert model.blocks["a"][1].momentum is None
    assert isinstance(model.norm3, batchnorm.BatchNorm3d) and not model.norm3.affine
    assert list(model.state_dict()) == keys_before
    for k, v in model.named_parameters():
        assert v is params_before[k]
    batchnorm.to_torch(model)
    assert type(model.features[1]) is nn.BatchNorm2d and type(model.norm3) is nn.BatchNorm3d


def test_a_bare_layer_converts_and_keeps_its_mode():
    bn = nn.BatchNorm1d(4).eval()
    ours = batchnorm.from_torch(bn)
    assert isinstance(ours, batchnorm.BatchNorm1d) and not ours.training


def test_converted_model_trains_step_for_step_like_the_original():
    torch.manual_seed(0)
    original = Net()
    converted = batchnorm.from_torch(copy.deepcopy(original))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (original, converted)]
    for step in range(5):
        x, t = torch.randn(6, 3, 10, 10), torch.randint(0, 4, (6,))
        losses = []
        for model, opt in zip((original, converted), opts):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), t)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-5, f"step {step}: {losses}"
    for (k, a), (_, b) in zip(original.state_dict().items(), converted.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
