"""A seeded generator of mutated CLI cases over every config surface.

``generate(n, seed)`` is a pure function of its arguments (and of the registries' names): it
draws with one ``random.Random(seed)``, so a failing case is reproduced by its id. Each case
records its surface, a one-line description of the mutation (the config diff), the likely
owner ``area`` of a failure and ``expect``: ``"any"`` (exit 0 or a clean exit 2 both pass),
``"error"`` (the input is wrong; exit 0 is the failure ``accepted``) or ``"ok"`` (a valid
config; a refusal is the failure ``refused-valid``).
"""

from __future__ import annotations

import inspect
import math
import random
from dataclasses import dataclass, field
from typing import Any

import yaml

from . import bases

AREAS = ("schema", "files/YAML/CLI", "store", "training/NaN", "other")


@dataclass
class Case:
    id: str
    surface: str
    family: str
    mutation: str
    area: str
    argv: list[str]
    files: dict[str, bytes] = field(default_factory=dict)
    ops: list[tuple[str, dict]] = field(default_factory=list)
    expect: str = "any"
    check: bool = True  # train: run with --check when the CLI has it
    needs: tuple[str, ...] = ()


# -- value pools ---------------------------------------------------------------------------------
NON_FINITE = [float("nan"), float("inf"), float("-inf"), "nan", "inf", ".inf", "-.inf", "NaN",
              "1e999"]
EXTREME = [0, -1, -3, 1e30, -1e30, 2**63, 2**64, 10**100, 1e-30, 1e300, 0.5, 3.7, 100000]
WRONG_TYPE = ["hot", "", "x" * 300, [1, 2], [], {}, {"a": 1}, None, True, [[1]], "1e3", "٣"]
UNKNOWN_NAMES = ["kdd", "KD", "foo", "", " kd", "kd ", "nan", "None", "ViT", "resnet-9000", "a\nb"]
DEVICES = ["cuda", "cuda:7", "mps", "meta", "", "garbage", "xla", "vulkan", "cuda:-1", "cpu:1", 0]
BAD_TAPS = [
    "blocks.99", "stage9", "..", ".", "layers..0", "a" * 500, "output.hidden_states[99]",
    "__class__", "__init__", "fc.weight", "layers.0.1.2.3", "*", "layers.*", ":input",
]
ODD_TAPS = ["", "fc:input", "logits[0]",  # "" is the model itself
             "logits['x']", "flatten[3]", "logits:input", "[0]"]
PATHS = ["fx/nope.safetensors", "fx", "/dev/null", "", ".", "fx/teacher/metrics.jsonl",
         "fx/cfg/teacher.yaml", "~nope", "/proc/fuzz", "a\x00b"]
RUN_NAMES = ["../../x", "a/b", "", ".", "..", "x" * 300, "nan", "~", "$HOME", "a\x00b"]
UNKNOWN_KEYS = ["epoch", "learning_rate", "lr ", "Temperature", "temprature", "batchsize",
                "extra", "__class__", "", "x.y", "1"]
NAME_KEYS = {"loss", "model", "projector", "optimizer", "schedule", "strategy", "hf",
             "tokenizer", "audio_norm", "head", "method"}
PATH_KEYS = {"checkpoint", "root", "store", "from_config", "out_dir", "hf_path", "fsdd_root",
             "cache_dir"}
NOT_HYPER = {"s", "t", "y", "s_shape", "t_shape", "s_shapes", "t_shapes", "num_samples",
             "mask", "num_classes", "in_channels", "self", "student", "teacher", "ipc",
             "input_shape", "device", "seed", "iterations", "progress"}


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def _bad_number(v) -> bool:
    """True when ``v`` cannot be a finite number (so a numeric field must refuse it)."""
    if isinstance(v, bool) or v is None:
        return False
    if isinstance(v, (int, float)):
        return not math.isfinite(v)
    if isinstance(v, str):
        try:
            return not math.isfinite(float(v))
        except ValueError:
            return True
    return True  # list / dict


def _paths(node, prefix=()):
    """Every (path, value) in a nested config, depth first."""
    out = [(prefix, node)] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _get(cfg, path):
    for k in path:
        cfg = cfg[k]
    return cfg


def _set(cfg, path, value):
    _get(cfg, path[:-1])[path[-1]] = value


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def dump(cfg) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, default_flow_style=None)


def _short(v, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


# -- registries (names and hyper-parameters from the signatures) ------------------------------
def _registry():
    from crossdistill import cli, registry

    cli._import_all()  # noqa: SLF001
    return registry


def _params(fn) -> dict[str, Any]:
    """Keyword hyper-parameters of a registered callable or class and their defaults."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return {}
    return {
        n: (None if p.default is inspect.Parameter.empty else p.default)
        for n, p in sig.parameters.items()
        if n not in NOT_HYPER and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


# -- the generator ---------------------------------------------------------------------------------
FAMILIES = {  # family -> (weight in "full", weight in "fast")
    "tree": (30, 34),
    "hyper": (14, 16),
    "swap": (8, 6),
    "text": (10, 12),
    "set": (8, 10),
    "argv": (7, 8),
    "file": (8, 7),
    "store": (5, 4),
    "resume": (3, 1),
    "numeric": (3, 0),
    "valid": (4, 2),
}
FAST_SURFACES = ("train/digits", "train/digits-cnn", "train/kd", "train/kd-vit", "train/method",
                 "train/store", "train/mnist", "condense", "cache-teacher")
# the expensive surfaces (lm/seg/av) appear in the fast profile only through quick failures
FAST_QUICK = ("train/lm", "train/seg", "train/av")


class _Gen:
    def __init__(self, seed: int, profile: str):
        self.rng = random.Random(seed)
        self.seed, self.profile = seed, profile
        self.reg = _registry()
        self.cuda = _cuda()

    # helpers -------------------------------------------------------------------------------
    def pick(self, seq):
        return seq[self.rng.randrange(len(seq))]

    def surface(self, allowed=None) -> str:
        names = list(bases.BASES)
        if self.profile == "fast":
            names = [s for s in names if s in FAST_SURFACES]
        if allowed is not None:
            names = [s for s in names if s in allowed] or list(allowed)
        return self.pick(names)

    def case(self, surface, family, mutation, area, cfg=None, text=None, extra_argv=(),
             expect="any", ops=(), check=True, files=None, argv=None, config_arg="config.yaml"):
        cmd, _ = bases.BASES.get(surface, ("train", None))
        files = dict(files or {})
        if text is None and cfg is not None:
            text = dump(cfg)
        if text is not None:
            files["config.yaml"] = text.encode() if isinstance(text, str) else text
        if argv is None:
            argv = [cmd, config_arg]
            if cmd == "condense":
                argv.append("--no-progress")
            if cmd in ("train", "condense", "cache-teacher") and "--out" not in extra_argv:
                argv += ["--out", "out"]
        argv = list(argv) + list(extra_argv)
        needs = set(bases.fixtures_of(surface))
        for name, kw in ops:
            needs |= {"store": {"teacher", "store"}, "run_dir": {"teacher"}, "mnist": {"mnist"},
                      "tokenizer": {"lm_teacher"}}.get(name, set())
            if name == "checkpoint":
                needs.add(kw["src"].split("/")[0])
        return Case("", surface, family, mutation, area, argv, files, list(ops), expect,
                    check and cmd == "train", tuple(sorted(needs)))

    # families ------------------------------------------------------------------------------
    def tree(self, surface):
        _, cfg = bases.base(surface)
        paths = _paths(cfg)
        if self.profile == "fast":  # condense has no --check: keep its loop short
            paths = [(p, v) for p, v in paths if p[0] != "iterations"]
        path, old = self.pick(paths)
        key = path[-1] if isinstance(path[-1], str) else (path[-2] if len(path) > 1 else "")
        r = self.rng.random()
        under_free = any(p in ("config", "task", "params") for p in path[:-1])
        if r < 0.12:
            del _get(cfg, path[:-1])[path[-1]]
            return self.case(surface, "tree", f"delete {_dotted(path)}", "schema", cfg)
        if r < 0.22:
            maps = [p for p, v in _paths(cfg) if isinstance(v, dict)] + [()]
            where = self.pick(maps)
            k = self.pick(UNKNOWN_KEYS)
            node = _get(cfg, where)
            if k in node:
                k = k + "_x"
            node[k] = self.pick([1, "x", None, [1]])
            free = any(p in ("config", "task", "params") for p in where)
            return self.case(surface, "tree", f"add {_dotted(where + (k,))} = {node[k]!r}",
                             "schema", cfg, expect="any" if free else "error")
        # replace a value, with a pool chosen by the field's kind
        expect = "any"
        if key in NAME_KEYS and isinstance(old, str) or key == "name" and "method" in path:
            new = self.pick(UNKNOWN_NAMES)
            expect = "error"
        elif key == "name" and path == ("name",):
            new = self.pick(RUN_NAMES)
        elif key == "device":
            new = self.pick(DEVICES)
            expect = "any" if (new == "cpu:1" or self.cuda and str(new).startswith("cuda")) \
                else "error"
        elif key in ("student", "teacher") and "terms" in path:
            new = self.pick(BAD_TAPS + ODD_TAPS)
            expect = "error" if new in BAD_TAPS else "any"
            if surface == "cache-teacher" and key == "student":
                expect = "any"  # caching runs the teacher only
        elif key in PATH_KEYS:
            new = self.pick(PATHS)
            expect = "error" if key != "out_dir" else "any"
        elif isinstance(old, (int, float)) and not isinstance(old, bool):
            new = self.pick(NON_FINITE + EXTREME + WRONG_TYPE)
            expect = "error" if _bad_number(new) and new is not None else "any"
        elif isinstance(old, bool):
            new = self.pick(["yes", "hot", 2, None, [True], "nan"])
            expect = "error" if new in ("hot", "nan") or isinstance(new, list) else "any"
        else:
            new = self.pick(NON_FINITE + EXTREME + WRONG_TYPE + UNKNOWN_NAMES)
        if under_free:
            expect = "any"
        _set(cfg, path, new)
        return self.case(surface, "tree", f"set {_dotted(path)} = {_short(new)}", "schema", cfg,
                         expect=expect)

    def _components(self, cfg):
        """(path, registry, name) of every part of a config that takes hyper-parameters."""
        r = self.reg
        out = []
        for i, t in enumerate(cfg.get("terms", [])):
            out.append((("terms", i), r.LOSSES, t["loss"]))
        for role in ("student", "teacher"):
            spec = cfg.get(role)
            if isinstance(spec, dict) and spec.get("model"):
                out.append(((role,), r.MODELS, spec["model"]))
        if isinstance(cfg.get("method"), dict):
            out.append((("method",), r.METHODS, cfg["method"]["name"]))
        if isinstance(cfg.get("method"), str):  # condense
            out.append(((), r.CONDENSERS, cfg["method"]))
        return out

    def hyper(self, surface):
        _, cfg = bases.base(surface)
        comps = self._components(cfg)
        if not comps or self.rng.random() < 0.12:  # projector params on a feature term
            terms = cfg.get("terms") or [{"loss": "mse"}]
            cfg["terms"] = terms
            t = terms[-1]
            t["projector"] = self.pick(["mlp", "linear", "conv1x1", "auto"])
            k = self.pick(["hidden", "hidden_dim", "bias", "kernel_size", "heads", "nope"])
            t["projector_params"] = {k: self.pick(NON_FINITE + EXTREME + WRONG_TYPE)}
            return self.case(surface, "hyper", f"terms.{len(terms) - 1}: projector "
                             f"{t['projector']}, projector_params {t['projector_params']!r}",
                             "schema", cfg)
        path, reg, name = self.pick(comps)
        try:
            params = _params(reg.get(name))
        except Exception:  # noqa: BLE001
            params = {}
        node = _get(cfg, path)
        if not params or self.rng.random() < 0.1:
            k = self.pick(["temprature", "alfa", "nope", "Temperature"])
            node[k] = 1.0
            return self.case(surface, "hyper", f"{_dotted(path + (k,))} = 1.0 (not a parameter "
                             f"of {name})", "schema", cfg, expect="error")
        k = self.pick(sorted(params))
        default = params[k]
        new = self.pick(NON_FINITE + EXTREME + WRONG_TYPE)
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        expect = "error" if numeric and _bad_number(new) and new is not None else "any"
        if isinstance(new, list):  # sizes often take a pair or a list (img_size: [h, w])
            expect = "any"
        if k == "temperature" and isinstance(new, (int, float)) and not isinstance(new, bool) \
                and new <= 0:
            expect = "error"
        node[k] = new
        return self.case(surface, "hyper", f"{_dotted(path + (k,))} = {_short(new)} ({name}; "
                         f"default {default!r})", "schema", cfg, expect=expect)

    def swap(self, surface):
        """A valid registered name in another place: another loss, model, method, condenser."""
        _, cfg = bases.base(surface)
        r = self.reg
        choice = self.rng.random()
        if surface == "condense":
            new = self.pick(r.CONDENSERS.names())
            cfg["method"] = new
            return self.case(surface, "swap", f"method = {new}", "schema", cfg)
        if choice < 0.4 and cfg.get("terms"):
            i = self.rng.randrange(len(cfg["terms"]))
            new = self.pick(r.LOSSES.names())
            cfg["terms"][i] = {"loss": new, **{k: v for k, v in cfg["terms"][i].items()
                                                if k in ("student", "teacher", "weight")}}
            return self.case(surface, "swap", f"terms.{i}.loss = {new} (its defaults)",
                             "schema", cfg)
        if choice < 0.6:
            new = self.pick(r.LOSSES.names())
            term = {"loss": new, "student": self.pick(["logits", "layers.0", "fc", "blocks.0"]),
                    "teacher": self.pick(["logits", "stage3", "flatten", None, "default"])}
            cfg.setdefault("terms", [{"loss": "ce"}]).append(term)
            return self.case(surface, "swap", f"append term {term}", "schema", cfg)
        if choice < 0.8:
            new = self.pick(r.MODELS.names())
            role = "student"
            spec = cfg[role]
            cfg[role] = {"model": new, **{k: v for k, v in spec.items()
                                          if k in ("inputs",) or self.rng.random() < 0.3}}
            cfg[role].pop("hf", None)
            cfg[role].pop("config", None)
            return self.case(surface, "swap", f"student = {cfg[role]}", "schema", cfg)
        new = self.pick(r.METHODS.names())
        cfg["method"] = {"name": new}
        cfg.pop("terms", None)
        return self.case(surface, "swap", f"method = {new}", "schema", cfg)

    def text(self, surface):
        _, cfg = bases.base(surface)
        body = dump(cfg)
        kinds = ["latin-1", "utf-16", "utf-16-le", "utf-8-bom", "binary", "nul", "truncated",
                 "garbage", "empty", "scalar", "duplicate-top", "duplicate-nested",
                 "billion-laughs", "deep-nesting", "tag", "merge-key", "config-path",
                 "long-value", "long-list", "from_config"]
        if self.profile == "fast":
            kinds.remove("long-list")
        how = self.pick(kinds)
        err = "error"
        if how == "latin-1":
            data = ("# caf\xe9 (latin-1)\n" + body).encode("latin-1")
        elif how == "utf-16":
            data = body.encode("utf-16")
        elif how == "utf-16-le":
            data = body.encode("utf-16-le")
        elif how == "utf-8-bom":
            data, err = b"\xef\xbb\xbf" + body.encode(), "any"
        elif how == "binary":
            data = self.rng.randbytes(self.rng.randrange(16, 4096))
        elif how == "nul":
            i = self.rng.randrange(len(body))
            data = (body[:i] + "\x00" + body[i:]).encode()
        elif how == "truncated":
            data, err = body[: self.rng.randrange(1, len(body))].encode(), "any"
        elif how == "garbage":
            data = self.pick([b"student: {model: [\n", b"key: value: other\n", b"\t- a\n",
                              b"- [\n", b"{{}}\n", b"a: 'unterminated\n", b"%YAML 9.9\n---\na: 1",
                              b"--- a\n--- b\n", b"*undefined\n", b"? [a]\n: b\n"])
        elif how == "empty":
            data = self.pick([b"", b"# only a comment\n", b"---\n", b"\n\n"])
        elif how == "scalar":
            data = self.pick([b"3\n", b"hello\n", b"null\n", b"~\n", b"[]\n", b"[1, 2]\n",
                              b"true\n", b"1e30\n"])
        elif how == "duplicate-top":
            top = self.pick(list(cfg))
            data = (body + dump({top: cfg[top]})).encode()
        elif how == "duplicate-nested":
            data = body.replace("epochs: 1", "epochs: 1, epochs: 2", 1) if "epochs: 1," in body \
                else None
            if data is None:
                sect = self.pick([k for k, v in cfg.items() if isinstance(v, dict)])
                first = next(iter(cfg[sect]))
                data = body + f"{sect}:\n  {first}: 1\n  {first}: 2\n"
                data = data.replace(f"\n{sect}:", f"\n{sect}_dup:", 0)
            data = data.encode()
        elif how == "billion-laughs":
            lol = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
            for prev, cur in zip("abcdefgh", "bcdefghi"):
                lol.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
            where = self.pick(["top", "train.epochs", "name", "terms", "student.model",
                               "train.device", "data"])
            laughs = "\n".join(lol)
            if where == "top":
                data = (laughs + "\n" + body).encode()
            else:
                anchors = "\n".join("x" + line for line in lol)  # unknown top keys, then use
                sect, _, sub = where.partition(".")
                use = f"{sect}: *i\n" if not sub else f"{sect}: {{{sub}: *i}}\n"
                rest = "\n".join(line for line in body.splitlines()
                                 if not line.startswith(sect + ":"))
                data = (anchors + "\n" + rest + "\n" + use).encode()
        elif how == "deep-nesting":
            n = self.pick([500, 5000, 50000])
            kind = self.pick(["list", "map", "value"])
            if kind == "list":
                data = ("[" * n + "]" * n).encode()
            elif kind == "map":
                data = ("{a: " * n + "1" + "}" * n).encode()
            else:
                data = (body + "deep: " + "[" * n + "]" * n + "\n").encode()
        elif how == "tag":
            tag = self.pick(['!!python/object/apply:os.system ["echo pwned"]',
                             "!!python/name:os.system", "!!binary aGVsbG8=", "!!set {a, b}",
                             "!!timestamp 2001-12-14", "!!float nan", "!custom 1"])
            data = body.replace("lr: 0.05", f"lr: {tag}").replace("lr: 0.003", f"lr: {tag}")
            if data == body:
                data = body + f"seed: {tag}\n"
            data = data.encode()
        elif how == "merge-key":
            data, err = ("defaults: &d {epochs: 1}\n" + body).encode(), "error"
        elif how == "config-path":
            arg = self.pick(["nope.yaml", "fx", "/dev/null", "./nope/config.yaml", ""])
            return self.case(surface, "text", f"config path {arg!r}", "files/YAML/CLI", cfg,
                             expect="error", config_arg=arg)
        elif how == "long-value":
            n = self.pick([10**5, 10**6, 5 * 10**6] if self.profile == "full" else [10**5])
            where = self.pick(["name", "train.device", "student.model", "terms.0.loss", "huge"])
            v = "@LONG@"  # dumped as a placeholder, then expanded (PyYAML dumps slowly)
            if where == "huge":
                cfg["huge"] = v
            elif where == "name":
                cfg["name"] = v
            elif where == "terms.0.loss":
                cfg.setdefault("terms", [{}])[0]["loss"] = v
            else:
                sect, sub = where.split(".")
                cfg.setdefault(sect, {})[sub] = v
            data = dump(cfg).replace("@LONG@", "x" * n).encode()
            return self.case(surface, "text", f"{where} = 'x' * {n}", "files/YAML/CLI",
                             text=data, expect="error")
        elif how == "long-list":
            n = self.pick([10**4, 5 * 10**4])  # PyYAML reads ~13k list items/s
            key = "milestones" if surface.startswith("train") else "ipc"
            sect = cfg.setdefault("train", {}) if key == "milestones" else cfg
            sect[key] = "@LIST@"
            data = dump(cfg).replace("@LIST@", "[" + ", ".join(["0.5"] * n) + "]")
            return self.case(surface, "text", f"{key} = [0.5] * {n}", "files/YAML/CLI",
                             text=data.encode(), expect="any")
        else:  # from_config pointing at a broken teacher config
            if not surface.startswith("train"):
                return self.text("train/kd")
            bad = self.pick([b"\xe9\xff", b"3\n", b"student: {model: [\n", b""])
            cfg["teacher"] = {"from_config": "teacher.yaml"}
            cfg.setdefault("terms", [{"loss": "ce"}, {"loss": "kd"}])
            return self.case(surface, "text", f"teacher.from_config -> file {bad!r}",
                             "files/YAML/CLI", cfg, expect="error",
                             files={"teacher.yaml": bad})
        return self.case(surface, "text", f"config file: {how}", "files/YAML/CLI", text=data,
                         expect=err)

    def set_(self, surface):
        cmd, cfg = bases.base(surface)
        r = self.rng.random()
        if r < 0.5:
            misuse = self.pick([
                ["train.epochs.x=1"], ["train.lr"], ["=1"], ["train.lr=["], ["train.lr={a: "],
                ["train.lr=: :"], ["train.lr=!!python/object:os.system"], ["train.lr=*a"],
                ["terms.9.weight=1"], ["terms.x.weight=1"], ["terms.-1.weight=1"], ["a..b=1"],
                [".=1"], ["train.=1"], ["student=3", "student.model=cnn"],
                ["terms.0.loss.x=1"], ["train.lr=nan"], ["train.lr=.inf"], ["train=[1]"],
                ["train.lr=0.1", "train.lr.x=2"], ["student.hidden.0.a=1"], ["data=null",
                 "data.name=digits"], ["terms=null", "terms.0.loss=kd"], ["ipc.x=1"],
                ["method.name.x=1"], ["train.seed=9223372036854775808"],
            ])
            if cmd == "condense":
                return self.case(surface, "set", "condense has no --set: " + " ".join(misuse),
                                 "files/YAML/CLI", cfg, extra_argv=["--set", misuse[0]],
                                 expect="error")
            ok = misuse in (["data=null", "data.name=digits"],
                            ["train.seed=9223372036854775808"])
            argv = [a for m in misuse for a in ("--set", m)]
            text = None
            if self.rng.random() < 0.15:
                text = self.pick([b"3\n", b"[1, 2]\n", b"hello\n"])
                argv = ["--set", "train.lr=1"]
                misuse = [f"train.lr=1 onto the document {text!r}"]
                ok = False
            return self.case(surface, "set", "--set " + " ".join(misuse), "files/YAML/CLI",
                             cfg, text=text, extra_argv=argv, expect="any" if ok else "error")
        # a valid path, a value from the pools, rendered as YAML text
        path, old = self.pick([(p, v) for p, v in _paths(cfg)
                               if not isinstance(v, (dict, list))] or [(("train", "lr"), 0.1)])
        new = self.pick(NON_FINITE + EXTREME + WRONG_TYPE)
        text = yaml.safe_dump(new, default_flow_style=True).strip()
        text = text.removesuffix("\n...").removesuffix("...").strip() or "''"
        expect = "error" if (isinstance(old, (int, float)) and not isinstance(old, bool)
                             and _bad_number(new) and new is not None) else "any"
        if cmd == "condense":
            return self.tree(surface)
        return self.case(surface, "set", f"--set {_dotted(path)}={text}", "schema", cfg,
                         extra_argv=["--set", f"{_dotted(path)}={text}"], expect=expect)

    def argv(self, surface):
        cmd, cfg = bases.base(surface)
        files = {"occupied": b"a file, not a directory\n"}
        if cmd == "train":
            extra, expect = self.pick([
                (["--out", "occupied"], "error"), (["--out", "/proc/fuzz"], "error"),
                (["--out", "occupied/sub"], "error"), (["--nproc", "0"], "error"),
                (["--nproc", "-3"], "error"), (["--nproc", "abc"], "error"),
                (["--nproc", "1e3"], "error"), (["--bogus"], "error"),
                (["--resume"], "error"), (["--resume", "--out", "occupied"], "error"),
                (["--set"], "error"), (["--out"], "error"), (["--nproc", "1"], "any"),
                (["--out", "sub/../x/"], "any"),
            ])
        elif cmd == "cache-teacher":
            extra, expect = self.pick([
                (["--topk", "0"], "error"), (["--topk", "-1"], "error"),
                (["--topk", "11"], "error"), (["--topk", "1000000"], "error"),
                (["--topk", "abc"], "error"), (["--taps", "nonexist"], "error"),
                (["--taps", "stage3", "stage3"], "any"), (["--taps", ""], "any"),
                (["--taps", "logits"], "any"), (["--taps", "fc:input"], "any"),
                (["--dtype", "int8"], "error"), (["--out", "occupied"], "error"),
                (["--out", "/proc/fuzz"], "error"), (["--topk", "3"], "any"),
                (["--set", "teacher.checkpoint=fx/nope.safetensors"], "error"),
                (["--set", "teacher=null"], "error"),
                (["--set", "teacher.checkpoint=null"], "error"),
                (["--set", "teacher.store=fx/store", "--set", "teacher.model=null"], "error"),
            ])
        else:
            extra, expect = self.pick([
                (["--out", "occupied"], "error"), (["--out", "/proc/fuzz"], "error"),
                (["--bogus"], "error"), (["--out", "occupied/sub"], "error"),
            ])
            if self.rng.random() < 0.35:  # condense-eval on a broken run directory
                how = self.pick(["empty", "random"])
                return self.case(surface, "argv", f"condense-eval on a {how} "
                                 "synthetic.safetensors", "files/YAML/CLI",
                                 argv=["condense-eval", "syn", "--no-progress"],
                                 ops=[("synthetic", {"dst": "syn", "how": how, "seed": 1})],
                                 expect="error")
        argv = [cmd, "config.yaml"] + (["--no-progress"] if cmd == "condense" else [])
        if "--out" not in extra:
            argv += ["--out", "out"]
        return self.case(surface, "argv", " ".join(extra), "files/YAML/CLI", cfg, files=files,
                         argv=argv + extra, expect=expect,
                         check=not {"--out", "--resume"} & set(extra))  # --check skips them

    def file(self, surface):
        cmd, cfg = bases.base(surface)
        teachers = {"train/kd": "teacher", "train/kd-vit": "teacher", "train/method": "teacher",
                    "cache-teacher": "teacher", "train/lm-kd": "lm_teacher",
                    "train/seg-kd": "seg_teacher", "train/av-kd": "av_teacher"}
        mnist_surfaces = ("train/mnist", "train/seg", "train/av", "train/seg-kd", "train/av-kd")
        if surface in teachers and (surface not in mnist_surfaces or self.rng.random() < 0.5):
            how = self.pick(["missing", "directory", "empty", "random", "truncated",
                             "header-flip", "data-flip", "huge-header", "json-garbage", "nan",
                             "inf", "other-model", "pickle", "yaml"])
            cfg["teacher"]["checkpoint"] = "ckpt.safetensors"
            op = ("checkpoint", {"dst": "ckpt.safetensors", "how": how, "seed": self.rng.random(),
                                 "src": f"{teachers[surface]}/student.safetensors"})
            return self.case(surface, "file", f"teacher.checkpoint: {how}", "files/YAML/CLI",
                             cfg, ops=[op], expect="any" if how == "data-flip" else "error",
                             check=how not in ("nan", "inf"))
        if surface in mnist_surfaces:
            how = self.pick(["missing", "file", "empty-dir", "bad-magic", "short-header",
                             "magic-only", "truncated-gzip", "not-gzip", "empty-gzip",
                             "dtype-code", "ndim-0", "ndim-255", "huge-dims", "one-dim",
                             "labels-count", "labels-255", "labels-missing", "float-nan",
                             "bitflip"])
            cfg["data"]["root"] = "mnist"
            op = ("mnist", {"dst": "mnist", "how": how, "seed": self.rng.randrange(10**6)})
            expect = "any" if how in ("labels-255", "bitflip") else "error"
            return self.case(surface, "file", f"data.root: MNIST folder, {how}",
                             "files/YAML/CLI", cfg, ops=[op], expect=expect)
        if surface == "train/lm" or surface == "train/lm-kd":
            if self.rng.random() < 0.5:
                how = self.pick(["garbage", "empty", "wrong-json"])
                cfg["data"]["params"]["cache_dir"] = "tok"
                return self.case(surface, "file", f"tokenizer cache: tokenizer.json {how}",
                                 "files/YAML/CLI", cfg,
                                 ops=[("tokenizer", {"dst": "tok", "how": how, "seed": 3})],
                                 expect="error")
            what = self.pick([b"", b"\xff\xfe\x00\x01" * 100, "caf\xe9 ".encode("latin-1") * 300])
            cfg["data"]["root"] = "text.txt"
            return self.case(surface, "file", f"data.root: a text file of {what[:12]!r}...",
                             "files/YAML/CLI", cfg, files={"text.txt": what}, expect="any")
        return self.file(self.pick(list(teachers) + list(mnist_surfaces)
                                   if self.profile == "full" else ["train/kd", "train/mnist"]))

    def store(self, surface):
        _, cfg = bases.base("train/store")
        how = self.pick([
            "bad-json", "no-manifest", "manifest-list", "no-shards", "del:format", "del:shards",
            "del:num_samples", "del:num_classes", "del:taps", "del:shapes", "del:dtype",
            "del:data_fingerprint", "del:teacher_hash", "del:transform", "set:num_classes=11",
            "set:num_classes=0", "set:num_classes=\"x\"", "set:num_samples=1",
            "set:num_samples=1000000000000", "set:dtype=\"float64\"", "set:dtype=\"bogus\"",
            "set:data_fingerprint=\"0000\"", "set:taps=[\"logits\", \"nope\"]",
            "set:shapes={\"logits\": [11]}", "set:topk=3", "set:teacher_hash=\"beef\"",
            "shard-escape", "shard-absolute", "shard-missing", "shard-truncated",
            "shard-bitflip", "nan-rows", "permuted-rows", "other-teacher",
        ])
        cfg["teacher"] = {"store": "store"}
        if self.rng.random() < 0.4:  # name the teacher too: the store is checked against it
            cfg["teacher"] = {**bases.TEACHER, "store": "store"}
        expect = "error"
        if how in ("set:teacher_hash=\"beef\"", "del:teacher_hash") and \
                "model" not in cfg["teacher"]:
            expect = "any"
        return self.case("train/store", "store", f"teacher store: {how}"
                         + (" (with model + checkpoint)" if "model" in cfg["teacher"] else ""),
                         "store", cfg, ops=[("store", {"dst": "store", "how": how,
                                                        "seed": self.rng.randrange(10**6)})],
                         expect=expect)

    def resume(self, surface):
        how = self.pick(["torn-metrics", "metrics-garbage", "ckpt-garbage", "ckpt-empty",
                         "ckpt-truncated", "ckpt-missing", "config-garbage", "tmp-leftover",
                         "intact"])
        extra = self.pick([[], [], ["--set", "train.lr=0.5"], ["--set", "train.seed=3"],
                           ["--set", "student.channels=[8, 8]"]])
        expect = "error" if extra or how.startswith("ckpt-") else "any"
        return self.case("train/digits", "resume", f"--resume {' '.join(extra)} on a run dir: "
                         f"{how}", "training/NaN", argv=["train", "fx/cfg/teacher.yaml", "--out",
                                                          "run", "--resume", *extra],
                         ops=[("run_dir", {"dst": "run", "how": how, "seed": 5})],
                         expect=expect, check=False)

    def numeric(self, surface):
        """Real training (no --check) with hostile numbers: written weights must be finite."""
        surface = self.pick(["train/digits", "train/kd", "train/digits-cnn"])
        _, cfg = bases.base(surface)
        how = self.pick(["lr=1e6", "lr=1e30", "sgd-clip", "adamw-lr", "kd-weight",
                         "label-smoothing", "momentum"])
        t = cfg["train"]
        if how == "lr=1e6":
            t["lr"] = 1e6
        elif how == "lr=1e30":
            t["lr"] = 1e30
        elif how == "sgd-clip":
            t.update(lr=1e6, grad_clip=1.0)
        elif how == "adamw-lr":
            t.update(optimizer="adamw", lr=1e6)
        elif how == "kd-weight":
            if "terms" in cfg and len(cfg["terms"]) > 1:
                cfg["terms"][1]["weight"] = 1e300
            else:
                cfg["terms"] = [{"loss": "ce", "weight": 1e300}]
        elif how == "label-smoothing":
            cfg["terms"][0]["label_smoothing"] = 0.999999
        else:
            t.update(momentum=0.999999, lr=10.0)
        return self.case(surface, "numeric", f"{how} (real training)", "training/NaN", cfg,
                         check=False)

    def valid(self, surface):
        _, cfg = bases.base(surface)
        if self.rng.random() < 0.5 and "train" in cfg:
            cfg["train"]["seed"] = self.rng.randrange(100)
            return self.case(surface, "valid", f"train.seed = {cfg['train']['seed']}", "other",
                             cfg, expect="ok")
        return self.case(surface, "valid", "unchanged base", "other", cfg, expect="ok")


def generate(n: int, seed: int = 0, profile: str = "full") -> list[Case]:
    """``n`` cases drawn with ``random.Random(seed)``; ``profile="fast"`` keeps to cheap
    surfaces and mutations (the fast-suite sample)."""
    g = _Gen(seed, profile)
    fams = list(FAMILIES)
    weights = [FAMILIES[f][0 if profile == "full" else 1] for f in fams]
    cases = []
    for i in range(n):
        fam = g.rng.choices(fams, weights)[0]
        quick = profile == "fast" and fam in ("tree", "text", "set") and g.rng.random() < 0.1
        surface = g.pick(FAST_QUICK) if quick else g.surface()
        make = {"set": g.set_}.get(fam) or getattr(g, fam)
        c = make(surface)
        c.id = f"{seed}-{i}"
        cases.append(c)
    return cases
