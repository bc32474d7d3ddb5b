"""Issue #11: every example the issue lists gives exit 2 and one ``crossdistill: error:`` line.

Each case is a tiny digits config (tests/fuzz/bases.py: a CNN teacher checkpoint, an MLP
student, ce + kd + a feature term) with the issue's change applied. Validation examples run
in-process with ``--check`` (validate + build + one step); examples that need real training
(NaN, ``--out``, ``name``) or could exhaust memory or hang when not refused (sizes, billion
laughs, huge values) run in a forked child under the fuzz runner's memory and time limits.
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from fuzz import bases
from fuzz.generate import Case, dump
from fuzz.runner import Runner, classify, message_lines, warm, warm_run

from crossdistill.cli import main

INF, NAN = math.inf, math.nan
MAX_ERR = 4096  # "a few KB" of error output at most (beyond the run's epoch lines)
LAUGHS = "\n".join(
    ['xa: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"x{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdefgh", "bcdefghi")]
)


def ex(id, surface="train/kd", patch=None, *, text=None, argv=(), ops=(), check=True,
       forked=False, marks=(), timeout=60, config_arg="config.yaml"):
    return pytest.param(
        dict(surface=surface, patch=patch or {}, text=text, argv=list(argv), ops=list(ops),
             check=check, forked=forked, timeout=timeout, config_arg=config_arg),
        id=id, marks=list(marks),
    )


def ckpt(how):
    return [("checkpoint", {"dst": "ckpt.safetensors", "src": "teacher/student.safetensors",
                            "how": how, "seed": 1})]


def mnist(how):
    return [("mnist", {"dst": "mnist", "how": how, "seed": 1})]


def store(how):
    return [("store", {"dst": "store", "how": how, "seed": 1})]


STORE = {"teacher": {**bases.TEACHER, "store": "store"}}  # model + checkpoint named too
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="cuda is available here")
SLOW = pytest.mark.slow

EXAMPLES = [
    # loss hyper-parameters are not type-checked
    ex("kd-temperature-hot", patch={"terms.1.temperature": "hot"}),
    ex("kd-temperature-nan-string", patch={"terms.1.temperature": "nan"}),
    ex("kd-temperature-nan", patch={"terms.1.temperature": NAN}),
    ex("kd-temperature-list", patch={"terms.1.temperature": [1, 2]}),
    ex("ce-label-smoothing-x", patch={"terms.0.label_smoothing": "x"}),
    ex("dkd-alpha-abc", patch={"terms.1": {"loss": "dkd", "alpha": "abc"}}),
    ex("kd-temperature-huge-int", patch={"terms.1.temperature": 10**400}),
    ex("kd-weight-huge-int", patch={"terms.1.weight": 10**400}),
    ex("reviewkd-no-arguments", patch={"terms.2": {"loss": "reviewkd"}}),
    ex("kd-teacher-null", patch={"terms.1.teacher": None}),
    # sizes are not bounded by what the machine can do
    ex("train-epochs-1e30", patch={"train.epochs": 1e30}, forked=True),
    ex("student-depth-1e30", "train/kd-vit", {"student.depth": 1e30}, forked=True),
    ex("student-channels-0-1e30", "train/digits-cnn", {"student.channels.0": 1e30},
       forked=True),
    ex("data-img-size-100000", patch={"data.img_size": 100000}, forked=True),
    ex("train-milestones-5M", "train/digits", {"train.milestones": [0.5] * 5_000_000},
       forked=True, marks=[SLOW], timeout=600),
    ex("train-lr-1e300", patch={"train.lr": 1e300}, check=False, forked=True),
    ex("train-seed-2**63", patch={"train.seed": 2**63}),
    ex("train-warmup-epochs-inf", patch={"train.warmup_epochs": INF}),
    ex("data-split-seed--1", patch={"data.split_seed": -1}),
    # devices
    ex("device-cuda", patch={"train.device": "cuda"}, marks=[NO_CUDA]),
    ex("device-cuda:7", patch={"train.device": "cuda:7"}),
    ex("device-mps", patch={"train.device": "mps"}),
    ex("device-meta", patch={"train.device": "meta"}),
    ex("device-empty", patch={"train.device": ""}),
    ex("device-garbage", patch={"train.device": "garbage"}),
    # files
    ex("mnist-corrupt-idx-header", "train/mnist", {"data.root": "mnist"}, ops=mnist("bad-magic")),
    ex("mnist-short-header", "train/mnist", {"data.root": "mnist"}, ops=mnist("short-header")),
    ex("mnist-truncated-gzip", "train/mnist", {"data.root": "mnist"},
       ops=mnist("truncated-gzip")),
    ex("config-latin-1", text=lambda body: ("# caf\xe9\n" + body).encode("latin-1")),
    ex("config-utf-16", text=lambda body: body.encode("utf-16")),
    ex("config-binary", text=lambda body: bytes(range(256)) * 4),
    ex("config-deeply-nested", text=lambda body: (body + "deep: " + "[" * 100_000
                                                   + "]" * 100_000 + "\n").encode()),
    ex("out-is-a-file", argv=["--out", "occupied"], check=False),
    ex("out-under-proc", argv=["--out", "/proc/crossdistill-run"], check=False),
    # --set
    ex("set-into-a-scalar", argv=["--set", "train.epochs.x=1"]),
    ex("set-onto-scalar-document", text=lambda body: b"3\n", argv=["--set", "train.lr=1"]),
    ex("set-unparsable-value", argv=["--set", "train.lr=["]),
    # projector params
    ex("projector-mlp-hidden--1",
       patch={"terms.2.projector": "mlp", "terms.2.projector_params": {"hidden": -1}}),
    # NaN is never detected (real training)
    ex("nan-lr-1e6-adamw", patch={"train.optimizer": "adamw", "train.lr": 1e6}, check=False,
       forked=True),
    ex("nan-lr-1e6-sgd", patch={"train.lr": 1e6}, check=False, forked=True),
    ex("nan-lr-1e6-sgd-grad-clip", patch={"train.lr": 1e6, "train.grad_clip": 1.0},
       check=False, forked=True),
    ex("nan-lr-inf", patch={"train.lr": INF}, check=False, forked=True),
    ex("nan-kd-weight-1e300", patch={"terms.1.weight": 1e300}, check=False, forked=True),
    ex("nan-teacher-weights", patch={"teacher.checkpoint": "ckpt.safetensors"}, ops=ckpt("nan"),
       check=False, forked=True),
    ex("nan-one-input", "train/mnist", {"data.root": "mnist"}, ops=mnist("one-nan"),
       check=False, forked=True),
    # a teacher store's contents are not checked (the config names model + checkpoint too)
    ex("store-bit-flips", "train/store", STORE, ops=store("shard-bitflip")),
    ex("store-45-nan-rows", "train/store", STORE, ops=store("nan-rows")),
    ex("store-permuted-rows", "train/store", STORE, ops=store("permuted-rows")),
    ex("store-shard-from-another-teacher", "train/store", STORE, ops=store("other-teacher")),
    ex("store-manifest-num-classes", "train/store", STORE, ops=store("set:num_classes=11")),
    ex("store-manifest-num-samples", "train/store", STORE, ops=store("set:num_samples=10")),
    ex("store-manifest-data-fingerprint", "train/store", STORE,
       ops=store('set:data_fingerprint="0123456789abcdef"')),
    ex("store-manifest-dtype", "train/store", STORE, ops=store('set:dtype="float32"')),
    ex("store-shard-path-escapes", "train/store", STORE, ops=store("shard-escape")),
    ex("store-manifest-bad-json", "train/store", STORE, ops=store("bad-json")),
    ex("store-manifest-no-shards", "train/store", STORE, ops=store("no-shards")),
    ex("store-manifest-missing-key", "train/store", STORE, ops=store("del:shards")),
    # metrics and resume
    ex("resume-changed-lr", argv=["--out", "run", "--resume", "--set", "train.lr=0.5"],
       ops=[("run_dir", {"dst": "run", "how": "intact"})], check=False, forked=True,
       config_arg="fx/cfg/teacher.yaml"),
    # output size, duplicate keys, ranges, --nproc, run names
    ex("billion-laughs", text=lambda body: (LAUGHS + "\n" + body).encode(), forked=True),
    ex("billion-laughs-as-a-value", text=lambda body: "\n".join(
        [LAUGHS] + [ln for ln in body.splitlines() if not ln.startswith("train:")]
        + ["train: {epochs: *i}\n"]).encode(), forked=True),
    ex("value-1MB-not-echoed-whole", patch={"train.device": "x" * 2**20}, forked=True),
    ex("value-50MB-not-echoed-whole", patch={"train.device": "x" * 50 * 2**20}, forked=True,
       marks=[SLOW], timeout=600),
    ex("duplicate-keys", text=lambda body: (body + "train: {epochs: 2}\n").encode()),
    ex("duplicate-nested-keys", patch={"data.batch_size": 64},
       text=lambda body: body.replace("batch_size: 64", "batch_size: 64, batch_size: 32")
       .encode()),
    ex("dkd-alpha--1", patch={"terms.1": {"loss": "dkd", "alpha": -1.0}}),
    ex("kd-temperature-1e-30", patch={"terms.1.temperature": 1e-30}),
    ex("term-warmup-inf", patch={"terms.1.warmup": INF}),
    ex("nproc-0", argv=["--nproc", "0"]),
    ex("nproc--3", argv=["--nproc", "-3"]),
    ex("name-escapes-runs", patch={"name": "../../x"}, argv=["--out", None], check=False),
]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # forked children must not inherit a busy thread pool
    warm({"train/kd"})
    r = Runner(tmp_path_factory.mktemp("issue11"), timeout=60)
    warm_run(r.work)
    for name in ("teacher", "store", "mnist"):
        r.fixture(name)
    yield r
    torch.set_num_threads(threads)


def _set(cfg, dotted, value):
    keys = [int(k) if k.isdigit() else k for k in dotted.split(".")]
    node = cfg
    for k in keys[:-1]:
        node = node[k] if isinstance(node, list) else node.setdefault(k, {})
    node[keys[-1]] = value


def _case(spec) -> Case:
    cmd, cfg = bases.base(spec["surface"])
    for k, v in spec["patch"].items():
        _set(cfg, k, v)
    body = dump(cfg)
    data = spec["text"](body) if spec["text"] else body.encode()
    argv = spec["argv"]
    if argv[-2:] == ["--out", None]:  # no --out at all: the default run directory
        argv = argv[:-2]
    elif "--out" not in argv:
        argv = argv + ["--out", "out"]
    needs = set(bases.fixtures_of(spec["surface"]))
    return Case("example", spec["surface"], "example", str(spec["patch"])[:80], "other",
                [cmd, spec["config_arg"], *argv], {"config.yaml": data,
                                                    "occupied": b"a file\n"},
                spec["ops"], "error", spec["check"], tuple(sorted(needs)))


def _assert_one_line(rc, err: str, size: int) -> None:
    lines = message_lines(err)  # epoch lines of a run that started are not noise
    shown = err if len(err) < 3000 else err[:1500] + "\n[...]\n" + err[-1500:]
    assert rc == 2, f"exit {rc}, expected 2; stderr:\n{shown}"
    assert len(lines) == 1 and lines[0].startswith("crossdistill: error:"), shown
    too_long = f"{size} bytes of error output (a line of at most {MAX_ERR}): {shown[:300]}"
    assert len(lines[0]) <= MAX_ERR and size <= 4 * MAX_ERR, too_long


@pytest.mark.parametrize("spec", EXAMPLES)
def test_issue_example_gives_one_line_exit_2(spec, runner, capsys, monkeypatch):
    case = _case(spec)
    d = runner.prepare(case)
    argv = list(case.argv)
    if case.check:
        argv.insert(2, "--check")
    if spec["forked"]:
        rc, secs, err, size = runner.fork(argv, d, "example", timeout=spec["timeout"])
        r = classify(case, rc, err, size, secs)
        assert r.outcome == "clean-error" or rc == 2, f"{r.outcome}: {r.detail}\n{err[-2000:]}"
        _assert_one_line(rc, err, size)
        return
    monkeypatch.chdir(d)
    rc = main(argv)
    err = capsys.readouterr().err
    _assert_one_line(rc, err, len(err.encode()))


def test_examples_cover_every_bullet():
    ids = {p.id for p in EXAMPLES}
    for must in ("kd-temperature-hot", "train-epochs-1e30", "device-meta",
                 "mnist-corrupt-idx-header", "config-latin-1", "set-into-a-scalar",
                 "projector-mlp-hidden--1", "nan-lr-1e6-sgd", "store-bit-flips",
                 "billion-laughs", "duplicate-keys", "nproc--3", "name-escapes-runs"):
        assert must in ids
    assert yaml.safe_load(LAUGHS)["xi"][0][0][0][0][0][0][0][0] == ["lol"] * 9
