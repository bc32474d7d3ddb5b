"""CLI plug-in: ``crossdistill condense CONFIG`` and ``crossdistill condense-eval RUN_DIR``.

``condense`` reads a YAML file (safe loader) validated by :class:`CondenseConfig`::

    method: dm            # any name of `crossdistill list condensers`
    ipc: 10
    data: {name: digits, root: null, img_size: null}
    iterations: 200
    seed: 0
    out_dir: runs/condense_dm_digits
    net_kw: {width: 32}   # method hyper-parameters go at the top level ...
    hyper: {lr_img: 1.0}  # ... or here
    eval: {archs: [convnet, mlp], n_models: 5}

and writes RUN_DIR/synthetic.safetensors (+ synthetic.json meta), RUN_DIR/grid.png and
RUN_DIR/config.yaml. ``condense-eval`` trains fresh models on that set with the harness and
writes RUN_DIR/eval.json (``--baselines`` adds the random real subset and the full training
set; ``--select-on-val`` chooses lr and steps per architecture on the val split from
:data:`~crossdistill.condense.harness.DEFAULT_GRID` and records the choice) and prints a
table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..config import _Strict
from ..errors import ConfigError
from ..schema import MAX_SEED, pydantic_error


class DataSpec(_Strict):
    name: str = "digits"
    root: str | None = None
    img_size: int | None = Field(None, ge=4, le=1024)

    @field_validator("name")
    @classmethod
    def _known(cls, v):
        from ..registry import DATASETS

        DATASETS.get(v, "data.name")
        return v


class EvalSpec(_Strict):
    archs: list[str] = Field(default_factory=lambda: ["convnet", "mlp"])
    n_models: int = Field(5, ge=1, le=100)
    steps: int | None = Field(None, ge=1, le=10**7)
    seed: int = Field(0, ge=0, le=MAX_SEED)

    @field_validator("archs")
    @classmethod
    def _archs(cls, v):
        from ..registry import MODELS

        if not v:
            raise ValueError("give at least one architecture")
        for a in v:
            MODELS.get(a, "eval.archs")
        return v


class CondenseConfig(BaseModel):
    """A condensation run. Unknown top-level keys are the method's hyper-parameters."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    method: str
    ipc: int = Field(10, ge=1, le=10_000)
    data: DataSpec = DataSpec()
    iterations: int = Field(200, ge=0, le=10**7)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: str = "cpu"
    out_dir: str | None = None
    hyper: dict = Field(default_factory=dict)
    eval: EvalSpec = EvalSpec()

    @field_validator("method")
    @classmethod
    def _method(cls, v):
        from ..registry import CONDENSERS

        CONDENSERS.get(v, "method")
        return v

    def method_hyper(self) -> dict:
        return {**(self.model_extra or {}), **self.hyper}


def _pyd_error(err: ValidationError) -> ConfigError:
    return pydantic_error(err)


def load_config(path: str | Path) -> CondenseConfig:
    from ..yamlfile import read_yaml  # strict: UTF-8, size, depth, aliases, duplicate keys

    raw = read_yaml(Path(path), "config") or {}
    return validate(raw)


def validate(raw) -> CondenseConfig:
    if not isinstance(raw, dict):
        raise ConfigError("config", type(raw).__name__, "a YAML mapping with method, ipc, data")
    if isinstance(raw.get("method"), dict):  # method: {name: dm, lr_img: 1}
        m = dict(raw["method"])
        if "name" not in m:
            raise ConfigError("method", m, "a name or a mapping with 'name'")
        raw = {**raw, "method": m.pop("name"), "hyper": {**raw.get("hyper", {}), **m}}
    try:
        return CondenseConfig.model_validate(raw)
    except ValidationError as err:
        raise _pyd_error(err) from None


FIXED = ("ipc", "num_classes", "input_shape", "device", "seed", "iterations")  # the harness's


def check_hyper(method: str, hyper: dict, field: str = "") -> dict:
    """The method's hyper-parameters checked against its constructors' signatures (the
    ``**kw`` chain walked): names, types, ranges; returns them coerced."""
    from ..registry import CONDENSERS
    from ..schema import check

    cls = CONDENSERS.get(method, "method")
    if getattr(cls, "data", "images") != "images":  # pair condensers: not from this CLI yet
        raise ConfigError("method", method, f"a condenser of labelled images; {method!r} "
                          f"condenses {cls.data} (Python API: condense.pairs.synthesize_pairs)")
    for k in hyper:
        if k in FIXED:
            raise ConfigError(k, hyper[k], f"set {k} at the top level of the config, not here")
    return check(cls, hyper, field, f"condenser {method!r}", skip=FIXED)


def add_parsers(sub) -> None:
    c = sub.add_parser(
        "condense",
        help="learn a synthetic training set (dataset distillation)",
        description="Run a condenser from a YAML config; writes "
        "synthetic.safetensors, synthetic.json and grid.png to the run dir.",
    )
    c.add_argument("config", help="YAML condensation config (see configs/condense_*.yaml)")
    c.add_argument(
        "--out",
        help="run directory (default: out_dir of the config, else "
        "runs/condense_<method>_<data>_ipc<ipc>)",
    )
    c.add_argument("--no-progress", action="store_true", help="hide progress bars")
    c.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    e = sub.add_parser(
        "condense-eval",
        help="judge a synthetic set: fresh models trained on it",
        description="Train fresh models (ConvNet and another architecture) on "
        "RUN_DIR/synthetic.safetensors only; writes RUN_DIR/eval.json.",
    )
    e.add_argument("run_dir", help="a directory written by `crossdistill condense`")
    e.add_argument("--archs", help="comma-separated architectures (default: the config's)")
    e.add_argument("--n-models", type=int, help="fresh models per architecture (default 5)")
    e.add_argument(
        "--steps",
        type=int,
        help="training steps per model (default: the preset fixed per dataset and IPC)",
    )
    e.add_argument(
        "--select-on-val",
        action="store_true",
        help="choose lr and steps per architecture on the val split from the grid "
        "lr {0.01, 0.05} x steps {1, 3} x the preset (or --steps); default: the preset alone",
    )
    e.add_argument(
        "--baselines",
        action="store_true",
        help="also judge a random real subset of the same size and the full train set",
    )
    e.add_argument("--no-progress", action="store_true", help="hide progress bars")
    e.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )


def cmd_condense(args) -> int:
    from ..resources import check_device
    from . import harness as H

    cfg = load_config(args.config)
    hyper = check_hyper(cfg.method, cfg.method_hyper())
    check_device(cfg.device, "device")
    from ..rundir import check_out_dir

    out = check_out_dir(
        args.out
        or cfg.out_dir
        or f"runs/condense_{cfg.method.replace('+', '_')}_{cfg.data.name}_ipc{cfg.ipc}",
        "--out" if args.out else "out_dir",
    )
    train = H.load_splits(cfg.data.name, cfg.data.root, cfg.data.img_size)[0]
    syn = H.synthesize(
        cfg.method,
        train,
        ipc=cfg.ipc,
        iterations=cfg.iterations,
        seed=cfg.seed,
        device=cfg.device,
        progress=not args.no_progress,
        **hyper,
    )
    syn.meta["data"] = cfg.data.model_dump()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    syn.save(out / "synthetic.safetensors")
    H.save_grid(syn, out / "grid.png")
    m = syn.meta
    print(
        f"{cfg.method} ipc={cfg.ipc}: {len(syn)} images in {m['synth_seconds']:.1f}s, peak "
        f"memory {m['peak_mem_mib']:.0f} MiB ({m['peak_mem_how']})"
    )
    print(f"run written to {out}")
    return 0


def cmd_condense_eval(args) -> int:
    from ..report import format_table, pm
    from . import harness as H
    from .base import SyntheticSet

    run = Path(args.run_dir)
    if not (run / "synthetic.safetensors").is_file():
        raise ConfigError("run_dir", str(run), "no synthetic.safetensors in it; run condense")
    cfg = load_config(run / "config.yaml") if (run / "config.yaml").is_file() else None
    ev = cfg.eval if cfg else EvalSpec()
    archs = args.archs.split(",") if args.archs else ev.archs
    EvalSpec(archs=archs)  # validates names
    n_models = args.n_models or ev.n_models
    if n_models < 1:
        raise ConfigError("--n-models", n_models, "must be >= 1")
    syn = SyntheticSet.load(run / "synthetic.safetensors")
    data = syn.meta.get("data") or (cfg.data.model_dump() if cfg else {"name": "digits"})
    splits = H.load_splits(data["name"], data.get("root"), data.get("img_size"))
    net_kw = syn.meta.get("net_kw") or {}
    steps = args.steps or ev.steps
    over = {"steps": steps} if steps else {}
    sets = [syn]
    if args.baselines:
        sets += [
            H.random_subset(splits[0], int(syn.meta.get("ipc", 1)), seed=ev.seed),
            H.full_train_set(splits[0]),
        ]
    results, rows = [], []
    for s in sets:
        cfg_e = H.eval_config(data["name"], s.meta.get("ipc", "full"), **over)
        cands = H.candidate_configs(cfg_e, **H.DEFAULT_GRID) if args.select_on_val else None
        r = H.evaluate_synthetic(
            s,
            data["name"],
            archs,
            n_models,
            cfg=None if cands else cfg_e,
            candidates=cands,
            net_kw=net_kw,
            seed=ev.seed,
            progress=not args.no_progress,
            splits=splits,
        )
        r.update(
            method=s.meta.get("method"),
            ipc=s.meta.get("ipc"),
            size=len(s),
            synth_seconds=s.meta.get("synth_seconds"),
            peak_mem_mib=s.meta.get("peak_mem_mib"),
        )
        results.append(r)
        rows.append(
            [r["method"], str(r["ipc"]), str(len(s))]
            + [pm(r["archs"][a]["test_mean"], r["archs"][a]["test_std"]) for a in archs]
        )
    (run / "eval.json").write_text(json.dumps({"data": data, "results": results}, indent=2))
    print(format_table(["method", "ipc", "images"] + [f"{a} test %" for a in archs], rows))
    if args.select_on_val:
        print("eval config chosen on val (lr, steps):")
        for r in results:
            chosen = ", ".join(
                f"{a} lr={r['archs'][a]['chosen']['lr']:g} steps={r['archs'][a]['chosen']['steps']}"
                for a in archs
            )
            print(f"  {r['method']} ipc{r['ipc']}: {chosen}")
    print(f"written {run / 'eval.json'}")
    return 0


COMMANDS = {"condense": cmd_condense, "condense-eval": cmd_condense_eval}
