"""The teacher's validation metric for a report, so the student's curve has its target beside
it: read from ``results.json`` (``teacher_val_<metric>``) when the run recorded it, else
evaluated once here from the run's config when its teacher is a model with a checkpoint
file that still exists (stores and from_config teachers are not re-built)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from .runs import Run

_CACHE: dict[str, float] = {}  # (teacher, data, task) -> value, across the runs of a report


def _online(cfg) -> dict:
    teachers = {"teacher": cfg.teacher} if cfg.teacher is not None else dict(cfg.teachers or {})
    return {
        n: s
        for n, s in teachers.items()
        if s.model and s.checkpoint and not s.store and Path(s.checkpoint).is_file()
    }


def evaluate_teachers(run: Run) -> tuple[dict[str, float], str]:
    """({teacher name: val metric}, a note saying where it came from or why it is missing)."""
    recorded = run.recorded_teacher()
    if recorded:
        return recorded, "recorded by the run"
    if not (run.path / "config.yaml").is_file():
        return {}, "no config.yaml"
    from .. import config as C
    from ..build import load_splits, make_model, task_of
    from ..train import evaluate

    try:
        cfg = C.load(run.path / "config.yaml", require_paths=False)
        specs = _online(cfg)
        if not specs:
            return {}, _why_not(cfg)
        task = task_of(cfg)
        out, splits = {}, None
        for name, spec in specs.items():
            key = json.dumps(
                [spec.model_dump(mode="json"), cfg.data.model_dump(mode="json"), str(cfg.task)],
                sort_keys=True,
            )
            if key not in _CACHE:
                splits = splits or load_splits(cfg)
                model = make_model(spec, "teacher", splits["train"])
                res = evaluate(model, splits["val"], task=task, io=spec.io())
                _CACHE[key] = float(res[task.select])
            out[name] = _CACHE[key]
    except (ConfigError, OSError, RuntimeError, KeyError) as err:
        return {}, f"teacher not evaluated ({err})"
    return out, "evaluated on val for this report"


def _why_not(cfg) -> str:
    teachers = [cfg.teacher] if cfg.teacher is not None else list((cfg.teachers or {}).values())
    if not teachers:
        return "no teacher"
    if all(t.store for t in teachers):
        return "a teacher store has no model to evaluate"
    if any(t.from_config for t in teachers):
        return "a from_config teacher is not re-built for a report"
    return "teacher checkpoint not found"
