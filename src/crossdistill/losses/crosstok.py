"""Cross-tokenizer distillation: ULD (and its hybrid), MinED and ALM.

Student and teacher read the same text under different tokenizers (``shakespeare_pair``): the
student's logits ``s`` are (B, Ls, Vs) over its own ``labels`` (the context's ``y``), the
teacher's ``t`` are (B, Lt, Vt) over ``batch["teacher_labels"]``, computed from the teacher's
*own* tokenization (``teacher_input_ids``), never the student's ids. Position alignment is by
bytes: ``batch["chunk_s"]``/``batch["chunk_t"]`` give each label token's chunk
(:mod:`crossdistill.text.align`, -1 = none). All are registered with ``cross_tokenizer=True``
(vocabularies may differ). The teacher is detached; maths runs in at least float32.

Reductions (documented per loss): ``uld``/``uld_hybrid`` return one value per sample (the mean
over its aligned pairs), which the Term averages over the samples of the global batch;
``mined``/``alm`` return a scalar, the mean over the micro-batch's aligned positions / chunks
(tokenkit's global-batch divisor is not reproduced under gradient accumulation).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import LOSSES
from ..schema import Pos, Prob, Temperature
from . import divergences as D
from .features import _pair
from .logits import _check_temperature

PAIRED = "needs a paired dataset such as shakespeare_pair"
TEACHER_IO = ("teacher: {inputs: {input_ids: teacher_input_ids, attention_mask: "
              "teacher_attention_mask}}")


# -- batch keys and tokenizers ------------------------------------------------------------


def _keys(name: str, batch, keys: tuple[str, ...]) -> list[Tensor]:
    """The alignment keys of a paired batch, or one clear error naming what is missing."""
    have = sorted(batch) if batch is not None else []
    missing = [k for k in keys if k not in have]
    if missing:
        raise ConfigError(f"terms.{name}", f"batch keys {have}",
                          f"{PAIRED} (batches with {', '.join(keys)}); missing {missing}")
    return [batch[k] for k in keys]


def _check_len(name: str, what: str, x: Tensor, ref: Tensor, key: str) -> None:
    if tuple(x.shape[:2]) != tuple(ref.shape):
        own = f"; feed the teacher its own tokenization ({TEACHER_IO})"
        hint = own if what == "teacher" else ""
        raise ConfigError(f"terms.{name}.{what}", tuple(x.shape),
                          f"{what} outputs must cover batch[{key!r}] {tuple(ref.shape)}{hint}")


def _tokenizers(name: str, data):
    """(student, teacher) tokenizers of a paired training Dataset: its attributes, else the
    paths in ``data.info`` (a subset keeps those)."""
    from ..text.tokenizer import load_tokenizer

    info = getattr(data, "info", None) or {}
    out = []
    for attr in ("tokenizer", "teacher_tokenizer"):
        tok = getattr(data, attr, None)
        if tok is None and info.get(attr):
            tok = load_tokenizer(info[attr], f"data.info.{attr}")
        if tok is None:
            raise ConfigError(f"terms.{name}", f"no data.{attr}",
                              f"{PAIRED} (it carries the student and teacher tokenizers)")
        out.append(tok)
    return out


def _vocab_width(name: str, what: str, width: int, tok) -> int:
    """The model's output width must hold the tokenizer (a padded table is sliced to it)."""
    if width < len(tok):
        raise ConfigError(f"terms.{name}.{what}", width,
                          f"at least the {what} tokenizer's {len(tok)} entries")
    return len(tok)


# -- alignment helpers ----------------------------------------------------------------------


def _positional(s: Tensor, t: Tensor, y_s: Tensor, y_t: Tensor):
    """ULD's alignment: the k-th scored student position against the k-th scored teacher
    position, k < min(n_s, n_t) per sample. Returns (B, K, Vs), (B, K, Vt), valid (B, K)."""
    ms, mt = y_s != -100, y_t != -100
    n = torch.minimum(ms.sum(1), mt.sum(1))
    k = int(n.max()) if n.numel() else 0
    order_s = torch.argsort((~ms).to(torch.int8), dim=1, stable=True)[:, :k]
    order_t = torch.argsort((~mt).to(torch.int8), dim=1, stable=True)[:, :k]
    s_k = s.gather(1, order_s.unsqueeze(-1).expand(-1, -1, s.shape[-1]))
    t_k = t.gather(1, order_t.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
    valid = torch.arange(k, device=n.device) < n.unsqueeze(1)
    return s_k, t_k, valid


def _per_sample(value: Tensor, valid: Tensor) -> Tensor:
    """(B, K) pair values -> (B,) means over each sample's valid pairs (0 where none)."""
    return torch.where(valid, value, 0.0).sum(1) / valid.sum(1).clamp_min(1)


def _top_desc(x: Tensor, k: int) -> Tensor:
    """The ``k`` largest entries of each row of ``x``, descending, differentiable in ``x``.
    On CPU the order comes from NumPy's argsort (about 10x faster than torch's CPU sort or
    top-k over a few hundred entries, single thread) and the values are gathered from ``x``,
    so autograd sees a plain gather; elsewhere ``torch.topk``."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return x.topk(k, -1).values
    flat = x.detach().reshape(-1, x.shape[-1]).numpy()
    order = np.argsort(-flat, axis=-1, kind="quicksort")[:, :k]
    idx = torch.from_numpy(np.ascontiguousarray(order)).view(*x.shape[:-1], k)
    return x.gather(-1, idx)


def _sorted_l1(q: Tensor, p: Tensor) -> Tensor:
    """ULD's distance: ``sum_i |sort(q)_i - sort(p)_i|``, probabilities sorted descending and
    the smaller vocabulary zero-padded (the Wasserstein-1 distance under a uniform cost).

    Only the ``k = min(V_q, V_p)`` largest entries of the larger side meet a non-zero partner;
    its other entries meet padding and add their plain sum (entries are >= 0). So the larger
    side needs a top-k, not a full sort, and no padded copy is made."""
    k = min(q.shape[-1], p.shape[-1])

    def top(x):
        v = _top_desc(x, k)
        return v, (0.0 if x.shape[-1] == k else x.sum(-1) - v.sum(-1))

    (q_k, q_rest), (p_k, p_rest) = top(q), top(p)
    return (q_k - p_k).abs().sum(-1) + q_rest + p_rest


def _chunk_ids(chunk: Tensor, bound: int) -> Tensor:
    """Chunk ids with -1 sent to a dump column ``bound`` (for scatters over (B, bound + 1))."""
    return torch.where(chunk >= 0, chunk, bound).long()


def _chunk_sums(values: Tensor, chunk: Tensor, bound: int) -> tuple[Tensor, Tensor]:
    """Per-chunk sums of per-token ``values`` (B, L) and token counts, each (B, bound)."""
    ids = _chunk_ids(chunk, bound)
    z = values.new_zeros(values.shape[0], bound + 1)
    sums = z.scatter_add(1, ids, torch.where(chunk >= 0, values, 0.0))
    counts = z.scatter_add(1, ids, (chunk >= 0).to(values.dtype))
    return sums[:, :bound], counts[:, :bound]


def _chunk_firsts(chunk: Tensor, bound: int) -> tuple[Tensor, Tensor]:
    """Position of each chunk's first label token (B, bound) and whether it exists."""
    b, length = chunk.shape
    pos = torch.full((b, bound + 1), length, dtype=torch.long, device=chunk.device)
    where = torch.arange(length, device=chunk.device).expand(b, length)
    pos = pos.scatter_reduce(1, _chunk_ids(chunk, bound), where, reduce="amin")[:, :bound]
    return pos.clamp_max(length - 1), pos < length


def _token_logp(name: str, x: Tensor, labels: Tensor, what: str) -> Tensor:
    """Log-probability of each observed token, (B, L): from logits (B, L, V) (a gather minus
    the log-normaliser, no full log-softmax kept), or given directly as (B, L) log-probs."""
    if x.dim() == 2:
        return x
    if x.dim() != 3:
        raise ConfigError(f"terms.{name}.{what}", tuple(x.shape),
                          "logits (B, L, V) or one log-prob per token (B, L)")
    ok = labels >= 0
    if bool(ok.any()) and int(labels[ok].max()) >= x.shape[-1]:
        raise ConfigError(f"terms.{name}.{what}", int(labels[ok].max()),
                          f"label ids below the {what} vocabulary {x.shape[-1]}: is the {what} "
                          "the model of that tokenizer?")
    picked = x.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return picked - x.logsumexp(-1)


# -- ULD ----------------------------------------------------------------------------------

ULD_PAPER = "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs"


@LOSSES.register("uld", paper=ULD_PAPER, year=2024, inputs="logits", default_weight=1.5,
                 cross_tokenizer=True)
def uld(s: Tensor, t: Tensor, *, y: Tensor, batch, temperature: Temperature = 1.0,
        teacher_labels: str = "teacher_labels") -> Tensor:
    """Universal Logit Distillation (Nicolas Boizard et al., 2024), Eq. of Sec. 3:
    ``L_ULD = 1/K sum_k sum_i |sort(q_k)_i - sort(p_k)_i|``, ``q_k = softmax(s_k / T)`` and
    ``p_k = softmax(t_k / T)`` at the k-th scored student / teacher positions (positional
    alignment, k < min(n_s, n_t), as in the paper's code), probabilities sorted descending, the
    smaller vocabulary zero-padded. T = 1 on both sides by default. One value per sample (its
    mean over k); the Term averages samples. The paper's total is ``1 * CE + 1.5 * L_ULD``:
    the registered default weight is 1.5 (add ``ce`` at weight 1).
    """
    _check_temperature("uld", temperature)
    (y_t,) = _keys("uld", batch, (teacher_labels,))
    _check_len("uld", "teacher", t, y_t, teacher_labels)
    s, t = _pair(s, t)
    s_k, t_k, valid = _positional(s, t, y, y_t.to(s.device))
    dist = _sorted_l1(F.softmax(s_k / temperature, -1), F.softmax(t_k / temperature, -1))
    return _per_sample(dist, valid)


@LOSSES.register("uld_hybrid", stateful=True, paper=ULD_PAPER + " (hybrid, as TRL's GOLD)",
                 year=2024, inputs="logits", default_weight=1.5, cross_tokenizer=True)
class ULDHybridLoss(nn.Module):
    """Hybrid ULD (Boizard et al., 2024; the variant of TRL's GOLD trainer): at ULD's
    positional pairs, vocabulary entries that exist in both tokenizers (the same bytes) are
    compared directly with the generalised JSD (``divergences.generalized_jsd``, beta = the
    teacher's share, 0.5), the rest with ULD's sorted L1:
    ``l_k = w JSD_beta(p_k[M_t] || q_k[M_s]) + (1 - w) sum_i |sort(q_k[~M_s]) - sort(p_k[~M_t])|``,
    on the unrenormalised sub-vectors as in TRL; ``w = |M| / V_t`` unless ``matched_weight``
    is given (TRL's adaptive default). Matches compare the bytes tokens stand for
    (:func:`~crossdistill.text.align.vocab_bytes`), not raw vocabulary strings as TRL does,
    so byte-level ``'Ġa'`` matches a character tokenizer's ``' a'``. The mapping is built
    once from the training data's two tokenizers. One value per sample.
    """

    takes_batch = True  # the distiller passes the batch (teacher labels)

    def __init__(self, s_shape: tuple, t_shape: tuple, *, num_samples: int | None = None,
                 data=None, beta: Prob = 0.5, matched_weight: Prob | None = None,
                 temperature: Temperature = 1.0, teacher_labels: str = "teacher_labels"):
        super().__init__()
        from ..text.align import vocab_bytes

        _check_temperature("uld_hybrid", temperature)
        tok_s, tok_t = _tokenizers("uld_hybrid", data)
        vs_w, vt_w = int(s_shape[-1]), int(t_shape[-1])
        _vocab_width("uld_hybrid", "student", vs_w, tok_s)
        _vocab_width("uld_hybrid", "teacher", vt_w, tok_t)
        index: dict[bytes, int] = {}
        for i, b in enumerate(vocab_bytes(tok_s)):
            index.setdefault(b, i)
        pairs, used = [], set()
        for j, b in enumerate(vocab_bytes(tok_t)):
            i = index.get(b)
            if i is not None and b and i not in used:
                pairs.append((j, i))
                used.add(i)
        m_t = torch.tensor([j for j, _ in pairs], dtype=torch.long)
        m_s = torch.tensor([i for _, i in pairs], dtype=torch.long)
        un_t, un_s = torch.ones(vt_w, dtype=torch.bool), torch.ones(vs_w, dtype=torch.bool)
        un_t[m_t], un_s[m_s] = False, False
        for k, v in (("matched_t", m_t), ("matched_s", m_s), ("unmatched_t", un_t),
                     ("unmatched_s", un_s)):
            self.register_buffer(k, v, persistent=False)
        self.beta, self.temperature, self.teacher_labels = float(beta), temperature, teacher_labels
        self.weight = len(pairs) / vt_w if matched_weight is None else float(matched_weight)

    def forward(self, s: Tensor, t: Tensor, *, y: Tensor, batch=None, **_) -> Tensor:
        (y_t,) = _keys("uld_hybrid", batch, (self.teacher_labels,))
        _check_len("uld_hybrid", "teacher", t, y_t, self.teacher_labels)
        s, t = _pair(s, t)
        s_k, t_k, valid = _positional(s, t, y, y_t.to(s.device))
        log_q = F.log_softmax(s_k / self.temperature, -1)
        log_p = F.log_softmax(t_k / self.temperature, -1)
        value = log_q.new_zeros(valid.shape)
        if self.unmatched_s.any() and self.unmatched_t.any():  # TRL: skipped if a side is empty
            value = (1 - self.weight) * _sorted_l1(log_q[..., self.unmatched_s].exp(),
                                                   log_p[..., self.unmatched_t].exp())
        if len(self.matched_t):
            jsd = D.generalized_jsd(log_p[..., self.matched_t], log_q[..., self.matched_s],
                                    self.beta)
            value = value + self.weight * jsd
        return _per_sample(value, valid)


# -- MinED ----------------------------------------------------------------------------------


def _levenshtein_to_all(u: bytes, table: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Edit distance from ``u`` to every row of ``table`` (byte strings padded with -1)."""
    n, width = table.shape
    prev = np.broadcast_to(np.arange(width + 1), (n, width + 1)).copy()
    for i, c in enumerate(u, start=1):
        cur = np.empty_like(prev)
        cur[:, 0] = i
        for j in range(1, width + 1):
            sub = prev[:, j - 1] + (table[:, j - 1] != c)
            cur[:, j] = np.minimum(np.minimum(prev[:, j] + 1, cur[:, j - 1] + 1), sub)
        prev = cur
    return prev[np.arange(n), lens]


def mined_map(t_vocab: list[bytes], s_vocab: list[bytes], s_special: set[int] = frozenset()):
    """Teacher id -> student id of minimum edit distance between the tokens' bytes (MinED).

    Exact matches first; ties go to the longest common prefix, then the smallest id (ours: the
    papers do not say; for a character student this maps ``'the'`` to ``'t'``, the character
    the teacher's next token starts with). Student special tokens are candidates only for an
    exact match. Cost O(V_t * V_s * len^2) in numpy: fine for vocabularies of a few thousand.
    """
    exact: dict[bytes, int] = {}
    for i, b in enumerate(s_vocab):
        exact.setdefault(b, i)
    cand = np.asarray([i for i, b in enumerate(s_vocab) if b and i not in s_special])
    if len(cand) == 0:
        raise ConfigError("mined.student", len(s_vocab), "a student vocabulary with tokens")
    width = max(len(s_vocab[i]) for i in cand)
    table = np.full((len(cand), width), -1, dtype=np.int16)
    lens = np.asarray([len(s_vocab[i]) for i in cand])
    for r, i in enumerate(cand):
        table[r, : lens[r]] = np.frombuffer(s_vocab[i], dtype=np.uint8)
    out = np.zeros(len(t_vocab), dtype=np.int64)
    for j, u in enumerate(t_vocab):
        if u in exact:
            out[j] = exact[u]
            continue
        d = _levenshtein_to_all(u, table, lens)
        best = np.flatnonzero(d == d.min())
        if len(best) > 1:
            ub = np.frombuffer(u, dtype=np.uint8)
            k = min(len(ub), width)
            same = table[best, :k] == ub[:k] if k else np.zeros((len(best), 0), bool)
            prefix = np.cumprod(same, axis=1).sum(1)
            best = best[prefix == prefix.max()]
        out[j] = cand[best[0]]
    return out


def _aligned_firsts(c_s: Tensor, c_t: Tensor) -> Tensor:
    """(B, chunks) whether a chunk has a first label token on both sides."""
    bound = min(c_s.shape[1], c_t.shape[1])
    return _chunk_firsts(c_s, bound)[1] & _chunk_firsts(c_t, bound)[1]


def mined_positions(ctx) -> Tensor:
    """How many positions ``mined`` sums over in a batch (its Term's divisor)."""
    c_s, c_t = _keys("mined", ctx.batch, ("chunk_s", "chunk_t"))
    return _aligned_firsts(c_s, c_t).sum()


@LOSSES.register("mined", stateful=True, reduction="sum", count=mined_positions,
                 paper="Knowledge Fusion of Large Language Models (MinED vocabulary alignment)",
                 year=2024, inputs="logits", default_weight=1.0, cross_tokenizer=True)
class MinEDLoss(nn.Module):
    """MinED (Fanqi Wan et al., "Knowledge Fusion of Large Language Models", ICLR 2024; a
    baseline of DSKD): each teacher token is mapped to the student token of minimum edit
    distance (:func:`mined_map`), the teacher's distribution is carried into the student
    vocabulary, ``p~_v = sum_{u: map(u) = v} p_u``, and ``KL(p~ || q)`` is taken
    (``divergences.kl``) at aligned positions. Positions come from the byte chunks rather than
    FuseLLM's edit-distance DP over the token sequence: at each chunk's first label token both
    models predict the next token from the same text prefix (ours). A padded teacher table is
    sliced to its tokenizer. Returns the *sum* over the aligned positions; the Term divides
    by their count (:func:`mined_positions`, global under accumulation and DDP).
    """

    takes_batch = True  # the distiller passes the batch (alignment keys)

    def __init__(self, s_shape: tuple, t_shape: tuple, *, num_samples: int | None = None,
                 data=None, temperature: Temperature = 1.0):
        super().__init__()
        from ..text.align import special_ids, vocab_bytes

        _check_temperature("mined", temperature)
        tok_s, tok_t = _tokenizers("mined", data)
        _vocab_width("mined", "student", int(s_shape[-1]), tok_s)
        self.vt = _vocab_width("mined", "teacher", int(t_shape[-1]), tok_t)
        mapping = mined_map(vocab_bytes(tok_t), vocab_bytes(tok_s), special_ids(tok_s))
        self.register_buffer("mapping", torch.from_numpy(mapping), persistent=False)
        self.temperature = temperature

    def forward(self, s: Tensor, t: Tensor, *, batch=None, **_) -> Tensor:
        c_s, c_t = _keys("mined", batch, ("chunk_s", "chunk_t"))
        _check_len("mined", "student", s, c_s, "chunk_s")
        _check_len("mined", "teacher", t, c_t, "chunk_t")
        s, t = _pair(s, t)
        c_s, c_t = c_s.to(s.device), c_t.to(s.device)
        bound = min(c_s.shape[1], c_t.shape[1])
        pos_s, _ = _chunk_firsts(c_s, bound)
        pos_t, _ = _chunk_firsts(c_t, bound)
        ok = _aligned_firsts(c_s, c_t)
        s_rows = s.gather(1, pos_s.unsqueeze(-1).expand(-1, -1, s.shape[-1]))[ok]
        t_rows = t[..., : self.vt].gather(1, pos_t.unsqueeze(-1).expand(-1, -1, self.vt))[ok]
        if s_rows.shape[0] == 0:
            return s.sum() * 0.0
        p_t = F.softmax(t_rows / self.temperature, -1)
        p_m = p_t.new_zeros(s_rows.shape).index_add(1, self.mapping, p_t)
        log_q = F.log_softmax(s_rows / self.temperature, -1)
        return D.kl(torch.log(p_m), log_q).sum()


# -- ALM ----------------------------------------------------------------------------------

ALM_EPSILON = 1e-6  # tokenkit's: keeps log y < 0, so log(1 - y) stays finite


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends (Maechler, 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)),
                       torch.log(-torch.expm1(x)))


def binarised_ce(log_p_t: Tensor, log_p_s: Tensor, tau: float) -> Tensor:
    """ALM's ``binary_ce``: ``y = exp(log P / tau - eps)`` per side,
    ``-(y_t log y_s + (1 - y_t) log(1 - y_s))``, in log space."""
    lt = log_p_t / tau - ALM_EPSILON
    ls = log_p_s / tau - ALM_EPSILON
    return -(lt.exp() * ls + (-torch.expm1(lt)) * log1mexp(ls))


def _both_sides(c_s: Tensor, c_t: Tensor) -> Tensor:
    """(B, chunks) whether a chunk holds label tokens on both sides."""
    bound = min(c_s.shape[1], c_t.shape[1])
    n_s = _chunk_sums(torch.zeros(c_s.shape, device=c_s.device), c_s, bound)[1]
    n_t = _chunk_sums(torch.zeros(c_t.shape, device=c_t.device), c_t, bound)[1]
    return (n_s > 0) & (n_t > 0)


def alm_chunks(ctx) -> Tensor:
    """How many chunks ``alm`` sums over in a batch (its Term's divisor)."""
    c_s, c_t = _keys("alm", ctx.batch, ("chunk_s", "chunk_t"))
    return _both_sides(c_s, c_t).sum()


@LOSSES.register("alm", paper="Universal Cross-Tokenizer Distillation via Approximate "
                 "Likelihood Matching", year=2025, inputs="logits", default_weight=1.0,
                 cross_tokenizer=True, reduction="sum", count=alm_chunks)
def alm(s: Tensor, t: Tensor, *, y: Tensor, batch, tau: Pos = 100.0,
        teacher_labels: str = "teacher_labels") -> Tensor:
    """Approximate Likelihood Matching (Benjamin Minixhofer, Ivan Vulić, Edoardo Ponti, 2025),
    the ``binary_ce`` objective of tokenkit's ``compute_alm_loss``. For each byte chunk c
    (the same text on both sides), ``log P(c) = min(0, sum_{i in c} log p(x_i | x_<i))`` over
    the observed tokens of the chunk on each side, then with ``y = exp(log P(c) / tau - 1e-6)``
    ``l_c = -(y_t log y_s + (1 - y_t) log(1 - y_s))`` (stable ``log1mexp``), tau = 100.
    Returns the *sum* over the chunks; the Term divides by their count (:func:`alm_chunks`),
    over the global batch under accumulation and DDP, as tokenkit's global-batch mean.

    ``t`` is the teacher's logits (B, Lt, Vt) *or* one log-prob per teacher token (B, Lt), the
    observed token's (a store that keeps only that, 4 bytes a token): the same values.
    Chunks are the plain byte-boundary ("unconstrained") chunks; tokenkit's default "unbiased"
    chunks need precomputed tokenizer-pair tables (without them its loss is NaN) and its
    ``append_space`` boundary term needs a word-boundary vocabulary mask: neither is
    implemented, so those modes cannot silently degrade here.
    """
    y_t, c_s, c_t = _keys("alm", batch, (teacher_labels, "chunk_s", "chunk_t"))
    _check_len("alm", "student", s, c_s, "chunk_s")
    _check_len("alm", "teacher", t, c_t, "chunk_t")
    s, t = _pair(s, t)
    c_s, c_t, y_t = c_s.to(s.device), c_t.to(s.device), y_t.to(s.device)
    bound = min(c_s.shape[1], c_t.shape[1])
    lp_s, _ = _chunk_sums(_token_logp("alm", s, y, "student"), c_s, bound)
    lp_t, _ = _chunk_sums(_token_logp("alm", t, y_t, "teacher"), c_t, bound)
    ok = _both_sides(c_s, c_t)
    loss = binarised_ce(lp_t.clamp_max(0.0)[ok], lp_s.clamp_max(0.0)[ok], tau)
    return loss.sum()


def check_teacher_io(terms, data, teacher_io: dict, several: bool = False) -> None:
    """Before training: every cross-tokenizer term's teacher must read its own tokenization
    (``inputs: {input_ids: teacher_input_ids, ...}``) when the data has one. Fed the student's
    ids instead (the bug TRL users met), shapes can still agree and the loss would train on
    nonsense silently, so this is checked on the config, not on tensors. ``teacher_io``: teacher
    name -> its io dict (``{"inputs": ...}``); ``several``: the config has ``teachers:``."""
    if data is None or "teacher_input_ids" not in getattr(data, "tensors", {}):
        return
    for term in terms:
        if not LOSSES.meta(term.loss).get("cross_tokenizer"):
            continue
        names = [term.teacher_model] if term.teacher_model else list(teacher_io)
        for name in names:
            io = teacher_io.get(name) or {}
            inputs = io.get("inputs") if isinstance(io, dict) else getattr(io, "inputs", None)
            if isinstance(inputs, dict) and inputs.get("input_ids") == "teacher_input_ids":
                continue
            field = f"teachers.{name}.inputs" if several else "teacher.inputs"
            raise ConfigError(field, inputs, f"{term.field} ({term.loss}) is a cross-tokenizer "
                              f"loss: feed the teacher its own tokenization ({TEACHER_IO})")
