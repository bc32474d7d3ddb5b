"""Command line: ``crossdistill train | eval | export | list | report | demo``.

Bad input exits with code 2 and one line naming the field, the value and what is allowed;
an unexpected failure exits 1 with one ``internal error`` line; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ConfigError, one_line

LIST_KINDS = ("losses", "models", "datasets", "methods", "projectors", "condensers", "config")


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (``crossdistill: error: ...``), exit 2."""

    def error(self, message):
        self.exit(2, f"crossdistill: error: {one_line(message)} (see {self.prog} --help)\n")


def _version() -> str:
    from . import __version__

    return f"crossdistill {__version__}"


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="crossdistill", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a student (or a teacher) from a YAML config")
    t.add_argument("config", help="YAML run config (see configs/)")
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=0.1 (repeatable)",
    )
    t.add_argument("--out", help="run directory (default: runs/<config name>)")
    t.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes on this machine (DDP, or "
        "FSDP with --set train.strategy=fsdp); launches torch.distributed.run",
    )
    t.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    t.add_argument(
        "--allow-changed",
        action="store_true",
        help="with --resume: continue even though the config differs from the run's "
        "config.yaml (refused otherwise, listing what changed)",
    )
    t.add_argument(
        "--check",
        action="store_true",
        help="validate and build everything, run one training step on one batch, print a "
        "one-line summary; writes no files",
    )
    t.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )

    e = sub.add_parser("eval", help="evaluate a run's exported student on a split")
    e.add_argument("run_dir", help="a run directory written by `crossdistill train`")
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    e.add_argument(
        "--weights", help="student weights (.safetensors); default RUN_DIR/student.safetensors"
    )
    e.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )

    x = sub.add_parser("export", help="write a run's clean student weights and model spec")
    x.add_argument("run_dir")
    x.add_argument(
        "--out", help="output .safetensors path (default RUN_DIR/export/student.safetensors)"
    )
    x.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )

    ls = sub.add_parser("list", help="list registered losses, models, datasets, methods, ...")
    ls.add_argument("kind", choices=LIST_KINDS)
    ls.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )

    r = sub.add_parser(
        "report",
        help="write an HTML report of one run (RUN_DIR/report.html) or compare several",
    )
    r.add_argument(
        "run_dir", nargs="+", help="run directories (or a folder of runs) to report or compare"
    )
    r.add_argument(
        "--out", help="HTML path (default RUN_DIR/report.html; several runs: their compare.html)"
    )
    r.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )

    d = sub.add_parser(
        "demo",
        help="teacher + students of other architectures on digits, 3 seeds, table and HTML report",
    )
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--seeds", type=int, default=3)
    d.add_argument("--epochs", type=int, default=None, help="student epochs (default: the demo's)")
    d.add_argument("--quick", action="store_true", help="toy size (for tests)")
    d.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )

    g = sub.add_parser("generate", help="sample text from a trained language-model run's student")
    g.add_argument("run_dir", help="a run directory of an lm run (e.g. configs/lm_kd.yaml)")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to sample (default 64, or what the model's context leaves)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 greedy")
    g.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus mass to keep (1: all)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    g.add_argument(
        "--weights", help="student weights (.safetensors); default RUN_DIR/student.safetensors"
    )
    g.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    for plugin in _plugins():
        plugin.add_parsers(sub)
    return p


def _plugins():
    """Sub-packages that add their own commands (``add_parsers(sub)`` + ``COMMANDS``)."""
    import importlib

    found = []
    for mod in ("crossdistill.condense.cli", "crossdistill.teachers.cli"):
        try:
            found.append(importlib.import_module(mod))
        except ModuleNotFoundError as err:
            if err.name != mod:
                raise
    return found


def _launch(args, argv: list[str]) -> int:
    """Re-run this command under torch.distributed.run with ``--nproc`` processes."""
    import os
    import subprocess

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if not a.startswith("--nproc="):
            rest.append(a)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        "-m",
        "crossdistill.cli",
        *rest,
    ]
    return subprocess.call(
        cmd, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    )


def _check_nproc(n: int) -> None:
    """``--nproc`` between 1 and the CPU cores or GPUs here (each process needs one)."""
    import os

    import torch

    most = max(os.cpu_count() or 1, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if not 1 <= n <= most:
        raise ConfigError(
            "--nproc", n, f"a number of processes from 1 to {most} (the CPU cores or GPUs here)"
        )


def _check_step(cfg) -> int:
    """``train --check``: everything built and one optimiser step on one batch, in memory."""
    import math

    from .build import make_trainer

    trainer = make_trainer(cfg, None)
    trainer.cfg.progress = False
    trainer.setup()
    batch = next(iter(trainer.batches.epoch(0)))
    out = trainer.train_step(batch, 0, 0, 1)
    losses = {name: float(v.detach()) for name, v in out.losses.items()}
    total = float(out.total.detach())
    bad = [n for n, v in losses.items() if not math.isfinite(v)]
    if bad or not math.isfinite(total):
        field = f"terms.{bad[0]}" if bad else "terms"
        raise ConfigError(field, losses.get(bad[0], total) if bad else total,
                          "the first training step's loss is not finite; check the loss's "
                          "hyper-parameters and weight, train.lr and the inputs")
    d = trainer.distiller
    student = sum(p.numel() for p in d.student.parameters())
    teachers = sum(
        p.numel() for t in d.teachers.values() if hasattr(t, "parameters") for p in t.parameters()
    )
    trainable = sum(p.numel() for p in d.parameters() if p.requires_grad)
    extra = trainable - sum(p.numel() for p in d.student.parameters() if p.requires_grad)
    terms = ", ".join(f"{n} {v:.4g}" for n, v in losses.items())
    n = len(next(iter(batch.values())))
    print(
        f"check ok: student {student:,} params, teacher(s) {teachers:,}, projectors and loss "
        f"modules {extra:,} trainable; one step on a batch of {n}: loss {total:.4g} ({terms}); "
        "no files written"
    )
    return 0


def cmd_train(args) -> int:
    import os

    from . import config as C
    from .build import make_trainer
    from .rundir import check_out_dir, default_out_dir

    _check_nproc(args.nproc)
    cfg = C.load(args.config, args.overrides)
    out = check_out_dir(args.out) if args.out else default_out_dir(cfg)
    if args.resume and not (out / "last.ckpt").is_file():
        raise ConfigError("--resume", str(out), "no last.ckpt in that run directory")
    if args.check:  # everything a run would check, then one step; nothing written
        return _check_step(cfg)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(args, args.argv)  # config and --out checked once, here
    if args.resume:  # before config.yaml is rewritten below
        from .train.resume import check_run_config

        check_run_config(out, cfg, args.allow_changed)
    trainer = make_trainer(cfg, out)
    if os.environ.get("RANK", "0") == "0":
        out.mkdir(parents=True, exist_ok=True)
        from .train.metrics import write_atomic

        write_atomic(out / "config.yaml", C.dump(cfg))
    res = trainer.fit(resume=args.resume, allow_changed=args.allow_changed)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(res, indent=2))
        print(f"run written to {out}")
    from .train.distributed import shutdown

    shutdown()  # under --nproc: leave the process group together
    return 0


def _run_config(run_dir: Path):
    from . import config as C

    if not (run_dir / "config.yaml").is_file():
        raise ConfigError("run_dir", str(run_dir), "not a run directory (no config.yaml)")
    return C.load(run_dir / "config.yaml", require_paths=False)  # its teacher may be gone


def cmd_eval(args) -> int:
    from .build import load_splits, make_model, task_of
    from .io import load_into
    from .train import evaluate

    run = Path(args.run_dir)
    cfg = _run_config(run)
    splits = load_splits(cfg)
    model = make_model(cfg.student, "student", splits["train"], checkpoint=False)
    load_into(model, args.weights or run / "student.safetensors", "--weights")
    res = evaluate(
        model, splits[args.split], device=cfg.train.device, task=task_of(cfg), io=cfg.student.io()
    )
    print(json.dumps({"split": args.split, **res}))
    return 0


def cmd_export(args) -> int:
    from .export import export_run

    paths = export_run(args.run_dir, args.out)
    if "hf" in paths:
        print(f"hugging face model: {paths['hf']} (AutoModel.from_pretrained)")
    print(f"student weights: {paths['weights']}")
    print(f"model spec: {paths['spec']} (crossdistill.export.load_exported)")
    return 0


def cmd_list(args) -> int:
    from . import registry

    if args.kind == "config":  # the config reference (the README's section is this text)
        from .reference import generate

        print(generate(), end="")
        return 0

    reg = {
        "losses": registry.LOSSES,
        "models": registry.MODELS,
        "datasets": registry.DATASETS,
        "methods": registry.METHODS,
        "projectors": registry.PROJECTORS,
        "condensers": registry.CONDENSERS,
    }[args.kind]
    _import_all()
    for name in reg.names():
        if args.kind == "models":
            _list_model(name, reg.get(name))
            continue
        meta = {k: v for k, v in reg.meta(name).items() if v is not None}
        head = meta.pop("paper", None) or meta.pop("description", None)
        if head and "year" in meta:
            head = f"{head} ({meta.pop('year')})"
        rest = ", ".join(f"{k}={v}" for k, v in meta.items() if k not in ("name", "sizes"))
        params = ", ".join(_show_param(k, v) for k, v in _hyper(reg.get(name), args.kind).items())
        desc = "; ".join(x for x in (head, rest, params and f"params: {params}") if x)
        print(f"{name:14s} {desc}")
    return 0


_REQUIRED = object()
_INPUTS = {"y", "idx", "mask", "batch", "num_samples", "s", "t", "x", "split", "root", "student",
           "teacher"}


def _show_param(name: str, default) -> str:
    if default is _REQUIRED:
        return f"{name} (required)"
    if default is None:  # derived from the data or the models when not given
        return f"{name} (optional)"
    return f"{name}={default!r}"


def _hyper(obj, kind: str) -> dict:
    """The user-settable keyword arguments of a registered callable and their defaults,
    from its signature (a class: its ``__init__``; a stateful loss: its ``__init__`` minus
    the shapes it is built from)."""
    import inspect

    fn = obj.__init__ if inspect.isclass(obj) else obj
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return {}
    out = {}
    for n, p in sig.parameters.items():
        if n == "self" or n in _INPUTS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if kind == "losses" and p.kind is not p.KEYWORD_ONLY:
            continue  # losses take tensors positionally, hyper-parameters by keyword
        if p.default is p.empty and p.kind is not p.KEYWORD_ONLY:
            continue  # positional inputs (a model, shapes)
        out[n] = _REQUIRED if p.default is p.empty else p.default
    return out


def _list_model(name: str, factory) -> None:
    """A model's structure and taps, with the arguments it was built with: taps depend on
    them (a depth-3 ViT has no ``blocks.5``)."""
    from .models import create

    built = {"num_classes": 10, **{k: v for k, v in _hyper(factory, "models").items()
                                   if v is not _REQUIRED and k != "num_classes"}}
    try:
        m = create(name, num_classes=10)
    except Exception as err:  # a model that needs arguments (e.g. a tokenizer's vocabulary)
        print(f"{name:12s} (not built with defaults: {one_line(str(err), 120)})")
        return
    print(
        f"{name:12s} family={getattr(m, 'family', '?')} stages={m.stages} "
        f"head={m.feature_path}"
    )
    args = ", ".join(f"{k}={v!r}" for k, v in built.items())
    print(f"{'':12s} built with: {args} (other arguments give other taps)")
    print(f"{'':12s} taps: {', '.join(p for p, _ in m.named_modules() if p)}")


def _import_all():
    from . import data, losses, models, projectors  # noqa: F401

    for mod in ("methods", "condense"):
        try:
            __import__(f"crossdistill.{mod}")
        except ImportError:
            pass


def cmd_report(args) -> int:
    from .report import write_report

    path = write_report(args.run_dir, out=args.out)
    print(f"report written to {path}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, seeds=args.seeds, quick=args.quick, epochs=args.epochs)
    return 0


def cmd_generate(args) -> int:
    from .lm.generate import generate_from_run

    print(generate_from_run(
        args.run_dir, args.prompt, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        weights=args.weights,
    ))
    return 0


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "export": cmd_export,
    "list": cmd_list,
    "report": cmd_report,
    "demo": cmd_demo,
    "generate": cmd_generate,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    commands = dict(COMMANDS)
    for plugin in _plugins():
        commands.update(plugin.COMMANDS)
    debug = getattr(args, "debug", False)
    try:
        return commands[args.cmd](args)
    except ConfigError as err:
        if debug:
            raise
        print(f"crossdistill: error: {one_line(str(err), 4000)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crossdistill: interrupted; resume with --resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `crossdistill list models | head`: the reader left
        _silence_stdout()
        return 141
    except MemoryError as err:
        if debug:
            raise
        what = one_line(str(err), 200) or "an allocation failed"
        print(
            f"crossdistill: error: {args.cmd}: ran out of memory ({what}); this machine's RAM "
            "does not hold the run: lower data.batch_size, the model or the data size",
            file=sys.stderr,
        )
        return 2
    except Exception as err:  # last resort: never a traceback for a user
        if debug:
            raise
        if _is_cuda_oom(err):
            print(
                f"crossdistill: error: {args.cmd}: GPU memory ran out "
                f"({one_line(str(err), 200)}); lower data.batch_size or the model size",
                file=sys.stderr,
            )
            return 2
        print(
            f"crossdistill: internal error: {type(err).__name__}: {one_line(str(err), 500)} "
            "(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _is_cuda_oom(err: Exception) -> bool:
    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    return oom is not None and isinstance(err, oom)


if __name__ == "__main__":
    sys.exit(main())
