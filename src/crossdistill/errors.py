"""One error type for everything a user can get wrong.

The CLI turns a :class:`ConfigError` into one line and exit code 2; the message always
names the field, the bad value and what is allowed, so a user can fix it without reading
a traceback. Shown values are capped (:func:`show`) and every message is one line, so a
50 MB value or an alias bomb never floods the terminal.
"""

from __future__ import annotations

import difflib
import pickle
import reprlib
from collections.abc import Iterable

MAX_VALUE_CHARS = 200  # a shown value is cut here, with its full length noted
MAX_TEXT_CHARS = 2000  # field and "allowed" texts (registry listings can be long)

_repr = reprlib.Repr()  # bounded work too: at most 12 items a level, 3 levels, 60-char leaves
_repr.maxlevel, _repr.maxstring, _repr.maxother = 3, 60, 60
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = _repr.maxfrozenset = 12


def one_line(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """``text`` with newlines escaped and cut to ``limit`` characters."""
    text = str(text).replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def show(value, limit: int = MAX_VALUE_CHARS) -> str:
    """A bounded, one-line ``repr`` of ``value``: long strings are cut with their length,
    containers show their first items (``reprlib``), never the whole object."""
    if isinstance(value, (str, bytes)):
        if len(value) > limit:
            return f"{one_line(repr(value[:limit]), 4 * limit)}... ({len(value)} chars)"
        return one_line(repr(value), 4 * limit + 3)
    try:
        text = _repr.repr(value)
    except Exception:  # a broken __repr__ must not hide the real error
        text = f"<{type(value).__name__}>"
    if isinstance(value, (list, tuple, dict, set)) and len(text) > limit:
        return f"{one_line(text, limit)[:limit]}... ({len(value)} items)"
    return one_line(text, limit)


def describe(err: BaseException, limit: int = 240) -> str:
    """``Type: first line of the message`` (cut to ``limit``): how a foreign exception
    (torch, transformers, tokenizers) is quoted inside a one-line error."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:limit]}" if lines else type(err).__name__


class ConfigError(ValueError):
    """Bad user input, detected before any training starts."""

    def __init__(self, field: str, value, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{one_line(field, 300)}: got {show(value)}; {one_line(allowed)}")

    def __reduce__(self):
        """Picklable whatever the subclass's ``__init__`` takes (an error raised in a worker
        process must reach the parent intact, or a multiprocessing pool hangs); a value that
        cannot be pickled travels as its shown text."""
        state = dict(self.__dict__)
        try:
            pickle.dumps(state.get("value"))
        except Exception:
            state["value"] = show(state.get("value"))
        return _rebuild, (type(self), self.args, state)


def _rebuild(cls, args, state):
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


def nearest(name: str, options: Iterable[str], n: int = 5) -> list[str]:
    """The options closest to ``name`` (for "did you mean" hints)."""
    options = list(options)
    close = difflib.get_close_matches(name, options, n=n, cutoff=0.3)
    if len(close) < n:  # fall back to shared-prefix matches so a hint is never empty
        stem = name.split(".")[0]
        close += [o for o in options if o.startswith(stem) and o not in close][: n - len(close)]
    return close or options[:n]
