"""Attention sequence-to-sequence recognisers for LIBS (Zhao et al., "Hearing Lips: Improving
Lip Reading by Distilling Speech Recognizers", AAAI 2020): the audio teacher (a speech
recogniser) and the visual student (a lip reader) have this same shape.

Encoder: strided 1-D convolutions over the frames (``subsample``: 1, 2 or 4 frames per
state; padding zeroed before each) and a bidirectional GRU over the valid frames (packed):
no state sees a padded frame. Decoder: a GRU cell fed the previous token and the previous
context (input feeding), dot-product attention over the encoder states (Luong et al.,
2015), and a linear output over ``[state; context]``. Training uses teacher forcing on
``labels``; evaluation (``model.eval()``) also decodes greedily. ``forward`` returns a dict:

* ``logits`` (B, S, num_classes): teacher-forced on ``labels`` (S = labels' width), or the
  greedy steps' logits without labels;
* ``context`` (B, S, H): the teacher-forced attention contexts (the context-level taps);
* ``encoder`` (B, T', H), ``encoder_len`` (B,): encoder states and their valid lengths
  (frame level); ``summary`` (B, H): their mean over the valid states (sequence level);
* in eval mode or without labels: ``pred`` (B, max_steps) greedy tokens (digits; -100 from
  the first EOS on) and ``pred_context`` (B, max_steps, H), the contexts of those steps.

Token ids: ``0 .. num_classes - 2`` symbols, ``eos = num_classes - 1``, ``bos =
num_classes`` (input only), matching :mod:`crossdistill.data.av_seq` (10 digits, EOS 10,
BOS 11).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..data.dataset import IGNORE_INDEX
from ..errors import ConfigError
from ..registry import MODELS
from ..schema import Count, Depth, Width


def seq_io(key: str, lengths: str | None = None, labels: str = "labels") -> dict:
    """The adapter of a :class:`Seq2Seq` reading frames ``key`` (lengths ``<key>_len``)."""
    return {"inputs": {"x": key, "lengths": lengths or f"{key}_len", "labels": labels}}


def length_mask(lengths: Tensor, size: int) -> Tensor:
    """``(B, size)`` bool: True at the first ``lengths[b]`` positions."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


class SeqEncoder(nn.Module):
    def __init__(self, in_features: int, hidden: int, layers: int, subsample: int, drop: float):
        super().__init__()
        self.strides = [2] * int(math.log2(subsample)) or [1]
        self.frontend = nn.ModuleList(
            nn.Conv1d(in_features if i == 0 else hidden, hidden, 3, stride=st, padding=1)
            for i, st in enumerate(self.strides)
        )
        self.rnn = nn.GRU(hidden, hidden // 2, layers, batch_first=True, bidirectional=True,
                          dropout=drop if layers > 1 else 0.0)
        self.drop = nn.Dropout(drop)

    def out_lengths(self, lengths: Tensor) -> Tensor:
        for st in self.strides:
            lengths = (lengths - 1) // st + 1
        return lengths

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Padding is zeroed before every convolution, so no state sees a padded frame."""
        lens = lengths.long().clamp(1, x.shape[1])
        h = (x * length_mask(lens, x.shape[1])[..., None]).transpose(1, 2)
        for conv, st in zip(self.frontend, self.strides):
            h = torch.relu(conv(h))
            lens = (lens - 1) // st + 1
            h = h * length_mask(lens, h.shape[2])[:, None, :]
        h = h.transpose(1, 2)
        packed = pack_padded_sequence(h, lens.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=h.shape[1])
        return self.drop(out), lens


class AttnDecoder(nn.Module):
    def __init__(self, num_classes: int, hidden: int, enc_dim: int, emb: int, drop: float):
        super().__init__()
        self.embed = nn.Embedding(num_classes + 1, emb)  # + BOS
        self.init = nn.Linear(enc_dim, hidden)
        self.cell = nn.GRUCell(emb + enc_dim, hidden)
        self.query = nn.Linear(hidden, enc_dim, bias=False)
        self.out = nn.Sequential(nn.Dropout(drop), nn.Linear(hidden + enc_dim, num_classes))
        self.scale = enc_dim**-0.5

    def start(self, summary: Tensor) -> tuple[Tensor, Tensor]:
        return torch.tanh(self.init(summary)), torch.zeros_like(summary)

    def step(self, tok, h, ctx, enc, mask):
        h = self.cell(torch.cat([self.embed(tok), ctx], -1), h)
        score = (enc @ self.query(h)[:, :, None]).squeeze(-1) * self.scale
        a = score.masked_fill(~mask, float("-inf")).softmax(-1)
        ctx = (a[:, :, None] * enc).sum(1)
        return self.out(torch.cat([h, ctx], -1)), h, ctx


class Seq2Seq(nn.Module):
    """Encoder + attention decoder (module docstring)."""

    def __init__(self, num_classes: int, in_features: int, hidden: int, layers: int,
                 subsample: int, emb: int, drop: float, max_steps: int):
        super().__init__()
        self.num_classes, self.eos, self.bos = num_classes, num_classes - 1, num_classes
        self.max_steps = max_steps
        self.encoder = SeqEncoder(in_features, hidden, layers, subsample, drop)
        self.decoder = AttnDecoder(num_classes, hidden, hidden, emb, drop)
        self.stages = ["encoder", "decoder"]
        self.feature_path = "decoder.out.1"  # the output layer; its input: [state, context]
        self.family = "seq"

    def encode(self, x: Tensor, lengths: Tensor) -> dict:
        enc, lens = self.encoder(x, lengths)
        mask = length_mask(lens, enc.shape[1])
        summary = (enc * mask[..., None]).sum(1) / lens[:, None].to(enc.dtype)
        return {"encoder": enc, "encoder_len": lens, "summary": summary, "mask": mask}

    def forward(self, x: Tensor, lengths: Tensor, labels: Tensor | None = None) -> dict:
        if x.dim() != 3 or lengths.shape != x.shape[:1]:
            raise ConfigError("seq2seq.inputs", (tuple(x.shape), tuple(lengths.shape)),
                              "frames (B, T, features) and lengths (B,)")
        e = self.encode(x, lengths)
        enc, mask = e.pop("encoder"), e.pop("mask")
        out = {"encoder": enc, **e}
        if labels is not None:
            prev = torch.cat([torch.full_like(labels[:, :1], self.bos), labels[:, :-1]], 1)
            prev = prev.masked_fill(prev == IGNORE_INDEX, self.eos)
            h, ctx = self.decoder.start(e["summary"])
            logits, ctxs = [], []
            for j in range(labels.shape[1]):
                z, h, ctx = self.decoder.step(prev[:, j], h, ctx, enc, mask)
                logits.append(z)
                ctxs.append(ctx)
            out["logits"], out["context"] = torch.stack(logits, 1), torch.stack(ctxs, 1)
        if labels is None or not self.training:
            z, pred, pctx = self.greedy(enc, mask, e["summary"])
            out.update(pred=pred, pred_context=pctx)
            if labels is None:
                out["logits"], out["context"] = z, pctx
        return out

    def greedy(self, enc: Tensor, mask: Tensor, summary: Tensor):
        """Greedy decoding for ``max_steps`` steps: (logits, tokens with -100 from the first
        EOS on, contexts)."""
        h, ctx = self.decoder.start(summary)
        tok = torch.full((len(enc),), self.bos, dtype=torch.long, device=enc.device)
        done = torch.zeros(len(enc), dtype=torch.bool, device=enc.device)
        zs, toks, ctxs = [], [], []
        for _ in range(self.max_steps):
            z, h, ctx = self.decoder.step(tok, h, ctx, enc, mask)
            tok = z.argmax(-1)
            done = done | (tok == self.eos)
            zs.append(z)
            toks.append(tok.masked_fill(done, IGNORE_INDEX))
            ctxs.append(ctx)
        return torch.stack(zs, 1), torch.stack(toks, 1), torch.stack(ctxs, 1)


@MODELS.register(
    "seq2seq",
    family="seq",
    description="conv + BiGRU encoder, attention GRU decoder over digit strings "
    "(hidden=64, subsample=2, in_features=40); frames (B, T, F) + lengths (+ labels)",
    paper="Luong et al., Effective Approaches to Attention-based Neural Machine "
    "Translation, 2015 (the recogniser shape of LIBS)",
)
def seq2seq(
    *,
    num_classes: Count = 11,
    in_features: Width = 40,
    hidden: Width = 64,
    layers: Depth = 1,
    subsample: int = 2,
    emb: Width = 32,
    drop: float = 0.1,
    max_steps: Width = 5,
) -> Seq2Seq:
    """An attention seq2seq recogniser: ``num_classes`` outputs (symbols + EOS), frames of
    ``in_features`` values; ``hidden`` even (two GRU directions)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError("num_classes", num_classes, "an int >= 2 (symbols + EOS)")
    if subsample not in (1, 2, 4):
        raise ConfigError("subsample", subsample, "1, 2 or 4")
    if hidden % 2:
        raise ConfigError("hidden", hidden, "an even int (two GRU directions)")
    if not 0.0 <= float(drop) < 1.0:
        raise ConfigError("drop", drop, "a probability in [0, 1)")
    return Seq2Seq(num_classes, in_features, hidden, layers, subsample, emb, float(drop),
                   max_steps)
