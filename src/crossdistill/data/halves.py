"""H2 instance retrieval: the top half of a digit image against its own bottom half.

Each image of ``images`` (``mnist``: 28 x 28, halves 14 x 28; ``digits``: sklearn's 8 x 8,
halves 4 x 8) gives ``xa`` (the top ``H/2`` rows) and ``xb`` (the bottom ``H/2`` rows), with
its digit ``y`` and ``idx``. The split is exactly the classification source's
(:func:`crossdistill.data.load`: fixed, seeded by ``split_seed``, stratified, standardised
with the train split's mean and std) and is cut afterwards, so no image is in two splits;
``limit`` keeps a stratified subset of the split (toy runs, a 1k test gallery). Query ``i``
(``xa[i]``) matches gallery item ``i`` (``xb[i]``) only: many other images are the same digit,
so this is instance retrieval, not class retrieval.

:func:`candidate_lists` turns a split into re-ranking lists for cross-encoders (the
``rerank`` task): for each query, in both directions, the top ``k`` items of a fixed
first-stage retriever's ranking, and where among them the true match is (``-1``: not
retrieved, a miss whatever the re-ranker does).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..registry import DATASETS
from ..schema import Count, Seed
from .dataset import Dataset

IMAGES = ("mnist", "digits")


def cut(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top half, bottom half) of images (N, C, H, W), H even."""
    h = x.shape[-2]
    if x.dim() != 4 or h % 2:
        raise ConfigError("data.x", tuple(x.shape), "images (N, C, H, W) with an even H")
    return x[..., : h // 2, :].contiguous(), x[..., h // 2 :, :].contiguous()


def halves(split: str, *, images: str = "mnist", root=None, split_seed: int = 0,
           limit: int | None = None) -> Dataset:
    """Keys ``xa`` / ``xb`` (N, 1, H/2, W), ``y``, ``idx`` (module docstring)."""
    from . import SPLITS, load

    if images not in IMAGES:
        raise ConfigError("data.images", images, f"one of {', '.join(IMAGES)}")
    if split not in SPLITS:
        raise ConfigError("data.split", split, f"allowed: {', '.join(SPLITS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 10):
        raise ConfigError("data.limit", limit, "an integer >= 10 (a gallery for recall@10)")
    kw = {"root": root} if images == "mnist" else {}
    data = load(images, split, split_seed=split_seed, limit=limit, **kw)
    xa, xb = cut(data.x)
    return Dataset(
        {"xa": xa, "xb": xb, "y": data.y, "idx": data.idx},
        {"xa": "image", "xb": "image", "y": "label", "idx": "id"},
        name=f"{images}-halves", split=split, num_classes=data.num_classes,
        info={**data.info, "construction": f"{images} {split} images cut into top / bottom "
              "halves (query i matches gallery item i)", "images": images, "limit": limit},
    )


@torch.no_grad()
def candidate_lists(data: Dataset, emb_a: torch.Tensor, emb_b: torch.Tensor, k: int = 20,
                    similarity: str = "cosine") -> Dataset:
    """Re-ranking lists of ``data`` (a halves split) from a first-stage retriever's
    embeddings ``emb_a`` / ``emb_b`` (N, D) of its halves. Rows ``0..N-1``: top -> bottom
    (query ``xa[i]`` repeated over the list, candidates ``xb`` of the retriever's top ``k``);
    rows ``N..2N-1``: bottom -> top. Keys ``xa`` / ``xb`` (2N, k, C, h, w) aligned pairs,
    ``pos`` (2N,) the true match's place in the list (-1: not in it), ``dir`` (0 / 1), and
    ``idx``. ``info["first_stage_recall"]``: the share of lists holding their match."""
    n = len(data)
    if len(emb_a) != n or len(emb_b) != n:
        raise ConfigError("candidates.embeddings", (len(emb_a), len(emb_b)),
                          f"one embedding per sample of the split ({n})")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ConfigError("candidates.k", k, f"an integer in 1..{n} (the gallery size)")
    if similarity not in ("cosine", "dot"):
        raise ConfigError("candidates.similarity", similarity, "cosine or dot")
    qa, gb = emb_a.float(), emb_b.float()
    if similarity == "cosine":
        qa, gb = F.normalize(qa, dim=-1), F.normalize(gb, dim=-1)
    sim = qa @ gb.T
    a2b = sim.topk(k, dim=1).indices  # (N, k) gallery items per top half
    b2a = sim.T.topk(k, dim=1).indices  # (N, k) top halves per bottom half
    own = torch.arange(n)[:, None]
    xa, xb = data["xa"], data["xb"]
    lists_a = torch.cat([xa[:, None].expand(-1, k, -1, -1, -1), xa[b2a]])
    lists_b = torch.cat([xb[a2b], xb[:, None].expand(-1, k, -1, -1, -1)])
    hit = torch.cat([a2b == own, b2a == own])
    pos = torch.where(hit.any(1), hit.float().argmax(1), torch.full((2 * n,), -1))
    out = Dataset(
        {"xa": lists_a.contiguous(), "xb": lists_b.contiguous(), "pos": pos.long(),
         "dir": torch.cat([torch.zeros(n), torch.ones(n)]).long(),
         "idx": torch.cat([data["idx"], data["idx"]])},
        {"xa": "value", "xb": "value", "pos": "value", "dir": "value", "idx": "id"},
        name=f"{data.name}-rerank", split=data.split, num_classes=k,
        info={"construction": f"top-{k} lists of a first-stage retriever, both directions",
              "k": k, "first_stage_recall": float(hit.any(1).float().mean())},
    )
    return out


@DATASETS.register(
    "halves",
    description="MNIST or sklearn digits cut into top and bottom halves: instance retrieval "
    "of an image's bottom half from its top half and back (H2)",
    splits=True,
    task="retrieval",
)
def _halves(
    split,
    root: str | None = None,
    split_seed: Seed = 0,
    images: Literal["mnist", "digits"] = "mnist",
    limit: Count | None = None,
):
    return halves(split, images=images, root=root, split_seed=split_seed, limit=limit)
