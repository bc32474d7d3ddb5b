"""Seeded sampling from causal LMs: our own loop, so every draw comes from the caller's
``torch.Generator`` (HF ``generate`` draws from the global RNG, which DDP ranks and resumed
runs would not share).

A Hugging Face model decodes with its KV cache (``past_key_values``); any other model is
re-run on the whole prefix each step. Both paths give the same tokens (tested): the same
positions (``position_ids`` from the prompt's attention mask, so left-padded prompts work),
and one uniform per row and step whatever the path. ``temperature`` here is the *sampling*
temperature only; a loss's temperature is its own setting.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from ..errors import ConfigError


def context_length(model: nn.Module) -> int | None:
    """The positions a model can attend over (HF ``n_positions`` /
    ``max_position_embeddings``), or None when it does not say."""
    cfg = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def check_length(model: nn.Module, prompt_len: int, max_new_tokens: int,
                 field: str = "max_new_tokens", what: str = "model") -> None:
    """ConfigError unless ``prompt_len + max_new_tokens`` fits the model's context."""
    limit = context_length(model)
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise ConfigError(
            field, max_new_tokens,
            f"a prompt of {prompt_len} tokens + {max_new_tokens} new tokens = "
            f"{prompt_len + max_new_tokens} exceeds the {limit} positions of the {what} "
            f"(config n_positions); use max_new_tokens <= {max(limit - prompt_len, 0)}",
        )


def _check_settings(max_new_tokens, temperature, top_k, top_p) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise ConfigError("max_new_tokens", max_new_tokens, "an integer >= 1")
    if not 0.0 <= float(temperature) <= 1e3:
        raise ConfigError("temperature", temperature, "a number in [0, 1000]; 0 = greedy")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ConfigError("top_k", top_k, "an integer >= 0 (0 = no top-k filter)")
    if not 0.0 < float(top_p) <= 1.0:
        raise ConfigError("top_p", top_p, "a number in (0, 1] (1 = no nucleus filter)")


def filter_logits(z: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """``z`` (..., V) with tokens outside the top-k and outside the nucleus (the smallest
    set whose probability reaches ``top_p``; the most likely token always stays) at -inf."""
    if top_k and top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        zs, order = z.sort(dim=-1, descending=True)
        p = zs.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p  # mass before this token already reaches top_p
        z = z.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return z


def _draw(z: Tensor, temperature: float, generator) -> Tensor:
    """One token per row: argmax at temperature 0, else inverse-CDF sampling with exactly
    one uniform per row (so the RNG stream does not depend on the values)."""
    if temperature == 0:
        return z.argmax(-1)
    p = (z.float() / temperature).softmax(-1)
    dev = generator.device if generator is not None else z.device
    u = torch.rand(z.shape[0], 1, generator=generator, device=dev).to(z.device)
    cdf = p.cumsum(-1)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return idx.squeeze(-1).clamp_max(z.shape[-1] - 1)


def _logits(out) -> Tensor:
    z = getattr(out, "logits", out)
    if isinstance(z, (tuple, list)):
        z = z[0]
    return z


def _is_hf(model) -> bool:
    return bool(getattr(model, "is_hf", False)) or hasattr(model, "prepare_inputs_for_generation")


def _caller(model: nn.Module, cache: bool):
    """``call(ids, mask, pos, past) -> (last-position logits, past)`` for this model: an HF
    model with its KV cache (``cache`` in transformers 5, ``past_key_values`` before) and
    only the last position through the output layer; else the whole prefix each step."""
    if not _is_hf(model):
        return lambda ids, mask, pos, past: (_logits(model(ids))[:, -1], None)
    params = inspect.signature(model.forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def call(ids, mask, pos, past):
        kw = {name: past} if past is not None else {}
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=cache,
                    **kw, **last)
        return _logits(out)[:, -1], getattr(out, name, None) if cache else None

    if not cache:  # re-run the whole prefix: never hand a cache back
        return lambda ids, mask, pos, past: call(ids, mask, pos, None)
    return call


@torch.no_grad()
def sample(
    model: nn.Module,
    input_ids: Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Continue each prompt row of ``input_ids`` (B, P) by ``max_new_tokens`` tokens.

    Returns ``ids`` (B, P + N) and ``completion_mask`` (B, P + N) bool: True on generated
    tokens up to and including each row's first ``eos_token_id``; later positions hold
    ``pad_token_id`` (else the eos id, else 0). ``attention_mask`` (B, P) marks real prompt
    tokens (left padding). ``use_cache`` (default: for HF models) picks the KV-cache path.
    The model runs in eval mode without gradients and is put back in its mode after."""
    _check_settings(max_new_tokens, temperature, top_k, top_p)
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ConfigError("input_ids", tuple(input_ids.shape), "a (batch, prompt length >= 1) "
                          "tensor of token ids")
    check_length(model, input_ids.shape[1], max_new_tokens)
    pad = pad_token_id if pad_token_id is not None else eos_token_id if eos_token_id is not None \
        else 0
    cache = _is_hf(model) if use_cache is None else bool(use_cache)
    b, n_prompt = input_ids.shape
    mask = (torch.ones_like(input_ids) if attention_mask is None
            else attention_mask.to(input_ids.device).long())
    ids, done = input_ids, torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    alive = torch.zeros(b, 0, dtype=torch.bool, device=input_ids.device)
    was = model.training
    model.eval()
    call = _caller(model, cache)
    try:
        past = None
        for _ in range(max_new_tokens):
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            if past is None:
                z, past = call(ids, mask, pos, None)
            else:
                z, past = call(ids[:, -1:], mask, pos[:, -1:], past)
            z = filter_logits(z.float(), top_k, top_p)
            nxt = torch.where(done, torch.full_like(done, pad, dtype=ids.dtype),
                              _draw(z, float(temperature), generator))
            alive = torch.cat([alive, ~done[:, None]], 1)
            if eos_token_id is not None:
                done = done | (nxt == eos_token_id)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if bool(done.all()):
                break
    finally:
        model.train(was)
    left = n_prompt + max_new_tokens - ids.shape[1]  # every row stopped early: fill with pad
    if left:
        ids = torch.cat([ids, ids.new_full((b, left), pad)], 1)
        alive = torch.cat([alive, alive.new_zeros(b, left)], 1)
    completion = torch.cat([torch.zeros(b, n_prompt, dtype=torch.bool, device=ids.device),
                            alive], 1)
    return ids, completion


def generate_from_run(run_dir, prompt: str, *, max_new_tokens: int | None = None,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      seed: int = 0, weights=None) -> str:
    """Sample a continuation of ``prompt`` from a trained LM run's student
    (``RUN_DIR/student.safetensors``, or ``weights``) with the run's own tokenizer; returns
    prompt + continuation as text, up to the first EOS. ``max_new_tokens`` defaults to 64,
    or what the model's context leaves. What ``crossdistill generate`` runs."""
    from pathlib import Path

    from ..build import load_splits, make_model, task_of
    from ..config import load
    from ..io import load_into
    from ..text.tokenizer import encode_with_bytes, load_tokenizer

    try:  # the flags, before anything is loaded, named as the command line spells them
        _check_settings(64 if max_new_tokens is None else max_new_tokens, temperature, top_k,
                        top_p)
    except ConfigError as err:
        raise ConfigError("--" + err.field.replace("_", "-"), err.value, err.allowed) from None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError("--seed", seed, "an integer in [0, 2**63)")
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError("run_dir", str(run), "not a run directory (no config.yaml)")
    cfg = load(run / "config.yaml", require_paths=False)  # its teacher may be gone
    task = task_of(cfg)
    if task.name != "lm":
        raise ConfigError("run_dir", str(run), f"a {task.name!r} run, not a language model; "
                          "generate samples from runs of the lm task (e.g. configs/lm_kd.yaml)")
    train = load_splits(cfg)["train"]
    tok = getattr(train, "tokenizer", None)
    if tok is None and train.info.get("tokenizer"):
        tok = load_tokenizer(train.info["tokenizer"], "data.info.tokenizer")
    if tok is None:
        raise ConfigError("run_dir", str(run), f"the run's data ({cfg.data.name!r}) has no "
                          "tokenizer to encode a prompt; use a text source such as shakespeare")
    model = make_model(cfg.student, "student", train, checkpoint=False)
    load_into(model, weights or run / "student.safetensors", "--weights")
    ids = encode_with_bytes(tok, prompt)[0] if prompt else []
    if not ids:  # an empty prompt starts from the document token
        ids = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    limit = context_length(model)
    if max_new_tokens is None:
        max_new_tokens = max(1, min(64, limit - len(ids))) if limit else 64
    check_length(model, len(ids), max_new_tokens, "--max-new-tokens", "student")
    out, comp = sample(
        model, torch.tensor([ids]), max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        generator=torch.Generator().manual_seed(seed),
    )
    new = out[0][comp[0]].tolist()
    return prompt + tok.decode(new, skip_special_tokens=True)
