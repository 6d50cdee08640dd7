"""The memory bound of docs/method.md §1.2/§1.3, measured: peak resident memory of a fresh process."""

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch, llp_fast
    torch.manual_seed(0)
    which, q, m, d = sys.argv[1], *map(int, sys.argv[2:])
    x = torch.nn.functional.normalize(torch.randn(q, d), dim=1)
    y = torch.nn.functional.normalize(torch.randn(m, d), dim=1)
    classes = torch.randint(0, 1000, (m,))
    # Warm up on a tiny problem so one-off allocations (thread pools, BLAS) are not counted.
    llp_fast.propagate(x[:10], y[:50], classes[:50], k=10, num_classes=1000)
    llp_fast.aggregation_loss(x[:4].clone().requires_grad_(), y[:50], classes[:50], classes[:4]).sum().backward()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if which == "propagate":
        labels, conf = llp_fast.propagate(x, y, classes, torch.rand(m), k=10, num_classes=1000)
        assert labels.shape == (q,)
    else:
        v = x.clone().requires_grad_()
        llp_fast.aggregation_loss(v, y, classes, classes[:q]).sum().backward()
        assert v.grad.shape == (q, d)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"extra_mb": (after - before) / 1024}))
    """
)


def _extra_mb(*args) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"]


@pytest.mark.slow
def test_propagate_50k_by_50k_stays_under_1gb():
    # A dense 50,000 x 50,000 float32 score matrix would be 10,000 MB.
    extra = _extra_mb("propagate", 50_000, 50_000, 128)
    assert extra < 1024, f"propagate used {extra:.0f} MB extra"


@pytest.mark.slow
def test_aggregation_loss_forward_backward_is_bounded():
    # B x N logits (2,000 x 200,000) would be 1,600 MB in float32, forward alone.
    extra = _extra_mb("loss", 2_000, 200_000, 128)
    assert extra < 400, f"aggregation_loss used {extra:.0f} MB extra"
