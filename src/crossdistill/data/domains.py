"""A second domain pair for cross-domain distillation and adaptation: MNIST (source,
labelled) -> scikit-learn digits (target, labels for evaluation only).

The target is brought to the source's format, and nothing more, so the domain gap is the
data's own (8x8 scans of thick pen strokes vs MNIST's pen strokes scanned finely): each 8x8
digit (raw 0..16 scaled to [0, 1]) is upsampled bilinearly into MNIST's frame, each image is
rescaled so its brightest pixel is 1 (MNIST digits peak at full intensity), and both domains
are standardised with the *source* train split's mean and std: one input pipeline, as a
deployed model would have. ``target_frame`` says where the digit goes: ``"mnist"`` (default)
a 20x20 box centred in the 28x28 frame with 4 blank pixels each side, which is how MNIST
itself was made (NIST digits size-normalised to 20x20, then centred); ``"fill"`` the whole
28x28 frame, a larger gap. Measured here with the zoo ``bida`` ViT trained on 2,000 MNIST
images: target accuracy 15 % with ``"fill"`` (near chance: the digits are 40 % larger than
anything the source showed) against 27 % with ``"mnist"``.

:func:`domain_splits` returns the two domains of one split; :func:`mnist_digits` pairs
them sample by sample for models or losses that see both at once (registered as the
``mnist_digits`` data source). Pairs are arbitrary across domains (the classes of a
pair need not match), redrawn from ``pair_seed``.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .dataset import IGNORE_INDEX, Dataset

SOURCE_LIMIT = {"train": 2000, "val": 360, "test": 360}  # target splits: 1,077 / 360 / 360
FRAMES = {"mnist": (20, 4), "fill": (28, 0)}  # target_frame -> (digit size, padding)
SPLIT_OFFSET = 1_000_000  # idx = position + offset * split index: ids unique across splits


def _limit(limit, split: str, field: str) -> int | None:
    n = limit.get(split) if isinstance(limit, dict) else limit
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(field, limit, "a positive int, a {split: int} dict or null (all)")
    return n


def domain_splits(
    split: str,
    *,
    root: str | None = None,
    split_seed: int = 0,
    limit=None,
    target_limit=None,
    target_frame: str = "mnist",
) -> tuple[Dataset, Dataset]:
    """``(source, target)`` of ``split``: source = MNIST ``{x, y, idx}`` (28x28, standardised
    with its train mean/std, as ``load("mnist")``), target = sklearn digits
    ``{x, target_y, idx}`` prepared as the module docstring says. The target's labels sit
    under ``target_y`` (not ``y``), so a task reading ``y`` cannot train on them.
    ``limit`` / ``target_limit``: stratified subsets (an int or ``{split: int}``; default
    source 2,000 / 360 / 360, target all: 1,077 / 360 / 360). ``target_frame``: ``"mnist"``
    or ``"fill"`` (module docstring)."""
    from . import SPLITS, load

    if split not in SPLITS:
        raise ConfigError("data.split", split, f"allowed: {', '.join(SPLITS)}")
    if target_frame not in FRAMES:
        raise ConfigError("data.target_frame", target_frame, f"one of {', '.join(FRAMES)}")
    n_src = _limit(SOURCE_LIMIT if limit is None else limit, split, "data.limit")
    n_tgt = _limit(target_limit, split, "data.target_limit")
    source = load("mnist", split, root=root, split_seed=split_seed, limit=n_src)
    mean, std = source.info["mean"], source.info["std"]
    size, pad = FRAMES[target_frame]
    raw = load("digits", split, split_seed=split_seed, limit=n_tgt, img_size=size,
               normalize=False)
    x = raw.x / raw.x.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    x = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    target = Dataset(
        {"x": ((x - mean) / std).contiguous(), "target_y": raw.y, "idx": raw.idx},
        {"x": "image", "target_y": "label"},
        name="digits-28",
        split=split,
        num_classes=10,
        info={
            "construction": f"sklearn digits, bilinear 8x8 -> {size}x{size}, padded by {pad} "
            "to 28x28, per-image max -> 1, standardised with the MNIST train mean/std",
            "target_frame": target_frame,
            "mean": mean,
            "std": std,
            "split_seed": split_seed,
        },
    )
    return source, target


def balanced_pairs(n_source: int, n_target: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(source_ids, target_ids)`` of ``max(n_source, n_target)`` pairs: the larger
    side in order (each sample once), the smaller side as concatenated random permutations
    cut to length (each sample ``floor`` or ``ceil`` of ``N / n`` times), so every sample of
    both domains is used and none is over-weighted."""
    g = torch.Generator().manual_seed(int(seed))
    n = max(n_source, n_target)

    def tiled(m: int) -> torch.Tensor:
        reps = -(-n // m)
        return torch.cat([torch.randperm(m, generator=g) for _ in range(reps)])[:n]

    if n_source >= n_target:
        return torch.arange(n), tiled(n_target)
    return tiled(n_source), torch.arange(n)


def mnist_digits(
    split: str,
    *,
    root: str | None = None,
    split_seed: int = 0,
    pair_seed: int = 0,
    limit=None,
    target_limit=None,
    train_target_labels: bool = False,
    target_frame: str = "mnist",
) -> Dataset:
    """Source and target samples paired: keys ``source`` (MNIST image), ``y`` (its label),
    ``target`` (a digits image), ``target_y`` (its label), ``source_idx`` / ``target_idx``
    (the ids in each domain) and ``idx``. Pairing: :func:`balanced_pairs`, seeded by
    ``pair_seed`` and the split.

    Target labels are for evaluation only: on the train split ``target_y`` is -100 (no
    label) unless ``train_target_labels``. Target accuracy: a classification task with
    ``target: target_y`` and model inputs ``[target]``, or, beside the source accuracy of a
    model reading ``source``, the view ``{replace: {source: target, y: target_y}}``."""
    from . import SPLITS

    if not isinstance(train_target_labels, bool):
        raise ConfigError("data.train_target_labels", train_target_labels, "true or false")
    source, target = domain_splits(
        split, root=root, split_seed=split_seed, limit=limit, target_limit=target_limit,
        target_frame=target_frame,
    )
    si, ti = balanced_pairs(len(source), len(target), pair_seed * 1_000_003 + SPLITS.index(split))
    target_y = target["target_y"][ti].clone()
    if split == "train" and not train_target_labels:
        target_y.fill_(IGNORE_INDEX)
    n = len(si)
    return Dataset(
        {
            "source": source.x[si],
            "y": source.y[si],
            "target": target.x[ti],
            "target_y": target_y,
            "source_idx": source.idx[si],
            "target_idx": target.idx[ti],
            "idx": torch.arange(n) + SPLIT_OFFSET * SPLITS.index(split),
        },
        {
            "source": "image",
            "y": "label",
            "target": "image",
            "target_y": "label",
            "source_idx": "id",
            "target_idx": "id",
        },
        name="mnist-digits",
        split=split,
        num_classes=10,
        info={
            "construction": f"MNIST {split} (source) paired with sklearn digits {split} "
            f"(target, 28x28) by balanced random pairs (pair seed {pair_seed})",
            "source": {"n": len(source), **source.info},
            "target": {"n": len(target), **target.info},
            "pair_seed": pair_seed,
            "train_target_labels": train_target_labels,
        },
    )
