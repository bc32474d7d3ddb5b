"""Command line: ``crossdistill train | eval | export | list | report | demo``.

Bad input exits with code 2 and one line naming the field, the value and what is allowed;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ConfigError

LIST_KINDS = ("losses", "models", "datasets", "methods", "projectors", "condensers")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crossdistill", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
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

    r = sub.add_parser("report", help="write RUN_DIR/report.html with plots and tables")
    r.add_argument("run_dir")
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

    if args.nproc < 1:
        raise ConfigError("--nproc", args.nproc, "must be >= 1")
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


def cmd_train(args) -> int:
    import os

    from . import config as C
    from .build import default_out_dir, make_trainer

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(args, args.argv)
    cfg = C.load(args.config, args.overrides)
    out = Path(args.out) if args.out else default_out_dir(cfg)
    if args.resume and not (out / "last.ckpt").is_file():
        raise ConfigError("--resume", str(out), "no last.ckpt in that run directory")
    trainer = make_trainer(cfg, out)
    if os.environ.get("RANK", "0") == "0":
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(C.dump(cfg))
    res = trainer.fit(resume=args.resume)
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
    return C.load(run_dir / "config.yaml")


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
    import shutil

    from .build import load_splits, make_model
    from .io import load_into

    run = Path(args.run_dir)
    cfg = _run_config(run)
    src = run / "student.safetensors"
    model = make_model(cfg.student, "student", load_splits(cfg)["train"], checkpoint=False)
    load_into(model, src, "run_dir")  # checks the file matches the config's student
    out = Path(args.out) if args.out else run / "export" / "student.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, out)
    if hasattr(model, "save_pretrained"):  # an HF student: also its own format
        from .models.hf import export_hf

        export_hf(model, str(out.with_suffix("")) + "_hf")
        print(f"hugging face model: {str(out.with_suffix(''))}_hf (AutoModel.from_pretrained)")
    spec = {
        **cfg.student.model_dump(exclude_none=True, exclude={"checkpoint"}),
        "data": cfg.data.name,
    }
    out.with_suffix(".json").write_text(json.dumps(spec, indent=2))
    print(f"student weights: {out}\nmodel spec: {out.with_suffix('.json')}")
    return 0


def cmd_list(args) -> int:
    from . import registry

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
        meta = reg.meta(name)
        if args.kind == "models":
            from .models import create

            m = create(name, num_classes=10)
            print(
                f"{name:12s} family={getattr(m, 'family', '?')} stages={m.stages} "
                f"head={m.feature_path}"
            )
            print(f"{'':12s} taps: {', '.join(p for p, _ in m.named_modules() if p)}")
            continue
        desc = ", ".join(f"{k}={v}" for k, v in meta.items() if k not in ("name", "sizes"))
        print(f"{name:14s} {desc}")
    return 0


def _import_all():
    from . import data, losses, models, projectors  # noqa: F401

    for mod in ("methods", "condense"):
        try:
            __import__(f"crossdistill.{mod}")
        except ImportError:
            pass


def cmd_report(args) -> int:
    from .report import write_report

    path = write_report(args.run_dir)
    print(f"report written to {path}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, seeds=args.seeds, quick=args.quick, epochs=args.epochs)
    return 0


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "export": cmd_export,
    "list": cmd_list,
    "report": cmd_report,
    "demo": cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    commands = dict(COMMANDS)
    for plugin in _plugins():
        commands.update(plugin.COMMANDS)
    try:
        return commands[args.cmd](args)
    except ConfigError as err:
        if getattr(args, "debug", False):
            raise
        print(f"crossdistill: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crossdistill: interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
