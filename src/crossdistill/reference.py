"""The config reference, generated from the schema (``crossdistill list config``), so the
README's reference cannot drift from what is validated: every section and field with its
type, default, range and description, then every registered loss, method, projector, model
and condenser with its hyper-parameters (from their signatures)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from . import schema

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
REGENERATE = "python -m crossdistill.reference --write README.md"

INTRO = """\
Generated from the schema by `crossdistill list config` (regenerate with
`python -m crossdistill.reference --write README.md`). Every number is checked before any data
is read: floats must be finite; numbers a signature leaves unbounded must satisfy
|float| <= 1e6 and |int| <= 2^31 - 1; lists hold at most 10,000 items. Then the run's memory
(parameters x 4 bytes x 4 for weights, gradients and optimiser state, plus one batch of
activations, plus the data) is compared with the memory available, and `train.device` with
the devices this torch offers (cpu; cuda, cuda:N when CUDA is available; mps).

Defaults worth knowing: SGD uses Nesterov momentum 0.9 (`nesterov: true`; off when
`momentum: 0`); the cosine schedule is updated every optimizer step from `lr` down to
`min_lr` after a linear warm-up of `warmup_epochs` (`schedule_unit: epoch` holds each epoch's
value instead); `lr: 0.05` with `data.batch_size: 64` is tuned for SGD, AdamW usually wants
about 1e-3. MNIST is read from `data.root`, else `$CROSSDISTILL_DATA/mnist-t10k` when that
variable is set, else `../shared/data/mnist-t10k` relative to the project; FSDD recordings
(the `av` source) likewise from `$CROSSDISTILL_DATA/fsdd/recordings`.
"""


def _fmt(v) -> str:
    if isinstance(v, Path):
        v = str(v)
    try:
        return "`" + json.dumps(v, default=str) + "`"
    except (TypeError, ValueError):
        return f"`{v}`"


def _default(fi) -> str:
    if fi.default_factory is not None:
        return _fmt(fi.default_factory())
    if fi.default is PydanticUndefined:
        return "required"
    if isinstance(fi.default, BaseModel):
        return "(section)"
    return _fmt(fi.default)


def section(title: str, model: type[BaseModel], note: str = "") -> list[str]:
    out = [f"#### `{title}`", ""]
    if note:
        out += [note, ""]
    out += ["| field | type | default | range | description |", "|---|---|---|---|---|"]
    for name, fi in model.model_fields.items():
        tp = Annotated[(fi.annotation, *fi.metadata)] if fi.metadata else fi.annotation
        desc = (fi.description or "").replace("|", "\\|")
        row = [f"`{name}`", schema.type_name(fi.annotation), _default(fi), schema.range_of(tp)]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + f" | {desc} |")
    return out + [""]


def _params(rows: list[dict]) -> str:
    if not rows:
        return "(none)"
    parts = []
    for r in rows:
        d = "required" if r["default"] == "required" else json.dumps(r["default"], default=str)
        parts.append(f"`{r['name']}={d}`" + (f" {r['range']}" if r["range"] else ""))
    return ", ".join(parts)


def registered() -> list[str]:
    from . import condense, data, lm, losses, methods, models, prepare, projectors  # noqa: F401
    from . import registry as R
    from .condense.cli import FIXED
    from .context import LOSS_CONTEXT

    kinds = [
        ("losses", R.LOSSES, dict(skip=LOSS_CONTEXT, positional=2)),
        ("methods", R.METHODS, dict(positional=2)),
        ("projectors", R.PROJECTORS, dict(positional=2)),
        ("models", R.MODELS, {}),
        ("condensers", R.CONDENSERS, dict(skip=FIXED)),
        ("prepare stages", R.PREPARES, {}),
    ]
    out = []
    for title, reg, kw in kinds:
        out += [f"#### {title}", "", "| name | hyper-parameters (default, range) |", "|---|---|"]
        for name in reg.names():
            text = _params(schema.describe(reg.get(name), **kw)).replace("|", "\\|")
            out.append(f"| `{name}` | {text} |")
        out.append("")
    return out


def generate() -> str:
    """The markdown reference (what sits between the README's markers)."""
    from . import config as C

    lines = [INTRO, "### Sections", ""]
    lines += section("(top level)", C.RunConfig)
    lines += section("student / teacher / teachers.NAME", C.TeacherSpec,
                     "Zoo-model arguments (depth, width, ...) go beside `model`; see models below.")
    lines += section("data", C.DataSpec)
    lines += section("data.augment", C.AugmentSpec)
    lines += section("terms[i]", C.TermSpec,
                     "Keys beyond these are the loss's hyper-parameters (see losses below).")
    lines += section("method", C.MethodSpec, "Keys beyond `name` are the method's.")
    lines += section("mixture", C.MixtureSpec)
    lines += section("train", C.TrainSpec)
    lines += ["### Registered components", ""] + registered()
    return "\n".join(lines).rstrip() + "\n"


def readme_section(text: str) -> str:
    """The text between the markers of a README."""
    i, j = text.index(START) + len(START), text.index(END)
    return text[i:j].strip("\n") + "\n"


def write(path: str | Path) -> None:
    p = Path(path)
    text = p.read_text()
    i, j = text.index(START) + len(START), text.index(END)
    p.write_text(text[:i] + "\n" + generate() + text[j:])


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--write"]:
        write(sys.argv[2] if len(sys.argv) > 2 else "README.md")
    else:
        print(generate(), end="")
