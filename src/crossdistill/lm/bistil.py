"""BiStil (Ansell et al., "Distilling Efficient Language-Specific Models for Cross-Lingual
Transfer", Findings of ACL 2023): a student cut from the teacher, then distilled with
hidden-state MSE, attention MSE and a soft cross-entropy at T = 2 (no T^2), plus the task loss.

* :func:`init_from_teacher` -- the student starts from a subset of the teacher's layers
  ("regular": teacher layer ``l`` with ``l mod r == r - 1`` becomes student layer ``l // r``,
  ``r = n_teacher / n_student``) and the teacher's embeddings. A narrower student (width
  ``d < D``) gets the word embeddings ``U[:, :d]`` of the teacher embedding's SVD
  ``E = U S V^T`` (S and V dropped, as the official ``factorize_embeddings``); its blocks
  cannot take the teacher's weights and keep their random init (the official
  ``compress_model`` at the snapshot read computes the layer mapping but has the weight copy
  commented out, so there only the embeddings are inherited, at any width).
* ``bistil_hidden`` -- MSE between a student hidden state and a teacher one, through a fixed
  map ``P`` (top-``d`` right singular vectors of the teacher's states, uncentred) when the
  student is narrower.
* ``attn_mse`` -- attention-map MSE on the entries whose query and key are real tokens
  (and, causal, key <= query). The official code drops entries where the teacher's
  attention is exactly 0, which also drops genuine zeros; we use the attention mask.
* method ``bistil`` -- the terms (and, with ``init: true``, the init) for HF GPT-2 models.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..distiller import Term
from ..errors import ConfigError
from ..losses.features import _upcast
from ..registry import LOSSES, METHODS
from ..schema import NonNeg, Temperature

PAPER = "Distilling Efficient Language-Specific Models for Cross-Lingual Transfer"


# -- the student's init ----------------------------------------------------------------------
def layer_map(n_teacher: int, n_student: int, field: str = "student.config.n_layer") -> dict:
    """``{student layer: teacher layer}`` of the paper's "regular" choice: teacher layer
    ``l`` with ``l mod r == r - 1`` becomes student layer ``l // r``."""
    if n_student < 1 or n_teacher % n_student:
        raise ConfigError(field, n_student, f"a divisor of the teacher's {n_teacher} layers")
    r = n_teacher // n_student
    return {k // r: k for k in range(n_teacher) if k % r == r - 1}


def _gpt2(model, field: str):
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) != "gpt2" or not hasattr(model, "transformer"):
        what = getattr(cfg, "model_type", None) or type(model).__name__
        raise ConfigError(f"{field}.hf", what, "BiStil's init and taps support HF GPT-2 models "
                          "(hf: gpt2, head: causal_lm)")
    return cfg


def embedding_init(weight: Tensor, d: int) -> Tensor:
    """``U[:, :d]`` of the SVD ``weight = U S V^T`` (float64): orthonormal columns."""
    u, _, _ = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    return u[:, :d]


def _check_same(s_cfg, t_cfg, keys) -> None:
    for key in keys:
        a, b = getattr(s_cfg, key, None), getattr(t_cfg, key, None)
        if a != b:
            raise ConfigError(f"student.config.{key}", a, f"the teacher's {b!r} (BiStil copies "
                              "the teacher's blocks into an equally wide student)")


@torch.no_grad()
def init_from_teacher(student: nn.Module, teacher: nn.Module) -> dict:
    """Initialise a GPT-2 ``student`` from a GPT-2 ``teacher`` in place (see the module
    docstring); returns what was copied: ``{"layers": {student: teacher}, "embeddings":
    "copied" | "svd"}``."""
    s_cfg, t_cfg = _gpt2(student, "student"), _gpt2(teacher, "teacher")
    if s_cfg.vocab_size != t_cfg.vocab_size:
        raise ConfigError("student.config.vocab_size", s_cfg.vocab_size,
                          f"the teacher's {t_cfg.vocab_size} (one tokenizer)")
    if s_cfg.n_positions > t_cfg.n_positions:
        raise ConfigError("student.config.n_positions", s_cfg.n_positions,
                          f"at most the teacher's {t_cfg.n_positions}")
    d, big_d = s_cfg.n_embd, t_cfg.n_embd
    if d > big_d:
        raise ConfigError("student.config.n_embd", d, f"at most the teacher's {big_d}")
    layers = layer_map(t_cfg.n_layer, s_cfg.n_layer)
    s, t = student.transformer, teacher.transformer
    s_head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    s_tied = s_head is not None and s_head.weight is s.wte.weight
    if d < big_d:  # narrower: only the factorised word embeddings (official code)
        s.wte.weight.copy_(embedding_init(t.wte.weight, d))
        if s_head is not None and not s_tied:
            s_head.weight.copy_(s.wte.weight)  # the official code ties output to input
        return {"layers": {}, "embeddings": "svd"}
    _check_same(s_cfg, t_cfg, ("n_head", "n_inner", "activation_function", "layer_norm_epsilon"))
    s.wte.weight.copy_(t.wte.weight)
    s.wpe.weight.copy_(t.wpe.weight[: s_cfg.n_positions])
    for i, k in layers.items():
        s.h[i].load_state_dict(t.h[k].state_dict())
    s.ln_f.load_state_dict(t.ln_f.state_dict())
    if s_head is not None and not s_tied and t_head is not None:
        s_head.load_state_dict(t_head.state_dict())
    return {"layers": layers, "embeddings": "copied"}


# -- losses ------------------------------------------------------------------------------------
def hidden_map(gram: Tensor, d: int) -> Tensor:
    """(D, d): the top-``d`` eigenvectors of the uncentred Gram matrix ``H^T H`` (D, D), i.e.
    the top-``d`` right singular vectors of the states ``H``, largest first."""
    vals, vecs = torch.linalg.eigh(gram.double())
    return vecs[:, vals.argsort(descending=True)[:d]]


@LOSSES.register("bistil_hidden", paper=PAPER, year=2023, inputs="features",
                 default_weight=1.0, stateful=True)
class BiStilHidden(nn.Module):
    """Hidden-state MSE of BiStil (Ansell et al., 2023, Sec. 3): ``mean_k (h_s - P^T h_t)_k^2``
    per token (the Term averages over the valid tokens; the official ``nn.MSELoss`` also
    counts padding). ``P`` (D, d) is the identity for an equally wide student, else the
    top-``d`` right singular vectors of the teacher's states at this tap (uncentred), fixed
    once from the valid tokens of the first training batch (the official code uses one random
    token per sequence of a mapping set; our choice at small scale), summed over ranks
    under torch.distributed, and checkpointed as a buffer."""

    takes_mask = True

    def __init__(self, s_shape, t_shape, *, num_samples=None):
        super().__init__()
        ok = t_shape is not None and len(s_shape) >= 2 and tuple(s_shape[:-1]) == tuple(
            t_shape[:-1]) and s_shape[-1] <= t_shape[-1]
        if not ok:
            raise ConfigError("bistil_hidden.inputs", f"{s_shape} vs {t_shape}",
                              "(..., d) student and (..., D) teacher states, d <= D")
        self.d, self.big_d = int(s_shape[-1]), int(t_shape[-1])
        self.register_buffer("proj", torch.zeros(self.big_d, self.d))
        self.register_buffer("ready", torch.tensor(self.d == self.big_d))

    @torch.no_grad()
    def _fit(self, t: Tensor, mask: Tensor | None) -> None:
        import torch.distributed as dist

        h = t.reshape(-1, self.big_d).double()
        if mask is not None and mask.shape == t.shape[:-1]:
            h = h[mask.reshape(-1).to(h.device)]
        gram = h.T @ h
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(gram)
        self.proj.copy_(hidden_map(gram, self.d))
        self.ready.fill_(True)

    def forward(self, s: Tensor, t: Tensor, *, mask=None, **_) -> Tensor:
        s32, t32 = _upcast(s), _upcast(t).detach()
        if self.d != self.big_d:
            if not bool(self.ready):
                self._fit(t32, mask)
            t32 = t32 @ self.proj.to(t32.dtype)
        return (s32 - t32).pow(2).mean(-1)


@LOSSES.register("attn_mse", paper=PAPER, year=2023, inputs="features", default_weight=1.0)
def attn_mse(s: Tensor, t: Tensor, *, batch=None, mask_key: str = "attention_mask",
             causal: bool = True) -> Tensor:
    """Attention MSE of BiStil (Ansell et al., 2023): ``mean (A_s - A_t)^2`` over the entries
    of two (B, H, L, L) attention maps whose query and key are real tokens (``batch[mask_key]``;
    every token when the batch has no such key) and, for a causal model, key <= query (the
    other entries are zero by construction in both). Same heads on both sides: the maps are
    compared head by head, as the official code (which views both as one vector)."""
    if s.dim() != 4 or t.shape != s.shape or s.shape[-1] != s.shape[-2]:
        raise ConfigError("attn_mse.inputs", f"{tuple(s.shape)} vs {tuple(t.shape)}",
                          "two equal (batch, heads, L, L) attention maps: the student needs the "
                          "teacher's number of heads (n_head)")
    b, h, n, _ = s.shape
    tokens = None if batch is None else batch.get(mask_key)
    real = torch.ones(b, n, dtype=torch.bool, device=s.device) if tokens is None \
        else tokens.to(s.device).bool()
    keep = real[:, None, :, None] & real[:, None, None, :]
    if causal:
        keep = keep & torch.ones(n, n, dtype=torch.bool, device=s.device).tril()
    diff = (_upcast(s) - _upcast(t).detach()).pow(2)
    return torch.where(keep, diff, 0.0).sum() / (keep.sum() * h).clamp_min(1)


# -- the method --------------------------------------------------------------------------------
def _eager(student, teacher) -> None:
    """Attention taps need eager attention: the student's is the user's setting (an error
    if not); the frozen teacher is switched (same outputs), since its config is often a
    cached teacher's."""
    impl = getattr(student.config, "_attn_implementation", None)
    if impl != "eager":
        raise ConfigError("student.attn_implementation", impl, "'eager': BiStil's attention MSE "
                          "reads output.attentions, which sdpa does not return (or set "
                          "method.attn_weight: 0)")
    if getattr(teacher.config, "_attn_implementation", None) != "eager":
        try:
            teacher.set_attn_implementation("eager")
        except Exception as err:  # noqa: BLE001  (transformers raises several types)
            impl = teacher.config._attn_implementation
            msg = f"'eager' (BiStil's attention MSE; switching failed: {err})"
            raise ConfigError("teacher.attn_implementation", impl, msg) from None
    if student.config.n_head != teacher.config.n_head:
        raise ConfigError("student.config.n_head", student.config.n_head,
                          f"the teacher's {teacher.config.n_head}: attention maps are compared "
                          "head by head (or set method.attn_weight: 0)")


@METHODS.register("bistil", paper=PAPER, year=2023, family="sequence")
def bistil(
    student,
    teacher,
    *,
    init: bool = True,
    hidden_weight: NonNeg = 1.0,
    attn_weight: NonNeg = 1.0,
    soft_weight: NonNeg = 1.0,
    task_weight: NonNeg = 1.0,
    temperature: Temperature = 2.0,
):
    """BiStil for HF GPT-2 models (Ansell et al., 2023, Sec. 3, Eq. for L):
    ``a_hid mean_{i=0..n} MSE(h_s^i, P h_t^{i r}) + a_attn mean_l MSE(A_s^l, A_t^{(l+1)r-1})
    + a_ce CE_T(p_t, p_s) + a_task CE``, with hidden states ``output.hidden_states[i]``
    (i = 0 the embeddings, as the official code; student block ``l`` against teacher block
    ``(l+1)r-1``), attentions ``output.attentions[l]`` (needs attn_implementation: eager) and
    the soft CE at T = 2 without T^2 as ``fkl`` at temperature 2: forward KL = soft CE minus
    the teacher's entropy, so the same gradient (values differ by that constant). Defaults
    are the paper's phase-2 weights (all 1); phase 1 is ``soft_weight: 0, task_weight: 0``.
    ``init: true`` initialises the student from the teacher when the recipe is built
    (:func:`init_from_teacher`); a resume then loads the checkpoint over it."""
    if teacher is None:
        raise ConfigError("teacher", None, "bistil distils from one teacher: add a teacher section")
    if getattr(teacher, "is_store", False):  # signals from a store, config and init from its
        # checked model (a store made from this recipe holds the hidden states and attentions)
        if teacher.source is None:
            raise ConfigError("teacher.checkpoint", None, "bistil reads the teacher's config "
                              "and weights: give model (or hf) + checkpoint beside the store")
        teacher = teacher.source
    s_cfg, t_cfg = _gpt2(student, "student"), _gpt2(teacher, "teacher")
    n = s_cfg.n_layer
    layer_map(t_cfg.n_layer, n)  # the layer counts divide
    r = t_cfg.n_layer // n
    if attn_weight:
        _eager(student, teacher)
    if init:
        init_from_teacher(student, teacher)
    terms = []
    if task_weight:
        terms.append(Term("ce", weight=task_weight))
    if soft_weight:
        terms.append(Term("fkl", temperature=temperature, weight=soft_weight, name="soft_ce"))
    if hidden_weight:
        terms += [Term("bistil_hidden", student=f"output.hidden_states[{i}]",
                       teacher=f"output.hidden_states[{i * r}]", weight=hidden_weight / (n + 1),
                       name=f"hidden_{i}") for i in range(n + 1)]
    if attn_weight:
        terms += [Term("attn_mse", student=f"output.attentions[{k}]",
                       teacher=f"output.attentions[{(k + 1) * r - 1}]", weight=attn_weight / n,
                       name=f"attn_{k}") for k in range(n)]
    if not terms:
        raise ConfigError("method.hidden_weight", 0, "at least one BiStil weight above 0")
    return terms
