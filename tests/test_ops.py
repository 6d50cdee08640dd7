"""Every op passes torch.library.opcheck on every sample of tests/samples.py, and compiles with
torch.compile(fullgraph=True)."""

import pytest
import torch
from conftest import unit
from samples import sample, sample_ids

import llp_fast
from llp_fast._op_table import OPS

# opcheck and torch.compile drive the C++ extension at unusual shapes and strides: a native crash fails
# these tests, not the run
pytestmark = pytest.mark.isolated


# Every odd shape and every dtype of every op (tests/samples.py), each shape once: opcheck runs each
# op several times (schema, fake, autograd registration, aot dispatch).
CASES = [(op, name) for op in OPS for name in sample_ids(op, diagonal=True)]


@pytest.mark.parametrize("op,name", CASES, ids=[f"{op}-{name}" for op, name in CASES])
def test_opcheck(op, name):
    args = sample(op, name, diagonal=True).args
    if op in ("aggregation_loss", "aggregation_loss_fused") and args[0].dtype in (torch.float32, torch.float64):
        args = (args[0].clone().requires_grad_(), *args[1:])  # and the autograd registration
    torch.library.opcheck(getattr(torch.ops.llp_fast, op).default, args)


def test_compile_fullgraph():
    q, lab = unit(7, 13), unit(11, 13)
    cls = torch.randint(0, 3, (11,))
    log_rho = torch.rand(11)

    prop = torch.compile(lambda a, b, c, d: llp_fast.propagate(a, b, c, d, k=3, num_classes=3), fullgraph=True)
    torch.testing.assert_close(prop(q, lab, cls, log_rho), llp_fast.propagate(q, lab, cls, log_rho, k=3, num_classes=3))

    dens = torch.compile(lambda a, b: llp_fast.local_density(a, b, t=3), fullgraph=True)
    torch.testing.assert_close(dens(lab, q), llp_fast.local_density(lab, q, t=3))

    v1, v2 = q.clone().requires_grad_(), q.clone().requires_grad_()
    loss = torch.compile(lambda v: (llp_fast.aggregation_loss(v, lab, cls, cls[:7]) * 2).sum(), fullgraph=True)
    loss(v1).backward()
    (llp_fast.aggregation_loss(v2, lab, cls, cls[:7]) * 2).sum().backward()
    torch.testing.assert_close(v1.grad, v2.grad)

    mask = torch.rand(11) < 0.7
    top = torch.compile(lambda a, b, c, m: llp_fast.topk_scores(a, b, k=4, bias=c, key_mask=m), fullgraph=True)
    torch.testing.assert_close(
        top(q, lab, log_rho, mask), llp_fast.topk_scores(q, lab, k=4, bias=log_rho, key_mask=mask)
    )
    init = llp_fast.topk_scores(q, lab[:6], k=4)
    more = torch.compile(lambda a, b, i: llp_fast.topk_scores(a, b, k=4, init=i, index_offset=6), fullgraph=True)
    torch.testing.assert_close(more(q, lab[6:], init), llp_fast.topk_scores(q, lab, k=4))

    b1, b2 = lab.clone(), lab.clone()
    idx = torch.tensor([1, 5, 1])
    upd = torch.compile(lambda b, i, x: llp_fast.bank_update_(b, i, x, momentum=0.3), fullgraph=True)
    upd(b1, idx, q[:3])
    llp_fast.bank_update_(b2, idx, q[:3], momentum=0.3)
    torch.testing.assert_close(b1, b2)


def test_compile_fullgraph_many_classes_several_k_and_a_changing_tau():
    """Found by review (2026-12-08): under torch.compile a many-class vote (the sorted vote, S > 4 K +
    64) returned class ids beyond num_classes without a word, several K at many classes did not
    compile (a branch on a value), and a tau that changed between calls (a schedule, a sweep) did not
    either (math.isfinite on a symbolic float)."""
    torch._dynamo.reset()
    q, lab = unit(5, 8), unit(50, 8)
    cls = torch.randint(0, 1000, (50,))
    several = torch.compile(
        lambda a, b, c, tau: llp_fast.propagate(a, b, c, k=(10, 3), tau=tau, num_classes=1000), fullgraph=True
    )
    ops = torch.compile(
        lambda a, b, c, tau: (
            llp_fast.local_density(b, a, t=3, tau=tau),
            llp_fast.topk_scores(a, b, k=4, tau=tau),
            llp_fast.aggregation_loss(a, b, c, c[:5], tau=tau),
        ),
        fullgraph=True,
    )
    for tau in (0.07, 0.1, 0.2):
        want = llp_fast.propagate(q, lab, cls, k=(10, 3), tau=tau, num_classes=1000)
        torch.testing.assert_close(several(q, lab, cls, tau), want)
        want = (
            llp_fast.local_density(lab, q, t=3, tau=tau),
            llp_fast.topk_scores(q, lab, k=4, tau=tau),
            llp_fast.aggregation_loss(q, lab, cls, cls[:5], tau=tau),
        )
        torch.testing.assert_close(ops(q, lab, cls, tau), want)
    one = torch.compile(lambda a, b, c, s: llp_fast.propagate(a, b, c, k=10, num_classes=s), fullgraph=True)
    for bad, classes in ((1000, 1000), (-3, 200)):
        wrong = cls.clone()
        wrong[7] = bad
        with pytest.raises(RuntimeError, match=r"labeled_classes: an entry outside \[0, "):
            one(q, lab, wrong, classes)
        with pytest.raises(RuntimeError, match=r"labeled_classes: an entry outside \[0, "):
            several(q, lab, wrong if classes == 1000 else wrong.clamp_max(999), 0.07)
