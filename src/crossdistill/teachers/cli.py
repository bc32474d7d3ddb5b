"""``crossdistill cache-teacher CONFIG``: run a config's teacher once over its training split
and write a teacher store (see ``store.py``); train later with ``teacher: {store: PATH}``.
Re-running the same command after an interruption completes the store (see ``writer.py``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError


def add_parsers(sub) -> None:
    p = sub.add_parser("cache-teacher", help="precompute a config's teacher signals into a store")
    p.add_argument("config", help="a run config with teacher: {model, checkpoint}")
    p.add_argument("--out", help="store directory (default runs/stores/<teacher>-<data>)")
    p.add_argument(
        "--topk",
        type=int,
        default=None,
        help="keep only the top-k logits "
        "(+ logsumexp); the rest of the mass is spread evenly (documented rule)",
    )
    p.add_argument(
        "--observed",
        metavar="KEY",
        default=None,
        help="keep only the teacher's log-prob of the next token in batch key KEY (e.g. "
        "labels; 4 bytes/token, tap token_logprob: what ALM needs) instead of logits",
    )
    p.add_argument(
        "--taps",
        nargs="*",
        default=None,
        help="teacher feature taps to store (default: the teacher taps the config's terms use)",
    )
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--shard-size", type=int, default=50_000, help="rows per shard file")
    p.add_argument("--batch-size", type=int, default=256, help="samples per teacher forward")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )


def cmd_cache_teacher(args) -> int:
    from .. import config as C
    from ..build import load_splits, make_model
    from .fingerprint import weights_hash
    from .store import cache_teacher

    cfg = C.load(args.config, args.overrides)
    if args.out:
        from ..rundir import check_out_dir

        check_out_dir(args.out, "--out")
    spec = cfg.teacher
    if (
        spec is None
        or not (spec.model or spec.hf or spec.hf_path)
        or not (spec.checkpoint or spec.hf_path)
    ):
        raise ConfigError(
            "teacher",
            None if spec is None else spec.model,
            "cache-teacher needs teacher: {model: ..., checkpoint: ...} (or hf_path)",
        )
    from ..adapters import ModelIO
    from ..build import task_of

    train = load_splits(cfg)["train"]
    teacher = make_model(spec, "teacher", train)
    task = task_of(cfg)
    io = ModelIO(**spec.io(), field="teacher").with_defaults(task.inputs, task.class_dim)
    taps = args.taps
    if taps is None:
        read = [[term.teacher] if isinstance(term.teacher, str) else term.teacher or []
                for term in cfg.terms]
        if cfg.method is not None:  # and what the method's recipe reads (built on a student
            # of the config, as a run builds it: e.g. BiStil's hidden states and attentions)
            import torch

            from .. import methods

            torch.manual_seed(cfg.train.seed)
            student = make_model(cfg.student, "student", train)
            recipe = methods.build(cfg.method.name, student, teacher, **cfg.method.kwargs())
            read += [[str(p) for p in t.teacher or []] for t in recipe.terms]
        taps = sorted({t for r in read for t in r if t not in ("logits", "default")})
    out = Path(args.out or f"runs/stores/{weights_hash(teacher)}-{train.fingerprint()}")
    cache_teacher(
        teacher,
        train,
        out,
        io=io,
        taps=taps,
        topk=args.topk,
        observed=args.observed,
        dtype=args.dtype,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        device=cfg.train.device,
        progress=cfg.train.progress,
    )
    m = json.loads((out / "manifest.json").read_text())
    print(
        f"teacher store: {out}\n  samples {m['num_samples']}, taps {m['taps']}, "
        f"{m['bytes_per_sample']} bytes/sample ({m['bytes_per_sample_signals']} without the id), "
        f"{m.get('bytes_per_token', m['bytes_per_sample_signals']):g} bytes/position "
        f"over {m.get('positions_per_sample', 1)} positions/sample"
    )
    return 0


COMMANDS = {"cache-teacher": cmd_cache_teacher}
