"""Dual encoders: an image tower and a text tower embedding into one space (CLIP's shape).

``DualEncoder(image, text, dim)``: ``image`` is a zoo classifier whose classifier (its
``feature_path`` Linear) is replaced by a projection to ``dim`` (tap ``image.<feature_path>``),
``text`` a :class:`TextTower` (tap ``text_out``: one text embedding per
sample). ``forward(image, ids, mask)`` returns
``(image embedding, text embedding)``, unnormalised; the ``clip`` / ``affinity`` losses and
the retrieval task normalise. Text of shape (B, C, L) (several captions per image) is
embedded caption by caption and the unit embeddings averaged, so evaluation uses every
caption; training picks one caption per image with the ``pick_caption`` stage.

Text towers: :func:`minilm_tower` (the pretrained all-MiniLM-L6-v2, frozen or fine-tuned:
the CLIP-style teacher's text side) and :func:`bert_tower` (a small BERT from a config,
random init: a student's text side). Both pool by the mean over attended tokens, as
sentence-transformers does for MiniLM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import MODELS
from ..schema import Count, Depth, Width
from .mlp import replace_head, tag


class TextTower(nn.Module):
    """An HF encoder over token ids, mean-pooled over the attention mask, then ``proj``.

    The batch is cropped to its longest text (the last position any mask attends) before the
    encoder: exact, since masked attention and pooling give padding no weight, and a batch
    of short captions padded to ``max_tokens`` then costs its own length."""

    def __init__(self, encoder: nn.Module, dim: int | None = None, trainable: bool = True):
        super().__init__()
        self.encoder = encoder
        hidden = int(encoder.config.hidden_size)
        self.proj = nn.Linear(hidden, dim) if dim else nn.Identity()
        self.trainable = bool(trainable)
        self.checked = False
        if not trainable:
            for p in self.encoder.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.trainable:  # a frozen encoder stays in eval mode (no dropout)
            self.encoder.eval()
        return self

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None:
            mask = torch.ones_like(ids)
        if not self.checked:  # once: token ids from another tokenizer index out of range
            vocab = int(self.encoder.config.vocab_size)
            top = int(ids.max()) if ids.numel() else 0
            if top >= vocab or (ids.numel() and int(ids.min()) < 0):
                raise ConfigError("model.text", f"token id {top}", f"ids below the text "
                                  f"model's vocabulary of {vocab}: the data's tokenizer must "
                                  "be the text model's own")
            self.checked = True
        used = mask.ne(0).any(0).nonzero()
        n = int(used.max()) + 1 if used.numel() else 1
        ids, mask = ids[:, :n], mask[:, :n]
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.proj((h * m).sum(1) / m.sum(1).clamp_min(1e-9))


def minilm_tower(dim: int | None = None, trainable: bool = False) -> TextTower:
    """all-MiniLM-L6-v2 (6 layers, 384 wide) from the ``text`` extra, offline."""
    import os

    from transformers import AutoModel

    from ..text.minilm import minilm_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    enc = AutoModel.from_pretrained(str(minilm_path("model.text")), local_files_only=True)
    return TextTower(enc, dim, trainable)


def hf_tower(path, dim: int | None = None, trainable: bool = True) -> TextTower:
    """A user's Hugging Face encoder directory (``save_pretrained``: config, weights and
    its tokenizer, which the data must use: ``data.tokenizer: <the same path>``)."""
    from transformers import AutoModel

    from ..text.minilm import hf_dir

    p = hf_dir(path, "model.text", tokenizer=True, model=True)
    try:
        enc = AutoModel.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError("model.text", str(path), f"a loadable Hugging Face model ({err})") \
            from None
    if not hasattr(enc.config, "hidden_size"):
        raise ConfigError("model.text", str(path), "an encoder with a hidden_size")
    return TextTower(enc, dim, trainable)


def bert_tower(vocab_size: int = 30522, n_layer: int = 2, hidden: int = 128, heads: int = 2,
               max_tokens: int = 64, dim: int | None = None) -> TextTower:
    """A small BERT (random init from a config; MiniLM's vocabulary by default)."""
    from transformers import BertConfig, BertModel

    if hidden % heads:
        raise ConfigError("model.text_heads", heads, f"a divisor of text_hidden ({hidden})")
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=n_layer,
                     num_attention_heads=heads, intermediate_size=4 * hidden,
                     max_position_embeddings=max_tokens)
    return TextTower(BertModel(cfg), dim, trainable=True)


class DualEncoder(nn.Module):
    def __init__(self, image: nn.Module, text: TextTower, dim: int):
        super().__init__()
        replace_head(image, lambda head: nn.Linear(head.in_features, dim), "model.image")
        if isinstance(text.proj, nn.Identity):
            text.proj = nn.Linear(int(text.encoder.config.hidden_size), dim)
        self.image, self.text, self.dim = image, text, dim
        self.text_out = nn.Identity()  # the text embedding of each sample: the text tap
        self.image_tap, self.text_tap = f"image.{image.feature_path}", "text_out"

    def io(self, image="x", ids="caption_ids", mask="caption_mask") -> dict:
        return {"inputs": {"image": image, "ids": ids, "mask": mask}}

    def embed_text(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        if ids.dim() == 3:  # (B, C, L): the mean of the captions' unit embeddings
            b, c, n = ids.shape
            m = mask.reshape(b * c, n) if mask is not None else None
            e = F.normalize(self.text(ids.reshape(b * c, n), m), dim=-1)
            return self.text_out(e.view(b, c, -1).mean(1))
        return self.text_out(self.text(ids, mask))

    def forward(self, image: Tensor, ids: Tensor, mask: Tensor | None = None):
        return self.image(image), self.embed_text(ids, mask)


@MODELS.register(
    "dual-encoder",
    family="dual",
    description="an image tower (a zoo model) and a text tower (pretrained MiniLM or a small "
    "BERT) projected into one embedding space (CLIP-style)",
    paper="Radford et al., Learning Transferable Visual Models From Natural Language "
    "Supervision, 2021",
)
def dual_encoder(
    *,
    num_classes: Count = 10,
    in_channels: Width = 1,
    img_size: int = 28,
    image: str = "cnn",
    text: str = "bert",
    dim: Width = 128,
    text_layers: Depth = 2,
    text_hidden: Width = 128,
    text_heads: Width = 2,
    text_trainable: bool = True,
    max_tokens: Width = 64,
) -> nn.Module:
    """``image``: a zoo model name (built at ``img_size``); ``text``: ``"minilm"`` (the
    pretrained encoder, ``text_trainable`` false = frozen), ``"bert"`` (``text_layers`` x
    ``text_hidden``, MiniLM's vocabulary) or a user's Hugging Face encoder directory (with
    its tokenizer; the data's ``tokenizer`` is then that directory too). ``num_classes`` only
    sizes the image model's classifier, which the projection replaces."""
    from . import create

    if not isinstance(text, str) or (text not in ("minilm", "bert") and "/" not in text):
        raise ConfigError("model.text", text, "minilm, bert, or the path of a Hugging Face "
                          "encoder directory with its tokenizer")
    if image == "dual-encoder":
        raise ConfigError("model.image", image, "an image model of the zoo")
    img = create(image, num_classes=num_classes, in_channels=in_channels, img_size=img_size)
    if text == "minilm":
        tower = minilm_tower(trainable=text_trainable)
    elif text == "bert":
        tower = bert_tower(n_layer=text_layers, hidden=text_hidden, heads=text_heads,
                           max_tokens=max_tokens)
    else:
        tower = hf_tower(text, trainable=text_trainable)
    model = DualEncoder(img, tower, dim)
    stages = [f"image.{s}" for s in getattr(img, "stages", [])]
    return tag(model, family="dual", stages=stages, feature_path=model.image_tap)


class ZeroShotClassifier(nn.Module):
    """A dual encoder as a classifier over class prompts (CLIP's zero-shot use):
    ``forward(image) -> (B, num_classes)`` logits ``cos(image embedding, prompt embedding) /
    temperature`` for the prompts' ``classes``, ``-inf`` for every other class (so argmax,
    accuracy and CE of the classification task see only the candidates: unseen 5-9 say).
    ``prompt_ids`` / ``prompt_mask``: (K, L) token ids of one prompt per class, e.g. from
    :func:`crossdistill.data.captions.class_prompts`."""

    def __init__(self, dual: DualEncoder, prompt_ids: Tensor, prompt_mask: Tensor | None = None,
                 classes=None, num_classes: int = 10, temperature: float = 0.01):
        super().__init__()
        classes = list(range(len(prompt_ids)) if classes is None else classes)
        if len(classes) != len(prompt_ids) or not all(0 <= c < num_classes for c in classes):
            raise ConfigError("zero_shot.classes", classes,
                              f"one class in [0, {num_classes}) per prompt ({len(prompt_ids)})")
        self.dual, self.num_classes, self.temperature = dual, num_classes, float(temperature)
        self.register_buffer("prompt_ids", prompt_ids.clone(), persistent=False)
        mask = prompt_mask if prompt_mask is not None else torch.ones_like(prompt_ids)
        self.register_buffer("prompt_mask", mask.clone(), persistent=False)
        self.register_buffer("classes", torch.tensor(classes), persistent=False)

    def forward(self, image: Tensor) -> Tensor:
        img = F.normalize(self.dual.image(image), dim=-1)
        txt = F.normalize(self.dual.embed_text(self.prompt_ids, self.prompt_mask), dim=-1)
        out = img.new_full((len(img), self.num_classes), float("-inf"))
        out[:, self.classes] = img @ txt.T / self.temperature
        return out
