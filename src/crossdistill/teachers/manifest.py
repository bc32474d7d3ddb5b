"""A teacher store's ``manifest.json``: its fields, and the checks that refuse a damaged one.

The manifest is the only thing that says what a store's bytes mean, so every field is
checked against the others (types, ranges, shapes, byte counts, shard names, row counts)
before a shard is opened; a store that cannot be trusted is refused with one line that
names the store and the field, never read with a wrong meaning.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch

from ..errors import ConfigError
from ..signals import OBSERVED  # noqa: F401  (re-exported: the writer and store read it here)

FORMAT = "crossdistill-teacher-store/2"
OLD_FORMATS = ("crossdistill-teacher-store/1",)  # no content hashes: refused, rewrite it
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
LOGITS = "logits"
TOPK_KEYS = ("logits.values", "logits.indices", "logits.lse")
DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}  # store dtype -> safetensors
INDEX_DTYPES = {"uint8": "U8", "uint16": "U16", "int32": "I32"}
ST_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "I64": 8, "U8": 1, "U16": 2, "I32": 4}
RERUN = "re-run `crossdistill cache-teacher` with the same config and options"
SHARD_RE = re.compile(r"shard-\d{5}\.safetensors")
TEMP_RE = re.compile(r"\.(shard-\d{5}\.safetensors|manifest\.json)\..*\.tmp")
_HEX16, _HEX64 = re.compile(r"[0-9a-f]{16}"), re.compile(r"[0-9a-f]{64}")

# what a store was made from: a re-run with the same values continues an interrupted store
HEAD_KEYS = (
    "format",
    "teacher_hash",
    "teacher_class",
    "inputs",
    "io",
    "data_fingerprint",
    "transform",
    "num_samples",
    "dtype",
    "topk",
    "observed",
    "taps",
    "shard_size",
    "batch_size",
    "device",
)
# what the first batch showed: kept by a resumed write
META_KEYS = (
    "num_classes",
    "vocab_size",
    "positions_per_sample",
    "index_dtype",
    "shapes",
    "bytes_per_sample",
    "bytes_per_sample_signals",
    "bytes_per_token",
)
SHARD_KEYS = ("shards", "shard_rows", "shard_sha256")
KEYS = (*HEAD_KEYS, *META_KEYS, *SHARD_KEYS, "complete")
OPTIONAL = ("observed",)  # absent in stores written before it existed (= null)


def index_dtype(vocab: int) -> torch.dtype:
    """The smallest integer type holding class ids ``0..vocab-1`` (int16 would wrap past
    32,767, which silently corrupts large-vocabulary top-k stores)."""
    if vocab <= 256:
        return torch.uint8
    if vocab <= 65536:
        return torch.uint16
    return torch.int32


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 8 MiB pieces (shards can be larger than memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(8 << 20):
            h.update(piece)
    return h.hexdigest()


def signal_dtypes(m: dict) -> dict[str, str]:
    """The safetensors dtype of every tensor a shard of this manifest holds."""
    out = {"idx": "I64"}
    if m.get("observed"):
        out[OBSERVED] = "F32"
    elif m["topk"]:
        idx = INDEX_DTYPES[m["index_dtype"]]
        out.update({"logits.values": "F16", "logits.indices": idx, "logits.lse": "F16"})
    else:
        out[LOGITS] = DTYPES[m["dtype"]]
    out.update({t: DTYPES[m["dtype"]] for t in m["taps"][1:]})
    return out


def read_manifest(store: Path, field: str) -> dict:
    """The validated manifest of the store directory ``store``, or a one-line ConfigError."""
    path = store / MANIFEST
    if not path.is_file():
        leftovers = store.is_dir() and any(
            SHARD_RE.fullmatch(p.name) or TEMP_RE.fullmatch(p.name) for p in store.iterdir()
        )
        if leftovers:
            raise ConfigError(
                field,
                str(store),
                f"incomplete teacher store: writing was interrupted before its first shard "
                f"was recorded (no {MANIFEST}); {RERUN} to complete it",
            )
        raise ConfigError(
            field,
            str(store),
            f"not a teacher store (no {MANIFEST}); "
            "create one with `crossdistill cache-teacher CONFIG`",
        )
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ValueError(f"larger than {MAX_MANIFEST_BYTES >> 20} MiB")
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ConfigError(field, str(path), f"not a readable manifest ({err}); {RERUN}") from None
    _validate(m, field, str(store))
    return m


def _int(v, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _ints(v, lo: int = 1) -> bool:
    return isinstance(v, list) and all(_int(x, lo) for x in v)


def _strs(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _io_ok(v) -> bool:
    if not isinstance(v, dict) or set(v) != {"inputs", "logits", "class_dim", "kwargs"}:
        return False
    inputs, sel = v["inputs"], v["logits"]
    ok_in = (
        inputs is None
        or _strs(inputs)
        or (
            isinstance(inputs, dict)
            and all(isinstance(x, str) for x in (*inputs, *inputs.values()))
        )
    )
    step = (int, str)
    ok_sel = (
        sel is None
        or isinstance(sel, step)
        or (isinstance(sel, list) and all(isinstance(x, step) for x in sel))
    )
    class_dim = v["class_dim"] is None or isinstance(v["class_dim"], int)
    return ok_in and ok_sel and class_dim and isinstance(v["kwargs"], dict)


def _validate(m, field: str, where: str) -> None:
    def bad(key: str, what: str) -> ConfigError:
        return ConfigError(
            field, where, f"damaged {MANIFEST}: {key} {what} (edited or corrupted?); {RERUN}"
        )

    if not isinstance(m, dict):
        raise bad("the top level", f"is a {type(m).__name__}, not an object")
    fmt = m.get("format")
    if fmt in OLD_FORMATS:
        raise ConfigError(
            field,
            where,
            f"written by an older crossdistill ({fmt}) without content hashes, so its "
            f"contents cannot be checked; {RERUN} to rewrite it",
        )
    if fmt != FORMAT:
        raise bad("format", f"is {fmt!r}, expected {FORMAT!r}")
    if m.get("complete") is False:
        n = len(m["shards"]) if isinstance(m.get("shards"), list) else 0
        raise ConfigError(
            field,
            where,
            f"incomplete teacher store: writing was interrupted after {n} shard(s); "
            f"{RERUN} to complete it",
        )
    missing = [k for k in KEYS if k not in m and k not in OPTIONAL]
    if missing:
        raise bad(", ".join(missing[:4]), "missing")
    rules = {
        "complete": m["complete"] is True,
        "teacher_hash": isinstance(m["teacher_hash"], str) and _HEX16.fullmatch(m["teacher_hash"]),
        "teacher_class": isinstance(m["teacher_class"], str),
        "inputs": _strs(m["inputs"]) and len(m["inputs"]) > 0,
        "io": _io_ok(m["io"]),
        "data_fingerprint": isinstance(m["data_fingerprint"], str)
        and _HEX16.fullmatch(m["data_fingerprint"]),
        "transform": isinstance(m["transform"], dict),
        "num_samples": _int(m["num_samples"], 1),
        "num_classes": _int(m["num_classes"], 1),
        "dtype": m["dtype"] in DTYPES,
        "shard_size": _int(m["shard_size"], 1),
        "batch_size": _int(m["batch_size"], 1),
        "device": isinstance(m["device"], str),
        "taps": _strs(m["taps"])
        and m["taps"][:1] == [OBSERVED if m.get("observed") else LOGITS]
        and len(set(m["taps"])) == len(m["taps"]),
        "observed": m.get("observed") is None
        or (isinstance(m["observed"], str) and m["topk"] is None),
        "shapes": isinstance(m["shapes"], dict) and all(_ints(v) for v in m["shapes"].values()),
        "shards": isinstance(m["shards"], list) and len(m["shards"]) > 0,
    }
    for key, ok in rules.items():
        if not ok:
            raise bad(key, f"has a bad value ({str(m.get(key))[:60]})")
    C, topk = m["num_classes"], m["topk"]
    if m["vocab_size"] != C:
        raise bad("vocab_size", f"is {m['vocab_size']}, num_classes is {C}")
    if topk is not None and not (_int(topk, 1) and topk < C):
        raise bad("topk", f"is {topk}; must be null or in 1..{C - 1} (num_classes - 1)")
    want_index = str(index_dtype(C)).removeprefix("torch.") if topk else None
    if m["index_dtype"] != want_index:
        raise bad("index_dtype", f"is {m['index_dtype']}, {C} classes need {want_index}")
    _check_shapes(m, bad)
    _check_shards(m, bad)


def _check_shapes(m: dict, bad) -> None:
    dtypes, shapes, topk = signal_dtypes(m), m["shapes"], m["topk"]
    if set(shapes) != set(dtypes):
        raise bad("shapes", f"has keys {sorted(shapes)}, the taps need {sorted(dtypes)}")
    if shapes["idx"] != []:
        raise bad("shapes.idx", "must be [] (one id per sample)")
    if m.get("observed"):
        lead = shapes[OBSERVED]
    elif topk:
        lead = shapes["logits.lse"]
        if shapes["logits.values"] != [*lead, topk] or shapes["logits.indices"] != [*lead, topk]:
            raise bad("shapes", f"top-k values/indices must be {[*lead, topk]}")
    else:
        if not shapes[LOGITS] or shapes[LOGITS][-1] != m["num_classes"]:
            raise bad("shapes.logits", f"must end in num_classes ({m['num_classes']})")
        lead = shapes[LOGITS][:-1]
    if m["positions_per_sample"] != math.prod(lead):
        raise bad("positions_per_sample", f"must be {math.prod(lead)} (logits shape {lead})")
    per = {k: math.prod(shapes[k]) * ST_BYTES[d] for k, d in dtypes.items()}
    total = sum(per.values())
    if m["bytes_per_sample"] != total or m["bytes_per_sample_signals"] != total - per["idx"]:
        raise bad("bytes_per_sample", f"must be {total} for these shapes and dtypes")
    bpt = m["bytes_per_token"]
    if not isinstance(bpt, (int, float)) or not math.isclose(bpt, (total - 8) / math.prod(lead)):
        raise bad("bytes_per_token", f"must be {(total - 8) / math.prod(lead):g}")


def _check_shards(m: dict, bad) -> None:
    names, rows, hashes = m["shards"], m["shard_rows"], m["shard_sha256"]
    for i, name in enumerate(names):
        if name != shard_name(i):  # plain names in the store directory, nothing else
            raise bad(f"shards.{i}", f"is {str(name)[:80]!r}; expected {shard_name(i)!r}")
    if not _ints(rows) or len(rows) != len(names):
        raise bad("shard_rows", "must be one positive row count per shard")
    if not _strs(hashes) or len(hashes) != len(names) or not all(map(_HEX64.fullmatch, hashes)):
        raise bad("shard_sha256", "must be one SHA-256 (64 hex digits) per shard")
    size = m["shard_size"]
    if any(r != size for r in rows[:-1]) or rows[-1] > size:
        raise bad("shard_rows", f"every shard but the last holds shard_size ({size}) rows")
    if sum(rows) != m["num_samples"]:
        raise bad("num_samples", f"is {m['num_samples']}; the shards hold {sum(rows)} rows")
