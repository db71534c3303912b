"""The networks, by name (``model.arch``), and the options that make them the authors' networks.

- ``resnet18/34/50/101``: torchvision's ImageNet ResNets (random init; projection shortcuts).
- ``resnet20/44/56``: He et al. 2016's CIFAR ResNets (3 stages of n BasicBlocks, widths 16/32/64,
  depth 6n+2), by default with He et al.'s parameter-free "option A" shortcuts.
- ``resnet8``: the same family with one block per stage (~75k parameters), fast on a CPU for
  28×28 Fashion-MNIST.
- ``smallnet``: two conv layers and a linear layer, for tests.

The batch-augmentation authors' code (eladhoffer/convNet.pytorch, ``models/resnet.py``) builds its
ResNets differently; these options reproduce it on the same architectures:
- ``shortcut="projection"``: a 1×1 conv + BatchNorm shortcut wherever the shape changes (He et
  al.'s option B), in the CIFAR ResNets; torchvision's ResNets always have it.
- ``zero_init_residual``: the last BatchNorm of every residual block starts with weight 0, so each
  block starts as its shortcut (the authors' ``init_model``; torchvision's option of that name).
- ``fc_init_std``: the classifier's weight ~ N(0, std) and bias 0 (the authors: 0.01); 0 keeps the
  architecture's default.
Both families initialise convolutions as the authors do (He normal, fan-out) and BatchNorm to
weight 1, bias 0. The authors' weight decay on conv/linear weights only is ``optim.no_decay_bn_bias``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dali_ba.config import ConfigError

TORCHVISION = ("resnet18", "resnet34", "resnet50", "resnet101")
CIFAR_DEPTHS = {"resnet8": 1, "resnet20": 3, "resnet44": 7, "resnet56": 9}
ARCHS = TORCHVISION + tuple(CIFAR_DEPTHS) + ("smallnet",)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, projection: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.extra = stride, planes - in_planes
        self.downsample = None
        if projection and (stride > 1 or in_planes != planes):  # option B
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Option B (a projection) where it exists, else option A: subsample, zero-pad new channels."""
        if self.downsample is not None:
            return self.downsample(x)
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int, widths=(16, 32, 64), projection: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        layers, in_planes = [], widths[0]
        for i, planes in enumerate(widths):
            for j in range(blocks_per_stage):
                layers.append(BasicBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1, projection))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SmallNet(nn.Module):
    """conv-bn-relu-pool ×2 and a linear layer: a few thousand parameters, for tests."""

    def __init__(self, num_classes: int, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


def build_model(arch: str, num_classes: int, shortcut: str = "auto", zero_init_residual: bool = False,
                fc_init_std: float = 0.0) -> nn.Module:
    """The network ``arch`` with ``num_classes`` outputs (see the module docstring for the options)."""
    if num_classes < 2:
        raise ConfigError(f"model.num_classes: expected at least 2 classes; got {num_classes}")
    if arch not in ARCHS:
        raise ConfigError(f"model.arch: expected one of {', '.join(ARCHS)}; got {arch!r}")
    if shortcut != "auto" and arch not in CIFAR_DEPTHS:
        owned = "projection shortcuts" if arch in TORCHVISION else "no shortcuts"
        raise ConfigError(f"model.shortcut: {arch} has {owned} of its own (set auto); got {shortcut!r}")
    if zero_init_residual and arch == "smallnet":
        raise ConfigError("model.zero_init_residual: smallnet has no residual blocks; got true")
    if arch in TORCHVISION:
        import torchvision

        model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes,
                                                  zero_init_residual=zero_init_residual)
    elif arch in CIFAR_DEPTHS:
        model = CifarResNet(CIFAR_DEPTHS[arch], num_classes, projection=shortcut == "projection")
        if zero_init_residual:
            for block in model.layers:
                nn.init.zeros_(block.bn2.weight)
    else:
        model = SmallNet(num_classes)
    if fc_init_std > 0:
        nn.init.normal_(model.fc.weight, 0.0, fc_init_std)
        nn.init.zeros_(model.fc.bias)
    return model
