"""The pre-activation ResNets and their heads (docs/method.md §1.8)."""

import pytest
import torch

from llp_fast._device import memory_format
from llp_fast.nn import param_groups
from llp_fast.resnet import PreActBlock, PreActBottleneck, build_model


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("size", [8, 16, 72])
def test_heads_shapes_and_unit_embeddings(arch, size):
    torch.manual_seed(0)
    fmt = memory_format("cpu")  # the trainer's: channels_last at width 4 crashed oneDNN on AVX2 CPUs
    net = build_model(arch, num_classes=7, in_channels=3, image_size=size, width=4).to(memory_format=fmt)
    x = torch.randn(3, 3, size, size).contiguous(memory_format=fmt)
    logits, emb = net(x)
    assert logits.shape == (3, 7) and emb.shape == (3, 128)
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))


def test_small_stem_below_64px_only():
    small = build_model("resnet18", num_classes=2, in_channels=1, image_size=64, width=4)
    large = build_model("resnet18", num_classes=2, in_channels=1, image_size=65, width=4)
    assert isinstance(small.stem, torch.nn.Conv2d) and small.stem.stride == (1, 1)
    assert small.stem.kernel_size == (3, 3)
    assert isinstance(large.stem, torch.nn.Sequential)  # 7x7 stride 2 + max-pool


def test_block_counts_and_width():
    r18 = build_model("resnet18", num_classes=2, in_channels=3, image_size=32, width=8)
    r50 = build_model("resnet50", num_classes=2, in_channels=3, image_size=32, width=8)
    assert sum(isinstance(m, PreActBlock) for m in r18.modules()) == 8
    assert sum(isinstance(m, PreActBottleneck) for m in r50.modules()) == 16
    assert r18.feature_dim == 64 and r50.feature_dim == 256


def test_unknown_arch():
    with pytest.raises(ValueError, match="arch"):
        build_model("vgg", num_classes=2, in_channels=3, image_size=32)


def test_weight_decay_excludes_batchnorm_and_biases():
    net = build_model("resnet18", num_classes=3, in_channels=1, image_size=8, width=4)
    decay, no_decay = param_groups(net, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    bn = {id(p) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    biases = {id(net.fc.bias), id(net.embed.bias)}
    weights = {id(m.weight) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert {id(p) for p in decay["params"]} == weights
    assert {id(p) for p in no_decay["params"]} == bn | biases
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))


def test_backward_reaches_every_parameter():
    net = build_model("resnet18", num_classes=3, in_channels=1, image_size=8, width=4)
    logits, emb = net(torch.randn(4, 1, 8, 8))
    (logits.sum() + emb.sum()).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_build_checks_its_sizes_and_arch():
    """num_classes=0 built (B, 0) logits, width=0 empty layers, -1 was torch's error, an int arch an
    AttributeError, and a backbone beside a built-in arch was ignored."""
    from llp_fast.nn import build

    sizes = dict(num_classes=3, in_channels=1, image_size=8, width=4)
    for name in ("num_classes", "in_channels", "image_size", "width", "emb_dim"):
        for bad in (0, -1):
            with pytest.raises(ValueError, match=f"{name} must be >= 1"):
                build("resnet18", **{**sizes, name: bad})
        with pytest.raises(TypeError, match=name):
            build_model("resnet18", **{**sizes, name: 2.5})
    with pytest.raises(TypeError, match="arch must be a string"):
        build(18, **sizes)
    with pytest.raises(ValueError, match="backbone: a module given in Python"):
        build("resnet18", **sizes, backbone=torch.nn.Flatten())
