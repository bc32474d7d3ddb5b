"""Hugging Face transformers as students and teachers: random init by model type, or a
local checkpoint, offline and without unpickling.

``create_hf("gpt2", config={"n_layer": 2, "n_embd": 32})`` builds a randomly initialised
model from ``AutoConfig.for_model``; ``create_hf(hf_path="ckpt/")`` loads a local directory
with ``local_files_only=True, use_safetensors=True``: a directory holding only pickle
weights (``.bin``/``.pt``) is refused, since loading those runs arbitrary code. Config keys
are checked against the config class, because HF configs silently accept any keyword.

The model comes back unchanged (its ``forward`` takes ``input_ids``/``attention_mask`` and
returns a ``ModelOutput``), marked ``is_hf = True`` with ``family = "hf"``, ``stages`` (the
paths of its transformer blocks, for taps) and ``feature_path`` (its output head, or None).
Taps hook module paths inside it like any ``nn.Module``; a block returns a tuple in some
versions, so tap it with ``select=0`` there.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from torch import nn

from ..errors import ConfigError, describe, nearest

HEADS = {
    "causal_lm": "AutoModelForCausalLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "masked_lm": "AutoModelForMaskedLM",
    "base": "AutoModel",
}
ATTN = ("sdpa", "eager")
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _config_keys(cfg_cls) -> set[str]:
    """Every keyword a config class understands (HF configs accept unknown ones silently)."""
    from transformers import PretrainedConfig

    keys = {"num_labels", "output_attentions", "output_hidden_states"}
    for cls in cfg_cls.__mro__:
        if cls is object or not issubclass(cls, PretrainedConfig):
            continue
        keys |= {p for p, v in inspect.signature(cls.__init__).parameters.items()
                 if p != "self" and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)}
        keys |= set(getattr(cls, "attribute_map", {}) or {})
    try:
        keys |= set(cfg_cls().to_dict())
    except Exception:  # some configs need arguments; the signature is then enough
        pass
    return {k for k in keys if not k.startswith("_")}


def _check_config(cfg_cls, config: dict, model_type: str, field: str) -> None:
    if not isinstance(config, dict):
        raise ConfigError(f"{field}.config", config, "a mapping of config keys to values")
    valid = _config_keys(cfg_cls)
    for key, value in config.items():
        if key not in valid:
            raise ConfigError(
                f"{field}.config.{key}", value,
                f"not a {model_type} config key; nearest valid: "
                f"{', '.join(nearest(key, sorted(valid), 6))}",
            )


def _auto_class(head: str, field: str):
    import transformers

    if head not in HEADS:
        raise ConfigError(f"{field}.head", head, f"allowed: {', '.join(HEADS)}")
    return getattr(transformers, HEADS[head])


def _files(p: Path) -> str:
    names = sorted(f.name for f in p.iterdir())
    more = f" (+{len(names) - 15} more)" if len(names) > 15 else ""
    return ", ".join(names[:15]) + more or "none"


def _check_dir(path: str, field: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"{field}.hf_path", str(path),
                          "no such directory; a local Hugging Face checkpoint directory "
                          "(config.json + *.safetensors); nothing is downloaded")
    if not (p / "config.json").is_file():
        raise ConfigError(f"{field}.hf_path", str(path),
                          f"no config.json in this directory; files present: {_files(p)}")
    if not any(p.glob("*.safetensors")):
        pickled = [f.name for f in p.iterdir() if f.suffix in PICKLE_WEIGHTS]
        why = (f"only pickle weights ({', '.join(sorted(pickled))}), which are refused since "
               "loading them can run arbitrary code; convert them to safetensors"
               if pickled else "no *.safetensors weights")
        raise ConfigError(f"{field}.hf_path", str(path), f"{why}; files present: {_files(p)}")
    return p


def _mark(model: nn.Module) -> nn.Module:
    """Attributes the distillation code reads instead of special-casing HF models."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    stages: list[str] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and n_layers in (None, len(mod)):
            stages = [f"{name}.{i}" for i in range(len(mod))]
            break
    paths = {id(m): n for n, m in model.named_modules()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        head = next((m for n, m in model.named_modules() if n in ("score", "classifier")), None)
    model.is_hf = True
    model.family = "hf"
    model.stages = stages
    model.feature_path = paths.get(id(head)) if head is not None else None
    return model


def create_hf(
    hf: str | None = None,
    *,
    config: dict | None = None,
    hf_path: str | None = None,
    head: str = "causal_lm",
    attn_implementation: str = "sdpa",
    field: str = "student",
) -> nn.Module:
    """A transformers model: random init from model type ``hf`` (``"gpt2"``, ``"bert"``, ...)
    with ``config`` overrides, or loaded from the local directory ``hf_path`` (``config``
    then overrides the saved config, e.g. ``num_labels``). ``head`` picks the Auto class."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if (hf is None) == (hf_path is None):
        raise ConfigError(f"{field}.hf", hf if hf is not None else hf_path,
                          "give exactly one of hf (a model type, random init) and hf_path "
                          "(a local checkpoint directory)")
    auto = _auto_class(head, field)
    if attn_implementation not in ATTN:
        raise ConfigError(f"{field}.attn_implementation", attn_implementation,
                          f"allowed: {', '.join(ATTN)}")
    config = dict(config or {})
    if hf is not None:
        types = list(CONFIG_MAPPING.keys())
        if not isinstance(hf, str) or hf not in CONFIG_MAPPING:
            raise ConfigError(f"{field}.hf", hf, "not a transformers model type; nearest: "
                              f"{', '.join(nearest(str(hf), types, 6))}")
        _check_config(CONFIG_MAPPING[hf], config, hf, field)
        try:
            cfg = AutoConfig.for_model(hf, **config)
        except Exception as err:  # noqa: BLE001  (transformers' own validators raise many types)
            msg = f"rejected by {hf}: {describe(err)}"
            raise ConfigError(f"{field}.config", config, msg) from None
        source, load = hf, lambda: auto.from_config(cfg, attn_implementation=attn_implementation)
    else:
        p = _check_dir(hf_path, field)
        try:
            cfg = AutoConfig.from_pretrained(str(p), local_files_only=True)
        except Exception as err:
            raise ConfigError(f"{field}.hf_path", str(hf_path),
                              f"config.json is not loadable ({describe(err)})") from None
        _check_config(type(cfg), config, cfg.model_type, field)
        for key, value in config.items():
            setattr(cfg, key, value)

        def load():
            return auto.from_pretrained(
                str(p), config=cfg, local_files_only=True, use_safetensors=True,
                attn_implementation=attn_implementation,
            )

        source = str(hf_path)
    try:
        model = load()
    except ValueError as err:
        msg = str(err)
        if "attn" in msg.lower() or "sdpa" in msg.lower():
            raise ConfigError(f"{field}.attn_implementation", attn_implementation,
                              f"not supported by {source}; try 'eager'") from None
        if "Unrecognized configuration class" in msg:
            raise ConfigError(f"{field}.head", head,
                              f"{source} has no {HEADS[head]} model; try another of: "
                              f"{', '.join(h for h in HEADS if h != head)}") from None
        raise ConfigError(f"{field}.hf", source, f"could not be built: {describe(err)}") from None
    except OSError as err:
        msg = f"could not be loaded: {describe(err)}"
        raise ConfigError(f"{field}.hf_path", source, msg) from None
    except (RuntimeError, TypeError, IndexError) as err:  # e.g. a negative size in config
        where = f"{field}.config" if hf else f"{field}.hf_path"
        msg = f"could not be built: {describe(err)}"
        raise ConfigError(where, config or source, msg) from None
    return _mark(model)


def export_hf(model: nn.Module, out_dir, tokenizer=None) -> Path:
    """Save a transformers model (and optionally its tokenizer) as a standard HF directory
    in safetensors, so the distilled student loads with ``from_pretrained`` anywhere."""
    from transformers import PreTrainedModel

    inner = getattr(model, "_orig_mod", model)  # torch.compile
    inner = getattr(inner, "module", inner)  # DDP
    if not isinstance(inner, PreTrainedModel):
        raise ConfigError("export.model", type(model).__name__,
                          "a transformers PreTrainedModel (e.g. one made by create_hf)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if "safe_serialization" in inspect.signature(inner.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4.x; 5.x writes safetensors only
    inner.save_pretrained(str(out), **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
