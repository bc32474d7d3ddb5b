"""Classification: accuracy and cross-entropy over labelled samples (label -100 = none).

Evaluation ``views`` score the model again on a transformed batch (a missing modality, a
random per-sample modality mask, another key's images and labels); each view's metrics are
reported as ``<view>_<metric>`` beside the full-input ones. ``missing`` is a shorthand for
the common missing-modality views (see :func:`_missing`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..registry import TASKS
from .base import Task, valid_targets


@TASKS.register("classification", description="accuracy and CE; selects on val accuracy")
class Classification(Task):
    name = "classification"
    select, mode = "acc", "max"
    train_metrics = ("acc",)
    columns = (("acc", "accuracy"), ("loss", "CE"))

    def __init__(
        self,
        target: str = "y",
        inputs=None,
        views: dict | None = None,
        missing: list[str] | None = None,
        modalities: list[str] | None = None,
    ):
        self.target = target
        self.inputs = inputs if inputs is not None else ["x"]
        self.views = _views(views, missing, modalities, inputs)

    def check_batch(self, batch) -> None:
        """Every view's keys are in ``batch`` (called on the first training batch)."""
        for view in self.views.values():
            view.check_batch(batch)

    def update(self, sums, logits, batch, keep=None, out=None):
        y = batch[self.target]
        if y.device != logits.device:
            y = y.to(logits.device)
        ok = valid_targets(y, keep)
        z = logits.detach().float()
        hit = z.argmax(-1) == y  # never true where y == -100 (argmax >= 0)
        if keep is not None:
            hit = hit & ok
        self.add(sums, "correct", hit.sum(dtype=torch.float32))  # exact below 2**24
        self.add(sums, "labelled", ok.sum(dtype=torch.float32))
        if keep is not None:  # evaluation: CE too (the training loop has its own loss sums)
            ce = F.cross_entropy(
                z.reshape(-1, z.shape[-1]), y.reshape(-1).clamp_min(0), reduction="none"
            )
            self.add(sums, "ce", (ce * ok.reshape(-1)).sum())

    def compute(self, sums):
        n = max(sums.get("labelled", 0.0), 1.0)
        out = {"acc": sums.get("correct", 0.0) / n}
        if "ce" in sums:
            out["loss"] = sums["ce"] / n
        out["n"] = int(sums.get("labelled", 0.0))
        return out


# -- evaluation views -----------------------------------------------------------------------
# A view is a function of an evaluation batch (a new dict; the batch itself is untouched).
# The trainer only calls it; what it does (zero a modality, drop modalities at random, score
# another key) lives here.

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix of int64 values in [0, 2**32) (two rounds of the xor-shift-
    multiply hash with constant 0x45D9F3B; products stay below 2**59, so int64 never wraps).
    Counter-based, so a sample's draw depends on its id alone, on any device."""
    x = x & _MASK32
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def _missing_keys(name: str, keys, batch) -> None:
    lacking = [k for k in keys if k not in batch]
    if lacking:
        raise ConfigError(
            f"task.views.{name}",
            lacking[0],
            f"not a key of the batch; the batch has: {', '.join(sorted(batch))}",
        )


class View:
    """Base evaluation view: ``view(batch) -> batch``; ``check_batch`` validates the keys it
    reads against a batch (the first training batch, before any step)."""

    reads: tuple[str, ...] = ()

    def __init__(self, name: str):
        self.name = name

    def check_batch(self, batch) -> None:
        _missing_keys(self.name, self.reads, batch)

    def __call__(self, batch):
        raise NotImplementedError


class ZeroView(View):
    """Zero ``keys`` for every sample: that modality is missing at test time."""

    def __init__(self, name: str, keys: list[str]):
        super().__init__(name)
        self.keys = list(keys)
        self.reads = tuple(self.keys)

    def __call__(self, batch):
        self.check_batch(batch)
        return {k: torch.zeros_like(v) if k in self.keys else v for k, v in batch.items()}

    def __repr__(self) -> str:
        return f"ZeroView({self.keys})"


class RandomMaskView(View):
    """Each sample loses each of ``keys`` with probability ``rate``, never all of them (then
    one, drawn uniformly, is kept), like the ``modality_dropout`` training stage.

    The draw is a hash of ``(seed, sample id, key index)`` (the id is batch key ``id_key``),
    not a generator's state, so a sample's mask is the same in every epoch, every run, every
    batch size and on every DDP rank: val and test are one fixed corrupted set."""

    def __init__(self, name: str, rate: float, keys: list[str], seed: int = 0, id_key="idx"):
        super().__init__(name)
        self.rate, self.keys, self.seed, self.id_key = float(rate), list(keys), int(seed), id_key
        self.reads = (*self.keys, id_key)

    def mask(self, ids: torch.Tensor) -> torch.Tensor:
        """``(B, len(keys))`` bool, True = dropped, from the sample ids ``(B,)``."""
        ids = ids.reshape(-1).long()
        m = len(self.keys)
        base = _hash32(torch.full_like(ids, self.seed & _MASK32) ^ 0x5BD1E995)
        cell = ids[:, None] * (m + 1) + torch.arange(m + 1, device=ids.device)
        h = _hash32(_hash32(cell) ^ base[:, None])  # (B, m + 1): m draws and one for the rescue
        drop = h[:, :m].double() / 2.0**32 < self.rate
        keep = h[:, m] % m
        all_gone = drop.all(1)
        drop[all_gone, keep[all_gone]] = False
        return drop

    def __call__(self, batch):
        self.check_batch(batch)
        drop = self.mask(batch[self.id_key])
        out = dict(batch)
        for j, k in enumerate(self.keys):
            x = batch[k]
            d = drop[:, j].to(x.device).view(-1, *[1] * (x.dim() - 1))
            out[k] = torch.where(d, torch.zeros_like(x), x)
        return out

    def __repr__(self) -> str:
        return f"RandomMaskView(rate={self.rate}, keys={self.keys}, seed={self.seed})"


class ReplaceView(View):
    """Score other keys in place of the usual ones: ``{batch key: key to take it from}``.
    E.g. ``{source: target, y: target_y}`` scores a model that reads ``source`` on the
    target-domain images and labels, in the same evaluation."""

    def __init__(self, name: str, mapping: dict[str, str]):
        super().__init__(name)
        self.mapping = dict(mapping)
        self.reads = tuple(dict.fromkeys([*self.mapping, *self.mapping.values()]))

    def __call__(self, batch):
        self.check_batch(batch)
        return {**batch, **{dst: batch[src] for dst, src in self.mapping.items()}}

    def __repr__(self) -> str:
        return f"ReplaceView({self.mapping})"


def _str_list(field: str, value, what: str, min_len: int = 1) -> list[str]:
    keys = [value] if isinstance(value, str) else value
    if (
        not isinstance(keys, list)
        or len(keys) < min_len
        or not all(isinstance(k, str) and k for k in keys)
    ):
        raise ConfigError(field, value, what)
    return list(keys)


def _rate(field: str, value) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not 0.0 <= float(value) <= 1.0:  # also refuses NaN
        raise ConfigError(field, value, "a probability in [0, 1]")
    return float(value)


def _seed(field: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise ConfigError(field, value, "an int in [0, 2**32)")
    return value


VIEW_FORMS = (
    "a list of batch keys to zero, {zero: [keys]}, {random: rate, keys: [keys], seed: 0} "
    "or {replace: {key: other key}}"
)


def _view(name: str, spec) -> View:
    f = f"task.views.{name}"
    if not isinstance(spec, dict):
        return ZeroView(name, _str_list(f, spec, "a list of batch keys to zero"))
    kinds = [k for k in ("zero", "random", "replace") if k in spec]
    if len(kinds) != 1:
        raise ConfigError(f, spec, f"one of: {VIEW_FORMS}")
    allowed = {"zero": ("zero",), "random": ("random", "keys", "seed"), "replace": ("replace",)}
    for k in spec:
        if k not in allowed[kinds[0]]:
            raise ConfigError(
                f"{f}.{k}", spec[k], f"not an option of a {kinds[0]} view; allowed: "
                f"{', '.join(allowed[kinds[0]])}"
            )
    if kinds[0] == "zero":
        return ZeroView(name, _str_list(f"{f}.zero", spec["zero"], "a list of batch keys"))
    if kinds[0] == "replace":
        m = spec["replace"]
        if not isinstance(m, dict) or not m or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in m.items()
        ):
            raise ConfigError(f"{f}.replace", m, "a dict {batch key: key to read it from}")
        return ReplaceView(name, m)
    keys = _str_list(
        f"{f}.keys", spec.get("keys"), "two or more batch keys (each sample keeps one)", 2
    )
    return RandomMaskView(
        name, _rate(f"{f}.random", spec["random"]), keys, _seed(f"{f}.seed", spec.get("seed", 0))
    )


MISSING_FORMS = "<key>_only, no_<key> or random@<rate> (e.g. image_only, no_audio, random@0.5)"


def _missing_entry(e: str) -> tuple[str, str | float]:
    """``(kind, key or rate)`` of one ``missing`` entry: only / no / random."""
    if e.startswith("random@"):
        try:
            rate = float(e[len("random@") :])
        except ValueError:
            raise ConfigError("task.missing", e, f"allowed: {MISSING_FORMS}") from None
        return "random", _rate("task.missing", rate)
    if e.endswith("_only") and len(e) > len("_only"):
        return "only", e[: -len("_only")]
    if e.startswith("no_") and len(e) > len("no_"):
        return "no", e[len("no_") :]
    raise ConfigError("task.missing", e, f"allowed: {MISSING_FORMS}")


def _missing(missing, modalities, inputs) -> dict[str, View]:
    """The ``missing`` shorthand over the modality keys: ``<key>_only`` zeroes the others,
    ``no_<key>`` zeroes that key, ``random@<rate>`` is a random mask view named
    ``random<percent>`` (``random@0.5`` -> ``random50``, seed 0). Modality keys: ``modalities``,
    else the task's ``inputs`` if they name two or more keys, else the keys named by the
    ``<key>_only`` entries. (Both modalities present is the unsuffixed metric.)"""
    entries = _str_list("task.missing", missing, f"a list of: {MISSING_FORMS}")
    parsed = [(e, *_missing_entry(e)) for e in entries]
    if modalities is not None:
        keys = _str_list("task.modalities", modalities, "two or more batch keys", 2)
    elif isinstance(inputs, list) and len(inputs) >= 2:
        keys = list(inputs)
    else:
        keys = list(dict.fromkeys(arg for _, kind, arg in parsed if kind == "only"))
        if len(keys) < 2:
            raise ConfigError(
                "task.modalities", modalities,
                "give the modality keys for task.missing (e.g. [image, audio])",
            )
    out: dict[str, View] = {}
    for e, kind, arg in parsed:
        if kind == "random":
            name = "random" + f"{arg * 100:g}".replace(".", "p")
            out[name] = RandomMaskView(name, arg, keys)
            continue
        if arg not in keys:
            raise ConfigError("task.missing", e, f"{arg!r} is not a modality: {', '.join(keys)}")
        out[e] = ZeroView(e, [k for k in keys if k != arg] if kind == "only" else [arg])
    return out


def _views(views, missing=None, modalities=None, inputs=None) -> dict[str, View]:
    """Evaluation views by name; each view's metrics are reported as ``<name>_<metric>``
    beside the full-input ones. See :data:`VIEW_FORMS` and :func:`_missing`."""
    if views is not None and not isinstance(views, dict):
        raise ConfigError("task.views", views, "a dict {name: view}; a view is " + VIEW_FORMS)
    out = {str(name): _view(str(name), spec) for name, spec in (views or {}).items()}
    if missing is not None:
        for name, view in _missing(missing, modalities, inputs).items():
            if name in out:
                raise ConfigError("task.missing", name, "a view of that name is in task.views")
            out[name] = view
    elif modalities is not None:
        raise ConfigError("task.modalities", modalities, "only used with task.missing")
    return out
