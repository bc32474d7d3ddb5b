"""MTT: dataset distillation by matching training trajectories (small scale).

Paper: Cazenavette, Wang, Torralba, Efros & Zhu, "Dataset Distillation by Matching Training
Trajectories", CVPR 2022. Eq. (1)-(2): from an expert checkpoint theta*_t (recorded while
training on the real data), take ``N = syn_steps`` SGD steps on the synthetic data with a
learnable learning rate alpha,

    theta_hat_{n+1} = theta_hat_n - alpha * grad l(A(b_n); theta_hat_n),  theta_hat_0 = theta*_t

and minimise the normalised parameter distance to the expert ``M = expert_epochs`` epochs later

    L = || theta_hat_N - theta*_{t+M} ||^2 / || theta*_t - theta*_{t+M} ||^2

over the pixels (SGD, momentum 0.5) and alpha (SGD, lr ``lr_lr``, momentum 0.5); t is drawn
uniformly from [0, max_start_epoch). ``A`` is per-image DSA (not siamese), as in the official
code (GeorgeCazenavette/mtt-distillation, distill.py).

Expert trajectories are recorded with this library's :class:`~crossdistill.Trainer`
(supervised CE, SGD lr ``lr_teacher`` = 0.01, no momentum or weight decay, constant schedule,
as in the official buffer.py, without its ZCA whitening) -- the parameters after every epoch.
Experts are cached in memory per (data, network, settings), so IPC 1/10/50 runs of one
benchmark share them. Small scale here: defaults ``num_experts`` 3, ``syn_steps`` 20,
``expert_epochs`` 2, ``max_start_epoch`` 4, ``lr_img`` 100 (official CIFAR-10 values are
syn_steps 30-50, max_start_epoch 2-40, 50 experts of 50 epochs, lr_img 1e3 with ZCA).
``fyi=True`` trains the inner steps on S ∪ hflip(S) (FYI, fyi.py). ``learn_labels=True`` also
learns per-image soft-label logits (initialised at ``label_init`` x one-hot, SGD ``lr_label``),
used as soft targets in the inner steps and stored in ``SyntheticSet.soft`` (the learnable-label
option of TESLA / DATM-style trajectory matching; off by default, not in the benchmark).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..errors import ConfigError
from ..registry import CONDENSERS
from .augment import DSA, hflip_union
from .base import MatchingCondenser, RealSampler, seeded_model

_EXPERTS: dict = {}


def record_experts(
    x, y, num_classes, *, net, net_kw, n, epochs, lr, batch_size, seed, device="cpu"
) -> list[list[list[torch.Tensor]]]:
    """``n`` expert trajectories: the parameter list at epoch 0..``epochs`` of supervised
    training on (x, y) with our Trainer. Cached in memory."""
    from ..data import Dataset
    from ..distiller import Distiller, Term
    from ..train import Trainer

    key = (
        tuple(x.shape),
        float(x.sum()),
        int(y.sum()),
        net,
        tuple(sorted(net_kw.items())),
        n,
        epochs,
        lr,
        batch_size,
        seed,
    )
    if key in _EXPERTS:
        return _EXPERTS[key]
    data = Dataset.classification(x.cpu(), y.cpu(), torch.arange(len(y)), num_classes=num_classes)
    out = []
    for e in range(n):
        model = seeded_model(
            net, seed * 7919 + e, num_classes=num_classes, input_shape=tuple(x.shape[1:]), **net_kw
        )
        traj = [[p.detach().clone() for p in model.parameters()]]

        class Rec:
            def on_epoch_end(self, trainer, row, model=model, traj=traj):
                traj.append([p.detach().clone() for p in model.parameters()])

        trainer = Trainer(
            Distiller(model, None, [Term("ce")]),
            data,
            epochs=epochs,
            batch_size=batch_size,
            optimizer="sgd",
            lr=lr,
            momentum=0.0,
            nesterov=False,
            weight_decay=0.0,
            schedule="constant",
            seed=seed * 7919 + e,
            progress=False,
            device=str(device),
            callbacks=[Rec()],
        )
        trainer.fit()
        out.append([[t.to(device) for t in ps] for ps in traj])
    _EXPERTS[key] = out
    return out


@CONDENSERS.register(
    "mtt", paper="Dataset Distillation by Matching Training Trajectories", year=2022
)
class MTT(MatchingCondenser):
    name = "mtt"

    def __init__(
        self,
        *,
        num_experts: int = 3,
        syn_steps: int = 20,
        expert_epochs: int = 2,
        max_start_epoch: int = 4,
        lr_img: float = 100.0,
        lr_lr: float = 1e-5,
        lr_teacher: float = 0.01,
        batch_syn: int | None = None,
        expert_batch_size: int = 256,
        learn_labels: bool = False,
        label_init: float = 5.0,
        lr_label: float = 2.0,
        **kw,
    ):
        super().__init__(lr_img=lr_img, **kw)
        for k, v in (
            ("num_experts", num_experts),
            ("syn_steps", syn_steps),
            ("expert_epochs", expert_epochs),
            ("max_start_epoch", max_start_epoch),
        ):
            if v < 1:
                raise ConfigError(f"condense.{k}", v, "must be >= 1")
        self.num_experts, self.syn_steps, self.expert_epochs = num_experts, syn_steps, expert_epochs
        self.max_start_epoch, self.lr_lr, self.lr_teacher = max_start_epoch, lr_lr, lr_teacher
        self.batch_syn, self.expert_batch_size = batch_syn, expert_batch_size
        self.learn_labels, self.label_init, self.lr_label = learn_labels, label_init, lr_label
        self.aug = DSA(self.dsa_strategy, shared=False) if self.dsa is not None else None

    def init(self, real: RealSampler) -> None:
        super().init(real)
        self.experts = record_experts(
            real.x,
            real.y,
            self.num_classes,
            net=self.net_name,
            net_kw=self.net_kw,
            n=self.num_experts,
            epochs=self.max_start_epoch + self.expert_epochs,
            lr=self.lr_teacher,
            batch_size=self.expert_batch_size,
            seed=self.seed,
            device=self.device,
        )
        self.syn_lr = torch.tensor(self.lr_teacher, device=self.device, requires_grad=True)
        self.opt_lr = torch.optim.SGD([self.syn_lr], lr=self.lr_lr, momentum=0.5)
        self.soft = None
        if self.learn_labels:  # learnable soft-label logits, initialised at label_init * one-hot
            oh = F.one_hot(self.y_syn, self.num_classes).float() * self.label_init
            self.soft = oh.to(self.device).requires_grad_(True)
            self.opt_label = torch.optim.SGD([self.soft], lr=self.lr_label, momentum=0.5)
        self.net = self.new_net()
        self.names = [n for n, _ in self.net.named_parameters()]

    def step(self, real: RealSampler, it: int) -> dict[str, float]:
        g = self.gen
        traj = self.experts[int(torch.randint(len(self.experts), (1,), generator=g))]
        start = int(torch.randint(self.max_start_epoch, (1,), generator=g))
        theta0 = traj[start]
        target = traj[start + self.expert_epochs]
        theta = [p.clone().requires_grad_(True) for p in theta0]
        x_all = hflip_union(self.x_syn) if self.fyi else self.x_syn
        y_all = torch.cat([self.y_syn, self.y_syn]) if self.fyi else self.y_syn
        s_all = None
        if self.soft is not None:
            s_all = torch.cat([self.soft, self.soft]) if self.fyi else self.soft
        bs = self.batch_syn or len(y_all)
        for _ in range(self.syn_steps):
            ids = torch.randperm(len(y_all), generator=g)[:bs].to(y_all.device)
            xb = x_all[ids]
            if self.aug is not None:
                xb = self.aug(xb, g)
            out = functional_call(self.net, dict(zip(self.names, theta)), (xb,))
            if s_all is None:
                ce = F.cross_entropy(out, y_all[ids])
            else:  # cross-entropy against the learned soft labels
                ce = -(F.softmax(s_all[ids], 1) * F.log_softmax(out, 1)).sum(1).mean()
            grads = torch.autograd.grad(ce, theta, create_graph=True)
            theta = [p - self.syn_lr * gr for p, gr in zip(theta, grads)]
        num = sum(((a - b) ** 2).sum() for a, b in zip(theta, target))
        den = sum(((a - b) ** 2).sum() for a, b in zip(theta0, target))
        loss = num / den
        self.opt_img.zero_grad(set_to_none=True)
        self.opt_lr.zero_grad(set_to_none=True)
        inputs = [self.x_syn, self.syn_lr] + ([self.soft] if self.soft is not None else [])
        if self.soft is not None:
            self.opt_label.zero_grad(set_to_none=True)
        loss.backward(inputs=inputs)
        self.opt_img.step()
        self.opt_lr.step()
        if self.soft is not None:
            self.opt_label.step()
        with torch.no_grad():
            self.syn_lr.clamp_(min=1e-6)
        return {"loss": loss.item(), "syn_lr": self.syn_lr.item()}

    def synthetic(self):
        s = super().synthetic()
        s.meta["syn_lr"] = self.syn_lr.item()
        if self.soft is not None:
            s.soft = self.soft.detach().cpu().clone()
            s.meta["labels"] = "learned soft labels (logits; KL at T=1 in evaluation)"
        return s
