"""Export a finished run's student with a JSON spec complete enough to rebuild and run it
anywhere crossdistill is installed, and load it back.

``crossdistill export RUN_DIR [--out PATH.safetensors]`` writes ``PATH.safetensors`` (the
student's weights, keys = ``state_dict()`` keys) and ``PATH.json``:

* ``model``: the zoo name and every constructor argument as the run built it (``num_classes``,
  ``in_channels``, ``img_size`` resolved from the data), or, for a Hugging Face student, the
  ``PATH_hf`` directory written beside it (``AutoModel.from_pretrained`` loads it too);
* ``io``: how to call it (batch keys -> arguments) and where its logits are;
* ``task``: the task's name, selection metric and report columns;
* ``data`` and ``preprocessing``: the data source, its classes, the input shape and how raw
  inputs become model inputs (for images: pixels scaled to [0, 1], optional bilinear resize,
  then ``(x - mean) / std`` with the train split's statistics), see :func:`preprocess`;
* ``results``: the run's headline numbers, and the crossdistill version that wrote it.

:func:`load_exported` rebuilds the model from the spec and loads the weights (safetensors only,
no pickle). The run directory is only read, so a run on a read-only mount exports with
``--out`` pointing elsewhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .data.sources import PIXEL_MAX
from .errors import ConfigError

FORMAT = "crossdistill-export/1"


def _jsonable(value, limit: int = 20_000):
    """``value`` if it is plain JSON of a sane size, else None (tensors, large arrays)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        return None
    return json.loads(text) if len(text) <= limit else None


def preprocessing(cfg, train) -> dict:
    """How raw inputs become what the model was trained on (see the module docstring)."""
    info = {k: v for k, v in train.info.items() if _jsonable(v) is not None}
    if cfg.data.name in PIXEL_MAX and "mean" in info and "std" in info:
        size = cfg.data.img_size
        return {
            "pixel_max": PIXEL_MAX[cfg.data.name],
            "resize": [size, size] if size else None,
            "mean": info["mean"],
            "std": info["std"],
            "formula": "x = (resize_bilinear(pixels / pixel_max) - mean) / std",
        }
    return {"info": info}  # the source's own description (tokenizer, block, audio norm, ...)


def preprocess(spec: dict, pixels: torch.Tensor) -> torch.Tensor:
    """Raw image pixels ``(N, C, H, W)`` (0..pixel_max) -> model inputs, as the run's data did."""
    import torch.nn.functional as F

    p = spec.get("preprocessing", {})
    if "mean" not in p:
        raise ConfigError(
            "preprocessing", spec.get("data", {}).get("name"), "the spec has no image recipe"
        )
    x = pixels.float() / p["pixel_max"]
    if p.get("resize") and list(x.shape[-2:]) != list(p["resize"]):
        x = F.interpolate(x, size=tuple(p["resize"]), mode="bilinear", align_corners=False)
    return (x - p["mean"]) / p["std"]


def build_spec(cfg, train, results: dict | None = None, hf_dir: str | None = None) -> dict:
    """The JSON spec of a run's student (see the module docstring)."""
    from . import __version__
    from .adapters import ModelIO
    from .build import task_of, zoo_kwargs

    task = task_of(cfg)
    s = cfg.student
    if s.kind("student") == "model":
        kwargs = zoo_kwargs(s, "student", train)  # exactly what make_model passes
        model = {"kind": "zoo", "name": s.model, "kwargs": _jsonable(kwargs)}
    else:
        model = {
            "kind": "hf",
            "dir": hf_dir,
            "hf": s.hf,
            "hf_path": s.hf_path,
            "head": s.head,
            "attn_implementation": s.attn_implementation,
            "config": s.config,
        }
    io = ModelIO.parse(s.io(), "student").with_defaults(task.inputs, task.class_dim)
    res = {k: v for k, v in (results or {}).items() if isinstance(v, (int, float, str))}
    return {
        "format": FORMAT,
        "crossdistill_version": __version__,
        "model": model,
        "io": {"inputs": io.inputs, "logits": io.logits_sel, "class_dim": io.class_dim},
        "task": {
            "name": task.name,
            "spec": cfg.task,
            "select": task.select,
            "mode": task.mode,
            "columns": [list(c) for c in task.columns],
        },
        "data": {
            "name": cfg.data.name,
            "num_classes": train.num_classes,
            "input_shape": list(train.input_shape),
            "img_size": cfg.data.img_size,
            "split_seed": cfg.data.split_seed,
            "params": _jsonable(cfg.data.params),
        },
        "preprocessing": preprocessing(cfg, train),
        "results": res,
    }


def export_run(run_dir: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """Export a run's ``student.safetensors`` (checked against its config) with its spec.
    Returns the paths written: ``weights``, ``spec`` and, for an HF student, ``hf``."""
    from .build import load_splits, make_model
    from .config import load
    from .io import load_into, save_weights
    from .train.metrics import write_atomic

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError("run_dir", str(run), "not a run directory (no config.yaml)")
    cfg = load(run / "config.yaml", require_paths=False)  # the teacher may be gone
    src = run / "student.safetensors"
    train = load_splits(cfg)["train"]
    model = make_model(cfg.student, "student", train, checkpoint=False)
    load_into(model, src, "run_dir")  # the file must fit the config's student
    results = {}
    if (run / "results.json").is_file():
        results = _read_json(run / "results.json", "run_dir")
    folder = out is None or Path(out).is_dir() or str(out).endswith(("/", os.sep))
    out = (Path(out) if out else run / "export") / "student.safetensors" if folder else Path(out)
    stem = str(out.with_suffix(""))
    paths = {"weights": out, "spec": out.with_suffix(".json")}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_weights(model.state_dict(), out)
        if hasattr(model, "save_pretrained"):  # an HF student: also its own format
            from .models.hf import export_hf

            paths["hf"] = export_hf(model, stem + "_hf")
        spec = build_spec(cfg, train, results, Path(stem + "_hf").name if "hf" in paths else None)
        write_atomic(paths["spec"], json.dumps(spec, indent=2) + "\n")
    except OSError as err:
        why = err.strerror or err
        msg = f"cannot write there ({why}); give --out PATH elsewhere"
        raise ConfigError("--out", str(out), msg) from None
    return paths


def _read_json(path: Path, field: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(field, str(path), f"not a readable JSON file ({err})") from None
    if not isinstance(value, dict):
        raise ConfigError(field, str(path), "not a JSON object")
    return value


def _spec_paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_dir():
        p = p / "student.json"
    spec, weights = p.with_suffix(".json"), p.with_suffix(".safetensors")
    if not spec.is_file():
        raise ConfigError(
            "path", str(path), "no export spec (.json) there; write one with crossdistill export"
        )
    return spec, weights


def load_exported(path: str | Path) -> nn.Module:
    """The exported student (in eval mode), rebuilt from its spec with its weights loaded.
    ``path``: the ``.json`` spec, the ``.safetensors`` beside it, or their directory. The spec
    is kept as ``model.export_spec`` (call the model as ``spec["io"]`` says, on inputs made as
    ``spec["preprocessing"]`` says; :func:`preprocess` does it for images)."""
    from .io import load_into

    spec_path, weights = _spec_paths(path)
    spec = _read_json(spec_path, "path")
    if spec.get("format") != FORMAT:
        raise ConfigError("format", spec.get("format"), f"expected {FORMAT!r} ({spec_path})")
    m = spec.get("model") or {}
    if m.get("kind") == "zoo":
        from .models import create

        model = create(m["name"], field="model", **(m.get("kwargs") or {}))
    elif m.get("kind") == "hf":
        from .models.hf import create_hf

        model = create_hf(
            hf_path=str(spec_path.parent / m["dir"]),
            head=m.get("head", "causal_lm"),
            attn_implementation=m.get("attn_implementation", "sdpa"),
            field="model",
        )
    else:
        raise ConfigError("model.kind", m.get("kind"), "allowed: zoo, hf")
    load_into(model, weights, "weights")
    model.eval()
    model.export_spec = spec
    return model
