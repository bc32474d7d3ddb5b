"""Sentence-pair models: a cross-encoder that reads both sentences at once, and a bi-encoder
that embeds each alone and scores the pair by the cosine of the two embeddings.

Both return one score per pair as their logits, so a pair task (:mod:`crossdistill.tasks.
pair_auc`) and the distillation losses (:mod:`crossdistill.losses.pairs`) treat them alike:

- :class:`CrossEncoder`: a Hugging Face BERT over ``[CLS] a [SEP] b [SEP]`` (token types 0 / 1),
  its pooler (``tanh(W h_[CLS])``), dropout and a 1-logit linear head, as sentence-transformers'
  ``CrossEncoder(num_labels=1)`` builds it; ``forward(ids, mask, types) -> (B, 1)`` logits.
  The ``cross-encoder`` factory builds a small BERT from a config with MiniLM's vocabulary,
  randomly initialised or inheriting all-MiniLM-L6-v2's embeddings and a subset of its layers
  (leading channels and heads, TinyCLIP-style: :func:`crossdistill.methods.inherit.inherit_bert`).
- :class:`BiEncoder`: ``u = head(trunk(a))``, ``v = head(trunk(b))`` (one shared trunk and
  head: a siamese encoder), ``forward(a, b, a_mask, b_mask) -> {"logits": cos(u, v), "a": u,
  "b": v}`` (the cosine as ``(B, 1)``, like the cross-encoder's logit); taps ``a_out`` /
  ``b_out`` give ``u`` / ``v``. The trunk is a text tower over token ids
  (:class:`~crossdistill.models.dual.TextTower`), or ``None``: the inputs are then a frozen
  trunk's sentence embeddings, computed once (:func:`minilm_features`), and only the head
  trains. The head is ``identity`` (the trunk as it is), ``linear`` (initialised to the
  identity) or ``mlp`` (``x + W2 gelu(W1 x)``, ``W2 = 0`` at init): every trainable head
  starts as the trunk's own embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import MODELS
from ..schema import Depth, Fraction, Width
from .mlp import tag

HEADS = ("identity", "linear", "mlp")
TRUNKS = ("features", "minilm", "bert")
INHERIT = ("none", "minilm")


def _trim(ids: Tensor, *rest):
    """Cut the batch to its longest attended length (right padding): the same function,
    fewer positions."""
    mask = rest[0]
    if mask is None or mask.dim() != 2:
        return (ids, *rest)
    n = max(int(mask.sum(1).max()), 1)
    return (ids[:, :n], *[r[:, :n] if r is not None else None for r in rest])


class CrossEncoder(nn.Module):
    """A BERT over the pair, its pooler, dropout and a 1-logit head (module docstring)."""

    def __init__(self, encoder: nn.Module, dropout: float = 0.1):
        super().__init__()
        if getattr(encoder, "pooler", None) is None:
            raise ConfigError("model.encoder", type(encoder).__name__,
                              "a BertModel with its pooling layer (add_pooling_layer=True)")
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(int(encoder.config.hidden_size), 1)

    def io(self, ids: str = "pair_ids", mask: str = "pair_mask", types: str = "pair_types"):
        return {"inputs": {"ids": ids, "mask": mask, "types": types}}

    def forward(self, ids: Tensor, mask: Tensor | None = None,
                types: Tensor | None = None) -> Tensor:
        if mask is None:
            mask = torch.ones_like(ids)
        ids, mask, types = _trim(ids, mask, types)
        out = self.encoder(input_ids=ids, attention_mask=mask, token_type_ids=types)
        return self.head(self.dropout(out.pooler_output))


def make_head(kind: str, dim: int) -> nn.Module:
    if kind not in HEADS:
        raise ConfigError("model.head", kind, f"one of {', '.join(HEADS)}")
    if kind == "identity":
        return nn.Identity()
    if kind == "linear":
        lin = nn.Linear(dim, dim)
        with torch.no_grad():
            lin.weight.copy_(torch.eye(dim))
            lin.bias.zero_()
        return lin
    return ResidualMLP(dim)


class ResidualMLP(nn.Module):
    """``x + W2 gelu(W1 x)`` with ``W2 = 0`` at init (the identity function)."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden or dim), nn.Linear(hidden or dim, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


class BiEncoder(nn.Module):
    """A siamese sentence encoder scoring pairs by cosine (module docstring)."""

    def __init__(self, trunk: nn.Module | None, dim: int, head: str = "linear"):
        super().__init__()
        self.trunk = trunk
        self.head = make_head(head, dim)
        self.a_out, self.b_out = nn.Identity(), nn.Identity()  # the two sides' embeddings
        self.dim = int(dim)

    def io(self, a: str | None = None, b: str | None = None, a_mask: str | None = None,
           b_mask: str | None = None) -> dict:
        """The adapter: cached features ``emb_a`` / ``emb_b`` without a trunk, token ids
        ``a_ids`` / ``b_ids`` and masks with one."""
        if self.trunk is None:
            return {"inputs": {"a": a or "emb_a", "b": b or "emb_b"}}
        return {"inputs": {"a": a or "a_ids", "b": b or "b_ids", "a_mask": a_mask or "a_mask",
                           "b_mask": b_mask or "b_mask"}}

    def embed(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.trunk is not None:
            x = self.trunk(*_trim(x, mask))
        elif x.dim() != 2 or x.shape[-1] != self.dim:
            raise ConfigError("model.inputs", tuple(x.shape),
                              f"(B, {self.dim}) sentence embeddings (a bi-encoder without trunk)")
        return self.head(x)

    def forward(self, a: Tensor, b: Tensor, a_mask: Tensor | None = None,
                b_mask: Tensor | None = None) -> dict:
        u = self.a_out(self.embed(a, a_mask))
        v = self.b_out(self.embed(b, b_mask))
        cos = F.cosine_similarity(u.float(), v.float(), dim=-1)
        return {"logits": cos.unsqueeze(-1), "a": u, "b": v}


def _minilm_encoder():
    from .dual import minilm_tower

    return minilm_tower(trainable=True).encoder


POOLINGS = ("mean", "cls")


@torch.no_grad()
def minilm_features(texts: list[str], *, max_tokens: int = 32, views=("mean6",),
                    batch_size: int = 64) -> dict[str, Tensor]:
    """``{view: (N, 384)}`` unit sentence embeddings of ``texts`` from all-MiniLM-L6-v2 cut
    to ``max_tokens`` tokens (``[CLS] text [SEP]`` as the pair datasets encode a side). A view
    is a pooling and a hidden state: ``mean6`` (the mean over attended tokens of the last
    layer: MiniLM's own sentence embedding), ``cls6`` (the last layer's ``[CLS]`` state),
    ``mean0`` (the embedding layer), ... One forward serves every view; texts are batched by
    length (less padding, the same numbers)."""
    from transformers import AutoTokenizer

    from ..data.paraphrase import side_tensors
    from ..text.minilm import minilm_path

    parsed = []
    for v in views:
        pool = next((p for p in POOLINGS if isinstance(v, str) and v.startswith(p)), None)
        layer = v[len(pool):] if pool else ""
        if pool is None or not layer.isdigit() or not 0 <= int(layer) <= 6:
            raise ConfigError("features.views", v, "a pooling (mean, cls) and a MiniLM hidden "
                              "state 0..6, e.g. mean6")
        parsed.append((v, pool, int(layer)))
    if not parsed:
        raise ConfigError("features.views", list(views), "one or more views, e.g. mean6")
    tok = AutoTokenizer.from_pretrained(str(minilm_path("features")), local_files_only=True)
    enc = _minilm_encoder().eval()
    ids, mask = side_tensors(tok, list(texts), max_tokens)
    order = torch.argsort(mask.sum(1), descending=True)
    out = {v: torch.zeros(len(texts), int(enc.config.hidden_size)) for v, _, _ in parsed}
    for i in range(0, len(texts), batch_size):
        rows = order[i:i + batch_size]
        x, m = _trim(ids[rows], mask[rows])
        hs = enc(input_ids=x, attention_mask=m, output_hidden_states=True).hidden_states
        w = m.unsqueeze(-1).float()
        for v, pool, layer in parsed:
            h = hs[layer]
            e = h[:, 0] if pool == "cls" else (h * w).sum(1) / w.sum(1).clamp_min(1e-9)
            out[v][rows] = F.normalize(e, dim=-1)
    return out


@MODELS.register(
    "cross-encoder",
    family="dual",
    description="a sentence-pair cross-encoder: a small BERT (MiniLM's vocabulary; random or "
    "inheriting all-MiniLM-L6-v2's embeddings and layers) over [CLS] a [SEP] b [SEP], 1 logit",
    paper="Liu et al., Trans-Encoder: Unsupervised sentence-pair modelling through self- and "
    "mutual-distillations, ICLR 2022",
)
def cross_encoder(
    *,
    vocab_size: Width = 30522,
    layers: Depth = 2,
    hidden: Width = 128,
    heads: Depth = 4,
    ffn: Width | None = None,
    max_tokens: Width = 64,
    dropout: Fraction = 0.1,
    inherit: str = "none",
    inherit_layers: str = "interval_front",
    freeze_word_embeddings: bool = False,
) -> nn.Module:
    """``layers`` x ``hidden`` BERT (``heads`` heads, FFN ``ffn``, default ``4 * hidden``;
    ``max_tokens`` positions). ``inherit="minilm"``: start from all-MiniLM-L6-v2's embedding
    table, its layers ``inherit_layers`` (``interval_front``: 0, k, 2k, ...; ``front``: the
    first ones) and pooler, sliced to this width (needs its head size 32 and vocabulary).
    ``freeze_word_embeddings``: the token embedding table (30,522 rows: most of the
    parameters) is not trained, which saves its gradient and optimiser update each step."""
    from transformers import BertConfig, BertModel

    if inherit not in INHERIT:
        raise ConfigError("model.inherit", inherit, f"one of {', '.join(INHERIT)}")
    if hidden % heads:
        raise ConfigError("model.heads", heads, f"a divisor of hidden ({hidden})")
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=ffn or 4 * hidden,
                     max_position_embeddings=max_tokens, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout, type_vocab_size=2)
    model = CrossEncoder(BertModel(cfg, add_pooling_layer=True), dropout)
    if inherit == "minilm":
        from ..methods.inherit import inherit_bert

        kept = inherit_bert(_minilm_encoder(), model.encoder, inherit_layers)
        model.inherited = kept
    if freeze_word_embeddings:
        model.encoder.embeddings.word_embeddings.weight.requires_grad_(False)
    stages = [f"encoder.encoder.layer.{i}" for i in range(layers)]
    return tag(model, family="dual", stages=stages, feature_path="head")


@MODELS.register(
    "bi-encoder",
    family="dual",
    description="a siamese sentence encoder scoring pairs by cosine: cached frozen-trunk "
    "features, pretrained MiniLM or a small BERT, then an identity / linear / residual head",
    paper="Reimers & Gurevych, Sentence-BERT, EMNLP 2019",
)
def bi_encoder(
    *,
    trunk: str = "features",
    dim: Width = 384,
    head: str = "linear",
    trunk_trainable: bool = False,
    vocab_size: Width = 30522,
    layers: Depth = 2,
    hidden: Width = 128,
    heads: Depth = 2,
    max_tokens: Width = 64,
) -> nn.Module:
    """``trunk``: ``features`` (inputs are ``(B, dim)`` sentence embeddings of a frozen
    encoder), ``minilm`` (all-MiniLM-L6-v2 on token ids, frozen unless ``trunk_trainable``;
    ``dim`` 384) or ``bert`` (``layers`` x ``hidden``, random init; ``dim`` = ``hidden``)."""
    from .dual import bert_tower, minilm_tower

    if trunk not in TRUNKS:
        raise ConfigError("model.trunk", trunk, f"one of {', '.join(TRUNKS)}")
    tower = None
    if trunk == "minilm":
        tower, dim = minilm_tower(trainable=trunk_trainable), 384
    elif trunk == "bert":
        tower, dim = bert_tower(vocab_size, layers, hidden, heads, max_tokens), hidden
    model = BiEncoder(tower, dim, head)
    return tag(model, family="dual", stages=["a_out"], feature_path="a_out")
