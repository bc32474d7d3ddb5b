"""Reading YAML that users write: one strict, bounded loader for configs and ``--set`` values.

Safe-loading semantics (plain data, no tags), plus what ``yaml.safe_load`` lets through and
the CLI must not: files over :data:`MAX_BYTES`, text that is not UTF-8, duplicate mapping
keys (the last one would silently win), nesting deeper than :data:`MAX_DEPTH` (a
``RecursionError`` in PyYAML's recursive composer) and alias bombs ("billion laughs": a
1 KB file whose aliases expand to 10^9 nodes once anything walks the data). Every problem
is one :class:`ConfigError` naming the file, and the line and column where YAML has them.
"""

from __future__ import annotations

import codecs
import os
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, SequenceNode

from .errors import ConfigError, show

MAX_BYTES = 5_000_000  # 5 MB: a config is a few KB; this only stops accidents and bombs
MAX_DEPTH = 64  # nesting levels, counted through aliases too
MAX_ALIAS_NODES = 10_000  # nodes a document may produce through aliases (anchors reused)
MERGE_TAG = "tag:yaml.org,2002:merge"


class _Refused(yaml.MarkedYAMLError):
    """A document the strict loader will not build (depth, aliases, duplicates)."""


class StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that bounds depth and alias expansion and refuses duplicate keys.

    Sizes are computed bottom-up as nodes are composed (no second recursive walk), so the
    checks themselves cannot recurse past :data:`MAX_DEPTH`.
    """

    def __init__(self, stream):
        super().__init__(stream)
        self._level = 0
        self._aliased = 0
        self._size: dict[int, int] = {}  # id(node) -> nodes it expands to
        self._depth: dict[int, int] = {}  # id(node) -> levels it expands to

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            node = super().compose_node(parent, index)
            if id(node) not in self._size:
                raise _Refused(problem="an alias refers to the node that contains it "
                               "(a recursive structure)", problem_mark=mark)
            self._aliased += self._size[id(node)]
            if self._aliased > MAX_ALIAS_NODES:
                raise _Refused(problem=f"aliases expand to more than {MAX_ALIAS_NODES:,} nodes "
                               "(an alias bomb?); write the values out", problem_mark=mark)
            return node
        self._level += 1
        if self._level > MAX_DEPTH:
            raise _Refused(problem=f"nested deeper than {MAX_DEPTH} levels",
                           problem_mark=self.peek_event().start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._level -= 1
        if isinstance(node, SequenceNode):
            kids = node.value
        elif isinstance(node, MappingNode):
            kids = [n for pair in node.value for n in pair]
        else:
            kids = []
        self._size[id(node)] = 1 + sum(self._size[id(k)] for k in kids)
        depth = 1 + max((self._depth[id(k)] for k in kids), default=0)
        if depth > MAX_DEPTH:
            raise _Refused(problem=f"aliases nest the data deeper than {MAX_DEPTH} levels",
                           problem_mark=node.start_mark)
        self._depth[id(node)] = depth
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader reports it
                    continue
                if first is not None:
                    raise _Refused(
                        problem=f"duplicate key {show(key, 80)} (first at line {first}); "
                        "each key may appear once",
                        problem_mark=key_node.start_mark,
                    )
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        value = self.construct_scalar(node)
        if len(value) > 1000:  # int() refuses > 4300 digits with a ValueError
            raise _Refused(problem=f"an integer of {len(value)} characters",
                           problem_mark=node.start_mark)
        return super().construct_yaml_int(node)


StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: where (line, column) and what, from a PyYAML error."""
    if not isinstance(err, yaml.MarkedYAMLError):
        return str(err)
    mark = err.problem_mark or err.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    what = err.problem or err.context or "syntax error"
    if err.context and err.problem:
        what = f"{what} ({err.context})"
    if "constructor for the tag" in what:
        what += "; tags are not allowed (plain data only)"
    return f"{where}: {what}"


def parse(text: str, field: str, value: Any) -> Any:
    """``text`` as YAML with :class:`StrictLoader`; errors are ConfigError(field, value, ...)."""
    loader = StrictLoader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        raise ConfigError(field, value, f"not valid YAML{_yaml_problem(err)}") from None
    except ConfigError:
        raise
    except (ValueError, OverflowError) as err:  # e.g. a timestamp with month 13
        raise ConfigError(field, value, f"not valid YAML: {err}") from None
    finally:
        loader.dispose()


def _guess_encoding(data: bytes) -> str:
    if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        return "UTF-16 (it starts with a UTF-16 byte-order mark)"
    head = data[:4096]
    if head.count(0) > len(head) // 4 and (head[1::2].count(0) > len(head) // 3 or
                                            head[0::2].count(0) > len(head) // 3):
        return "UTF-16 (every other byte is zero)"
    if 0 in head:
        return "binary data, not text"
    text = head.decode("latin-1")
    control = sum(1 for c in text if ord(c) < 32 and c not in "\t\r\n")
    if control > len(text) // 100:
        return "binary data, not text"
    return "latin-1 / Windows-1252 text"


def decode(data: bytes, path: Path, field: str) -> str:
    """UTF-8 text of ``data`` (a BOM is fine); otherwise a ConfigError with the offset and
    the likely encoding."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        if 0 in data:  # valid UTF-8 but YAML refuses NUL, and it means UTF-16 or binary
            raise UnicodeDecodeError("utf-8", data, data.index(0), data.index(0) + 1, "NUL")
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        off = err.start
        line = data[:off].count(b"\n") + 1
        raise ConfigError(
            field,
            str(path),
            f"not UTF-8 text: byte 0x{data[off]:02x} at offset {off} (line {line}); it looks "
            f"like {_guess_encoding(data)}; save the file as UTF-8",
        ) from None


def read_yaml(path: str | os.PathLike, field: str = "config") -> Any:
    """The data of the YAML file ``path`` (None for an empty file), strictly checked."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(field, str(path), "file not found")
    if path.is_dir():
        raise ConfigError(field, str(path), "is a directory; give a YAML file")
    if not path.is_file():
        raise ConfigError(field, str(path), "not a regular file; give a YAML file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as err:
        raise ConfigError(field, str(path), f"cannot read it ({err.strerror})") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(
            field, str(path), f"larger than {MAX_BYTES:,} bytes (5 MB), the limit for a config"
        )
    return parse(decode(data, path, field), field, str(path))


# -- --set overrides -------------------------------------------------------------------


def _kind(v) -> str:
    """``an int``, ``a mapping``, ...: what a YAML value is, for messages."""
    name = {dict: "mapping", list: "list"}.get(type(v), type(v).__name__)
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def parse_overrides(items: list[str] | None) -> list[tuple[str, Any, str]]:
    """``["a.b=1", ...]`` -> ``[("a.b", 1, "a.b=1"), ...]``; values are YAML (strict)."""
    out = []
    for item in items or []:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError("--set", item, "use key.path=value, e.g. train.lr=0.1")
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(
                "--set", item, "the key is empty or has an empty part; use key.path=value, "
                "e.g. train.lr=0.1"
            )
        out.append((key, parse(text, "--set", item), item))
    return out


def set_path(raw: Any, dotted: str, value: Any, item: str | None = None) -> dict:
    """Apply one ``--set a.b.c=value`` to the config data ``raw`` (``terms.1.weight``
    indexes lists; missing or null mappings on the way are created). Returns the data
    (a new mapping when ``raw`` is None)."""
    item = item if item is not None else f"{dotted}=..."
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(
            "--set", item, f"the config file holds {_kind(raw)}, not a mapping of settings"
        )
    keys = dotted.split(".")
    node: Any = raw
    for i, k in enumerate(keys):
        where = ".".join(keys[:i])
        if isinstance(node, list):
            if not (k.isascii() and k.isdigit()) or int(k) >= len(node):
                allowed = f"0..{len(node) - 1}" if node else "nothing (it is empty)"
                raise ConfigError(
                    "--set", item, f"{where} is a list of {len(node)} items; index: {allowed}"
                )
            k = int(k)
        elif k not in node and k.isascii() and k.isdigit() and int(k) in node:
            k = int(k)  # a YAML mapping with integer keys
        if i == len(keys) - 1:
            node[k] = value
            return raw
        child = node[k] if isinstance(node, list) else node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, (dict, list)):
            raise ConfigError(
                "--set",
                item,
                f"{'.'.join(keys[: i + 1])} is {_kind(child)} ({show(child, 60)}), not a "
                f"mapping or list; cannot set {'.'.join(keys[i + 1:])} inside it",
            )
        node = child
    return raw


# -- paths written in a config -----------------------------------------------------------


def resolve_path(value: str, base: Path, field: str) -> str:
    """A relative path of a config resolves against the config file's directory ``base``
    when it exists there, else against the working directory; when neither exists the
    error names both paths tried. Absolute paths are returned unchanged."""
    p = Path(os.path.expandvars(os.path.expanduser(str(value))))
    if p.is_absolute():
        return str(value)
    beside = base / p
    if beside.exists():
        return str(beside)
    if p.exists():
        return str(p) if str(p) != str(value) else value
    tried = [beside.resolve()] if base.resolve() != Path.cwd().resolve() else []
    tried.append(Path.cwd() / p)
    raise ConfigError(
        field, value, f"no such file or directory; tried {' and '.join(map(str, tried))}"
    )
