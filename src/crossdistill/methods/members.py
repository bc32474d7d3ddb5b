"""Several models trained together as one student: the mechanism behind teacher-free and
co-trained recipes (mutual learning, cross-modal co-training, a router over experts).

The trainer optimises one student; :class:`Members` makes "one student" a named group of
models, each reading its own batch keys (an image network reads ``image``, an audio network
``audio``). Every member is a submodule under its name, so taps reach into any of them by
path (``"image.stage1"``; ``"image"`` alone is that member's logits) and each term of a
recipe is an ordinary :class:`~crossdistill.Term`. The group's own output, which validation
selects on, is the mean of the members' logits (``output="mean"``) or one member's.

Called through an adapter with keyword inputs ``{key: key}`` (``Members.io()`` gives it),
the group routes each key to the members that read it; with ``reads=None`` every member gets
the same arguments (two peers on one input). After training each member is a plain model
(``group[name]``), evaluated or exported alone with its own keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from ..errors import ConfigError


class Members(nn.Module):
    """Named member models; ``reads[name]`` lists the batch keys member ``name`` takes,
    positionally, in order (``None``: all members take the caller's arguments)."""

    def __init__(
        self,
        members: Mapping[str, nn.Module],
        reads: Mapping[str, str | Sequence[str]] | None = None,
        output: str = "mean",
        field: str = "members",
    ):
        super().__init__()
        if not members:
            raise ConfigError(field, members, "one or more named models")
        for name in members:
            if not isinstance(name, str) or not name.isidentifier():
                raise ConfigError(field, name, "member names are identifiers (image, audio, a)")
        if output != "mean" and output not in members:
            raise ConfigError(f"{field}.output", output, f"mean or one of {', '.join(members)}")
        self.names = list(members)
        for name, model in members.items():
            self.add_module(name, model)
        self.reads = None
        if reads is not None:
            missing = [n for n in self.names if n not in reads]
            extra = [n for n in reads if n not in members]
            if missing or extra:
                raise ConfigError(
                    f"{field}.reads",
                    missing or extra,
                    f"one entry per member: {', '.join(self.names)}",
                )
            self.reads = {n: [reads[n]] if isinstance(reads[n], str) else list(reads[n])
                          for n in self.names}
        self.output = output
        self.stages = [f"{n}.{s}" for n in self.names for s in getattr(members[n], "stages", [])]
        self.family = "members"

    def __getitem__(self, name: str) -> nn.Module:
        return getattr(self, name)

    def keys(self) -> list[str]:
        """Every batch key some member reads, in first-use order."""
        out: list[str] = []
        for n in self.names:
            out += [k for k in (self.reads or {}).get(n, []) if k not in out]
        return out

    def io(self) -> dict:
        """The student adapter that feeds this group: keyword inputs, one per batch key."""
        return {"inputs": {k: k for k in self.keys()}} if self.reads else {}

    def member_io(self, name: str) -> dict:
        """The adapter for member ``name`` alone (evaluating or distilling it by itself)."""
        return {"inputs": list(self.reads[name])} if self.reads else {}

    def logits(self, *args, **inputs) -> dict:
        """Every member's logits, by name."""
        if self.reads is None:
            return {n: self[n](*args, **inputs) for n in self.names}
        if args:
            raise ConfigError(
                "members.inputs",
                f"{len(args)} positional",
                f"call with batch keys by name: {', '.join(self.keys())} (use Members.io())",
            )
        out = {}
        for n in self.names:
            absent = [k for k in self.reads[n] if k not in inputs]
            if absent:
                raise ConfigError(
                    f"members.reads.{n}", absent[0], f"inputs given: {', '.join(inputs)}"
                )
            out[n] = self[n](*[inputs[k] for k in self.reads[n]])
        return out

    def forward(self, *args, **inputs):
        z = self.logits(*args, **inputs)
        if self.output != "mean":
            return z[self.output]
        return sum(z.values()) / len(z)
