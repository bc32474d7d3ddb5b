"""A memo of a frozen text encoder: each distinct text is embedded once.

A frozen text tower (the CLIP-style teacher's all-MiniLM-L6-v2, ``text_trainable: false``) is a
fixed function of the token ids, so its pooled output for a caption never changes during
training. :class:`TextEmbedCache` keys that output by the caption's *attended* token ids
(the ids where the mask is 1: padding length does not matter) and embeds each distinct key
once, in batches, with the encoder; :class:`CachedTextTower` is a drop-in for
:class:`~crossdistill.models.dual.TextTower` (same ``forward(ids, mask)``, same ``proj``)
that reads the cache and applies its own trainable projection, so a
:class:`~crossdistill.models.dual.DualEncoder` built on it trains only its image tower and
projections, and its weights load into the same dual encoder built on the real tower
(``strict=False``: everything but ``text.encoder.*``).

The table lives outside ``state_dict`` (its size depends on what was seen); save it with
:meth:`TextEmbedCache.save` (safetensors) and reload it with :meth:`TextEmbedCache.load`,
with or without the encoder. A cache without an encoder answers only what it holds and
raises a :class:`~crossdistill.errors.ConfigError` naming the first missing text otherwise.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import ConfigError


def _keys(ids: Tensor, mask: Tensor | None) -> list[tuple[int, ...]]:
    rows = ids.tolist()
    if mask is None:
        return [tuple(r) for r in rows]
    return [tuple(i for i, m in zip(r, mr) if m) for r, mr in zip(rows, mask.tolist())]


class TextEmbedCache:
    """``encoder``: a module ``(ids, mask) -> (N, hidden)`` (a frozen
    :class:`~crossdistill.models.dual.TextTower` whose ``proj`` is the identity, or None for a
    read-only cache); ``name`` identifies encoder + tokenizer (saved with the table and
    checked on load); ``hidden``: the embedding width (from the encoder's config if given)."""

    def __init__(self, encoder: nn.Module | None = None, *, name: str = "text",
                 hidden: int | None = None, batch_size: int = 256):
        if encoder is not None:
            if any(p.requires_grad for p in encoder.parameters()):
                raise ConfigError("text.cache.encoder", type(encoder).__name__,
                                  "a frozen encoder (requires_grad false): a trainable one "
                                  "changes, and a cache of it would be stale")
            if hidden is None:
                cfg = getattr(getattr(encoder, "encoder", encoder), "config", None)
                hidden = getattr(cfg, "hidden_size", None)
        if hidden is None:
            raise ConfigError("text.cache.hidden", None, "the encoder's output width")
        self.encoder, self.name, self.hidden = encoder, str(name), int(hidden)
        self.batch_size = int(batch_size)
        self.index: dict[tuple[int, ...], int] = {}
        self.table = torch.zeros(0, self.hidden)
        self.calls = 0  # encoder forwards so far (tests: each text embedded once)

    def __len__(self) -> int:
        return len(self.index)

    @torch.no_grad()
    def _encode(self, keys: list[tuple[int, ...]]) -> None:
        if self.encoder is None:
            raise ConfigError("text.cache", list(keys[0]),
                              f"token ids held by the cache {self.name!r} ({len(self)} texts; "
                              "it has no encoder to embed new ones: fill it first)")
        was = self.encoder.training
        self.encoder.eval()
        out = []
        try:
            for i in range(0, len(keys), self.batch_size):
                chunk = keys[i:i + self.batch_size]
                n = max(len(k) for k in chunk)
                ids = torch.zeros(len(chunk), max(n, 1), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for j, k in enumerate(chunk):
                    ids[j, :len(k)] = torch.tensor(k, dtype=torch.long)
                    mask[j, :len(k)] = 1
                out.append(self.encoder(ids, mask).float().cpu())
                self.calls += 1
        finally:
            self.encoder.train(was)
        emb = torch.cat(out)
        if emb.shape[-1] != self.hidden:
            raise ConfigError("text.cache.hidden", self.hidden,
                              f"the encoder's output width ({emb.shape[-1]})")
        base = len(self.index)
        for j, k in enumerate(keys):
            self.index[k] = base + j
        self.table = torch.cat([self.table, emb])

    def fill(self, ids: Tensor, mask: Tensor | None = None) -> TextEmbedCache:
        """Embed every text of ``ids`` (any leading dims, tokens last) not held yet."""
        flat_ids = ids.reshape(-1, ids.shape[-1])
        flat_mask = mask.reshape(-1, mask.shape[-1]) if mask is not None else None
        new = list(dict.fromkeys(k for k in _keys(flat_ids, flat_mask) if k not in self.index))
        if new:
            self._encode(new)
        return self

    def lookup(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(..., hidden)`` embeddings of ``ids`` ``(..., L)``; texts not held are embedded
        first (or raise, without an encoder)."""
        if ids.shape[-1] == 0:
            raise ConfigError("text.cache.ids", tuple(ids.shape), "at least one token")
        lead = ids.shape[:-1]
        flat_ids = ids.reshape(-1, ids.shape[-1])
        flat_mask = mask.reshape(-1, mask.shape[-1]) if mask is not None else None
        keys = _keys(flat_ids, flat_mask)
        missing = list(dict.fromkeys(k for k in keys if k not in self.index))
        if missing:
            self._encode(missing)
        rows = torch.tensor([self.index[k] for k in keys], dtype=torch.long)
        return self.table[rows].to(ids.device).view(*lead, self.hidden)

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(self.index, key=self.index.get)
        n = max((len(k) for k in keys), default=1)
        ids = torch.full((len(keys), n), -1, dtype=torch.long)
        for j, k in enumerate(keys):
            ids[j, :len(k)] = torch.tensor(k, dtype=torch.long)
        save_file({"ids": ids, "table": self.table.contiguous()}, str(path),
                  metadata={"name": self.name, "hidden": str(self.hidden)})
        return path

    @classmethod
    def load(cls, path: str | Path, encoder: nn.Module | None = None,
             name: str | None = None) -> TextEmbedCache:
        """The cache saved at ``path``; ``name``, if given, must be the one it was saved with
        (another encoder or tokenizer would give other embeddings)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.exists():
            raise ConfigError("text.cache.path", str(path), "an existing cache file")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if name is not None and meta.get("name") != name:
            raise ConfigError("text.cache.name", meta.get("name"),
                              f"{name!r} (the cache was made by another encoder/tokenizer)")
        data = load_file(str(path))
        cache = cls(encoder, name=meta.get("name", "text"), hidden=int(meta["hidden"]))
        cache.table = data["table"].float()
        for j, row in enumerate(data["ids"].tolist()):
            cache.index[tuple(i for i in row if i >= 0)] = j
        return cache


def cache_name(*parts) -> str:
    """A short stable name from the parts that define an encoder + tokenizer."""
    raw = json.dumps([str(p) for p in parts])
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


class CachedTextTower(nn.Module):
    """A :class:`~crossdistill.models.dual.TextTower` stand-in over a :class:`TextEmbedCache`:
    ``forward(ids, mask) = proj(cache.lookup(ids, mask))``; ``proj`` is ``Linear(hidden,
    dim)`` (or the identity without ``dim``). The cache is not a submodule: no encoder
    weights in ``state_dict`` or in the optimiser."""

    trainable = False

    def __init__(self, cache: TextEmbedCache, dim: int | None = None):
        super().__init__()
        if not isinstance(cache, TextEmbedCache):
            raise ConfigError("text.cache", type(cache).__name__, "a TextEmbedCache")
        self.__dict__["cache"] = cache
        self.proj = nn.Linear(cache.hidden, dim) if dim else nn.Identity()

    @property
    def encoder(self):
        """What :class:`~crossdistill.models.dual.DualEncoder` reads of a tower's encoder (its
        ``config.hidden_size``, to add the projection when ``dim`` was not given)."""
        from types import SimpleNamespace

        return SimpleNamespace(config=SimpleNamespace(hidden_size=self.cache.hidden))

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        e = self.cache.lookup(ids, mask)
        w = next(self.proj.parameters(), None)
        return self.proj(e.to(w.dtype if w is not None else e.dtype))
