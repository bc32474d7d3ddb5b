"""LM distillation benchmark (issue 12, items 6 and 9): a GPT-2-style teacher on tiny
Shakespeare distilled into students 4x+ smaller, every method through the library's own config
and build API (one dict per run, as a YAML config would give).

Data: the embedded tiny Shakespeare, its first ``max_chars`` characters split by position
90/5/5 (train / val / test); the tokenizers (BPE for the teacher, char and a smaller BPE for the
cross-tokenizer students) are trained on the train split only. The teacher (seed 0, CE) is
trained inside the benchmark, its checkpoint chosen on val bits per byte, and cached under
``--cache`` by a hash of everything that defines it. Students: seeds 0..2, checkpoint chosen on
val bits per byte, the test split read once per run. Metric: test bits per byte (exact UTF-8
byte counts, so comparable across tokenizers) and, where the student shares the teacher's
tokenizer, test perplexity.

Methods are rows of one table (``METHODS``: name -> what must be registered, which student
cells it runs on, the config it adds). A method whose loss / prepare stage / method / data
source is not registered (yet) is listed as not available and skipped. Token-level KD losses
run alone (no CE term), as in TAID's, GKD's and DistiLLM's language-model setting; ULD and ALM
add CE as their papers do. Claims are checked on the means over seeds (lower bits per byte is
better) and flagged when the difference is within the seeds' spread. The CE baseline's
plateau check: per cell, the range of its val bits per byte over the last 20 % of epochs (and
the epoch before) must be within ``PLATEAU_REL`` = 0.5 % of its final value (the 0.5 points
of an accuracy in %, read as relative: about 0.012 bits at 2.4 bits per byte).

Runs go to ``--workers`` processes of ``--threads`` torch threads each (default 2 x 1: the
cores here); finished runs are recorded next to the cache, so a killed run resumes.

    nice -n 10 python benchmarks/lm.py                  # full (35-50 min, 2 workers)
    python benchmarks/lm.py --quick --out /tmp/lm.json  # smoke version (< 5 min)
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hetero import _pool, cache_key  # noqa: E402  (the benchmarks' shared helpers)

from crossdistill.report import aggregate, format_table, pm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLATEAU_REL = 0.005  # "within 0.5 points": for bits per byte, 0.5 % of the cell's value
CACHE_VERSION = 1

#: Sizes and schedules. ``students``: the same-tokenizer cells (two sizes: TAID's gap claim);
#: ``cross``: the cross-tokenizer cells (student tokenizer; architecture ``cross_student``).
FULL = {
    # 20 epochs of ~90 steps (16 x 64 tokens): enough steps for the CE baseline to plateau
    # (a 4-epoch schedule left it improving 0.013 bits an epoch); the grid is sized to fit
    "text": {"max_chars": 300_000, "vocab_size": 512, "block": 64},
    "batch_size": 16,
    "teacher": {"n_layer": 4, "n_embd": 128, "n_head": 4},
    "teacher_epochs": 20,
    "students": {
        # as many heads as the teacher: BiStil compares attention maps head by head
        "s": {"n_layer": 1, "n_embd": 64, "n_head": 4},
        "xs": {"n_layer": 1, "n_embd": 32, "n_head": 4},
    },
    "cross": {"char": {"tokenizer": "char"}, "bpe300": {"tokenizer": "bpe", "vocab_size": 300}},
    "cross_student": "s",
    "epochs": 20,
    # the cross-tokenizer cells see 1.5-2.5x more, shorter blocks; 20 epochs left their CE
    # baseline 0.001 bits short of the plateau rule: 24 (a quarter more steps)
    "cross_epochs": 24,
    # HF's fused tanh-GELU (the same function as GPT-2's default gelu_new, to float rounding):
    # gelu_new is five Python-level ops, a fifth of the teacher's forward on CPU
    "activation": "gelu_pytorch_tanh",
    "lr": 3e-3,
    "prompt_tokens": 32,  # GKD / SeqKD / CoMD: the first half of each block is the prompt
    # CoMD: a pool of train-block prompts, rounds of SeqKD (epochs each, lr) from the
    # CE-trained student; the teacher samples at temperature 0.8
    "comd": {"prompts": 256, "rounds": 4, "epochs": 2, "lr": 1e-3},
    "seeds": 3,
}
QUICK = {
    "text": {"max_chars": 60_000, "vocab_size": 512, "block": 64},
    "batch_size": 32,
    "teacher": {"n_layer": 2, "n_embd": 64, "n_head": 2},
    "teacher_epochs": 3,
    "students": {
        "s": {"n_layer": 1, "n_embd": 16, "n_head": 2},
        "xs": {"n_layer": 1, "n_embd": 8, "n_head": 2},
    },
    "cross": {"char": {"tokenizer": "char"}, "bpe300": {"tokenizer": "bpe", "vocab_size": 300}},
    "cross_student": "s",
    "epochs": 2,
    "cross_epochs": 2,
    "activation": "gelu_pytorch_tanh",
    "lr": 3e-3,
    "prompt_tokens": 32,
    "comd": {"prompts": 32, "rounds": 2, "epochs": 1, "lr": 1e-3},
    "seeds": 1,
}
MIN_RATIO = 4.0  # teacher parameters / student parameters, at least


# -- the method table --------------------------------------------------------------------------
SAME, MAIN, CROSS = "same", "main", "cross"  # cells: both sizes, the larger one, cross-tokenizer


@dataclass(frozen=True)
class Method:
    """One benchmark row: what must be registered (``(kind, name)``: kind a registry --
    losses, methods, prepares, datasets -- or ``module`` for ``package.module:attribute``),
    the cells it runs on, and the config it adds to the run's base config (``build(P)``)."""

    needs: tuple[tuple[str, str], ...]
    cells: str
    build: object  # P -> dict merged into the run config
    teacher: bool = True
    # the teacher's signals come from a per-token store made once (see train_teacher):
    # "logits" (every logit, float32: the same values as the online teacher), "observed"
    # (the teacher's log-prob of each observed token, 4 bytes a token: all that ALM reads),
    # or a method's name: what that method's recipe reads (BiStil: logits, hidden states and
    # attention maps, float32), written from its own config
    store: str | None = None
    runner: str = "train"
    about: str = ""
    rows: tuple[str, ...] = ()  # the result rows one run gives (default: the method's own)


def _terms(*terms):
    return lambda P: {"terms": [dict(t) for t in terms]}


def _token_kd(loss: str, cells: str, about: str, **params) -> Method:
    """A token-level divergence alone (no CE), teacher logits from the store."""
    return Method(
        (("losses", loss),), cells, _terms({"loss": loss, **params}), store="logits", about=about
    )


def _onpolicy(lmbda: float, seq_kd: float, terms: list[dict], **stage_params):
    def build(P):
        stage = {"name": "onpolicy", "prompt_tokens": P["prompt_tokens"], "lmbda": lmbda}
        stage.update(seq_kd=seq_kd, temperature=0.9, **stage_params)
        return {"prepare": [stage], "terms": [dict(t) for t in terms]}

    return build


def _bistil(init: bool):
    def build(P):
        # the attention-map MSE reads output.attentions: eager kernels (the recipe switches the
        # frozen teacher itself)
        eager = {"attn_implementation": "eager"}
        return {"method": {"name": "bistil", "init": init}, "student": eager}

    return build


METHODS: dict[str, Method] = {
    "ce": Method((), SAME, _terms({"loss": "ce"}), teacher=False, about="CE only, no teacher"),
    "fkl": _token_kd("fkl", SAME, "forward KL, T 1"),
    "rkl": _token_kd("rkl", SAME, "reverse KL, T 1"),
    "jsd": _token_kd("jsd", MAIN, "generalised JSD, beta 0.5 (teacher share), T 1", beta=0.5),
    "tvd": _token_kd("tvd", MAIN, "total variation distance"),
    "skl": _token_kd("skl", MAIN, "skew KL, alpha 0.1", alpha=0.1),
    "taid": Method(
        (("methods", "taid"),),
        SAME,
        lambda P: {"method": {"name": "taid", "ce_weight": 0.0}},
        store="logits",
        about="TAID, LM form (no CE), the paper's adaptive schedule",
    ),
    "gkd": Method(
        (("prepares", "onpolicy"), ("losses", "jsd")),
        MAIN,
        _onpolicy(0.5, 0.0, [{"loss": "jsd", "beta": 0.5}]),
        about="GKD: lambda 0.5 student continuations, JSD beta 0.5",
    ),
    "gkd-off": Method(
        (("prepares", "onpolicy"), ("losses", "jsd")),
        MAIN,
        _onpolicy(0.0, 0.0, [{"loss": "jsd", "beta": 0.5}]),
        store="logits",  # lambda 0 keeps the dataset's tokens: the stored logits are exact
        about="GKD's supervised KD (lambda 0): dataset continuations, same masking and loss",
    ),
    "seqkd": Method(
        (("prepares", "onpolicy"),),
        MAIN,
        # Kim & Rush generate once per source; we sample afresh every 16th step and replay
        # the last 1024 teacher sequences between (the stage's bounded-generation setting):
        # about 1.2 teacher continuations per training block over the run
        _onpolicy(0.0, 1.0, [{"loss": "ce"}], regenerate_every=16, buffer_size=1024),
        about="SeqKD: CE on teacher continuations (sampled, T 0.9; new ones every 16th step, "
        "replayed between)",
    ),
    "bistil": Method(
        (("methods", "bistil"),), MAIN, _bistil(True), store="bistil",
        about="BiStil: teacher-layer init + KD",
    ),
    "bistil-rand": Method(
        (("methods", "bistil"),), MAIN, _bistil(False), store="bistil",
        about="BiStil's losses, random init",
    ),
    "comd": Method(
        (("module", "crossdistill.lm.comd:comd"), ("module", "crossdistill.lm.comd:seqkd_once")),
        MAIN,
        lambda P: {},
        runner="comd",
        about="CoMD rounds (SeqKD on a pool grown from the hard prompts) from the CE student; "
        "row comd-1shot: one-shot SeqKD from the same student, same teacher tokens and steps",
        rows=("comd", "comd-1shot"),
    ),
    "x-ce": Method(
        (("datasets", "shakespeare_pair"),),
        CROSS,
        _terms({"loss": "ce"}),
        teacher=False,
        about="CE only, student's own tokenizer",
    ),
    "x-uld": Method(
        (("datasets", "shakespeare_pair"), ("losses", "uld")),
        CROSS,
        _terms({"loss": "ce"}, {"loss": "uld"}),
        store="logits",
        about="CE + ULD (weight 1.5)",
    ),
    "x-alm": Method(
        (("datasets", "shakespeare_pair"), ("losses", "alm")),
        CROSS,
        _terms({"loss": "ce"}, {"loss": "alm", "teacher": "token_logprob"}),
        store="observed",
        about="CE + ALM (tau 100; teacher log-probs of its observed tokens from a 4 B/token "
        "store)",
    ),
}


def registered(kind: str, name: str) -> bool:
    """Whether ``name`` is registered in registry ``kind`` (or, kind ``module``, whether
    ``package.module:attribute`` exists)."""
    import crossdistill  # noqa: F401  (registers everything)

    if kind == "module":
        mod, _, attr = name.partition(":")
        try:
            if importlib.util.find_spec(mod) is None:
                return False
        except ModuleNotFoundError:
            return False
        return hasattr(importlib.import_module(mod), attr)
    from crossdistill import registry

    return name in getattr(registry, kind.upper())


def availability(methods=METHODS) -> dict[str, list[str]]:
    """method -> what it needs that is missing (empty: available)."""
    return {
        m: [f"{k} {n}" for k, n in spec.needs if not registered(k, n)]
        for m, spec in methods.items()
    }


# -- configs ----------------------------------------------------------------------------------
def merge(base: dict, extra: dict) -> dict:
    """``base`` updated by ``extra``, recursively for nested dicts (neither is modified)."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def cells_of(P: dict, which: str) -> list[str]:
    if which == SAME:
        return list(P["students"])
    if which == MAIN:
        return [next(iter(P["students"]))]
    return list(P["cross"])


def is_cross(P: dict, cell: str) -> bool:
    return cell in P["cross"]


def data_spec(P: dict, cache: Path, cell: str | None = None) -> dict:
    """The data section: the teacher's tokenizer, or (cross cells) the paired source with the
    student's tokenizer and the teacher's."""
    t = P["text"]
    tok = str(cache / "tokenizers")
    common = {"block": t["block"], "max_chars": t["max_chars"], "cache_dir": tok}
    if cell is None or not is_cross(P, cell):
        params = {"tokenizer": "bpe", "vocab_size": t["vocab_size"], **common}
        return {"name": "shakespeare", "batch_size": P["batch_size"], "params": params}
    own = P["cross"][cell]
    params = {"tokenizer": own["tokenizer"], **common}
    if "vocab_size" in own:
        params["vocab_size"] = own["vocab_size"]
    params.update(teacher_tokenizer="bpe", teacher_vocab_size=t["vocab_size"])
    return {"name": "shakespeare_pair", "batch_size": P["batch_size"], "params": params}


def train_spec(P: dict, epochs: int, seed: int) -> dict:
    """AdamW, cosine, 20 % of an epoch of warm-up (the library's LM example config)."""
    return {
        "epochs": epochs,
        "optimizer": "adamw",
        "lr": P["lr"],
        "weight_decay": 0.0,
        "warmup_epochs": 0.2,
        "schedule": "cosine",
        "seed": seed,
        "progress": False,
    }


def hf_spec(arch: dict, P: dict, inputs: dict | None = None, **config) -> dict:
    cfg = {**arch, "n_positions": P["text"]["block"], **config}
    if P.get("activation"):
        cfg["activation_function"] = P["activation"]
    return {"hf": "gpt2", "config": cfg, "inputs": inputs or {"input_ids": "input_ids"}}


def special_ids(P: dict, cache: Path) -> dict:
    """bos / eos / pad ids of the teacher's tokenizer (trained here on the train split and
    cached; loading the small val split is what trains it the first time)."""
    from crossdistill import data as D

    d = data_spec(P, cache)
    tok = D.load_split(d["name"], "val", **d["params"]).tokenizer
    return {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def teacher_config(P: dict, cache: Path, ids: dict) -> dict:
    return {
        "name": "lm-bench-teacher",
        "student": hf_spec(P["teacher"], P, vocab_size=P["text"]["vocab_size"], **ids),
        "data": data_spec(P, cache),
        "train": train_spec(P, P["teacher_epochs"], 0),
    }


def teacher_dir(P: dict, cache: Path, ids: dict) -> Path:
    """Where the teacher of ``P`` lives: keyed by its config without the cache location."""
    cfg = teacher_config(P, cache, ids)
    cfg["data"]["params"].pop("cache_dir")
    return cache / f"lm-bench-teacher-{cache_key({'cfg': cfg, 'v': CACHE_VERSION})}"


def teacher_spec(P: dict, cache: Path, ids: dict, cell: str) -> dict:
    """The trained teacher as a run's ``teacher`` section, fed its own tokenization of the
    same text in cross-tokenizer cells (never the student's ids)."""
    spec = teacher_config(P, cache, ids)["student"]
    if is_cross(P, cell):
        spec["inputs"] = {
            "input_ids": "teacher_input_ids",
            "attention_mask": "teacher_attention_mask",
        }
    spec["checkpoint"] = str(teacher_dir(P, cache, ids) / "student.safetensors")
    return spec


def run_config(P: dict, method: str, cell: str, seed: int, cache: Path, ids: dict) -> dict:
    """The full config dict of one run (validated by the library when it runs)."""
    m = METHODS[method]
    arch = P["students"][P["cross_student"] if is_cross(P, cell) else cell]
    cfg = {
        "name": f"lm-{method}-{cell}-{seed}",
        "student": hf_spec(arch, P),
        "data": data_spec(P, cache, cell),
        "train": train_spec(P, P["cross_epochs" if is_cross(P, cell) else "epochs"], seed),
    }
    if m.teacher:
        cfg["teacher"] = teacher_spec(P, cache, ids, cell)
        if m.store:  # beside model + checkpoint: the store is checked against those weights
            cfg["teacher"]["store"] = str(store_dir(P, cache, ids, cell, m.store))
    return merge(cfg, m.build(P))


def store_dir(P: dict, cache: Path, ids: dict, cell: str, kind: str = "logits") -> Path:
    """The teacher's store for ``cell``: the same-tokenizer cells share one (``store``); each
    cross-tokenizer cell has its own, over the teacher's tokenization of that cell's blocks."""
    name = "store" if not is_cross(P, cell) else f"store-{cell}"
    return teacher_dir(P, cache, ids) / (name if kind == "logits" else f"{name}-{kind}")


def store_kinds(P: dict) -> list[tuple[str, str]]:
    """(cell, kind) of every store the available methods read."""
    out = []
    for m in METHODS.values():
        if m.teacher and m.store:
            out += [(c, m.store) for c in cells_of(P, m.cells) if (c, m.store) not in out]
    return out


def param_count(arch: dict, P: dict, vocab: int) -> int:
    from crossdistill.models.hf import create_hf

    model = create_hf("gpt2", config={**hf_spec(arch, P)["config"], "vocab_size": vocab})
    return sum(p.numel() for p in model.parameters())


def check_sizes(P: dict) -> dict:
    """Parameters of the teacher and each same-tokenizer student; every student at least
    ``MIN_RATIO`` times smaller, else the benchmark's premise fails before any training."""
    v = P["text"]["vocab_size"]
    out = {"teacher": param_count(P["teacher"], P, v)}
    for cell, arch in P["students"].items():
        n = param_count(arch, P, v)
        out[cell] = n
        if out["teacher"] / n < MIN_RATIO:
            raise SystemExit(f"student {cell} ({n} params) is not {MIN_RATIO}x smaller")
    return out


def plan(P: dict, methods: list[str], avail: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(method, cell) of every available method on its cells."""
    return [(m, c) for m in methods if not avail.get(m) for c in cells_of(P, METHODS[m].cells)]


# -- runs (in worker processes) ---------------------------------------------------------------
def _quiet() -> None:
    os.environ["CROSSDISTILL_QUIET"] = "1"
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def train_teacher(P: dict, cache: Path, ids: dict) -> dict:
    """The teacher of ``P`` (trained once: CE, seed 0, best epoch on val) and its per-token
    stores over the train split (written once each by ``crossdistill cache-teacher``): full
    float32 logits for the rows that read logits (the same values the teacher computes),
    per cell, and for ALM only the observed tokens' log-probs (``--observed teacher_labels``).
    The rows with a store read it instead of running the teacher."""
    out = teacher_dir(P, cache, ids)
    meta_path = out / "meta.json"
    if not (meta_path.is_file() and (out / "student.safetensors").is_file()):
        _quiet()
        from crossdistill.build import make_trainer
        from crossdistill.config import validate

        t0 = time.time()
        trainer = make_trainer(validate(teacher_config(P, cache, ids)), out)
        res = trainer.fit()
        meta = {
            "test_bpb": res["test_bpb"],
            "test_ppl": res["test_ppl"],
            "best_val_bpb": res["best_val_bpb"],
            "best_epoch": res["best_epoch"],
            "epochs": P["teacher_epochs"],
            "val_curve": [r["val_bpb"] for r in trainer.log.rows],
            "seconds": time.time() - t0,
            "dir": str(out),
        }
        meta_path.write_text(json.dumps(meta, indent=2))
    for cell, kind in store_kinds(P):
        store = store_dir(P, cache, ids, cell, kind)
        if (store / "manifest.json").is_file():
            continue
        import yaml

        from crossdistill import cli

        base = kind if kind in METHODS else ("x-ce" if is_cross(P, cell) else "ce")
        cfg = run_config(P, base, cell, 0, cache, ids)
        cfg["teacher"] = teacher_spec(P, cache, ids, cell)  # the online teacher writes it
        spec = out / f"{store.name}.yaml"
        spec.write_text(yaml.safe_dump(cfg))
        args = ["cache-teacher", str(spec), "--out", str(store), "--dtype", "float32"]
        if kind == "observed":
            args += ["--observed", "teacher_labels" if is_cross(P, cell) else "labels"]
        if cli.main(args) != 0:
            raise RuntimeError(f"cache-teacher failed for {store}")
    return json.loads(meta_path.read_text())


def train_run(cfg: dict) -> dict:
    """One student run from its config dict: the result row's numbers."""
    _quiet()
    from crossdistill.build import make_trainer
    from crossdistill.config import validate

    trainer = make_trainer(validate(cfg))
    res = trainer.fit()
    rows = trainer.log.rows
    return {
        "test_bpb": res["test_bpb"],
        "test_ppl": res.get("test_ppl"),
        "best_val_bpb": res["best_val_bpb"],
        "best_epoch": res["best_epoch"],
        "val_curve": [r["val_bpb"] for r in rows],
        "steps": rows[-1]["step"] if rows else 0,
        "params": sum(p.numel() for p in trainer.distiller.student.parameters()),
    }


def comd_run(cfg: dict, P: dict) -> list[dict]:
    """CoMD and its control in one run, from the same start: the student is first trained
    with CE on the train split (the ce cell's run: CoMD's "pretrain, then rounds"), then
    (a) CoMD's rounds (``crossdistill.lm.comd.comd``, hard prompts, judge = the teacher, per
    byte) and (b), from the same weights, one-shot SeqKD (``seqkd_once``) with CoMD's number
    of teacher tokens and of optimiser steps. Every tuning step keeps its best epoch on val
    bits per byte; the test split is read once per row."""
    _quiet()
    from crossdistill.build import make_model, make_trainer
    from crossdistill.config import validate
    from crossdistill.lm import comd as C
    from crossdistill.train import evaluate

    rc = validate(cfg)
    seed, cp, bs = rc.train.seed, P["comd"], P["batch_size"]
    pre = make_trainer(validate({k: v for k, v in cfg.items() if k != "teacher"}))
    pre.fit()
    student, train, val, test = pre.distiller.student, pre.train_data, pre.val, pre.test
    teacher = make_model(rc.teacher, "teacher", train)
    start = copy.deepcopy(student.state_dict())
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(train), generator=gen)[: cp["prompts"]]
    prompts = train.tensors["input_ids"][picks, : P["prompt_tokens"]]
    tok = train.tokenizer
    sampling = dict(
        max_new_tokens=P["text"]["block"] - P["prompt_tokens"],
        temperature=0.8,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        seed=seed,
    )
    steps, curve = [], []

    def tuner(epochs_for):
        def train_fn(model, data):
            per_epoch = math.ceil(len(data) / bs)
            n = epochs_for(per_epoch)
            steps.append(n * per_epoch)
            res = C.seqkd_train(
                model, data, epochs=n, lr=cp["lr"], batch_size=bs, seed=seed, val=val
            )
            curve.append(res["best_val_bpb"])
            return res

        return train_fn

    def row(method, **extra):
        t = evaluate(student, test, task="lm")
        return {
            "method": method,
            "test_bpb": t["bpb"],
            "test_ppl": t["ppl"],
            "best_val_bpb": curve[-1],
            "best_epoch": len(curve) - 1,
            "val_curve": list(curve),
            "steps": sum(steps),
            "params": sum(p.numel() for p in student.parameters()),
            **extra,
        }

    rounds = C.comd(
        student,
        teacher,
        prompts,
        rounds=cp["rounds"],
        tokenizer=tok,
        train_fn=tuner(lambda _: cp["epochs"]),
        **sampling,
    )
    budget, total = rounds[-1]["teacher_tokens"], sum(steps)
    out = [row("comd", teacher_tokens=budget, hard=[r["hard"] for r in rounds])]
    student.load_state_dict(start)
    steps.clear()
    curve.clear()
    one = C.seqkd_once(
        student,
        teacher,
        prompts,
        teacher_tokens=budget,
        train_fn=tuner(lambda per_epoch: max(1, round(total / per_epoch))),
        **sampling,
    )
    out.append(row("comd-1shot", teacher_tokens=one["teacher_tokens"]))
    return out


def _work(item):
    """A job in a worker: ("teacher", P, cache, ids) or ("run", job, cfg, P, deadline);
    returns (job, result rows) -- rows None past the deadline."""
    if item[0] == "teacher":
        return "teacher", train_teacher(item[1], Path(item[2]), item[3])
    _, job, cfg, P, deadline = item
    if deadline and time.time() > deadline:
        return job, None
    t0 = time.time()
    try:
        if METHODS[job[0]].runner == "comd":
            rows = comd_run(cfg, P)
        else:
            rows = [{"method": job[0], **train_run(cfg)}]
    except Exception as err:  # one broken method must not sink the benchmark
        import traceback

        return job, [
            {
                "method": job[0],
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(limit=-4),
            }
        ]
    for r in rows:
        r["seconds"] = (time.time() - t0) / len(rows)
    return job, rows


def row_names(methods) -> list[str]:
    """The result rows of these methods, in table order."""
    return list(dict.fromkeys(r for m in methods for r in (METHODS[m].rows or (m,))))


# -- summaries --------------------------------------------------------------------------------
def cell_stats(rows: list[dict]) -> list[dict]:
    return aggregate(
        rows, by=["cell", "method"], metrics=["test_bpb", "test_ppl", "best_val_bpb", "seconds"]
    )


def lookup(stats, cell: str, method: str, metric: str = "test_bpb"):
    """(mean, std, n) of ``metric`` in a cell, or None."""
    for r in stats:
        if (r["cell"], r["method"]) == (cell, method) and r.get(metric) is not None:
            return r[metric], r.get(f"{metric}_std", 0.0), r["n"]
    return None


def _fmt(v, seeds: int | None = None, digits: int = 3) -> str:
    if v is None:
        return "-"
    return pm(v[0], v[1], scale=1.0, digits=digits) + (
        f" (n={v[2]})" if seeds and v[2] != seeds else ""
    )


def _clear(gain: float, spread: float, n: int) -> bool | None:
    """Whether ``gain`` exceeds the seeds' ``spread``; None with a single seed (no spread)."""
    return None if n < 2 else abs(gain) > spread


def _beats(a, b) -> tuple[float, bool | None]:
    """(bits saved by ``a`` over ``b`` (> 0: ``a`` is better), whether that exceeds the seeds'
    spread sqrt(std_a^2 + std_b^2), None with one seed); ``a``, ``b``: (mean, std, n)."""
    gain = b[0] - a[0]
    return gain, _clear(gain, math.hypot(a[1], b[1]), min(a[2], b[2]))


def _verdict(results: list[tuple[float, bool | None]], ge: bool = False) -> str:
    """'held' / 'held (within seed spread)' / 'held (one seed: no spread)' / 'held in k of n
    comparisons' / 'did not hold' over the comparisons ``(gain, clear)``; ``ge``: a tie holds
    (the >= claims)."""
    if not results:
        return "not measured"
    ok = [g >= 0 if ge else g > 0 for g, _ in results]
    clear = [c for _, c in results]
    if all(ok):
        if all(c is True for c in clear):
            return "held"
        return "held (within seed spread)" if False in clear else "held (one seed: no spread)"
    if any(ok):
        return f"held in {sum(ok)} of {len(ok)} comparisons"
    return "did not hold"


def _claim(name, claim, evidence, results, missing=None, ge=False, summary="") -> dict:
    verdict = _verdict(results, ge)
    if not results and missing:
        verdict = f"not measured ({missing})"
    return dict(method=name, claim=claim, evidence=evidence, summary=summary, verdict=verdict)


def _pairwise(stats, cells, a, baselines):
    """Evidence lines and (gain, clear) results of ``a`` against each baseline per cell."""
    ev, res = [], []
    for c in cells:
        va = lookup(stats, c, a)
        bs = {b: lookup(stats, c, b) for b in baselines}
        if va is None or any(v is None for v in bs.values()):
            continue
        parts = []
        for b, vb in bs.items():
            g, clear = _beats(va, vb)
            res.append((g, clear))
            parts.append(f"{b} {_fmt(vb)} ({a} saves {g:+.3f} bits)")
        ev.append(f"{c}: {a} {_fmt(va)}; " + ", ".join(parts))
    return ev, res


def claims(stats, P: dict, avail: dict[str, list[str]]) -> list[dict]:
    """The seed papers' claims, checked on test bits per byte (lower is better)."""

    def missing(*ms):
        gone = sorted({n for m in ms for n in avail.get(m, [])})
        return ", ".join(gone) + " not available" if gone else "not run"

    out = []
    same = list(P["students"])
    ev, res = _pairwise(stats, same, "taid", ["fkl", "rkl"])
    out.append(
        _claim(
            "TAID",
            "TAID >= forward KL and reverse KL (bits per byte no worse), at each student size",
            ev,
            res,
            missing("taid", "fkl", "rkl"),
            ge=True,
        )
    )
    # the gap claim: the smaller student (larger gap) gains more over each baseline
    # the gap claim: the smallest student (largest gap) gains more over each baseline than
    # the largest; spread: the four cells' stds combined
    res, ev = [], []
    for b in ("fkl", "rkl"):
        got = [(c, lookup(stats, c, "taid"), lookup(stats, c, b)) for c in same]
        if len(same) < 2 or any(t is None or v is None for _, t, v in got):
            continue
        gains = [(c, _beats(t, v)[0]) for c, t, v in got]
        growth = gains[-1][1] - gains[0][1]
        ends = (got[0], got[-1])
        spread = math.sqrt(sum(t[1] ** 2 + v[1] ** 2 for _, t, v in ends))
        res.append((growth, _clear(growth, spread, min(min(t[2], v[2]) for _, t, v in ends))))
        ev.append(
            f"taid over {b}: "
            + ", ".join(f"{c} {g:+.3f}" for c, g in gains)
            + f" (growth {growth:+.3f} bits)"
        )
    out.append(
        _claim(
            "TAID (gap)",
            f"TAID's gain over fkl/rkl grows with the teacher-student gap (students "
            f"{', '.join(same)}, smaller last)",
            ev,
            res,
            missing("taid", "fkl", "rkl"),
            summary="growth = gain at the smallest student minus gain at the largest",
        )
    )
    main = cells_of(P, MAIN)
    ev, res = _pairwise(stats, main, "taid", ["jsd", "tvd", "skl"])
    out.append(
        _claim(
            "TAID (other baselines)",
            "TAID >= JSD, TVD and skew KL (the rest of the paper's baselines)",
            ev,
            res,
            missing("taid", "jsd", "tvd", "skl"),
            ge=True,
        )
    )
    for name, a, bs, claim, ms in (
        (
            "GKD",
            "gkd",
            ["gkd-off"],
            "GKD on-policy (lambda 0.5) beats off-policy KD (lambda 0) at equal steps",
            ("gkd", "gkd-off"),
        ),
        (
            "BiStil",
            "bistil",
            ["bistil-rand"],
            "BiStil init + distillation beats random init + distillation",
            ("bistil",),
        ),
        (
            "CoMD",
            "comd",
            ["comd-1shot"],
            "CoMD beats one-shot sequence KD at equal teacher tokens",
            ("comd",),
        ),
    ):
        ev, res = _pairwise(stats, main, a, bs)
        out.append(_claim(name, claim, ev, res, missing(*ms)))
    cross = list(P["cross"])
    ev1, res1 = _pairwise(stats, cross, "x-alm", ["x-uld"])
    ev2, res2 = _pairwise(stats, cross, "x-uld", ["x-ce"])
    out.append(
        _claim(
            "ALM / ULD",
            "ALM > ULD > CE for students with another tokenizer than the teacher's",
            ev1 + ev2,
            res1 + res2 if res1 and res2 else [],
            missing("x-alm", "x-uld", "x-ce"),
        )
    )
    return out


def plateau(rows: list[dict], P: dict) -> list[dict]:
    """The CE baseline's plateau check per cell: the range of val bits per byte over the last
    ``ceil(20 %)`` of epochs and the epoch before, worst seed; within PLATEAU_REL of the
    final value holds."""
    out = []
    for cell in [*P["students"], *P["cross"]]:
        k = max(1, math.ceil(0.2 * P["cross_epochs" if is_cross(P, cell) else "epochs"]))
        method = "x-ce" if is_cross(P, cell) else "ce"
        curves = [r["val_curve"] for r in rows if (r["cell"], r["method"]) == (cell, method)]
        curves = [c for c in curves if len(c) > k]
        if not curves:
            continue
        ranges = [max(c[-k - 1 :]) - min(c[-k - 1 :]) for c in curves]
        limit = PLATEAU_REL * min(c[-1] for c in curves)
        drops = [c[-k - 1] - c[-1] for c in curves]
        worst = max(ranges)
        out.append(
            dict(
                cell=cell,
                method=method,
                epochs=f"{len(curves[0]) - k}..{len(curves[0])}",
                range_bits=worst,
                last_drop_bits=max(drops),
                limit_bits=limit,
                plateaued=worst <= limit,
            )
        )
    return out


def tables(res: dict) -> str:
    """The printed tables: test bits per byte (every cell), perplexity (same tokenizer)."""
    P, stats, seeds = res["profile"], res["cells"], res["config"]["seeds"]
    methods = row_names(m for m in res["config"]["methods"] if not res["available"].get(m))
    cells = [*P["students"], *P["cross"]]
    ran = [m for m in methods if any(lookup(stats, c, m) for c in cells)]
    body = [[m] + [_fmt(lookup(stats, c, m), seeds) for c in cells] for m in ran]
    lines = [
        "test bits per byte (mean +- std over seeds; lower is better)",
        format_table(["method"] + cells, body),
        "",
        "test perplexity (same tokenizer as the teacher)",
        format_table(
            ["method"] + list(P["students"]),
            [
                [m] + [_fmt(lookup(stats, c, m, "test_ppl"), seeds, 1) for c in P["students"]]
                for m in ran
                if any(lookup(stats, c, m, "test_ppl") for c in P["students"])
            ],
        ),
    ]
    gone = {m: v for m, v in res["available"].items() if v and m in res["config"]["methods"]}
    if gone:
        lines += [
            "",
            "not available: " + "; ".join(f"{m} ({', '.join(v)})" for m, v in gone.items()),
        ]
    return "\n".join(lines)


def report(res: dict) -> str:
    t = res["teacher"]
    sizes = res["sizes"]
    head = [
        "# LM distillation benchmark"
        + (
            " --quick (smoke run: tiny sizes, 1 seed; not a result)"
            if res["config"]["quick"]
            else ""
        ),
        f"teacher: {sizes['teacher']} params, test bpb {t['test_bpb']:.3f}, ppl "
        f"{t['test_ppl']:.1f} (best epoch {t['best_epoch'] + 1} of {t['epochs']}); students: "
        + ", ".join(
            f"{c} {sizes[c]} params ({sizes['teacher'] / sizes[c]:.1f}x smaller)"
            for c in res["profile"]["students"]
        ),
        f"wall {res['wall_seconds'] / 60:.1f} min, {res['config']['workers']} worker(s) x "
        f"{res['config']['threads']} thread(s)",
        "",
        tables(res),
        "",
        "rows: "
        + "; ".join(f"{m} = {a}" for m, a in res.get("method_table", {}).items())
        + ". Cross-tokenizer cells (student tokenizer; architecture of student "
        + f"{res['profile']['cross_student']}): "
        + ", ".join(
            f"{c} {next((r['params'] for r in res.get('runs', []) if r['cell'] == c), '?')} params"
            for c in res["profile"]["cross"]
        ),
        "",
        f"CE plateau check (val bpb range over the last 20% of epochs and the one before; "
        f"holds within {PLATEAU_REL:.1%} of the final value):",
    ]
    for p in res["plateau"]:
        head.append(
            f"  {p['cell']}: range {p['range_bits']:.4f} bits (limit {p.get('limit_bits', 0):.4f})"
            f" over epochs {p['epochs']} -> "
            + ("plateaued" if p["plateaued"] else "still moving")
        )
    head += ["", "claims:"]
    for c in res["claims"]:
        head.append(f"  [{c['verdict']}] {c['method']}: {c['claim']}")
        head += [f"      {e}" for e in c["evidence"]]
        if c.get("summary") and c["evidence"]:
            head.append(f"      ({c['summary']})")
    for r in res.get("runs_failed", []):
        head.append(f"FAILED: {r['method']} {r['cell']} seed {r['seed']}: {r['error']}")
    if res.get("runs_not_run"):
        head += [
            "",
            f"incomplete: {len(res['runs_not_run'])} of {res['runs_planned']} runs not run",
        ]
    return "\n".join(head)


# -- main -------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1 seed (< 5 min)")
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel (processes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--seeds", type=int, default=None, help="default: 3 (quick: 1)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--cache", default=str(ROOT / "runs/cache"), help="teacher + tokenizers")
    ap.add_argument(
        "--out",
        default=None,
        help="JSON (default benchmarks/results/lm.json; --quick: runs/bench_lm/lm_quick.json)",
    )
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="start no new run after this many minutes (default: 57, quick: none)",
    )
    ap.add_argument("--fresh", action="store_true", help="ignore the record of finished runs")
    args = ap.parse_args(argv)
    P = copy.deepcopy(QUICK if args.quick else FULL)
    seeds = args.seeds or P["seeds"]
    if args.out is None:
        args.out = str(
            ROOT / ("runs/bench_lm/lm_quick.json" if args.quick else "benchmarks/results/lm.json")
        )
    if args.max_minutes is None and not args.quick:
        args.max_minutes = 57.0
    torch.set_num_threads(args.threads)
    _quiet()
    cache = Path(args.cache).resolve()
    t_start = time.time()
    sizes = check_sizes(P)
    ids = special_ids(P, cache)
    avail = availability()
    pairs = plan(P, args.methods, avail)
    # seed-major: a run cut short (--max-minutes) still covers every cell with fewer seeds
    jobs = [(m, c, s) for s in range(seeds) for m, c in pairs]
    configs = {j: run_config(P, *j, cache, ids) for j in jobs}
    keys = {j: cache_key({"cfg": configs[j], "v": CACHE_VERSION}) for j in jobs}
    for m, v in avail.items():
        if v and m in args.methods:
            print(f"not available: {m} ({', '.join(v)})", flush=True)
    print(f"{len(jobs)} runs, {len(pairs)} cells x {seeds} seed(s)", flush=True)
    partial = cache.parent / "bench_lm" / f"{Path(args.out).stem}.partial.jsonl"
    done = {}
    if partial.exists() and not args.fresh:
        for line in partial.read_text().splitlines():
            rec = json.loads(line)
            done[rec["key"]] = rec["rows"]
    elif partial.exists():
        partial.unlink()
    rows = [r for j in jobs if keys[j] in done for r in done[keys[j]]]
    todo = [j for j in jobs if keys[j] not in done]
    deadline = t_start + 60 * args.max_minutes if args.max_minutes else None

    def items(js):
        return [("run", j, configs[j], P, deadline) for j in js]

    # phase 1: the teacher beside the runs that need none; phase 2: the rest
    phases = [
        [("teacher", P, str(cache), ids)] + items(j for j in todo if not METHODS[j[0]].teacher),
        items(j for j in todo if METHODS[j[0]].teacher),
    ]
    skipped, failed, teacher = [], [], None
    bar = tqdm(total=len(todo), desc="lm bench", dynamic_ncols=True, disable=None)
    with _pool(args.workers, args.threads) as pmap:
        for phase in phases:
            for job, new in pmap(_work, phase):
                if job == "teacher":
                    teacher = new
                    tqdm.write(f"teacher: test bpb {new['test_bpb']:.3f} ({new['seconds']:.0f} s)")
                    continue
                bar.update(1)
                if new is None:
                    skipped.append(job)
                    continue
                new = [{**r, "cell": job[1], "seed": job[2]} for r in new]
                if any("error" in r for r in new):  # not recorded: a rerun tries again
                    failed.extend(new)
                    tqdm.write(f"{job[0]} {job[1]} seed {job[2]} FAILED: {new[0]['error']}")
                    continue
                rows.extend(new)
                for r in new:
                    tqdm.write(
                        f"{r['method']:>11} {job[1]:>6} seed {job[2]}: test bpb "
                        f"{r['test_bpb']:.3f} (val {r['best_val_bpb']:.3f}, best epoch "
                        f"{r['best_epoch'] + 1}) {r['seconds']:.0f} s"
                    )
                partial.parent.mkdir(parents=True, exist_ok=True)
                with partial.open("a") as f:
                    f.write(json.dumps({"key": keys[job], "job": list(job), "rows": new}) + "\n")
    bar.close()
    if teacher is None:
        teacher = train_teacher(P, cache, ids)
    stats = cell_stats(rows)
    res = {
        "benchmark": "lm",
        "config": {
            "quick": args.quick,
            "seeds": seeds,
            "methods": args.methods,
            "workers": args.workers,
            "threads": args.threads,
            "max_minutes": args.max_minutes,
            "plateau_rel": PLATEAU_REL,
        },
        "profile": P,
        "method_table": {m: METHODS[m].about for m in args.methods},
        "rows": row_names(args.methods),
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
        },
        "available": avail,
        "sizes": sizes,
        "teacher": teacher,
        "cells": stats,
        "plateau": plateau(rows, P),
        "claims": claims(stats, P, avail),
        "runs": rows,
        "runs_planned": len(jobs),
        "runs_not_run": [list(j) for j in skipped],
        "runs_failed": failed,
    }
    res["wall_seconds"] = time.time() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(report(res))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
