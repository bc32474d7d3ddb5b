"""CoMD (Li et al., "CoMD: ... Competitive Multimodal Distillation", 2023) in a text-only,
small-scale form: rounds of (i) sequence-level KD of the student on teacher answers to a
prompt pool, (ii) a competition where the student and the teacher both answer each prompt
and a judge scores the answers, and (iii) the teacher writing new prompts like the ones the
student lost, added to the pool. No official code exists; the judge and the score are ours
(shared/methods/sequence.md): an answer's score is its per-byte NLL under the judge (the
teacher by default, or a third model), and a prompt is *hard* when

    gap = NLL_judge(student's answer) - NLL_judge(teacher's answer) > margin

(per token without a tokenizer). A hard prompt's new sibling is a fresh teacher
continuation of it, as long as a prompt. ``select="random"`` is the control: the same
rounds with new prompts grown from randomly chosen pool prompts. Every teacher token
generated (answers and new prompts) is counted, so :func:`seqkd_once` can spend the same
number on one-shot sequence KD (Kim & Rush, 2016) for the comparison.

Training goes through the library's ``Distiller`` + ``Trainer`` (:func:`seqkd_train`, or
any ``train_fn(student, dataset) -> dict``); generation through
:func:`crossdistill.lm.generate.sample` with a seeded generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..data.dataset import IGNORE_INDEX, Dataset
from ..errors import ConfigError
from .generate import sample


# -- data and scores ---------------------------------------------------------------------------
def continuation_data(ids: Tensor, completion: Tensor, n_prompt: int,
                      vocab_size: int | None = None, name: str = "seqkd") -> Dataset:
    """An lm dataset that trains on the completions only: ``labels[t] = ids[t + 1]`` where
    token ``t + 1`` is generated (``completion``), else -100; the attention mask covers the
    ``n_prompt`` prompt tokens and the completion (padding after an eos is masked)."""
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(completion[:, 1:], ids[:, 1:], IGNORE_INDEX)
    real = completion.clone()
    real[:, :n_prompt] = True
    tensors = {"input_ids": ids, "labels": labels, "attention_mask": real.long()}
    kinds = {"input_ids": "tokens", "labels": "tokens", "attention_mask": "mask"}
    return Dataset(tensors, kinds, name=name, num_classes=vocab_size)


@torch.no_grad()
def answer_nll(model: nn.Module, ids: Tensor, completion: Tensor) -> Tensor:
    """(B,) summed NLL of each row's completion tokens under ``model`` (teacher forcing)."""
    was = model.training
    model.eval()
    try:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        model.train(was)
    z = getattr(out, "logits", out)[:, :-1].float()
    lp = torch.log_softmax(z, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return -(lp * completion[:, 1:]).sum(1)


def answer_units(ids: Tensor, completion: Tensor, tokenizer=None) -> Tensor:
    """(B,) what an NLL is divided by: the UTF-8 bytes of each completion (decoded by
    ``tokenizer``), else its token count."""
    if tokenizer is None:
        return completion.sum(1).double().clamp_min(1)
    texts = [tokenizer.decode(row[m].tolist()) for row, m in zip(ids, completion)]
    return torch.tensor([max(len(t.encode("utf-8")), 1) for t in texts], dtype=torch.float64)


def _vocab(model) -> int | None:
    return getattr(getattr(model, "config", None), "vocab_size", None)


def _chunks(n: int, size: int):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _sample(model, prompts: Tensor, gen, settings: dict, batch_size: int, **override):
    parts = [sample(model, prompts[a:b], generator=gen, **{**settings, **override})
             for a, b in _chunks(len(prompts), batch_size)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# -- training ----------------------------------------------------------------------------------
def seqkd_train(student: nn.Module, data: Dataset, *, epochs: int = 1, lr: float = 1e-3,
                batch_size: int = 16, seed: int = 0, val: Dataset | None = None,
                **settings) -> dict:
    """Sequence-level KD step: next-token CE of ``student`` on ``data`` (teacher text) with
    the library's Distiller and Trainer (``settings``: more TrainConfig fields); returns the
    Trainer's results. With ``val`` the best-on-val epoch is kept."""
    from ..distiller import Distiller, Term
    from ..train import Trainer

    settings = {"optimizer": "adamw", "weight_decay": 0.0, "progress": False, **settings}
    distiller = Distiller(student, None, [Term("ce")], task="lm")
    trainer = Trainer(distiller, data, val, epochs=epochs, lr=lr, batch_size=batch_size,
                      seed=seed, **settings)
    return trainer.fit()


# -- the procedure -----------------------------------------------------------------------------
def _check(prompts: Tensor, rounds: int, select: str, new_per_round) -> None:
    if not torch.is_tensor(prompts) or prompts.dim() != 2 or prompts.is_floating_point() \
            or len(prompts) < 1:
        got = tuple(prompts.shape) if torch.is_tensor(prompts) else type(prompts).__name__
        raise ConfigError("comd.prompts", got, "a (prompts, length) tensor of token ids")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError("comd.rounds", rounds, "an integer >= 1")
    if select not in ("hard", "random"):
        raise ConfigError("comd.select", select, "hard (CoMD) or random (the control)")
    if new_per_round is not None and (not isinstance(new_per_round, int) or new_per_round < 0):
        raise ConfigError("comd.new_per_round", new_per_round, "an integer >= 0")


def comd(
    student: nn.Module,
    teacher: nn.Module,
    prompts: Tensor,
    *,
    rounds: int = 4,
    new_per_round: int | None = None,
    select: str = "hard",
    margin: float = 0.0,
    judge: nn.Module | None = None,
    tokenizer=None,
    max_new_tokens: int = 32,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    train_fn: Callable[[nn.Module, Dataset], dict] | None = None,
    eval_fn: Callable[[nn.Module], dict] | None = None,
) -> list[dict]:
    """Run CoMD's rounds on ``student`` (trained in place) from the prompt pool ``prompts``
    (N, P) and return one record per round: ``round``, ``pool`` (prompts tuned on),
    ``teacher_tokens`` (generated so far, answers + new prompts), ``hard`` (prompts with
    gap > margin), ``mean_gap``, ``new_prompts``, ``train`` (``train_fn``'s result) and
    ``eval`` (``eval_fn(student)``, if given).

    Each round: the teacher answers the prompts that have no answer yet (answers are kept),
    the student is tuned on all answers (``train_fn``, default :func:`seqkd_train`), both
    models answer the pool and the ``judge`` (default: the teacher) scores them, and up to
    ``new_per_round`` (default N // 2) new prompts are grown by the teacher from the hardest
    prompts (``select="hard"``) or from random ones (``select="random"``). Sampling
    (``temperature`` 0.8, ``top_k``, ``top_p``, ``max_new_tokens``) is seeded by ``seed``."""
    _check(prompts, rounds, select, new_per_round)
    train_fn = train_fn or seqkd_train
    judge = judge if judge is not None else teacher
    gen = torch.Generator().manual_seed(int(seed))
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    k = len(prompts) // 2 if new_per_round is None else new_per_round
    n_prompt = prompts.shape[1]
    pool, answers, masks, tokens, records = prompts, [], [], 0, []
    for r in range(rounds):
        done = sum(len(a) for a in answers)
        if done < len(pool):  # (i) teacher answers for the new prompts, then SeqKD on all
            ids, comp = _sample(teacher, pool[done:], gen, settings, batch_size)
            answers.append(ids)
            masks.append(comp)
            tokens += int(comp.sum())
        ids, comp = torch.cat(answers), torch.cat(masks)
        trained = train_fn(student, continuation_data(ids, comp, n_prompt, _vocab(teacher)))
        # (ii) the competition: both answer, the judge scores per byte (or token)
        s_ids, s_comp = _sample(student, pool, gen, settings, batch_size)
        gap = torch.cat([
            answer_nll(judge, s_ids[a:b], s_comp[a:b]).double()
            / answer_units(s_ids[a:b], s_comp[a:b], tokenizer)
            - answer_nll(judge, ids[a:b], comp[a:b]).double()
            / answer_units(ids[a:b], comp[a:b], tokenizer)
            for a, b in _chunks(len(pool), batch_size)
        ])
        hard = (gap > margin).nonzero().squeeze(1)
        # (iii) the teacher grows new prompts from the hard ones (or random ones)
        if select == "hard":
            chosen = hard[gap[hard].argsort(descending=True)][:k]
        else:
            chosen = torch.randperm(len(pool), generator=gen)[: min(k, len(pool))]
        if len(chosen):
            grown, _ = _sample(teacher, pool[chosen], gen, settings, batch_size,
                               max_new_tokens=n_prompt, eos_token_id=None)
            pool = torch.cat([pool, grown[:, n_prompt:]])
            tokens += len(chosen) * n_prompt
        records.append({
            "round": r + 1, "pool": len(ids), "teacher_tokens": tokens, "hard": len(hard),
            "mean_gap": float(gap.mean()), "new_prompts": len(chosen), "train": trained,
            **({"eval": eval_fn(student)} if eval_fn is not None else {}),
        })
    return records


def seqkd_once(
    student: nn.Module,
    teacher: nn.Module,
    prompts: Tensor,
    *,
    teacher_tokens: int,
    max_new_tokens: int = 32,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    train_fn: Callable[[nn.Module, Dataset], dict] | None = None,
    eval_fn: Callable[[nn.Module], dict] | None = None,
) -> dict:
    """The control: one-shot sequence KD with the same teacher budget. The teacher answers
    the prompts in turn (fresh samples on later passes) until ``teacher_tokens`` tokens are
    generated, then ``train_fn`` tunes the student once on all answers."""
    _check(prompts, 1, "hard", None)
    if isinstance(teacher_tokens, bool) or not isinstance(teacher_tokens, int) \
            or teacher_tokens < 1:
        raise ConfigError("seqkd.teacher_tokens", teacher_tokens, "an integer >= 1")
    gen = torch.Generator().manual_seed(int(seed))
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    answers, masks, tokens, start = [], [], 0, 0
    while tokens < teacher_tokens:
        m = max(1, math.ceil((teacher_tokens - tokens) / max_new_tokens))
        rows = torch.arange(start, start + m) % len(prompts)
        ids, comp = _sample(teacher, prompts[rows], gen, settings, batch_size)
        answers.append(ids)
        masks.append(comp)
        tokens += int(comp.sum())
        start += m
    ids, comp = torch.cat(answers), torch.cat(masks)
    data = continuation_data(ids, comp, prompts.shape[1], _vocab(teacher))
    trained = (train_fn or seqkd_train)(student, data)
    out = {"pool": len(ids), "teacher_tokens": tokens, "train": trained}
    if eval_fn is not None:
        out["eval"] = eval_fn(student)
    return out
