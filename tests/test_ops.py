"""Every op passes torch.library.opcheck and compiles with torch.compile(fullgraph=True)."""

import pytest
import torch
from conftest import unit

import llp_fast
from llp_fast.reference import topk_scores_ref

# opcheck and torch.compile drive the C++ extension at unusual shapes and strides: a native crash fails
# these tests, not the run
pytestmark = pytest.mark.isolated


def _samples():
    q, lab = unit(7, 13), unit(11, 13)
    cls = torch.randint(0, 3, (11,))
    yield "propagate", (q, lab, cls, torch.rand(11), 3, 0.07, 3)
    yield "propagate", (q, lab, cls, None, 11, 0.5, 3)
    yield "propagate", (q[:1].bfloat16(), lab.bfloat16(), cls, torch.rand(11), 2, 0.07, 4)
    yield "local_density", (lab, q, 3, 0.07, None)
    yield "local_density", (lab, q, 2, 0.07, torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.bool))
    yield "aggregation_loss", (q.clone().requires_grad_(), lab, cls, cls[:7], 0.07)
    yield "aggregation_loss", (q.double().requires_grad_(), lab.double(), cls, cls[:7], 0.2)
    yield "aggregation_loss_fused", (q.clone().requires_grad_(), lab, cls, cls[:7], 0.07)
    yield "aggregation_loss_fused", (q.double().requires_grad_(), lab.double(), cls, cls[:7], 0.2)
    yield (
        "aggregation_loss_backward",
        (q, lab, cls, cls[:7], torch.rand(7) + 5, torch.rand(7) + 3, torch.rand(7), torch.rand(7), 0.07),
    )
    yield "bank_update_", (lab.clone(), torch.tensor([1, 1, 4]), q[:3].clone(), 0.5)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    yield "topk_scores", (q, lab, 3, 0.07, torch.rand(11), None, None, None, 0)
    init = topk_scores_ref(q, lab[:5], 4, 0.2, None, mask[:5])
    yield "topk_scores", (q, lab[5:], 4, 0.2, None, mask[5:], *init, 5)
    yield "topk_scores", (q[:1].bfloat16(), lab.bfloat16(), 15, 0.07, None, mask, None, None, 0)  # k > N


@pytest.mark.parametrize("name,args", list(_samples()), ids=lambda x: x if isinstance(x, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.llp_fast, name).default, args)


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
