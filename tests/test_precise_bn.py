"""Precise BN: statistics recomputed on a fixed train sample before each validation."""

import pytest
import torch
from torch import nn

import crossdistill as cd
from crossdistill.train.precise_bn import bn_layers, recompute, sample_ids


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return cd.data.Dataset.classification(
        3.0 + 2.0 * torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    )


def _model():
    torch.manual_seed(0)
    return cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8, channels=(4, 8))


def test_recompute_is_the_equal_weight_mean_of_batch_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3, momentum=0.1).eval()
    batches = [torch.randn(8, 3) * 2 + 1, torch.randn(8, 3) * 0.5 - 4]
    assert recompute(bn, batches, lambda m, x: m(x)) == 1
    want_mean = torch.stack([b.mean(0) for b in batches]).mean(0)
    want_var = torch.stack([b.var(0, unbiased=True) for b in batches]).mean(0)
    assert torch.allclose(bn.running_mean, want_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, want_var, atol=1e-5)
    assert bn.momentum == 0.1 and not bn.training  # settings and mode restored
    assert recompute(nn.Linear(3, 3), batches, lambda m, x: m(x)) == 0  # nothing to do


class _Frozen(nn.Module):
    """A module whose first BN is frozen: ``train()`` keeps it in eval mode."""

    def __init__(self):
        super().__init__()
        self.frozen, self.live = nn.BatchNorm1d(3), nn.BatchNorm1d(3)

    def forward(self, x):
        return self.live(self.frozen(x))

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.eval()
        return self


def test_frozen_layers_are_left_alone():
    m = _Frozen()
    m.frozen.running_mean.fill_(5.0)
    assert recompute(m, [torch.randn(8, 3)], lambda m, x: m(x)) == 1
    assert torch.equal(m.frozen.running_mean, torch.full((3,), 5.0))
    assert not torch.equal(m.live.running_mean, torch.zeros(3))


def test_sample_is_fixed_and_bounded():
    a, b = sample_ids(100, 30, seed=1), sample_ids(100, 30, seed=1)
    assert torch.equal(a, b) and len(a) == 30 and len(set(a.tolist())) == 30
    assert not torch.equal(a, sample_ids(100, 30, seed=2))
    assert torch.equal(sample_ids(10, 30, seed=0), torch.arange(10))  # k > n: everything


def test_trainer_recomputes_only_buffers():
    """Train-mode forwards use batch statistics, so the weights are the same with and without
    precise BN (the training's random stream is untouched); only the running statistics
    change, to those of the final weights on the sample."""
    data = _data()
    runs = {}
    for n in (0, 1000):
        s = _model()
        d = cd.Distiller(s, None, [cd.Term("ce")], seed=0)
        cd.Trainer(d, data, None, epochs=2, batch_size=16, lr=0.05, progress=False,
                   precise_bn=n).fit()
        runs[n] = s
    plain, precise = runs[0].state_dict(), runs[1000].state_dict()
    params = {k for k, _ in runs[0].named_parameters()}
    for k in params:
        assert torch.equal(plain[k], precise[k]), k
    stats = [k for k in plain if k.endswith("running_mean")]
    assert stats and any(not torch.equal(plain[k], precise[k]) for k in stats)
    ref = _model()
    ref.load_state_dict(runs[1000].state_dict())
    batches = [data.x[i:i + 16] for i in range(0, len(data), 16)]
    recompute(ref, batches, lambda m, x: m(x))
    for k in stats:
        assert torch.allclose(ref.state_dict()[k], precise[k], atol=1e-5), k


def test_precise_bn_steadies_val_between_epochs():
    """The val metric with precise BN depends on the weights only: two evaluations of the same
    weights after different last batches agree."""
    data, val = _data(), _data(32, seed=1)
    s = _model()
    d = cd.Distiller(s, None, [cd.Term("ce")], seed=0)
    t = cd.Trainer(d, data, val, epochs=1, batch_size=16, lr=0.05, progress=False,
                   precise_bn=1000)
    t.fit()
    first = {k: v.clone() for k, v in s.state_dict().items()}
    s.train()
    with torch.no_grad():
        s(torch.randn(16, 1, 8, 8) * 9)  # a stray batch moves the running statistics
    t._precise_bn()
    assert bn_layers(s)
    for k in first:
        assert torch.allclose(s.state_dict()[k].float(), first[k].float(), atol=1e-5), k


def test_config_rejects_a_negative_sample():
    from crossdistill.config import validate
    from crossdistill.errors import ConfigError

    raw = {"student": {"model": "cnn"}, "data": {"name": "digits"}}
    assert validate({**raw, "train": {"precise_bn": 512}}).train.precise_bn == 512
    with pytest.raises(ConfigError, match="train.precise_bn"):
        validate({**raw, "train": {"precise_bn": -1}})


def test_needs_a_dataset_train_split():
    from torch.utils.data import DataLoader

    from crossdistill.errors import ConfigError

    data = _data()
    loader = DataLoader([{"x": data.x[i], "y": data.y[i], "idx": data.idx[i]}
                         for i in range(len(data))], batch_size=16)
    d = cd.Distiller(_model(), None, [cd.Term("ce")], seed=0)
    with pytest.raises(ConfigError, match="train.precise_bn"):
        cd.Trainer(d, loader, None, epochs=1, progress=False, precise_bn=100).fit()
