"""DHO: dual-head optimisation for semi-supervised KD from a (vision-language) teacher.

Kang et al., "Simple Semi-supervised Knowledge Distillation from Vision-Language Models via
Dual-Head Optimization" (2025). One trunk ``f``, two linear heads: ``h_ce`` learns the labels
and ``h_kd`` the teacher, so the two signals do not fight over one head:

``L = 0.5 * CE(h_ce(f(x_l)), y) + 0.5 * T^2 * KL(p_t || softmax(h_kd(f(x)) / T))``, ``T = 2``,

the KD part on labelled and unlabelled samples alike (unlabelled ones carry ``y = -100``).
Prediction mixes the heads: ``p = a * softmax(h_ce) + (1 - a) * softmax(h_kd / b)``, with
``a in {0, 0.05, ..., 1}`` and ``b in {0.5, 0.75, 1, 1.25, 1.5, 2, 4}`` chosen on val before
every validation (:class:`ChooseMix`), so the best epoch is picked with its own mix. The
official loop zips the labelled and unlabelled loaders and so stops each epoch at the
shorter one; here both live in one split (labels -100 where none), so every unlabelled
sample is used each epoch.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.mlp import replace_head
from ..registry import METHODS
from ..schema import NonNeg, Temperature

MIX_A = tuple(round(0.05 * i, 2) for i in range(21))
MIX_B = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)


class DualHead(nn.Module):
    """A zoo classifier with a second head: ``head_ce`` (its own classifier) and ``head_kd``
    (a copy at init) on the same trunk feature. Training returns ``head_ce``'s logits (tap
    ``head_kd`` for the KD term); eval returns ``log p`` of the mix (``a``, ``b`` buffers),
    which the classification task scores like logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        head = replace_head(model, lambda _: nn.Identity(), "method.student")
        self.trunk, self.head_ce, self.head_kd = model, head, copy.deepcopy(head)
        self.register_buffer("mix_a", torch.tensor(0.5))
        self.register_buffer("mix_b", torch.tensor(1.0))
        self.feature_path, self.family = "head_ce", getattr(model, "family", "dho")
        self.stages = [f"trunk.{s}" for s in getattr(model, "stages", [])]

    def heads(self, *args, **kwargs) -> tuple[Tensor, Tensor]:
        f = self.trunk(*args, **kwargs)
        return self.head_ce(f), self.head_kd(f)

    def forward(self, *args, **kwargs) -> Tensor:
        ce, kd = self.heads(*args, **kwargs)
        if self.training:
            return ce
        return mix(ce, kd, self.mix_a, self.mix_b)


def mix(ce: Tensor, kd: Tensor, a, b) -> Tensor:
    """``log(a softmax(ce) + (1 - a) softmax(kd / b))``."""
    p = a * F.softmax(ce.float(), -1) + (1 - a) * F.softmax(kd.float() / b, -1)
    return p.clamp_min(1e-12).log()


class ChooseMix:
    """Callback: before each validation, set the student's ``(a, b)`` to the grid point with
    the best val accuracy (ties: the first in grid order)."""

    def __init__(self, model: DualHead, val, io=None, batch_size: int = 512):
        self.model, self.val, self.io, self.batch_size = model, val, io, batch_size

    @torch.no_grad()
    def choose(self, device="cpu") -> tuple[float, float, float]:
        from ..data.loaders import eval_batches
        from ..train.loop import eval_io

        _, io = eval_io("classification", self.io)
        was = self.model.training
        self.model.eval()
        ces, kds, ys = [], [], []
        for batch, _ in eval_batches(self.val, self.batch_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            ce, kd = io.call(self.model.heads, batch)
            ces.append(ce)
            kds.append(kd)
            ys.append(batch["y"])
        self.model.train(was)
        ce, kd, y = torch.cat(ces), torch.cat(kds), torch.cat(ys)
        keep = y >= 0
        best = (-1.0, 0.5, 1.0)
        for a in MIX_A:
            for b in MIX_B:
                acc = float((mix(ce, kd, a, b).argmax(-1)[keep] == y[keep]).float().mean())
                if acc > best[0]:
                    best = (acc, a, b)
        self.model.mix_a.fill_(best[1])
        self.model.mix_b.fill_(best[2])
        return best

    def on_val_start(self, trainer) -> None:
        self.choose(trainer.device)


@METHODS.register(
    "dho",
    paper="Simple Semi-supervised Knowledge Distillation from Vision-Language Models via "
    "Dual-Head Optimization",
    year=2025,
    family="semi-supervised",
)
def dho(student, teacher, *, ce_weight: NonNeg = 0.5, kd_weight: NonNeg = 0.5,
        temperature: Temperature = 2.0):
    """DHO's two terms (module docstring) for a :class:`DualHead` student; add
    :class:`ChooseMix` to the trainer's callbacks for the val-chosen mix."""
    from ..distiller import Term
    from . import Recipe

    if not isinstance(student, DualHead):
        raise ConfigError("method.student", type(student).__name__,
                          "a DualHead(model) student (crossdistill.methods.dho.DualHead)")
    if teacher is None:
        raise ConfigError("method.teacher", None, "dho distils a teacher's predictions")
    terms = [Term("ce", weight=ce_weight),
             Term("kd", student="head_kd", teacher="logits", weight=kd_weight,
                  temperature=temperature)]
    return Recipe(terms, note="dho: CE on head_ce, KD on head_kd; mix chosen on val")
