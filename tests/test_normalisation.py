"""The normalisation contract: every per-position term is a mean over the valid tokens of the
*global* batch, whatever micro-batches (gradient accumulation) or processes (DDP) they fall
into -- not a mean of micro-batch means, which over-weights short sequences."""

import os
import socket

import torch
import torch.multiprocessing as mp
from torch import nn

import crossdistill as cd
from crossdistill.train import distributed as D

V, L = 11, 6


class TinyLM(nn.Module):
    def __init__(self, dim=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, dim)
        self.head = nn.Linear(dim, V)

    def forward(self, input_ids):
        return self.head(torch.tanh(self.emb(input_ids)))


def _data(n=8, seed=0):
    """Sequences whose number of labelled positions differs a lot (1..L)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, L), generator=g)
    labels = torch.randint(0, V, (n, L), generator=g)
    for i in range(n):
        labels[i, 1 + (i * 5) % L :] = -100  # 1..L valid tokens per row
    return {"input_ids": ids, "labels": labels, "idx": torch.arange(n)}


def _distiller(seed=0):
    return cd.Distiller(
        TinyLM(seed=seed),
        TinyLM(seed=99),
        [cd.Term("ce"), cd.Term("fkl", weight=0.5), cd.Term("mse", student="emb",
                                                            teacher="emb", weight=0.1)],
        task="lm",
    )


def _grads(d):
    return {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}


def test_accumulated_micro_batches_give_the_global_token_mean():
    full = _data()
    ref = _distiller()
    ref.build(full)
    ref.train()
    ref(full).total.backward()
    want = _grads(ref)

    d = _distiller()
    d.build(full)
    d.train()
    parts = [{k: v[i : i + 2] for k, v in full.items()} for i in range(0, 8, 2)]
    per = [d.token_counts(p) for p in parts]
    acc = len(parts)
    counts = {k: sum(c[k] for c in per) / acc for k in per[0]}
    for p in parts:
        (d(p, counts=counts).total / acc).backward()
    got = _grads(d)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=name)

    # the mean of micro-batch means is a different (wrong) number here
    naive = _distiller()
    naive.build(full)
    naive.train()
    for p in parts:
        (naive(p).total / acc).backward()
    assert not torch.allclose(_grads(naive)["student.head.weight"], want["student.head.weight"])


def test_token_counts_follow_each_terms_mask():
    d = _distiller()
    batch = _data()
    d.build(batch)
    counts = d.token_counts(batch)
    valid = (batch["labels"] != -100).sum().float()
    assert counts["ce"] == valid and counts["fkl"] == valid
    assert "mse" not in counts  # a scalar loss (mean over all elements) keeps its reduction


def _splits(n=16):
    data = _data(n)
    kinds = {"input_ids": "tokens", "labels": "tokens", "idx": "id"}
    return {s: cd.data.Dataset(data, kinds, name="toy", split=s, num_classes=V)
            for s in ("train", "val", "test")}


def _fit(batch_size, accumulate, out=None):
    sp = _splits()
    d = _distiller()
    trainer = cd.Trainer(
        d, sp["train"], sp["val"], sp["test"], epochs=1, batch_size=batch_size,
        accumulate=accumulate, lr=0.5, optimizer="sgd", momentum=0.0, nesterov=False,
        weight_decay=0.0, progress=False, out_dir=out, grad_clip=0.0,
    )
    trainer.fit()
    return d.student.state_dict()


def test_trainer_accumulation_equals_the_big_batch():
    big = _fit(batch_size=8, accumulate=1)
    small = _fit(batch_size=4, accumulate=2)
    for k, v in big.items():
        torch.testing.assert_close(small[k], v, rtol=1e-5, atol=1e-6, msg=k)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    state = _fit(batch_size=8, accumulate=1, out=out)
    if rank == 0:
        torch.save(state, os.path.join(out, "state.pt"))
    D.shutdown()


def test_two_processes_equal_one_on_the_global_token_mean(tmp_path):
    out = str(tmp_path / "ddp")
    mp.spawn(_worker, args=(2, _port(), out), nprocs=2, join=True)
    multi = torch.load(os.path.join(out, "state.pt"), weights_only=True)
    single = _fit(batch_size=8, accumulate=1)
    for k, v in single.items():
        torch.testing.assert_close(multi[k], v, rtol=1e-5, atol=1e-6, msg=k)
