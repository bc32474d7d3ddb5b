"""LIBS losses (Zhao et al., "Hearing Lips: Improving Lip Reading by Distilling Speech
Recognizers", AAAI 2020): the context level (LCS-filtered decoder contexts) and the frame
level (attention alignment of video to audio states). The sequence level is the plain
``mse`` loss with a ``linear`` projector between the two encoders' summaries (see the
``libs`` recipe). No official code exists; the choices marked "ours" are ours.

The teacher (speech recogniser) is frozen: every teacher tensor is a constant here. Both
losses own trainable projections (stateful, trained with the student) and return scalars.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data.dataset import IGNORE_INDEX
from ..errors import ConfigError
from ..registry import LOSSES
from .features import _upcast


def lcs_pairs(hyp: list, ref: list) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)`` with ``hyp[i] == ref[j]`` along one longest common subsequence.
    Suffix LCS lengths by dynamic programming, then a walk from the start: equal heads are
    matched (always optimal); otherwise the ``hyp`` item is skipped when that keeps the
    length (ties: skip in ``hyp``). E.g. ``hyp = [1, 2, 3, 4]``, ``ref = [1, 3, 4, 5]``:
    ``[(0, 0), (2, 1), (3, 2)]``."""
    n, m = len(hyp), len(ref)
    dp = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            dp[i][j] = dp[i + 1][j + 1] + 1 if hyp[i] == ref[j] else max(dp[i + 1][j], dp[i][j + 1])
    out, i, j = [], 0, 0
    while i < n and j < m:
        if hyp[i] == ref[j]:
            out.append((i, j))
            i, j = i + 1, j + 1
        elif dp[i + 1][j] >= dp[i][j + 1]:
            i += 1
        else:
            j += 1
    return out


def symbols(row: list[int], eos: int) -> list[int]:
    """The symbols of one token row: up to the first EOS or -100."""
    out = []
    for v in row:
        if v == eos or v == IGNORE_INDEX:
            break
        out.append(v)
    return out


def context_pairs(pred: Tensor, y: Tensor, eos: int, align: str = "lcs"):
    """``(batch, teacher step, student step)`` index tensors of the context pairs: with
    ``align="lcs"`` the LCS matches of the teacher's greedy symbols and the reference (only
    steps the teacher got right, each paired with the student's step of that reference
    symbol); with ``"all"`` every teacher step k paired with student step k, up to the
    shorter of the two strings (no filtering: the ablation)."""
    b_idx, t_idx, s_idx = [], [], []
    for b, (p, r) in enumerate(zip(pred.tolist(), y.tolist())):
        hyp, ref = symbols(p, eos), symbols(r, eos)
        pairs = lcs_pairs(hyp, ref) if align == "lcs" else [
            (k, k) for k in range(min(len(hyp), len(ref)))
        ]
        for i, j in pairs:
            b_idx.append(b)
            t_idx.append(i)
            s_idx.append(j)
    dev = pred.device
    as_t = lambda v: torch.tensor(v, dtype=torch.long, device=dev)  # noqa: E731
    return as_t(b_idx), as_t(t_idx), as_t(s_idx)


ALIGNS = ("lcs", "all")


@LOSSES.register(
    "libs_context",
    paper="Hearing Lips: Improving Lip Reading by Distilling Speech Recognizers (context level)",
    year=2020,
    inputs="features",
    default_weight=1.0,
    stateful=True,
)
class LIBSContextLoss(nn.Module):
    """Context-level distillation: ``mean over pairs (b, i, j) of
    mean_d (W c^s_{b,j} - c^t_{b,i})_d^2``, where ``c^t`` are the teacher's decoder contexts
    while it decodes greedily, ``c^s`` the student's teacher-forced contexts and the pairs
    come from :func:`context_pairs` (the LCS of the teacher's prediction and the ground
    truth: only steps the teacher got right teach, each to the student's step of the same
    ground-truth symbol). ``W`` is a trainable linear map (ours; the paper does not say how
    dimensions are matched). Squared error averaged over the feature dim (ours). 0 when no
    step matches.

    Taps: student ``[output.context]`` (B, S, D_s); teacher ``[output.pred_context,
    output.pred]`` (B, S', D_t) and (B, S'); the labels ``y`` (B, S) (digits, EOS, -100)."""

    def __init__(self, s_shapes, t_shapes, *, align: str = "lcs", eos: int = 10,
                 num_samples: int | None = None):
        super().__init__()
        if align not in ALIGNS:
            raise ConfigError("libs_context.align", align, f"allowed: {', '.join(ALIGNS)}")
        if not isinstance(s_shapes, list) or len(s_shapes) != 1 or len(s_shapes[0]) != 3:
            raise ConfigError("libs_context.student", s_shapes,
                              "one tap [output.context]: (B, steps, dim)")
        if not isinstance(t_shapes, list) or len(t_shapes) != 2 or len(t_shapes[0]) != 3:
            raise ConfigError("libs_context.teacher", t_shapes,
                              "two taps [output.pred_context, output.pred]")
        self.align, self.eos = align, int(eos)
        self.proj = nn.Linear(s_shapes[0][-1], t_shapes[0][-1])

    def forward(self, s, t, *, y=None, idx=None) -> Tensor:
        (c_s,), (c_t, pred) = s, t
        if y is None:
            raise ConfigError("libs_context.y", None, "the labels (the task's target)")
        b, i, j = context_pairs(pred, y, self.eos, self.align)
        i, j = i.clamp_max(c_t.shape[1] - 1), j.clamp_max(c_s.shape[1] - 1)
        if len(b) == 0:
            return (self.proj(_upcast(c_s)) * 0.0).sum()
        diff = self.proj(_upcast(c_s)[b, j]) - _upcast(c_t).detach()[b, i]
        return diff.square().mean()


def attend(query: Tensor, keys: Tensor, values: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention: ``softmax_j(q_i . k_j / sqrt(d)) v_j`` per query;
    ``key_mask`` (B, T_k) False = padding (left out). Shapes (B, T_q, d), (B, T_k, d),
    (B, T_k, D_v) -> (B, T_q, D_v)."""
    score = query @ keys.transpose(1, 2) * query.shape[-1] ** -0.5
    if key_mask is not None:
        score = score.masked_fill(~key_mask[:, None, :], float("-inf"))
    return score.softmax(-1) @ values


def masked_frame_mse(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Mean over the valid frames (``mask`` (B, T) True) of the per-frame mean squared
    difference of ``a`` and ``b`` (B, T, D)."""
    per = (a - b).square().mean(-1)
    m = mask.to(per.dtype)
    return (per * m).sum() / m.sum().clamp_min(1.0)


def _lengths_mask(lengths: Tensor, size: int) -> Tensor:
    return torch.arange(size, device=lengths.device)[None, :] < lengths.to(torch.long)[:, None]


@LOSSES.register(
    "libs_frame",
    paper="Hearing Lips: Improving Lip Reading by Distilling Speech Recognizers (frame level)",
    year=2020,
    inputs="features",
    default_weight=1.0,
    stateful=True,
)
class LIBSFrameLoss(nn.Module):
    """Frame-level distillation: video and audio have different lengths, so each video state
    ``h^v_i`` attends over the audio encoder states (query = video):
    ``a_i = attend(W_q h^v_i, W_k h^a, h^a)`` (valid audio frames only), and
    ``L = mean over valid video frames of mean_d (P h^v_i - a_i)_d^2``. ``W_q``, ``W_k``
    (attention, width ``dim``, default the teacher's) and ``P`` (the video-state projection)
    are trainable and live here; the audio states are constants. Squared error averaged
    over the feature dim (ours).

    Taps: student ``[output.encoder, output.encoder_len]`` (B, T_v, D_s), (B,); teacher
    ``[output.encoder, output.encoder_len]`` (B, T_a, D_t), (B,)."""

    def __init__(self, s_shapes, t_shapes, *, dim: int | None = None,
                 num_samples: int | None = None):
        super().__init__()
        for side, sh in (("student", s_shapes), ("teacher", t_shapes)):
            if not isinstance(sh, list) or len(sh) != 2 or len(sh[0]) != 3 or len(sh[1]) != 1:
                raise ConfigError(f"libs_frame.{side}", sh,
                                  "two taps [output.encoder, output.encoder_len]: "
                                  "(B, frames, dim) states and (B,) lengths")
        ds, dt = s_shapes[0][-1], t_shapes[0][-1]
        d = dt if dim is None else dim
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ConfigError("libs_frame.dim", dim, "a positive int (attention width)")
        self.query, self.key = nn.Linear(ds, d), nn.Linear(dt, d)
        self.proj = nn.Linear(ds, dt)

    def aligned(self, h_v: Tensor, h_a: Tensor, a_len: Tensor) -> Tensor:
        """Each video state's attention-weighted audio feature (B, T_v, D_t)."""
        h_a = h_a.detach()
        return attend(self.query(h_v), self.key(h_a), h_a, _lengths_mask(a_len, h_a.shape[1]))

    def forward(self, s, t, *, y=None, idx=None) -> Tensor:
        (h_v, v_len), (h_a, a_len) = s, t
        h_v, h_a = _upcast(h_v), _upcast(h_a).to(_upcast(h_v).dtype)
        a = self.aligned(h_v, h_a, a_len)
        return masked_frame_mse(self.proj(h_v), a, _lengths_mask(v_len, h_v.shape[1]))
