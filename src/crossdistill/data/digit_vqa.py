"""Templated visual question answering on digit images: LLaVA-KD in miniature.

Each sample is an image, a short text prompt and a short response, tokenized by a word-level
tokenizer (``tokenizers`` WordLevel, saved in Hugging Face format) whose vocabulary is every
word a prompt, answer or caption here can contain, so all splits, seeds and models share it.
Three ``mode`` s, the data of the stages of an MLLM:

- ``caption`` (pre-training): no question; the response is a caption of the image written by
  :func:`crossdistill.data.captions.caption_pairs` (templates filled with the digit's name and
  the attributes measured on the image itself), ``captions`` per image.
- ``qa`` (instruction tuning): a question from :data:`QUESTIONS` and its answer, built from
  the label (``digit``, ``even``, ``above4``) or from the attribute words of
  :mod:`crossdistill.data.captions` (``thickness``, ``slant``, ``size``, ``position``; cut
  points from the train split, so an image has the same words in every split). In the train
  split each image gets ``questions`` of the question kinds (drawn without repetition, seeded
  by ``seed`` and the image id; ``None`` = all); val and test always ask every kind.
- ``text``: the ``qa`` and ``caption`` texts of the split with no image (key ``x`` absent): a
  text-only corpus to pre-train the language model on.

Layout of a sample (``<|endoftext|>`` is bos, eos and pad, GPT-2's convention): the token
string ``s = [bos] + prompt + response + [eos]`` gives ``input_ids = s[:-1]`` (padded with the
pad id) and ``labels[t] = s[t + 1]`` where ``s[t + 1]`` is a response token or the final eos,
``-100`` elsewhere (the prompt and the padding), so only the response is scored and position
``t``'s logits predict ``labels[t]`` (nothing shifts downstream). Keys: ``x`` (1, 8, 8) or
(1, 28, 28) images standardised with the train split's mean / std (absent in ``text`` mode),
``input_ids``, ``labels``, ``qtype`` (the question kind's index in :data:`QUESTIONS`;
``len(QUESTIONS)`` for a caption), ``y`` (the digit, a value: not the task's target), ``idx``
(unique: image id * 16 + the sample's slot). The strings are on ``data.texts`` (prompt,
response) and the tokenizer on ``data.tokenizer``.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from ..errors import ConfigError
from .dataset import IGNORE_INDEX, Dataset

QUESTIONS = (
    ("digit", "what digit is this ?"),
    ("even", "is the digit even ?"),
    ("above4", "is the digit above four ?"),
    ("thickness", "how thick is the stroke ?"),
    ("slant", "which way does it lean ?"),
    ("size", "how big is the digit ?"),
    ("position", "where is the digit ?"),
)
KINDS = tuple(k for k, _ in QUESTIONS)
MODES = ("qa", "caption", "text")
SLOTS = 16  # idx = image id * SLOTS + slot (question kind, or 8 + caption number)
POSITIONS = ("in the centre", "to the left", "to the right", "high in the frame",
             "low in the frame")
_WORD = re.compile(r"[\w-]+|[^\w\s]")


def answer(kind: str, y: int, w: dict[str, str]) -> str:
    """The answer to question ``kind`` about an image of digit ``y`` with attribute words
    ``w`` (one entry of :func:`crossdistill.data.captions.words`)."""
    from .captions import NAMES

    if kind == "digit":
        return NAMES[y]
    if kind == "even":
        return "yes" if y % 2 == 0 else "no"
    if kind == "above4":
        return "yes" if y > 4 else "no"
    if kind == "slant":
        return w["slant"].removeprefix("leaning ")
    if kind in ("thickness", "size", "position"):
        return w[kind]
    raise ConfigError("data.question", kind, f"one of {', '.join(KINDS)}")


def words_of(text: str) -> list[str]:
    """The word-level tokens of ``text`` (words, hyphenated words, punctuation)."""
    return _WORD.findall(text)


def vocabulary() -> list[str]:
    """Every word a prompt, answer or caption of this source can hold, sorted."""
    from .captions import NAMES, TEMPLATES

    parts = [q for _, q in QUESTIONS] + list(NAMES) + ["yes no left right upright and"]
    parts += [re.sub(r"\{\w+\}", " ", t) for t in TEMPLATES]  # the fills come below
    parts += ["thin medium thick small medium-sized large leaning", *POSITIONS]
    vocab = {w for p in parts for w in words_of(p)}
    for t in TEMPLATES:  # hyphenated fills such as "{thickness}-stroked"
        for m in re.findall(r"\}(-[\w-]+)", t):
            vocab |= {k + m for k in ("thin", "medium", "thick")}
            vocab.discard(m)
    return sorted(vocab)


def word_tokenizer(out_dir=None):
    """A word-level tokenizer over :func:`vocabulary` (ids: ``<|endoftext|>`` 0, ``<unk>``
    1, then the words in sorted order), wrapped as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from ..text.tokenizer import SPECIAL, UNK, _wrap

    vocab = {SPECIAL: 0, UNK: 1}
    for w in vocabulary():
        vocab.setdefault(w, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"[^\w\s-]"), behavior="isolated"),
    ])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    backend.add_special_tokens([SPECIAL, UNK])
    return _wrap(backend, out_dir, unk=UNK)


def encode(tok, prompts: list[str], responses: list[str], max_tokens: int | None = None):
    """``(input_ids, labels)`` (N, max_tokens) of the module docstring's layout; ``None``:
    as long as the longest sample."""
    pad, unk = tok.pad_token_id, tok.unk_token_id
    seqs = []
    for p, r in zip(prompts, responses):
        head = [pad] + tok.convert_tokens_to_ids(words_of(p))
        tail = tok.convert_tokens_to_ids(words_of(r)) + [tok.eos_token_id]
        if unk in head[1:] + tail:
            bad = [w for w in words_of(p + " " + r) if tok.convert_tokens_to_ids(w) == unk]
            raise ConfigError("data.text", bad, "words of the vocabulary (digit_vqa.vocabulary)")
        seqs.append((head, tail))
    longest = max((len(h) + len(t) - 1 for h, t in seqs), default=1)
    width = longest if max_tokens is None else max_tokens
    if longest > width:
        raise ConfigError("data.max_tokens", max_tokens,
                          f"null or at least {longest} (the longest prompt + response here)")
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for i, (head, tail) in enumerate(seqs):
        s, n = head + tail, len(head) + len(tail) - 1
        ids[i, :n] = torch.tensor(s[:-1])
        labels[i, len(head) - 1:n] = torch.tensor(tail)
    return ids, labels


def digit_vqa(split: str, *, images: str = "digits", root=None, split_seed: int = 0,
              mode: str = "qa", questions: int | None = None, kinds=None, captions: int = 1,
              seed: int = 0, limit: int | None = None,
              max_tokens: int | None = None) -> Dataset:
    """One split of the source (module docstring). ``kinds`` keeps some question kinds only
    (default all); ``limit`` keeps a stratified subset of the split's images."""
    from .captions import caption_pairs

    if mode not in MODES:
        raise ConfigError("data.mode", mode, f"one of {', '.join(MODES)}")
    kinds = list(KINDS if kinds is None else kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds or len(set(kinds)) != len(kinds):
        raise ConfigError("data.kinds", kinds, f"distinct question kinds of {', '.join(KINDS)}")
    if questions is not None and (isinstance(questions, bool) or not isinstance(questions, int)
                                  or not 1 <= questions <= len(kinds)):
        raise ConfigError("data.questions", questions, f"null or an integer in 1..{len(kinds)}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(
            max_tokens, int) or not 4 <= max_tokens <= 256):
        raise ConfigError("data.max_tokens", max_tokens, "null or an integer in 4..256")
    if isinstance(captions, bool) or not isinstance(captions, int) or not 1 <= captions <= 8:
        raise ConfigError("data.captions", captions, "an integer in 1..8")
    from . import SPLITS

    raw, caps, ws, _ = caption_pairs(split, images=images, root=root, split_seed=split_seed,
                                     captions=captions, seed=seed, limit=limit)
    rows: list[tuple[int, int, int, str, str]] = []  # (image row, qtype, slot, prompt, resp.)
    if mode in ("qa", "text"):
        for i, (w, yi, im) in enumerate(zip(ws, raw.y.tolist(), raw.idx.tolist())):
            pick = range(len(kinds))
            if split == "train" and questions is not None:
                g = np.random.default_rng([seed, SPLITS.index(split), int(im), 7])
                pick = sorted(g.choice(len(kinds), size=questions, replace=False).tolist())
            for j in pick:
                k = KINDS.index(kinds[j])
                rows.append((i, k, k, QUESTIONS[k][1], answer(kinds[j], yi, w)))
    if mode in ("caption", "text"):
        for i, cs in enumerate(caps):
            rows += [(i, len(QUESTIONS), 8 + c, "", text) for c, text in enumerate(cs)]
    tok = word_tokenizer()
    ids, labels = encode(tok, [r[3] for r in rows], [r[4] for r in rows], max_tokens)
    img = torch.tensor([r[0] for r in rows], dtype=torch.long)
    qtype = torch.tensor([r[1] for r in rows], dtype=torch.long)
    slot = torch.tensor([r[2] for r in rows], dtype=torch.long)
    mean, std = raw.info["train_mean"], raw.info["train_std"]
    tensors = {"input_ids": ids, "labels": labels, "qtype": qtype, "y": raw.y[img],
               "idx": raw.idx[img] * SLOTS + slot}
    kinds_of = {"input_ids": "tokens", "labels": "tokens", "qtype": "value", "y": "value",
                "idx": "id"}
    if mode != "text":
        tensors["x"] = ((raw.x - mean) / std)[img]
        kinds_of["x"] = "image"
    out = Dataset(tensors, kinds_of, name=f"{images}-vqa", split=split, num_classes=0,
                  info={"construction": f"{images} {split} images, templated {mode} "
                        f"(seed {seed}, questions {questions})", "mean": mean, "std": std,
                        "mode": mode, "vocab_size": len(tok), "kinds": kinds,
                        "images": len(raw)})
    out.texts = [(r[3], r[4]) for r in rows]
    out.tokenizer = tok
    return out


def _register():
    from typing import Literal

    from ..registry import DATASETS
    from ..schema import Count, Seed

    if "digit_vqa" in DATASETS.names():
        return

    @DATASETS.register(
        "digit_vqa",
        description="digit images with templated questions and short answers from the label "
        "and the measured attributes (qa), captions (caption) or their text alone (text); "
        "word-level tokenizer, labels -100 on the prompt",
        splits=True,
        task="vqa",
    )
    def _digit_vqa(
        split,
        root: str | None = None,
        split_seed: Seed = 0,
        images: Literal["mnist", "digits"] = "digits",
        mode: Literal["qa", "caption", "text"] = "qa",
        questions: Count | None = None,
        kinds: list[str] | None = None,
        captions: Count = 1,
        seed: Seed = 0,
        limit: Count | None = None,
        max_tokens: Count | None = None,
    ):
        return digit_vqa(split, images=images, root=root, split_seed=split_seed, mode=mode,
                         questions=questions, kinds=kinds, captions=captions, seed=seed,
                         limit=limit, max_tokens=max_tokens)


_register()
