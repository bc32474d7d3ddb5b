"""The training loop. It orchestrates; every loss and its maths live in the distiller.

Reading order: ``fit`` -> ``_run_epoch`` -> ``_step``. Checkpoints hold everything that
changes during training (weights, optimiser, RNG, counters, running sums), so ``fit(resume=True)``
after a kill reproduces the uninterrupted run's weights bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import Dataset
from ..data.loaders import eval_batches, make_batches
from ..errors import ConfigError
from ..io import load_weights, save_weights
from . import checkpoint
from . import distributed as D
from .config import TrainConfig
from .metrics import MetricsLog
from .schedule import lr_at


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    dist: D.Dist | None = None,
    *,
    task=None,
    io=None,
) -> dict[str, float]:
    """The task's metrics of ``model`` on ``data`` (default: classification accuracy and CE
    on the labelled samples). ``io`` is the model's adapter (default ``model(batch["x"])``).

    Under torch.distributed each rank scores every ``world``-th sample (shards padded to equal
    length so collective forwards, e.g. FSDP's, stay in step) and the sums are all-reduced.
    """
    from .. import tasks
    from ..adapters import ModelIO

    d = dist or D.Dist()
    task = tasks.build(task)
    io = ModelIO.parse(io, "student").with_defaults(task.inputs, task.class_dim)
    was = model.training
    model.eval()
    views = {"": [], **task.views}
    sums: dict = {v: {} for v in views}
    for batch, keep in eval_batches(data, batch_size, d.rank, d.world):
        batch = {k: v.to(device) for k, v in batch.items()}
        if keep is None:
            keep = torch.ones(len(next(iter(batch.values()))), dtype=torch.bool)
        for view, zero in views.items():
            b = {k: torch.zeros_like(v) if k in zero else v for k, v in batch.items()}
            out = io.call(model, b)
            task.update(sums[view], io.logits(out), b, keep=keep, out=out)
    model.train(was)
    res = task.compute(D.all_reduce_sums(sums[""], d))
    for view in task.views:
        m = task.compute(D.all_reduce_sums(sums[view], d))
        res.update({f"{view}_{k}": v for k, v in m.items() if k != "n"})
    return res


class Trainer:
    """Fits a :class:`~crossdistill.Distiller` (a student with no teacher is plain supervised
    training). ``val`` selects the best epoch; ``test`` is evaluated once, at the end, on the
    best-on-val weights."""

    def __init__(
        self,
        distiller,
        train: Dataset,
        val: Dataset | None = None,
        test: Dataset | None = None,
        *,
        config: TrainConfig | None = None,
        out_dir: str | Path | None = None,
        callbacks=(),
        **overrides,
    ):
        self.distiller = distiller
        self.cfg = config or TrainConfig()
        for k, v in overrides.items():
            if not hasattr(self.cfg, k):
                raise TypeError(f"Trainer got an unknown setting {k!r}")
            setattr(self.cfg, k, v)
        self.train_data, self.val, self.test = train, val, test
        self.out_dir = Path(out_dir) if out_dir else None
        self.callbacks = list(callbacks)
        self.device = torch.device(self.cfg.device)
        self.log = MetricsLog(self.out_dir)
        self.results: dict = {}

    # -- set-up ---------------------------------------------------------------------------
    def setup(self):
        """Everything before the first step: processes, batches, the dry run that builds
        projectors, the optimiser. ``fit`` calls it; call it yourself to drive
        :meth:`train_epoch` / :meth:`train_step` from your own loop."""
        c = self.cfg
        self.dist = D.init(self.device)
        self.device = D.device_for(c.device, self.dist)
        if c.batch_size % self.dist.world:
            raise ConfigError(
                "data.batch_size",
                c.batch_size,
                f"the global batch must divide by the {self.dist.world} processes",
            )
        if c.deterministic:  # CPU runs are deterministic already; CUDA needs this for exactness
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        torch.manual_seed(c.seed)
        self.distiller.seed = c.seed
        self.batches = make_batches(
            self.train_data,
            c.batch_size // self.dist.world,
            shuffle=True,
            seed=c.seed,
            shift=c.augment_shift,
            flip=c.augment_flip,
            rank=self.dist.rank,
            world=self.dist.world,
            num_workers=c.num_workers,
        )
        stores = [n for n, m in self.distiller.teachers.items() if getattr(m, "is_store", False)]
        for name in stores:  # ids, dataset and transform must match what the store was made of
            self.distiller.teachers[name].check(data=self.train_data)
        if stores and self.batches.augmenting:
            raise ConfigError(
                "data.augment",
                {"shift": c.augment_shift, "flip": c.augment_flip},
                f"teacher {stores[0]!r} reads stored signals of un-augmented "
                "inputs, which random augmentation would make stale: set shift 0 "
                "and flip false, or use an online teacher",
            )
        self.distiller.to(self.device)
        first = next(self.batches.epoch(0))
        self.distiller.build({k: v.to(self.device) for k, v in first.items()})
        self.model = D.wrap(self.distiller, c.strategy, self.dist, c.find_unused)
        if self.dist.active:  # identical initial weights everywhere, different dropout per rank
            torch.manual_seed(c.seed * 7919 + self.dist.rank)
        self.opt = self._make_optimizer()
        self.steps_per_epoch = math.ceil(len(self.batches) / c.accumulate)
        self.total_steps = c.epochs * self.steps_per_epoch
        self.warmup_steps = round(c.warmup_epochs * self.steps_per_epoch)
        self.amp_dtype = None
        if c.amp:
            cuda = self.device.type == "cuda"
            self.amp_dtype = (
                torch.float16 if cuda and not torch.cuda.is_bf16_supported() else torch.bfloat16
            )
        self.scaler = torch.amp.GradScaler(enabled=self.amp_dtype is torch.float16)
        self.state = {
            "epoch": 0,
            "batch": 0,
            "step": 0,
            "best_val": None,
            "best_epoch": -1,
            "sums": {},
        }
        self._first_batch = first
        return self

    def _make_optimizer(self):
        c = self.cfg
        params = [p for p in self.distiller.parameters() if p.requires_grad]
        if c.optimizer == "sgd":
            return torch.optim.SGD(
                params,
                lr=c.lr,
                momentum=c.momentum,
                nesterov=c.nesterov and c.momentum > 0,
                weight_decay=c.weight_decay,
            )
        elif c.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        else:
            raise ConfigError("train.optimizer", c.optimizer, "allowed: sgd, adamw")

    def _restructure(self) -> None:
        """After a structure event: new hooks, projectors and optimiser for the new student."""
        batch = {k: v.to(self.device) for k, v in self._first_batch.items()}
        self.distiller.rebuild(batch)
        self.model = D.wrap(self.distiller, self.cfg.strategy, self.dist, self.cfg.find_unused)
        self.opt = self._make_optimizer()

    # -- checkpoints ----------------------------------------------------------------------
    def _ckpt_path(self) -> Path | None:
        return self.out_dir / "last.ckpt" if self.out_dir else None

    @property
    def _fsdp(self) -> bool:
        return self.dist.active and self.cfg.strategy == "fsdp"

    def _states(self) -> tuple[dict, dict]:
        """(trainable model state, optimiser state); under FSDP gathered in full on rank 0."""
        if not self._fsdp:
            return self.distiller.trainable_state(), self.opt.state_dict()
        from torch.distributed.checkpoint import state_dict as dcp

        opts = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
        model = dcp.get_model_state_dict(self.distiller, options=opts)
        model = {k: v for k, v in model.items() if not k.startswith("teachers.")}
        return model, dcp.get_optimizer_state_dict(self.distiller, self.opt, options=opts)

    def _load_states(self, model: dict, optim: dict) -> None:
        if not self._fsdp:
            self.distiller.load_trainable_state(model)
            self.opt.load_state_dict(optim)
            return
        from torch.distributed.checkpoint import state_dict as dcp

        opts = dcp.StateDictOptions(full_state_dict=True, strict=False)
        dcp.set_model_state_dict(self.distiller, model, options=opts)
        dcp.set_optimizer_state_dict(self.distiller, self.opt, optim, options=opts)

    def _student_state(self) -> dict:
        if not self._fsdp:
            return self.distiller.student.state_dict()
        from torch.distributed.checkpoint import state_dict as dcp

        opts = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
        return dcp.get_model_state_dict(self.distiller.student, options=opts)

    def _load_student_state(self, state: dict) -> None:
        if not self._fsdp:
            self.distiller.student.load_state_dict(state)
            return
        from torch.distributed.checkpoint import state_dict as dcp

        dcp.set_model_state_dict(
            self.distiller.student, state, options=dcp.StateDictOptions(full_state_dict=True)
        )

    def save_checkpoint(self):
        if not self.out_dir:
            return
        rng = {"cpu": D.gather_rng(self.dist)}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        model, optim = self._states()
        state = {**self.state, "sums": self._floats(self.state["sums"])}
        if self.dist.main:
            checkpoint.save(
                {
                    "model": model,
                    "optimizer": optim,
                    "scaler": self.scaler.state_dict(),
                    "rng": rng,
                    "state": state,
                    "config": asdict(self.cfg),
                    "world": self.dist.world,
                    "structure": [dict(e) for e in self.distiller.structure_log],
                },
                self._ckpt_path(),
            )
        D.barrier(self.dist)

    def _resume(self):
        ck = checkpoint.load(self._ckpt_path())
        if ck.get("world", 1) != self.dist.world:
            raise ConfigError(
                "--resume",
                ck.get("world", 1),
                "the checkpoint was written by that "
                "many processes; resume with the same number "
                f"(now {self.dist.world})",
            )
        if ck.get("structure"):  # replay structure events, then load the matching weights
            self.distiller.replay_structure(ck["structure"])
            self._restructure()
        self._load_states(ck["model"], ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"]["cpu"][self.dist.rank])
        if "cuda" in ck["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(ck["rng"]["cuda"], self.device)
        self.state = ck["state"]
        if self.dist.main:
            self.log.restore(self.state["epoch"])

    # -- the loop -------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict:
        """Train every epoch (from the last checkpoint with ``resume``), pick the best epoch on
        the validation split by the task's metric, then score the test split once."""
        self.setup()
        if self.out_dir and self.dist.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if not resume:
                for f in ("metrics.jsonl", "metrics.csv", "results.json"):
                    (self.out_dir / f).unlink(missing_ok=True)
        D.barrier(self.dist)
        if resume:
            self._resume()
        t0 = time.time()
        while self.state["epoch"] < self.cfg.epochs:
            row = self.train_epoch(self.state["epoch"])
            self.state["epoch"] += 1
            self.state["batch"], self.state["sums"] = 0, {}
            self.save_checkpoint()
            for cb in self.callbacks:
                getattr(cb, "on_epoch_end", lambda *a: None)(self, row)
        self.results = self._finish(time.time() - t0)
        return self.results

    def train_epoch(self, epoch: int) -> dict:
        """One epoch of steps (from ``state["batch"]`` on, after a resume); returns its row."""
        c, st = self.cfg, self.state
        self.distiller.train()
        n = len(self.batches)
        bar = tqdm(
            self.batches.epoch(epoch, start=st["batch"]),
            total=n,
            initial=st["batch"],
            desc=f"epoch {epoch + 1}/{c.epochs}",
            leave=False,
            disable=not c.progress or not self.dist.main,
            dynamic_ncols=True,
        )
        t0 = time.time()
        for b, batch in enumerate(bar, start=st["batch"]):
            out = self.train_step(batch, epoch, b, n)
            last = b + 1 == n
            if (b + 1) % c.accumulate == 0 or last:
                if c.checkpoint_every and st["step"] % c.checkpoint_every == 0 and not last:
                    self.save_checkpoint()
            if c.progress and b % 10 == 0:  # .item() syncs a GPU: only when shown
                bar.set_postfix(loss=f"{out.total.item():.3f}")
            for cb in self.callbacks:
                getattr(cb, "on_batch_end", lambda *a: None)(self, b)
        bar.close()
        return self._epoch_row(epoch, time.time() - t0)

    def train_step(self, batch, epoch: int, b: int, n: int):
        """Forward and backward of micro-batch ``b`` of ``n``; the optimiser steps every
        ``accumulate`` micro-batches (and at the epoch's end). Returns the step's Output."""
        c, st = self.cfg, self.state
        self.distiller.set_progress(
            st["step"], self.total_steps, steps_per_epoch=self.steps_per_epoch, epoch=epoch + b / n
        )
        out = self._forward_backward(batch)
        self._accumulate(out, out.batch if out.batch is not None else batch)
        if (b + 1) % c.accumulate == 0 or b + 1 == n:
            self._optimizer_step()
            st["batch"] = b + 1
            for cb in self.callbacks:
                getattr(cb, "on_step_end", lambda *a: None)(self, out)
        return out

    def _forward_backward(self, batch):
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        ctx = (
            torch.autocast(self.device.type, dtype=self.amp_dtype)
            if self.amp_dtype
            else contextlib.nullcontext()
        )
        with ctx:
            out = self.model(batch)
        self.scaler.scale(out.total / self.cfg.accumulate).backward()
        return out

    def _optimizer_step(self):
        c, st = self.cfg, self.state
        lr = lr_at(
            st["step"],
            self.total_steps,
            base=c.lr,
            schedule=c.schedule,
            warmup=self.warmup_steps,
            milestones=tuple(c.milestones),
            gamma=c.gamma,
        )
        for g in self.opt.param_groups:
            g["lr"] = lr
        if c.grad_clip:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.distiller.parameters(), c.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        st["step"] += 1
        st["lr"] = lr
        on_step = getattr(self.distiller, "on_step", None)
        if on_step:
            on_step()
        if getattr(self.distiller, "structure_changed", False):
            self._restructure()

    def _accumulate(self, out, batch):
        """Running sums kept as device tensors: no host sync per step (GPU stays async)."""
        sums = self.state["sums"]
        k = len(out.logits)
        add = {
            "n": torch.tensor(float(k)),
            "loss": out.total.detach().float() * k,
        }
        if self.distiller.task.train_metrics:
            task_sums = {}
            self.distiller.task.update(task_sums, out.logits, batch)
            add.update({f"task:{key}": v for key, v in task_sums.items()})
        add.update({f"loss_{name}": v.detach().float() * k for name, v in out.losses.items()})
        for key, v in add.items():
            sums[key] = sums[key] + v if key in sums else v

    @staticmethod
    def _floats(sums: dict) -> dict:
        return {k: float(v) if torch.is_tensor(v) and v.dim() == 0 else v for k, v in sums.items()}

    def evaluate(self, data) -> dict:
        """The task's metrics of the current student on ``data`` (any split)."""
        return evaluate(
            self.distiller.student,
            data,
            self.cfg.eval_batch_size,
            self.device,
            self.dist,
            task=self.distiller.task,
            io=self.distiller.io,
        )

    def _epoch_row(self, epoch: int, seconds: float) -> dict:
        s, st = D.all_reduce_sums(self._floats(self.state["sums"]), self.dist), self.state
        task = self.distiller.task
        row = {
            "epoch": epoch,
            "step": st["step"],
            "lr": st.get("lr", self.cfg.lr),
            "train_loss": s["loss"] / s["n"],
        }
        if task.train_metrics:
            m = task.compute({k[5:]: v for k, v in s.items() if k.startswith("task:")})
            row.update({f"train_{k}": m[k] for k in task.train_metrics})
        row["epoch_time"] = seconds
        row.update({k: v / s["n"] for k, v in s.items() if k.startswith("loss_")})
        if self.val is not None:
            v = self.evaluate(self.val)
            row.update({f"val_{k}": x for k, x in v.items() if isinstance(x, float)})
            if task.better(v[task.select], st["best_val"]):
                st["best_val"], st["best_epoch"] = v[task.select], epoch
                self._save_best()
        else:
            st["best_epoch"] = epoch
            self._save_best()
        if self.dist.main:
            self.log.append(row)
        return row

    def _save_best(self):
        state = self._student_state()
        if self.out_dir:
            if self.dist.main:
                save_weights(state, self.out_dir / "best.safetensors")
            D.barrier(self.dist)
        else:
            self._best_state = {k: v.detach().clone() for k, v in state.items()}

    def _finish(self, seconds: float) -> dict:
        best = load_weights(self.out_dir / "best.safetensors") if self.out_dir else self._best_state
        self._load_student_state(best)
        res = {
            "best_epoch": self.state["best_epoch"],
            f"best_val_{self.distiller.task.select}": self.state["best_val"],
            "train_seconds": seconds,
            "epochs": self.cfg.epochs,
            "world": self.dist.world,
            "student_params": sum(v.numel() for v in best.values() if v.is_floating_point()),
        }
        task = self.distiller.task
        res["task"] = {
            "name": task.name,
            "select": task.select,
            "mode": task.mode,
            "columns": [list(c) for c in task.columns],
        }
        if self.test is not None:
            t = self.evaluate(self.test)
            res.update({f"test_{k}": x for k, x in t.items() if isinstance(x, (float, list))})
        if self.out_dir and self.dist.main:
            if self._fsdp:  # best.safetensors already holds the full, clean student state
                shutil.copyfile(
                    self.out_dir / "best.safetensors", self.out_dir / "student.safetensors"
                )
            else:
                self.distiller.export(self.out_dir / "student.safetensors")
            (self.out_dir / "results.json").write_text(json.dumps(res, indent=2))
        D.barrier(self.dist)
        return res
