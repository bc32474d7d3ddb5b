"""Two processes on the gloo backend: DDP gradients equal one process's on the same global
batch, and a DDP / FSDP training run ends where a single process does."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import crossdistill as cd
from crossdistill.train import distributed as D


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank, world, port):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )


def _distiller():
    torch.manual_seed(0)
    t = cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8, channels=(8, 16, 16))
    s = cd.models.create(
        "vit", num_classes=10, in_channels=1, img_size=8, patch=2, dim=16, depth=2, heads=2
    )
    return cd.Distiller(
        s,
        t,
        [
            cd.Term("ce"),
            cd.Term("kd"),
            cd.Term("mse", student="blocks.1", teacher="stage3", projector="mlp", weight=1.0),
        ],
    )


def _batch():
    g = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(8, 1, 8, 8, generator=g),
        "y": torch.arange(8) % 10,
        "idx": torch.arange(8),
    }


def _grads_worker(rank, world, port, out):
    _env(rank, world, port)
    dist.init_process_group("gloo")
    from torch.nn.parallel import DistributedDataParallel as DDP

    d = _distiller()
    full = _batch()
    part = {k: v[rank * 4 : (rank + 1) * 4] for k, v in full.items()}
    d.build(full)
    d.train()
    model = DDP(d)  # keep a reference: a collected DDP wrapper never all-reduces
    model(part).total.backward()
    if rank == 0:
        torch.save({n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}, out)
    D.shutdown()


def test_ddp_gradients_equal_single_process(tmp_path):
    out = str(tmp_path / "g.pt")
    mp.spawn(_grads_worker, args=(2, _port(), out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    d = _distiller()
    d.build(_batch())
    d.train()
    d(_batch()).total.backward()
    single = {n: p.grad for n, p in d.named_parameters() if p.grad is not None}
    assert set(ddp) == set(single)
    for name, g in single.items():
        msg = lambda m, n=name: f"{n}: {m}"  # noqa: E731
        torch.testing.assert_close(ddp[name], g, rtol=1e-4, atol=1e-6, msg=msg)


def _fit(out=None, strategy="ddp"):
    """The same small supervised run, in one process or as one rank of several."""
    data = {
        s: cd.data.load("digits", s, limit=n)
        for s, n in (("train", 128), ("val", 64), ("test", 64))
    }
    torch.manual_seed(0)
    s = cd.models.create("mlp", num_classes=10, in_channels=1, img_size=8, hidden=(32,))
    res = cd.Trainer(
        cd.Distiller(s),
        data["train"],
        data["val"],
        data["test"],
        epochs=2,
        batch_size=32,
        lr=0.1,
        progress=False,
        out_dir=out,
        strategy=strategy,
        nesterov=False,
        weight_decay=0.0,
    ).fit()
    return s, res


def _fit_worker(rank, world, port, out, strategy):
    _env(rank, world, port)
    assert _fit(out, strategy)[1]["world"] == 2
    D.shutdown()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_training_matches_single(tmp_path, strategy):
    out = str(tmp_path / strategy)
    mp.spawn(_fit_worker, args=(2, _port(), out, strategy), nprocs=2, join=True)
    multi = cd.io.load_weights(os.path.join(out, "student.safetensors"))
    s, res = _fit()
    for k, v in s.state_dict().items():
        torch.testing.assert_close(multi[k], v, rtol=1e-4, atol=1e-5)
    assert os.path.isfile(os.path.join(out, "last.ckpt"))
    saved = json.loads(open(os.path.join(out, "results.json")).read())
    assert saved["test_acc"] == pytest.approx(res["test_acc"], abs=1 / 64)
