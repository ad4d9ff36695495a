"""Instance norms computed as group norms: same outputs, gradients and checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medmap.experiments.baselines import StackedModalityCNN
from medmap.models.encoders import CNN3DEncoder, DenseNet3DEncoder, ViT3DEncoder
from medmap.models.norms import instance_norms_as_group_norms
from medmap.precision import autocast_context


def _net(affine: bool) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(2, 6, 3, padding=1), nn.InstanceNorm3d(6, affine=affine), nn.ReLU(),
                        nn.Sequential(nn.Conv3d(6, 4, 1), nn.InstanceNorm3d(4, affine=affine)))
    if affine:  # not the identity, so that a lost weight would show
        for m in net.modules():
            if isinstance(m, nn.InstanceNorm3d):
                nn.init.normal_(m.weight)
                nn.init.normal_(m.bias)
    return net


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("affine", [False, True])
def test_the_swap_keeps_outputs_and_gradients(affine: bool, precision: str) -> None:
    instance = _net(affine)
    group = copy.deepcopy(instance)
    assert instance_norms_as_group_norms(group) == 2
    assert not any(isinstance(m, nn.InstanceNorm3d) for m in group.modules())
    x = torch.randn(3, 2, 10, 12, 8)
    outs, grads = [], []
    for net in (instance, group):
        xi = x.clone().requires_grad_()
        with autocast_context(precision, torch.device("cpu")):
            y = net(xi)
        (y.float() ** 2).sum().backward()
        outs.append(y.float())
        grads.append(xi.grad)
    tol = 1e-4 if precision == "fp32" else 5e-2
    assert torch.allclose(outs[0], outs[1], atol=tol, rtol=tol)
    assert torch.allclose(grads[0], grads[1], atol=tol * 10, rtol=tol)
    assert set(instance.state_dict()) == set(group.state_dict())  # checkpoints load either way
    group.load_state_dict(instance.state_dict())


def test_norms_with_running_statistics_are_left_alone() -> None:
    net = nn.Sequential(nn.InstanceNorm3d(4, track_running_stats=True))
    assert instance_norms_as_group_norms(net) == 0 and isinstance(net[0], nn.InstanceNorm3d)


@pytest.mark.parametrize("model", [
    lambda: DenseNet3DEncoder(init_features=4, growth_rate=4, block_config=(1, 1), dim=8),
    lambda: CNN3DEncoder(channels=(4, 8), dim=8),
    lambda: ViT3DEncoder(roi_size=(16, 16, 16), dim=16, depth=1, heads=2, patch_size=4, stem_channels=4),
    lambda: StackedModalityCNN({"name": "DenseNet", "init_features": 4, "growth_rate": 4, "block_config": [1, 1],
                                "norm": "instance"}, 2, 3),
])
def test_encoders_and_the_cnn_baseline_carry_no_instance_norm_kernel(model) -> None:
    m = model()
    assert not any(isinstance(x, nn.modules.instancenorm._InstanceNorm) for x in m.modules())
    assert any(isinstance(x, nn.GroupNorm) for x in m.modules())
