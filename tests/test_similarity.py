"""Similarity-matrix losses (CLIP InfoNCE, TinyCLIP affinity mimicking): golden values,
gradients, a tiny end-to-end run and 2 gloo processes against one on the same batch."""

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import crossdistill as cd
from crossdistill.errors import ConfigError
from crossdistill.losses.similarity import AffinityLoss, CLIPLoss, affinity_loss, clip_loss


def test_clip_golden_two_pairs():
    # unit rows: a = [e1, e2], b = [e1, (e1 + e2)/sqrt 2]; scale 1
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]]) / torch.tensor([[1.0], [math.sqrt(2)]])
    c = 1 / math.sqrt(2)
    # a->b logits: row 0 [1, c] (target 0), row 1 [0, c] (target 1)
    a2b = (-math.log(math.e / (math.e + math.exp(c)))
           - math.log(math.exp(c) / (1 + math.exp(c)))) / 2
    # b->a logits: row 0 [1, 0] (target 0), row 1 [c, c] (target 1)
    b2a = (-math.log(math.e / (math.e + 1)) - math.log(0.5)) / 2
    assert clip_loss(a, b, 1.0).item() == pytest.approx((a2b + b2a) / 2, rel=1e-6)


def test_affinity_golden_and_properties():
    torch.manual_seed(0)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    # the student equal to the teacher at the same scale: the loss is the teacher's entropy
    logits = 2.0 * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    ent = lambda z: -(F.softmax(z, -1) * F.log_softmax(z, -1)).sum(-1).mean()  # noqa: E731
    want = 0.5 * (ent(logits) + ent(logits.T))
    assert affinity_loss(a, b, a, b, 2.0, 2.0).item() == pytest.approx(want.item(), rel=1e-6)
    # any other student scores higher (Gibbs: cross-entropy >= entropy)
    assert affinity_loss(torch.randn(4, 3), b, a, b, 2.0, 2.0) > want
    # the teacher gets no gradient
    ta = a.clone().requires_grad_()
    affinity_loss(a.clone().requires_grad_(), b, ta, b, 2.0, 2.0).backward()
    assert ta.grad is None


def test_gradcheck():
    torch.manual_seed(0)
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: clip_loss(x, y, 3.0), (a, b))
    ta, tb = b.detach().clone(), a.detach().clone()  # not views: gradcheck moves a, b
    assert torch.autograd.gradcheck(lambda x, y: affinity_loss(x, y, ta, tb, 3.0, 5.0), (a, b))


def test_modules_check_shapes_and_learn_the_scale():
    m = CLIPLoss([(4, 8), (4, 8)])
    assert m.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        m.scale.log_scale.fill_(10.0)
    assert m.scale().item() == pytest.approx(100.0, rel=1e-5)  # clamped, as CLIP
    with pytest.raises(ConfigError, match="clip.student"):
        CLIPLoss([(4, 8)])
    with pytest.raises(ConfigError, match="clip.student"):
        CLIPLoss([(4, 8), (4, 6)])
    with pytest.raises(ConfigError, match="affinity.teacher"):
        AffinityLoss([(4, 8), (4, 8)], [(4, 8), (4, 9)])


class Towers(nn.Module):
    """A toy dual encoder: ``forward(a, b)`` embeds both sides (taps ``ea``, ``eb``)."""

    def __init__(self, d_in=6, d=8):
        super().__init__()
        self.ea, self.eb = nn.Linear(d_in, d), nn.Linear(d_in, d)

    def forward(self, a, b):
        return self.ea(a), self.eb(b)


def _pairs(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 6, generator=g)
    perm = torch.randperm(6, generator=g)
    return cd.data.Dataset({"a": z, "b": z[:, perm] + 0.1 * torch.randn(n, 6, generator=g)},
                           {"a": "value", "b": "value"})


def test_clip_term_trains_a_toy_dual_encoder():
    torch.manual_seed(0)
    s, data = Towers(), _pairs()
    io = {"inputs": ["a", "b"]}
    task = {"name": "retrieval", "inputs": ["a", "b"], "ks": [1, 5]}
    d = cd.Distiller(s, None, [cd.Term("clip", student=["ea", "eb"], teacher=None)],
                     io=io, task=task)
    before = cd.evaluate(s, data, io=io, task=task)["mean_recall"]
    cd.Trainer(d, data, data, epochs=15, batch_size=16, lr=0.05, optimizer="adamw",
               progress=False).fit()
    after = cd.evaluate(s, data, io=io, task=task)["mean_recall"]
    assert after > before + 0.2
    # the affinity term distils a teacher's similarity structure
    t = Towers()
    t.load_state_dict(s.state_dict())
    s2 = Towers()
    d2 = cd.Distiller(s2, t, [cd.Term("affinity", student=["ea", "eb"], teacher=["ea", "eb"])],
                      io=io, teacher_io=io, task=task)
    cd.Trainer(d2, data, data, epochs=15, batch_size=16, lr=0.05, optimizer="adamw",
               progress=False).fit()
    assert cd.evaluate(s2, data, io=io, task=task)["mean_recall"] > before + 0.2


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net, teacher = Towers(), Towers()
        data = _pairs(8)
        rows = slice(rank * 4, rank * 4 + 4)
        a, b = net(data["a"][rows], data["b"][rows])
        ta, tb = teacher(data["a"][rows], data["b"][rows])
        loss = clip_loss(a, b, 5.0) + affinity_loss(a, b, ta.detach(), tb.detach(), 5.0, 9.0)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in net.parameters()])
        torch.distributed.all_reduce(grads)  # what DDP does, then / world
        value = loss.detach().clone()
        torch.distributed.all_reduce(value)
        if rank == 0:
            torch.save({"grads": grads / world, "loss": value / world}, out)
    finally:
        from crossdistill.train.distributed import shutdown

        shutdown()  # a barrier first: a rank leaving early can abort its peer


def test_two_gloo_processes_equal_one(tmp_path):
    torch.manual_seed(0)
    net, teacher = Towers(), Towers()
    data = _pairs(8)
    a, b = net(data["a"], data["b"])
    ta, tb = teacher(data["a"], data["b"])
    loss = clip_loss(a, b, 5.0) + affinity_loss(a, b, ta.detach(), tb.detach(), 5.0, 9.0)
    loss.backward()
    want = torch.cat([p.grad.flatten() for p in net.parameters()])
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, _port(), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    assert torch.allclose(got["grads"], want, atol=1e-6)
