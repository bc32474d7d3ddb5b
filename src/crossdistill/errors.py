"""One error type for everything a user can get wrong.

The CLI turns a :class:`ConfigError` into one line and exit code 2; the message always
names the field, the bad value and what is allowed, so a user can fix it without reading
a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """Bad user input, detected before any training starts."""

    def __init__(self, field: str, value, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}: got {value!r}; {allowed}")


def nearest(name: str, options: Iterable[str], n: int = 5) -> list[str]:
    """The options closest to ``name`` (for "did you mean" hints)."""
    options = list(options)
    close = difflib.get_close_matches(name, options, n=n, cutoff=0.3)
    if len(close) < n:  # fall back to shared-prefix matches so a hint is never empty
        stem = name.split(".")[0]
        close += [o for o in options if o.startswith(stem) and o not in close][: n - len(close)]
    return close or options[:n]
