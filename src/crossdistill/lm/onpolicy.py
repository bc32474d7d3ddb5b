"""On-policy and sequence-level distillation as one prepare stage: per sample, the
continuation of a prompt comes from the student (GKD), the teacher (SeqKD) or the data.

GKD: Agarwal et al., "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes" (ICLR 2024), Algorithm 1: with probability ``lmbda`` a sample's
continuation is the student's own sample from the prompt, with no gradient through the
sampling; the loss (the generalised JSD of their Eq. 1 is registered as ``jsd``) is then
taken on those tokens. SeqKD: Kim & Rush, "Sequence-Level Knowledge Distillation" (EMNLP
2016), Sec. 3.2: train on the teacher's generated sequences (``seq_kd``; they use beam
search, we sample, greedy at ``temperature: 0``). Any mix: the rest keep the dataset's
continuation (supervised KD), ``lmbda + seq_kd <= 1``.

Unlike TRL's trainer (one Python ``random`` coin per step and process), the branch is drawn
per sample from the stage's seeded generator, so DDP ranks and resumed runs agree.

Each block's first ``prompt_tokens`` positions are the prompt. In every branch, alike,
labels stay position-aligned (``labels[t] = input_ids[t + 1]``): prompt positions are -100
except the last, which predicts the first continuation token; positions after a
continuation's first EOS (included: the EOS is predicted), and from ``prompt_tokens +
max_new_tokens - 1`` on, are -100 with inputs set to pad and ``attention_mask`` 0.
``token_bytes`` is rewritten from a per-id byte table of the tokenizer, so the lm task's
training bits per byte keeps its meaning.

``regenerate_every: N`` (N > 1) bounds the generation cost: generations are kept in a replay
buffer of ``buffer_size`` sequences and, on steps between regenerations, the student / teacher
samples are drawn from it (seeded) instead; the buffer is checkpointed with the run
(``get_extra_state``), so a resumed run continues identically.
"""

from __future__ import annotations

from typing import Annotated

import annotated_types as at
import torch
from torch import Tensor

from ..errors import ConfigError
from ..prepare import Stage
from ..registry import PREPARES
from ..schema import Count, Prob
from .generate import check_length, sample

IGNORE = -100
DATA, STUDENT, TEACHER = 0, 1, 2
KEYS = ("input_ids", "labels", "attention_mask", "token_bytes")
TopK = Annotated[int, at.Interval(ge=0, le=1_000_000)]
TopP = Annotated[float, at.Interval(gt=0, le=1)]
SampleT = Annotated[float, at.Interval(ge=0, le=1e3)]  # 0 = greedy


def token_byte_lengths(tok) -> Tensor:
    """UTF-8 bytes of every token id (V,), as :func:`~crossdistill.text.tokenizer.
    encode_with_bytes` counts them: byte-level BPE tokens by their own bytes (a token may
    hold part of a character), special tokens by their text, others by their decoded text."""
    from ..text.tokenizer import _BYTE_OF, _backend, _is_byte_level

    backend = _backend(tok)
    byte_level = _is_byte_level(backend)
    added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
    out = []
    for i in range(len(tok)):
        if i in added:
            out.append(len(added[i].encode()))
            continue
        piece = backend.id_to_token(i) or ""
        if byte_level and all(c in _BYTE_OF for c in piece):
            out.append(len(piece))
        else:
            out.append(len(backend.decode([i], skip_special_tokens=False).encode()))
    return torch.tensor(out, dtype=torch.long)


def _token_key(io) -> str | None:
    """The batch key a model reads its token ids from (None if it does not say)."""
    inputs = getattr(io, "inputs", None)
    if isinstance(inputs, dict):
        return inputs.get("input_ids")
    return inputs[0] if inputs else None


@PREPARES.register(
    "onpolicy",
    description="GKD / sequence-level KD: each sample's continuation from the student "
    "(lmbda), the teacher (seq_kd) or the data; prompt and after-EOS masked",
    paper="On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes",
    year=2024,
)
class OnPolicy(Stage):
    """See the module docstring. ``temperature`` is the sampling temperature only (TRL's
    0.9; 0 = greedy); the loss runs at whatever the terms say (GKD: ``jsd``, beta 0.5,
    T 1). ``max_new_tokens`` defaults to the block minus the prompt. ``teacher_model``
    names the generating teacher when there are several. ``tokenizer`` (a directory) is
    only needed when the training data does not carry its own."""

    def __init__(
        self,
        prompt_tokens: Count = 16,
        lmbda: Prob = 0.5,
        seq_kd: Prob = 0.0,
        temperature: SampleT = 0.9,
        top_k: TopK = 0,
        top_p: TopP = 1.0,
        max_new_tokens: Count | None = None,
        regenerate_every: Count = 1,
        buffer_size: Count = 1024,
        teacher_model: str | None = None,
        tokenizer: str | None = None,
    ):
        super().__init__()
        for name, v in (("lmbda", lmbda), ("seq_kd", seq_kd)):
            if isinstance(v, bool) or not 0.0 <= float(v) <= 1.0:
                raise ConfigError(f"prepare.{name}", v, "a probability in [0, 1]")
        if float(lmbda) + float(seq_kd) > 1.0 + 1e-9:
            raise ConfigError("prepare.seq_kd", seq_kd, f"lmbda ({lmbda}) + seq_kd must be <= 1 "
                              "(the rest of the samples keep the dataset continuation)")
        self.prompt_tokens = int(prompt_tokens)
        self.lmbda, self.seq_kd = float(lmbda), float(seq_kd)
        self.sampling = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
        self.max_new_tokens = max_new_tokens
        self.regenerate_every, self.buffer_size = int(regenerate_every), int(buffer_size)
        self.teacher_model, self.tokenizer = teacher_model, tokenizer
        self.buffer: dict[str, Tensor] = {}  # KEYS + "branch", one row per kept generation
        self._ready = None  # (block length, eos, pad, byte table) once checked

    # -- checks, before any generation --------------------------------------------------
    def check(self, distiller, batch) -> None:
        """Everything a run needs, on the first batch: block vs prompt, context lengths,
        the generating teacher, special ids and the tokenizer's byte table."""
        if "input_ids" not in batch or "labels" not in batch:
            raise ConfigError("prepare.name", "onpolicy", "an LM batch with input_ids and labels "
                              f"(the lm task's data); batch keys: {', '.join(sorted(batch))}")
        block = batch["input_ids"].shape[-1]
        p = self.prompt_tokens
        if p >= block:
            raise ConfigError("prepare.prompt_tokens", p, f"fewer than the block's {block} tokens")
        n = self.max_new_tokens if self.max_new_tokens is not None else block - p
        if p + n > block:
            raise ConfigError("prepare.max_new_tokens", n, f"prompt_tokens ({p}) + max_new_tokens "
                              f"must fit the block of {block}; at most {block - p}")
        models = []
        if self.lmbda > 0:
            models.append(("student", distiller.student))
        if self.seq_kd > 0 or self.lmbda > 0:
            self._check_teachers(distiller)
        if self.seq_kd > 0:
            models.append((f"teacher {self._teacher_name(distiller)!r}", self._teacher(distiller)))
        for what, m in models:
            check_length(m, p, n, "prepare.max_new_tokens", what)
        tok = self._find_tokenizer(distiller)
        eos = pad = None
        if tok is not None:
            eos, pad = tok.eos_token_id, tok.pad_token_id
        cfg = getattr(distiller.student, "config", None)
        eos = eos if eos is not None else getattr(cfg, "eos_token_id", None)
        pad = pad if pad is not None else getattr(cfg, "pad_token_id", None)
        table = None
        if "token_bytes" in batch:
            if tok is None:
                raise ConfigError(
                    "prepare.tokenizer", None, "the onpolicy stage counts the bytes of generated "
                    "tokens (bits per byte) with the data's tokenizer, and this data has none: "
                    "give tokenizer: DIR (a tokenizer directory)")
            table = token_byte_lengths(tok)
        self._ready = (block, n, eos, pad if pad is not None else eos if eos is not None else 0,
                       table)

    def _check_teachers(self, distiller) -> None:
        for name, m in distiller.teachers.items():
            if getattr(m, "is_store", False):
                raise ConfigError(
                    f"teachers.{name}", "store", "a teacher store holds signals of the dataset's "
                    "tokens, which the onpolicy stage rewrites; use an online teacher")
            key = _token_key(distiller.teacher_io.get(name))
            if key not in (None, "input_ids"):
                raise ConfigError(
                    f"teachers.{name}.inputs", key, "the onpolicy stage rewrites input_ids; a "
                    "teacher reading its own tokenization cannot score generated tokens")

    def _teacher_name(self, distiller) -> str:
        names = list(distiller.teachers)
        if not names:
            raise ConfigError("prepare.seq_kd", self.seq_kd, "seq_kd > 0 needs a teacher")
        if self.teacher_model is None:
            if len(names) > 1:
                raise ConfigError("prepare.teacher_model", None,
                                  f"choose one of {', '.join(names)}")
            return names[0]
        if self.teacher_model not in names:
            raise ConfigError("prepare.teacher_model", self.teacher_model,
                              f"allowed: {', '.join(names)}")
        return self.teacher_model

    def _teacher(self, distiller):
        t = distiller.teachers[self._teacher_name(distiller)]
        sv = getattr(getattr(distiller.student, "config", None), "vocab_size", None)
        tv = getattr(getattr(t, "config", None), "vocab_size", None)
        if sv and tv and sv != tv:
            raise ConfigError("prepare.seq_kd", self.seq_kd, f"the teacher's vocabulary ({tv}) "
                              f"differs from the student's ({sv}); SeqKD needs one tokenizer")
        return t

    def _find_tokenizer(self, distiller):
        from ..text.tokenizer import load_tokenizer

        if self.tokenizer is not None:
            if isinstance(self.tokenizer, str):
                return load_tokenizer(self.tokenizer, "prepare.tokenizer")
            return self.tokenizer  # a tokenizer object (Python API)
        data = getattr(distiller, "data", None)
        tok = getattr(data, "tokenizer", None)
        path = (getattr(data, "info", None) or {}).get("tokenizer")
        if tok is None and path:
            tok = load_tokenizer(path, "data.info.tokenizer")
        return tok

    # -- the stage ----------------------------------------------------------------------
    def forward(self, batch: dict, state) -> dict:
        if self._ready is None:
            self.check(state.distiller, batch)
        block, n, eos, pad, table = self._ready
        g, p = state.generator, self.prompt_tokens
        ids = batch["input_ids"]
        b = ids.shape[0]
        u = torch.rand(b, generator=g, device=g.device).to(ids.device)
        branch = torch.where(u < self.lmbda, STUDENT,
                             torch.where(u < self.lmbda + self.seq_kd, TEACHER, DATA))
        out = self._data_rows(batch, n, pad, table)
        regen = self.regenerate_every == 1 or state.step % self.regenerate_every == 0
        for kind in (STUDENT, TEACHER):
            rows = (branch == kind).nonzero().flatten()
            if not len(rows):
                continue
            kept = self.buffer.get("branch")
            pool = (kept == kind).nonzero().flatten() if kept is not None else None
            if not regen and pool is not None and len(pool):
                pick = pool[torch.randint(len(pool), (len(rows),), generator=g,
                                          device=g.device).to(pool.device)]
                new = {k: self.buffer[k][pick].to(ids.device) for k in out}
            else:
                d = state.distiller
                model = d.student if kind == STUDENT else self._teacher(d)
                seq, comp = sample(model, ids[rows, :p], max_new_tokens=n, eos_token_id=eos,
                                   pad_token_id=pad, generator=g, **self.sampling)
                new = self._generated_rows(seq, comp, batch, rows, pad, table)
                if self.regenerate_every > 1:
                    self._keep(new, kind)
            for k, v in new.items():
                out[k][rows] = v.to(out[k].dtype)
        batch = dict(batch)
        batch.update(out)
        batch["continuation_source"] = branch  # 0 data, 1 student, 2 teacher (for logs/tests)
        return batch

    def _data_rows(self, batch, n: int, pad: int, table) -> dict[str, Tensor]:
        """The dataset continuation, masked like a generated one (prompt, window end)."""
        p = self.prompt_tokens
        out = {k: batch[k].clone() for k in KEYS if k in batch}
        labels = out["labels"]
        labels[:, : p - 1] = IGNORE
        labels[:, p + n - 1 :] = IGNORE
        out["input_ids"][:, p + n :] = pad
        if "attention_mask" in out:
            out["attention_mask"][:, p + n :] = 0
        if "token_bytes" in out:
            out["token_bytes"] = out["token_bytes"] * (labels != IGNORE)
        return out

    def _generated_rows(self, seq, comp, batch, rows, pad: int, table) -> dict[str, Tensor]:
        """Rows of the batch rewritten around a generated continuation ``seq`` (r, p + n)."""
        r, length = seq.shape
        block = batch["input_ids"].shape[-1]
        ids = seq.new_full((r, block), pad)
        ids[:, :length] = seq
        real = torch.zeros(r, block, dtype=torch.bool, device=seq.device)
        real[:, :length] = comp
        real[:, : self.prompt_tokens] = True
        labels = torch.full_like(ids, IGNORE)
        labels[:, :-1] = torch.where(real[:, 1:] & (torch.arange(1, block, device=ids.device)
                                                    >= self.prompt_tokens), ids[:, 1:], IGNORE)
        out = {"input_ids": ids, "labels": labels}
        if "attention_mask" in batch:
            out["attention_mask"] = real.to(batch["attention_mask"].dtype)
        if "token_bytes" in batch:
            out["token_bytes"] = table.to(ids.device)[labels.clamp_min(0)] * (labels != IGNORE)
        return out

    # -- replay buffer ------------------------------------------------------------------
    def _keep(self, rows: dict[str, Tensor], kind: int) -> None:
        """Append generated rows (FIFO, at most ``buffer_size``), on the CPU."""
        rows = {k: v.detach().cpu() for k, v in rows.items()}
        rows["branch"] = torch.full((len(rows["input_ids"]),), kind, dtype=torch.long)
        for k, v in rows.items():
            old = self.buffer.get(k)
            self.buffer[k] = (v if old is None else torch.cat([old, v]))[-self.buffer_size :]

    def get_extra_state(self):
        return {"buffer": dict(self.buffer)}

    def set_extra_state(self, state) -> None:
        self.buffer = dict((state or {}).get("buffer", {}))

    def extra_repr(self) -> str:
        return (f"prompt_tokens={self.prompt_tokens}, lmbda={self.lmbda}, seq_kd={self.seq_kd}, "
                f"regenerate_every={self.regenerate_every}")
