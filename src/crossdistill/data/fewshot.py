"""Few-shot segmentation episodes on MNIST digit canvases, with classes held out.

Digits are split into *base* classes (default 0-4: a few-shot segmenter learns on them, by
episodes) and *novel* classes (default 5-9: never seen in that training; each comes with
``shots`` labelled canvases only). An *episode* is one target class ``c``, ``K = shots``
support canvases with the binary masks of ``c`` and a query canvas with its binary target
mask (1 = ink of a digit ``c``, intensity > ``threshold``; 0 = background and every other
digit). Every canvas holds ``min_digits``..``max_digits`` (default 2..3) non-overlapping
digits, each the central ``crop`` x ``crop`` (default 20) window of an MNIST image, laid out
by seeded rejection sampling (:func:`layout`, the rule of
:func:`~crossdistill.data.detection.separated_plan`) and pasted by
:func:`~crossdistill.data.canvas.paste`; its first digit is always of the target class, the
others are drawn from the ``distractors`` pool (``"role"``: the episode's own class set, so
novel digits never appear in base episodes; ``"all"``: any digit), so the target must be
told apart from other digits (whole 28x28 frames would leave about one digit per 56x56
canvas: three rarely fit without overlap).

One row per query, keys: ``image`` (1, S, S) the query (kind image), ``mask`` (S, S) its
binary target (label map, 2 classes), ``cls`` the target digit, ``support_image``
(K, 1, S, S) and ``support_mask`` (K, S, S) float {0, 1} (kind value: they reach a model as
ordinary batch keys, so the support set travels with its query through the batch), ``idx``.

* ``role="base"``: queries from the digits of MNIST split ``split``; every query draws its
  own K support canvases from the same split's digits (episodic training; val/test base
  episodes stay on held-out digits).
* ``role="novel"``: one fixed support set per class, the few-shot task: K canvases of each
  class made from *train* digits, seeded by ``support_seed`` alone (the same shots for every
  split); queries from split ``split``.
* ``episodes="shots"``: the rows are the K shots of each class themselves, each with the
  other K - 1 shots of its class as its support (leave-one-out): what a support-free student
  is distilled or fine-tuned on (DistillFSS trains on the support set only). ``n`` is then
  K x the number of classes.

Target classes cycle over the role's classes (balanced: query ``i`` has class
``classes[i % len(classes)]``). Images are standardised by the statistics of a fixed
reference set (1,000 train canvases, seed 0), as the other canvas sources do.
"""

from __future__ import annotations

import functools

import torch

from ..errors import ConfigError
from ..registry import DATASETS
from ..schema import Depth, ImgSize, Prob
from .canvas import NORM_CANVASES, _check_int, paste
from .dataset import Dataset

BASE = (0, 1, 2, 3, 4)
NOVEL = (5, 6, 7, 8, 9)
ROLES = ("base", "novel")
EPISODES = ("queries", "shots")
DISTRACTORS = ("role", "all")
SIZES = {"train": 1000, "val": 200, "test": 400}  # queries per split (registered source)
_SUPPORT_SALT = 7_919  # keeps support layouts apart from every split's query layouts


def check_classes(base, novel) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(base, novel)`` as tuples of distinct digits 0..9, non-empty and disjoint."""
    out = []
    for field, v in (("data.base", base), ("data.novel", novel)):
        if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
            raise ConfigError(field, v, "a non-empty list of distinct digits 0..9")
        v = list(v)
        ok = all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 9 for c in v)
        if not v or not ok or len(set(v)) != len(v):
            raise ConfigError(field, v, "a non-empty list of distinct digits 0..9")
        out.append(tuple(v))
    both = sorted(set(out[0]) & set(out[1]))
    if both:
        raise ConfigError("data.novel", list(out[1]),
                          f"classes disjoint from data.base {list(out[0])} (both hold {both})")
    return out[0], out[1]


def check_shots(shots, episodes: str = "queries") -> int:
    """K: an int >= 1 (>= 2 for ``episodes="shots"``: leave-one-out needs another shot)."""
    lo = 2 if episodes == "shots" else 1
    if isinstance(shots, bool) or not isinstance(shots, int) or not lo <= shots <= 100:
        why = " (leave-one-out shots need a second shot as support)" if lo == 2 else ""
        raise ConfigError("data.shots", shots, f"an int in {lo}..100 (K = 5 or 10){why}")
    return shots


def layout(n: int, size: int, hw: tuple[int, int], min_digits: int, max_digits: int,
           seed: int, tries: int = 200):
    """A seeded layout of non-overlapping digit windows (the rejection sampling of
    :func:`~crossdistill.data.detection.separated_plan`, with a floor ``min_digits``; the
    tries are drawn as tensors and read as Python ints, ~15x faster): ``count (n,)`` and the
    top-left corners ``top, left (n, max_digits)``. A canvas keeps fewer digits (at least
    one) if ``tries`` run out."""
    h, w = hw
    if max_digits * h * w > size * size:
        raise ConfigError("data.max_digits", max_digits, f"at most {size * size // (h * w)} "
                          f"digits of {h}x{w} fit on a {size}x{size} canvas without overlap")
    g = torch.Generator().manual_seed(int(seed))
    want = torch.randint(min_digits, max_digits + 1, (n,), generator=g).tolist()
    rs = torch.randint(0, size - h + 1, (n, max_digits, tries), generator=g).tolist()
    cs = torch.randint(0, size - w + 1, (n, max_digits, tries), generator=g).tolist()
    top = torch.zeros(n, max_digits, dtype=torch.long)
    left = torch.zeros(n, max_digits, dtype=torch.long)
    count = torch.zeros(n, dtype=torch.long)
    for i, k in enumerate(want):
        placed: list[tuple[int, int]] = []
        for j in range(k):
            for r, c in zip(rs[i][j], cs[i][j]):
                if all(abs(r - r2) >= h or abs(c - c2) >= w for r2, c2 in placed):
                    placed.append((r, c))
                    break
        count[i] = len(placed)
        for j, (r, c) in enumerate(placed):
            top[i, j], left[i, j] = r, c
    return count, top, left


def crop_digits(images: torch.Tensor, crop: int | None) -> torch.Tensor:
    """The central ``crop x crop`` window of each digit image (MNIST centres its digits in a
    20x20 box of the 28x28 frame, so 20 keeps nearly all ink and lets three digits share a
    56x56 canvas); ``None`` keeps the frame."""
    if crop is None:
        return images
    h, w = images.shape[-2:]
    if isinstance(crop, bool) or not isinstance(crop, int) or not 1 <= crop <= min(h, w):
        raise ConfigError("data.crop", crop, f"an int in 1..{min(h, w)} or None")
    r, c = (h - crop) // 2, (w - crop) // 2
    return images[..., r : r + crop, c : c + crop]


def class_canvases(images: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, pool,
                   size: int, max_digits: int, seed: int, threshold: float = 0.5,
                   min_digits: int = 1):
    """Raw canvases ``(n, 1, S, S)`` in [0, 1] and binary masks ``(n, S, S)`` (long) of
    ``targets[i]``: canvas ``i`` holds ``min_digits``..``max_digits`` non-overlapping
    digits, the first of class ``targets[i]``, the others drawn from the classes ``pool``.
    A pure function of its arguments (``seed`` fixes layout and digits)."""
    images, labels = torch.as_tensor(images), torch.as_tensor(labels)
    targets = torch.as_tensor(targets, dtype=torch.long)
    n = len(targets)
    hw = tuple(images.shape[-2:])
    if hw[0] > size or hw[1] > size:
        raise ConfigError("data.size", size, f"at least the digit size {hw[0]}x{hw[1]}")
    by_class = {int(c): (labels == int(c)).nonzero()[:, 0] for c in set(targets.tolist())
                | {int(c) for c in pool}}
    empty = [c for c, ids in by_class.items() if not len(ids)]
    if empty:
        raise ConfigError("data.classes", empty, "digits that the source split holds")
    count, top, left = layout(n, size, hw, min_digits, max_digits, seed)
    g = torch.Generator().manual_seed(int(seed) * 31 + 1)
    pool_ids = torch.cat([by_class[int(c)] for c in pool])
    src = pool_ids[torch.randint(len(pool_ids), (n, max_digits), generator=g)]
    pick = torch.rand(n, generator=g)
    for c in targets.unique().tolist():
        rows = (targets == c).nonzero()[:, 0]
        ids = by_class[c]
        src[rows, 0] = ids[(pick[rows] * len(ids)).long().clamp_max(len(ids) - 1)]
    canvas, seg, _, _ = paste(images, labels, (count, src, top, left), size, threshold)
    return canvas, (seg == (targets + 1).view(-1, 1, 1)).long()


@functools.lru_cache(maxsize=8)
def _norm_stats(root, crop, size: int, max_digits: int, threshold: float, min_digits: int):
    """Mean and std of a fixed reference set: NORM_CANVASES train canvases, seed 0, targets
    cycling over the ten digits, any digit as distractor (cached: a pure function)."""
    train = _digits("train", root, crop)
    targets = torch.arange(NORM_CANVASES) % 10
    ref, _ = class_canvases(train[0], train[1], targets, range(10), size, max_digits, 0,
                            threshold, min_digits)
    return float(ref.mean()), float(ref.std())


@functools.lru_cache(maxsize=6)
def _digits(split: str, root, crop):
    """Raw (cropped) digit images and labels of an MNIST split (cached; never mutated)."""
    from . import load

    src = load("mnist", split, root=root, normalize=False)
    return crop_digits(src.x, crop), src.y


@functools.lru_cache(maxsize=8)
def _queries(split, root, crop, n, classes, pool, seed, **kw):
    """The query canvases of a split (cached: the same for every support set drawn)."""
    targets = torch.tensor(classes)[torch.arange(n) % len(classes)]
    return class_canvases(*_digits(split, root, crop), targets, pool, seed=seed, **kw)


def support_bank(classes, shots: int, train, *, size: int = 56, max_digits: int = 3,
                 min_digits: int = 2, support_seed: int = 0, threshold: float = 0.5,
                 pool=None):
    """The few-shot task's shots: raw canvases ``(C, K, 1, S, S)`` and masks ``(C, K, S, S)``
    (long) of each class of ``classes``, from the *train* digits ``train = (images,
    labels)``, seeded by ``support_seed`` only (the same shots whatever split the queries
    come from)."""
    classes = tuple(classes)
    targets = torch.tensor(classes).repeat_interleave(shots)
    seed = int(support_seed) * 1_000_003 + _SUPPORT_SALT
    x, m = class_canvases(train[0], train[1], targets, classes if pool is None else pool,
                          size, max_digits, seed, threshold, min_digits)
    c = len(classes)
    return x.view(c, shots, 1, size, size), m.view(c, shots, size, size)


def fewshot_dataset(
    split: str,
    n: int | None = None,
    *,
    role: str = "novel",
    episodes: str = "queries",
    shots: int = 5,
    base=BASE,
    novel=NOVEL,
    distractors: str = "role",
    root: str | None = None,
    size: ImgSize = 56,
    max_digits: Depth = 3,
    min_digits: Depth = 2,
    crop: int | None = 20,
    seed: int = 0,
    support_seed: int = 0,
    threshold: Prob = 0.5,
    normalize: bool = True,
) -> Dataset:
    """Episodes of split ``split`` (module doc): ``n`` queries of the ``role`` classes, or
    with ``episodes="shots"`` the leave-one-out shots of the novel task (``n`` None).
    Canvases hold ``min_digits``..``max_digits`` digits (the target and distractors), each
    the central ``crop`` x ``crop`` window of an MNIST image."""
    from . import SPLITS

    if split not in SPLITS:
        raise ConfigError("data.split", split, f"allowed: {', '.join(SPLITS)}")
    if role not in ROLES:
        raise ConfigError("data.role", role, f"one of {', '.join(ROLES)}")
    if episodes not in EPISODES:
        raise ConfigError("data.episodes", episodes, f"one of {', '.join(EPISODES)}")
    if distractors not in DISTRACTORS:
        raise ConfigError("data.distractors", distractors, f"one of {', '.join(DISTRACTORS)}")
    base, novel = check_classes(base, novel)
    shots = check_shots(shots, episodes)
    size, max_digits = _check_int("data.size", size), _check_int("data.max_digits", max_digits)
    min_digits = _check_int("data.min_digits", min_digits)
    if crop is not None and (isinstance(crop, bool) or not isinstance(crop, int)
                             or not 1 <= crop <= 28):
        raise ConfigError("data.crop", crop, "an int in 1..28 (the MNIST frame) or None")
    if min_digits > max_digits:
        raise ConfigError("data.min_digits", min_digits, f"at most max_digits ({max_digits})")
    if isinstance(support_seed, bool) or not isinstance(support_seed, int) or support_seed < 0:
        raise ConfigError("data.support_seed", support_seed, "an int >= 0")
    classes = base if role == "base" else novel
    pool = classes if distractors == "role" else tuple(range(10))
    c = len(classes)
    kw = dict(size=size, max_digits=max_digits, min_digits=min_digits, threshold=threshold)
    if episodes == "shots" and role == "base":
        raise ConfigError("data.role", role, "novel for episodes 'shots' (the few-shot task's "
                          "own support set)")
    if episodes == "shots" and n is not None and n != shots * c:
        raise ConfigError("data.n", n, f"None for episodes 'shots' (the {shots} x {c} shots "
                          "are the rows)")
    train = _digits("train", root, crop)
    if episodes == "shots":
        xs, ms = support_bank(classes, shots, train, support_seed=support_seed, pool=pool, **kw)
        image, mask = xs.reshape(c * shots, 1, size, size), ms.reshape(c * shots, size, size)
        cls = torch.tensor(classes).repeat_interleave(shots)
        others = torch.tensor([[j for j in range(shots) if j != i] for i in range(shots)])
        rows = torch.arange(c).repeat_interleave(shots)
        loo = others.repeat(c, 1)  # (C K, K - 1): the other shots of the row's class
        sup_x, sup_m = xs[rows[:, None], loo], ms[rows[:, None], loo]
        source = f"mnist/train (the {shots} shots of each class, support_seed {support_seed})"
    else:
        n = _check_int("data.n", n if n is not None else SIZES[split])
        digits = train if split == "train" else _digits(split, root, crop)
        split_seed = int(seed) * 1_000_003 + SPLITS.index(split)
        cls = torch.tensor(classes)[torch.arange(n) % c]
        image, mask = (v.clone() for v in _queries(split, root, crop, n, classes, pool,
                                                    split_seed, **kw))
        if role == "novel":
            xs, ms = support_bank(classes, shots, train, support_seed=support_seed, pool=pool,
                                  **kw)
            pos = torch.arange(n) % c
            sup_x, sup_m = xs[pos], ms[pos]
            source = (f"queries mnist/{split}; shots mnist/train (support_seed "
                      f"{support_seed}, shared by every query of a class)")
        else:
            sx, sm = class_canvases(*digits, cls.repeat_interleave(shots), pool,
                                    seed=split_seed * 7 + _SUPPORT_SALT, **kw)
            sup_x = sx.view(n, shots, 1, size, size)
            sup_m = sm.view(n, shots, size, size)
            source = f"queries and their own supports from mnist/{split}"
    info = {}
    if normalize:
        mean, std = _norm_stats(root, crop, size, max_digits, threshold, min_digits)
        image, sup_x = (image - mean) / std, (sup_x - mean) / std
        info.update(mean=mean, std=std)
    info.update(
        construction=f"{size}x{size} canvases of {min_digits}..{max_digits} non-overlapping "
        f"MNIST digits (central {crop or 'full'} crops); {shots}-shot {role} episodes "
        f"({episodes}), classes {list(classes)}, distractors {distractors}; mask 1 = ink of "
        f"the target digit (> {threshold})",
        source=source, role=role, episodes=episodes, shots=shots, base=list(base),
        novel=list(novel), classes=list(classes), distractors=distractors, size=size,
        max_digits=max_digits, min_digits=min_digits, crop=crop, seed=seed,
        support_seed=support_seed, threshold=threshold, root=root, img_size=size,
        num_classes=2,
    )
    return Dataset(
        {"image": image.contiguous(), "mask": mask, "cls": cls,
         "support_image": sup_x.contiguous(), "support_mask": sup_m.float().contiguous(),
         "idx": torch.arange(len(cls))},
        {"image": "image", "mask": "label_map", "cls": "value", "support_image": "value",
         "support_mask": "value", "idx": "id"},
        name="mnist-fewshot", split=split, num_classes=2, info=info,
    )


@DATASETS.register(
    "fewshot-canvas",
    description="few-shot segmentation episodes on 56x56 digit canvases: base digits 0-4, "
    "novel 5-9 held out; query + K support canvases with binary masks of one class",
    splits=True,
    task="segmentation",
)
def _fewshot_canvas(split, root=None, split_seed=0, n=None, **params):
    if isinstance(n, dict):
        n = n[split]
    return fewshot_dataset(split, n, root=root, seed=split_seed, **params)
