"""LLaVA-KD: MDist + RDist and a three-stage training scheme for small multimodal LLMs.

Cai et al., "LLaVA-KD: A Framework of Distilling Multimodal Large Language Models" (2024,
arXiv 2410.16236). A large MLLM (l-MLLM) teaches a small one (s-MLLM) of the same layout
(vision encoder -> projector -> LLM, one tokenizer). Two distillation losses
(:mod:`crossdistill.losses.mllm`):

- MDist: ``L_res = sum_m KL(p_l(y_m | y_<m) || p_s(y_m | y_<m))`` on the response tokens and
  ``L_vis = sum_k KL(p_l || p_s)`` on the LLM's output distributions at the K visual tokens;
- RDist: ``L_rel``, the distance between teacher and student self-correlation matrices of
  the visual tokens (``R = norm(V) norm(V)^T``, K x K).

Three stages, each an ordinary :class:`~crossdistill.Distiller` + :class:`~crossdistill.Trainer`
run (:func:`pipeline`), the stage a recipe parameter:

1. ``dpt`` Distilled Pre-Training, image-caption data: ``L_reg + a L_res + b L_vis + g L_rel``
   with ``L_reg`` the caption CE; only the projector trains (vision encoder and LLM
   frozen), aligning visual tokens with the LLM's text space under the teacher's guidance.
2. ``sft`` Supervised Fine-Tuning, instruction data: ``L_reg`` only; projector and LLM train.
3. ``dft`` Distilled Fine-Tuning, instruction data: ``L_reg + a L_res + b L_vis + g L_rel``;
   projector and LLM train.

``pt`` is the plain, undistilled pre-training (caption CE, projector only) of the usual
two-stage PT -> SFT recipe (LLaVA, TinyLLaVA): the baseline DPT replaces, and how the
teacher itself is trained. The vision encoder is frozen in every stage (the student's
:class:`~crossdistill.models.mini_vlm.MiniVLM` keeps it so); the recipe sets which of the
student's other parameters train (``requires_grad``), which is the stage's definition.

Sources. The paper's public text (abstract, arXiv v1 and v3) and public summaries of it:
MDist brings the student's output distributions over visual and textual tokens to the
teacher's, ``L_res`` and ``L_vis`` being sums of KLD(teacher, student) over the response and
the visual tokens; RDist passes on how the teacher relates visual tokens to each other; DPT
aligns visual and textual representations, SFT teaches multimodal understanding, DFT
transfers the teacher further; teacher and student are both LLaVA-1.5-shaped (SigLIP + MLP
projector + LLM; released students: SigLIP-so400m with Qwen1.5-0.5B / 1.8B). The official repository
(github.com/Fantasyele/LLaVA-KD at aad2802, read, not run) has no training code (its README
lists "Release the training code" as to do); ``modeling_LLaVA_KD.py`` computes the cosine
self-correlation of the *projector's* outputs (L2-normalised visual tokens times their
transpose, plus text and image-text ones) and returns it from ``forward``;
``utils/distill_loss_utils.py`` holds forward / reverse / skewed / symmetric KL, JSD and TVD
averaged over positions whose label is not -100, plus unmasked ("womask") reverse and skewed
reverse KL (visual positions carry label -100, so those are the variants that can score them).

Ours, not confirmed by the text or the code we could read: the loss weights (all 1); the
RDist distance (``cosine``: ``1 - cos`` of the flattened matrices; ``mse`` / ``l1`` offered);
forward KL for ``L_vis`` as for ``L_res`` (the paper's KLD; the code's unmasked variants hint
at reverse KL there: ``divergence`` switches both); RDist on the projector output (the
released code's matrix; ``rdist_tap`` moves it, e.g. to ``visual_logits``); all of
``L_res``, ``L_vis``, ``L_rel`` in DPT as in DFT; caption data for DPT and only the projector
training in it (LLaVA's and TinyLLaVA's pre-training conventions). Official-code quirks not
copied: ``forward_kl`` returns the cross-entropy ``-sum p log q`` (the KL up to the teacher's
entropy: same gradient; we report the true KL); the self-correlation is normalised over the
whole batch's image features inside a per-sample loop, so each sample's entry holds every
sample's matrix; text-only samples get a 728 x 728 zero placeholder although SigLIP-so400m/14
at 384 px gives 729 tokens. Here RDist is one matrix per sample, images only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from ..errors import ConfigError
from ..registry import METHODS

STAGES = ("pt", "dpt", "sft", "dft")
DISTILLED = ("dpt", "dft")
PAPER = "LLaVA-KD: A Framework of Distilling Multimodal Large Language Models"


def trainable(student: nn.Module, stage: str) -> list[str]:
    """Set which of ``student``'s parameters train in ``stage`` (``pt`` / ``dpt``: the
    projector; ``sft`` / ``dft``: projector and LLM; the vision encoder never); returns the
    trained top-level modules."""
    for name in ("projector", "llm"):
        if not isinstance(getattr(student, name, None), nn.Module):
            raise ConfigError("method.student", type(student).__name__,
                              "a MiniVLM-like model with `projector` and `llm` submodules "
                              "(crossdistill.models.mini_vlm)")
    parts = ["projector"] if stage in ("pt", "dpt") else ["projector", "llm"]
    student.requires_grad_(False)
    for name in parts:
        getattr(student, name).requires_grad_(True)
    return parts


def _weight(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
        raise ConfigError(f"method.{name}", v, "a number >= 0 (0 drops the term)")
    return float(v)


@METHODS.register("llava-kd", paper=PAPER, year=2024, family="multimodal-llm")
def llava_kd(student, teacher, *, stage: str = "dft", ce_weight: float = 1.0,
             res_weight: float = 1.0, vis_weight: float = 1.0, rel_weight: float = 1.0,
             divergence: str = "fkl", temperature: float = 1.0, rdist_tap: str = "projector",
             vis_tap: str = "visual_logits", rdist_distance: str = "cosine"):
    """The terms of one LLaVA-KD stage (module docstring) for a MiniVLM-like ``student``
    and ``teacher``: ``ce`` (``L_reg``, response tokens), ``mdist`` on the response logits
    (``res_weight``), ``mdist`` per sample on ``vis_tap`` (``vis_weight``), ``rdist`` on
    ``rdist_tap`` (``rel_weight``); a weight of 0 drops its term (ablations). Sets which of the
    student's parameters train (:func:`trainable`)."""
    from ..distiller import Term
    from ..losses.divergences import NAMES
    from . import Recipe

    if stage not in STAGES:
        raise ConfigError("method.stage", stage, f"one of {', '.join(STAGES)}")
    w = {k: _weight(k, v) for k, v in (("ce_weight", ce_weight), ("res_weight", res_weight),
                                       ("vis_weight", vis_weight), ("rel_weight", rel_weight))}
    if divergence not in NAMES:
        raise ConfigError("method.divergence", divergence, f"one of {', '.join(NAMES)}")
    if rdist_distance not in ("cosine", "mse", "l1"):
        raise ConfigError("method.rdist_distance", rdist_distance, "cosine, mse or l1")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            0.01 < temperature <= 1000):
        raise ConfigError("method.temperature", temperature, "a number in (0.01, 1000]")
    distilled = stage in DISTILLED
    if distilled and teacher is None:
        raise ConfigError("method.teacher", None, f"stage {stage!r} distils a teacher MLLM; "
                          "give one (stages pt and sft need none)")
    parts = trainable(student, stage)
    terms = []
    if w["ce_weight"] > 0:
        terms.append(Term("ce", weight=w["ce_weight"], name="ce"))
    if distilled:
        kw = {"divergence": divergence, "temperature": float(temperature)}
        if w["res_weight"] > 0:
            terms.append(Term("mdist", weight=w["res_weight"], name="mdist_res", **kw))
        if w["vis_weight"] > 0:
            terms.append(Term("mdist", student=vis_tap, teacher=vis_tap, per="sample",
                              weight=w["vis_weight"], name="mdist_vis", **kw))
        if w["rel_weight"] > 0:
            terms.append(Term("rdist", student=rdist_tap, teacher=rdist_tap,
                              distance=rdist_distance, weight=w["rel_weight"], name="rdist"))
    if not terms:
        raise ConfigError("method.ce_weight", ce_weight, f"stage {stage!r} has no term left "
                          "(every weight is 0)")
    names = ", ".join(t.name for t in terms)
    return Recipe(terms, note=f"llava-kd {stage}: {names}; trains {' + '.join(parts)}")


@dataclass
class Stage:
    """One stage of :func:`pipeline`: ``stage`` (``pt`` / ``dpt`` / ``sft`` / ``dft``), its data,
    epochs and learning rate, the recipe's parameters, further Trainer settings and the task
    (None: the pipeline's; caption stages may select on val loss, since whole captions are
    rarely exactly right)."""

    stage: str
    train: object
    val: object = None
    test: object = None
    epochs: int = 1
    lr: float = 1e-3
    params: Mapping = field(default_factory=dict)
    trainer: Mapping = field(default_factory=dict)
    task: object = None


def pipeline(student: nn.Module, teacher: nn.Module | None, stages: Sequence[Stage], *,
             seed: int = 0, task=None, io=None, **train_kw) -> list[dict]:
    """Run ``stages`` in order on ``student`` (the same object throughout: each stage starts
    from the previous one's best-on-val weights, which its Trainer restores), each as a plain
    Distiller + Trainer run with :func:`llava_kd`'s terms. ``task`` defaults to the
    ``vqa`` task. Returns per stage the Trainer's results plus ``stage``, ``val_curve`` (the
    val selection metric per epoch) and ``note``."""
    from ..distiller import Distiller
    from ..tasks import build as build_task
    from ..train import Trainer
    from . import build

    if not stages:
        raise ConfigError("pipeline.stages", [], "at least one stage")
    task = build_task(task if task is not None else "vqa")
    out = []
    for i, st in enumerate(stages):
        if not isinstance(st, Stage) or st.stage not in STAGES:
            raise ConfigError(f"pipeline.stages.{i}", getattr(st, "stage", st),
                              f"a Stage of {', '.join(STAGES)}")
        use = teacher if st.stage in DISTILLED else None
        recipe = build("llava-kd", student, use, field=f"pipeline.stages.{i}",
                       stage=st.stage, **dict(st.params))
        st_task = task if st.task is None else build_task(st.task)
        d = Distiller(student, use, recipe.terms, task=st_task, io=io,
                      teacher_io=io if use is not None else None, seed=seed)
        kw = {**train_kw, **dict(st.trainer)}
        t = Trainer(d, st.train, st.val, st.test, epochs=st.epochs, lr=st.lr, seed=seed, **kw)
        res = t.fit()
        d.close()  # its taps come off the models; the next stage installs its own
        key = f"val_{st_task.select}"
        res = dict(res, stage=st.stage, note=recipe.note,
                   val_curve=[float(r[key]) for r in t.log.rows if key in r])
        out.append(res)
    return out
