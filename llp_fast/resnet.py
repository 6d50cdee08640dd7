"""Pre-activation ResNets (v2) with LLP's two heads (docs/method.md §1.8).

He et al., "Identity Mappings in Deep Residual Networks" (2016): BN -> ReLU -> conv inside
each residual branch, the shortcut untouched, one final BN -> ReLU before pooling. On the
pooled features sit two parallel linear heads: a classifier to S classes, and a projection
to D = 128 followed by L2 normalisation (the embedding that LLP stores in its memory bank).

``width`` is the channel count of the first stage (64 in the paper); 8-32 is plenty for the
small CPU data sets. Inputs of 64 px or less get the small-image stem (3x3 conv, stride 1,
no max-pool); larger ones the ImageNet stem (7x7 conv, stride 2, 3x3 max-pool).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _validate as check

ARCHS = ("resnet18", "resnet50")


class PreActBlock(nn.Module):
    """Basic pre-activation block (two 3x3 convs), used by ResNet-18."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != planes:
            self.shortcut = nn.Conv2d(cin, planes, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        # v2: a projection shortcut takes the pre-activated input, an identity one the raw input.
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


class PreActBottleneck(nn.Module):
    """Bottleneck pre-activation block (1x1, 3x3, 1x1), used by ResNet-50."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + sc


class PreActResNet(nn.Module):
    """Pre-activation ResNet with a classifier head and an L2-normalised embedding head.

    ``forward(x)`` takes (B, C, H, W) float images and returns ``(logits (B, S), emb (B, D))``,
    ``emb`` rows of unit norm (computed in float32 whatever the autocast dtype).
    """

    def __init__(
        self,
        block,
        layers,
        *,
        num_classes: int,
        in_channels: int = 3,
        width: int = 64,
        small_stem: bool = True,
        emb_dim: int = 128,
    ):
        super().__init__()
        if small_stem:
            self.stem = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], width
        for i, n in enumerate(layers):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if (i > 0 and j == 0) else 1))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(cin)
        self.feature_dim = cin
        self.fc = nn.Linear(cin, num_classes)
        self.embed = nn.Linear(cin, emb_dim)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x):
        x = self.stages(self.stem(x))
        x = F.relu(self.bn(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x):
        h = self.features(x)
        logits = self.fc(h)
        emb = F.normalize(self.embed(h).float(), dim=1)
        return logits, emb


def check_sizes(**sizes) -> None:
    """Each a whole number >= 1 (0 built (B, 0) logits or empty layers; -1 was torch's error)."""
    for name, value in sizes.items():
        check.positive_int(value, name)


def build_model(
    arch: str, *, num_classes: int, in_channels: int, image_size: int, width: int = 64, emb_dim: int = 128
) -> PreActResNet:
    """``arch`` is 'resnet18' or 'resnet50'; the small stem is used for ``image_size <= 64``."""
    check_sizes(num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=width, emb_dim=emb_dim)
    if arch == "resnet18":
        block, layers = PreActBlock, (2, 2, 2, 2)
    elif arch == "resnet50":
        block, layers = PreActBottleneck, (3, 4, 6, 3)
    else:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return PreActResNet(
        block,
        layers,
        num_classes=num_classes,
        in_channels=in_channels,
        width=width,
        small_stem=image_size <= 64,
        emb_dim=emb_dim,
    )
