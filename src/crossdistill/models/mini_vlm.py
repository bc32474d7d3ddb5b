"""A LLaVA-style multimodal LM in miniature: image encoder -> projector -> tiny GPT.

The LLaVA-1.5 layout (Liu et al., "Improved Baselines with Visual Instruction Tuning", 2024)
that LLaVA-KD's teacher and student share (Cai et al., "LLaVA-KD: A Framework of Distilling
Multimodal Large Language Models", 2024): a vision encoder (SigLIP there; here a zoo CNN or
ViT, frozen by default) gives ``N`` visual tokens (a feature map flattened, or patch tokens),
a two-layer MLP projector (Linear-GELU-Linear, LLaVA-1.5's ``mlp2x_gelu``) maps them to the
LM's width, and a causal transformer (:class:`TinyGPT`: GPT-2's pre-norm blocks, learned
positions, tied input / output embeddings) reads ``[visual tokens; text tokens]``.

``MiniVLM.forward(x, input_ids)`` returns the logits at the *text* positions, ``(B, T, V)``,
aligned with the batch's ``labels`` (see :mod:`crossdistill.data.digit_vqa`); without ``x``
the text is read alone at the positions it would have after the image (text-only
pre-training of the LM). Taps:

- ``projector``: the projected visual tokens ``(B, N, D)`` (the LM's visual inputs);
- ``visual_logits``: the LM's output distributions at the ``N`` visual positions
  ``(B, N, V)`` (an identity module the forward passes them through);
- ``llm.blocks.<i>``: hidden states of every position ``(B, N + T, D)``;
- ``logits``: the text positions' logits (the adapter's output).

Training code never special-cases this model: which parts train in a stage is the
parameters' ``requires_grad`` (set by the method); a frozen vision encoder stays in eval mode
(its BatchNorm statistics never move) whatever ``train()`` is called with.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import ConfigError
from ..registry import MODELS
from ..schema import Count, Depth, ImgSize, Pos, Prob, Width
from .mlp import tag
from .vit import FeedForward


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (fused ``qkv``, output ``proj``)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        drop = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class GPTBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A small GPT over input *embeddings*: ``forward(embeds, start) -> logits`` with
    positions ``start .. start + L - 1``; :meth:`embed` gives the token embeddings."""

    def __init__(self, vocab_size: int, dim: int, depth: int, heads: int, max_len: int,
                 mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.max_len = max_len
        self.wte = nn.Embedding(vocab_size, dim)
        self.wpe = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(GPTBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.apply(_init)
        self.head.weight = self.wte.weight  # tied, as in GPT-2

    def embed(self, ids: Tensor) -> Tensor:
        return self.wte(ids)

    def forward(self, embeds: Tensor, start: int = 0) -> Tensor:
        n = embeds.shape[1]
        if start + n > self.max_len:
            raise ConfigError("model.max_len", self.max_len,
                              f"at least {start + n} (visual tokens + text length)")
        pos = torch.arange(start, start + n, device=embeds.device)
        h = self.drop(embeds + self.wpe(pos))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


def _init(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


class VisionTokens(nn.Module):
    """An image model as a token encoder: the output of module ``path`` (a feature map
    ``(B, C, H, W)`` becomes ``H * W`` tokens ``(B, H * W, C)``; ``(B, N, C)`` passes), or,
    with ``path=None``, the model's ``tokens(x)`` without its class token (a zoo ViT)."""

    def __init__(self, model: nn.Module, path: str | None = None):
        super().__init__()
        self.model, self.path = model, path
        self._captured: Tensor | None = None
        if path is None:
            if not hasattr(model, "tokens"):
                raise ConfigError("model.vision_tap", None, "a module path of the vision model "
                                  "(it has no tokens() method)")
        else:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                names = ", ".join([n for n, _ in model.named_modules() if n][:12])
                raise ConfigError("model.vision_tap", path,
                                  f"a module of the vision model, e.g. {names}") from None
            # a bound method: a deep copy of the model re-binds it to the copy
            module.register_forward_hook(self._grab)

    def _grab(self, _module, _inputs, out) -> None:
        self._captured = out

    def forward(self, x: Tensor) -> Tensor:
        if self.path is None:
            return self.model.tokens(x)[:, 1:]
        self.model(x)
        out, self._captured = self._captured, None
        return out.flatten(2).transpose(1, 2) if out.dim() == 4 else out


class MiniVLM(nn.Module):
    """Vision tokens -> projector -> :class:`TinyGPT` (module docstring)."""

    def __init__(self, vision: VisionTokens, llm: TinyGPT, vision_dim: int,
                 num_visual: int, freeze_vision: bool = True):
        super().__init__()
        dim = llm.wte.embedding_dim
        self.vision = vision
        self.projector = nn.Sequential(nn.Linear(vision_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.llm = llm
        self.visual_logits = nn.Identity()
        self.num_visual = num_visual
        self.freeze_vision = freeze_vision
        if freeze_vision:
            self.vision.requires_grad_(False)
            self.vision.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_vision:
            self.vision.eval()
        return self

    def visual(self, x: Tensor) -> Tensor:
        """The projected visual tokens ``(B, N, D)``."""
        if self.freeze_vision:
            with torch.no_grad():
                v = self.vision(x)
        else:
            v = self.vision(x)
        return self.projector(v)

    def forward(self, x: Tensor | None = None, input_ids: Tensor | None = None) -> Tensor:
        if input_ids is None:
            raise ConfigError("student.inputs", "input_ids", "MiniVLM needs input_ids")
        text = self.llm.embed(input_ids)
        if x is None:  # text alone, at the positions it has after the image
            return self.llm(text, start=self.num_visual)
        v = self.visual(x)
        logits = self.llm(torch.cat([v, text], dim=1))
        self.visual_logits(logits[:, : v.shape[1]])
        return logits[:, v.shape[1]:]

    @torch.no_grad()
    def generate(self, x: Tensor, prompt: Tensor, max_new: int, eos: int = 0) -> Tensor:
        """Greedy decoding after ``prompt`` (B, P) (one length for the batch): the new tokens
        (B, max_new), ``-100`` after each sequence's first ``eos``."""
        was = self.training
        self.eval()
        ids, done = prompt, torch.zeros(len(prompt), dtype=torch.bool, device=prompt.device)
        out = []
        for _ in range(max_new):
            nxt = self(x, ids)[:, -1].argmax(-1)
            out.append(torch.where(done, torch.full_like(nxt, -100), nxt))
            done = done | (nxt == eos)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        self.train(was)
        return torch.stack(out, dim=1)


def build_vision(vision: str, vision_params: dict | None, in_channels: int, img_size,
                 vision_tap: str | None, weights: str | None = None) -> tuple[VisionTokens, int,
                                                                             int]:
    """``(VisionTokens, token width, number of tokens)`` of zoo model ``vision``."""
    from . import create

    if vision == "mini-vlm":
        raise ConfigError("model.vision", vision, "an image model of the zoo")
    params = {"num_classes": 10, "in_channels": in_channels, "img_size": img_size,
              **(vision_params or {})}
    model = create(vision, field="model.vision", **params)
    if weights is not None:
        from ..io import load_weights

        state = load_weights(weights, "model.vision_weights")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError("model.vision_weights", weights,
                              f"weights of the {vision} model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    enc = VisionTokens(model, vision_tap)
    hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    was = model.training
    model.eval()
    with torch.no_grad():
        tokens = enc(torch.zeros(1, in_channels, *hw))
    model.train(was)
    if tokens.dim() != 3:
        raise ConfigError("model.vision_tap", vision_tap,
                          f"a module giving a feature map or tokens (got {tuple(tokens.shape)})")
    return enc, tokens.shape[-1], tokens.shape[1]


@MODELS.register(
    "mini-vlm",
    family="vlm",
    description="LLaVA-style MLLM in miniature: zoo image encoder (frozen) -> MLP projector -> "
    "tiny GPT over [visual tokens; text]",
    paper="Liu et al., Improved Baselines with Visual Instruction Tuning (LLaVA-1.5), 2024",
)
def mini_vlm(
    *,
    vocab_size: Count = 57,
    dim: Width = 64,
    depth: Depth = 2,
    heads: Depth = 4,
    mlp_ratio: Pos = 4.0,
    max_len: Count = 64,
    dropout: Prob = 0.0,
    in_channels: Width = 1,
    img_size: ImgSize = 8,
    vision: str = "cnn",
    vision_params: dict | None = None,
    vision_tap: str | None = "stage2",
    vision_weights: str | None = None,
    freeze_vision: bool = True,
) -> nn.Module:
    """``vision`` a zoo image model (default a CNN with channels (16, 32): 8x8 digits give a
    4x4 map, 16 tokens of width 32) read at ``vision_tap``; ``vision_weights`` a safetensors
    file of its pre-trained weights; the GPT has ``depth`` blocks of width ``dim``."""
    for name, v in (("dim", dim), ("depth", depth), ("heads", heads), ("max_len", max_len),
                    ("vocab_size", vocab_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"model.{name}", v, "a positive integer")
    if dim % heads:
        raise ConfigError("model.heads", heads, f"must divide dim={dim}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError("model.dropout", dropout, "a float in [0, 1)")
    if vision == "cnn" and vision_params is None:
        vision_params = {"channels": (16, 32)}
    enc, width, n = build_vision(vision, vision_params, in_channels, img_size, vision_tap,
                                 vision_weights)
    if n >= max_len:
        raise ConfigError("model.max_len", max_len, f"more than the {n} visual tokens")
    llm = TinyGPT(vocab_size, dim, depth, heads, max_len, float(mlp_ratio), float(dropout))
    model = MiniVLM(enc, llm, width, n, freeze_vision=freeze_vision)
    return tag(model, family="vlm", stages=[f"llm.blocks.{i}" for i in range(depth)],
               feature_path="llm.head")
