"""The training loop. It orchestrates; every loss and its maths live in the distiller.

Reading order: ``fit`` -> ``_run_epoch`` -> ``_step``. Checkpoints hold everything that
changes during training (weights, optimiser, RNG, counters, running sums), so ``fit(resume=True)``
after a kill reproduces the uninterrupted run's weights bit for bit on CPU.
"""

from __future__ import annotations

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
from ..errors import ConfigError, describe
from ..io import load_weights, save_weights
from . import checkpoint
from . import distributed as D
from . import finite as F
from . import resume as R
from .config import TrainConfig
from .metrics import MetricsLog, write_atomic
from .schedule import lr_at


def eval_io(task, io):
    """(the task, the student's adapter with the task's defaults): how evaluation, and
    anything that must call the student the same way, reads a batch."""
    from .. import tasks
    from ..adapters import ModelIO

    task = tasks.build(task)
    return task, ModelIO.parse(io, "student").with_defaults(task.inputs, task.class_dim)


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
    d = dist or D.Dist()
    task, io = eval_io(task, io)
    was = model.training
    model.eval()
    views = {"": None, **task.views}  # a view: batch -> batch (the task's; e.g. a key zeroed)
    sums: dict = {v: {} for v in views}
    for i, (batch, keep) in enumerate(eval_batches(data, batch_size, d.rank, d.world)):
        batch = {k: v.to(device) for k, v in batch.items()}
        if i == 0:
            io.check_batch(batch)
            task.check_batch(batch)
        if keep is None:
            keep = torch.ones(len(next(iter(batch.values()))), dtype=torch.bool)
        for view, fn in views.items():
            b = batch if fn is None else fn(batch)
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
        from .console import default_callbacks  # epoch lines, train.log loggers

        self.callbacks += default_callbacks(self.cfg, self.callbacks)
        self.device = torch.device(self.cfg.device)
        self.log = MetricsLog(self.out_dir)
        self.results: dict = {}

    # -- set-up ---------------------------------------------------------------------------
    def setup(self):
        """Everything before the first step: processes, batches, the dry run that builds
        projectors, the optimiser. ``fit`` calls it; call it yourself to drive
        :meth:`train_epoch` / :meth:`train_step` from your own loop.

        It seeds torch from ``seed`` before it builds projectors and stateful losses, and the
        data order from ``seed`` too. Models you build yourself exist before this: seed them
        first (``torch.manual_seed(seed)``) for a run that repeats bit for bit;
        :func:`crossdistill.build.make_trainer` does that from ``train.seed``."""
        c = self.cfg
        self.dist = D.init(self.device)
        self.device = D.device_for(c.device, self.dist)
        if c.batch_size % self.dist.world:
            raise ConfigError(
                "data.batch_size",
                c.batch_size,
                f"the global batch must divide by the {self.dist.world} processes",
            )
        if c.precise_bn and not isinstance(self.train_data, Dataset):
            raise ConfigError(
                "train.precise_bn", c.precise_bn,
                "0 for a train split that is not a crossdistill Dataset (precise BN draws a "
                f"fixed sample from it; got {type(self.train_data).__name__})",
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
        splits = (("train", self.train_data), ("val", self.val), ("test", self.test))
        for name, split in splits:
            if split is not None:  # a retrieval gallery smaller than k, boxes off the image
                self.distiller.task.check_split(split, name)
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
            "skipped": 0,  # optimiser steps skipped for NaN/inf (train.nan: skip)
            "epoch_skipped": 0,
        }
        self._nan_skip = getattr(c, "nan", "error") == "skip"
        # one process, one micro-batch per step: the local mean is the global one already
        self._global = (c.accumulate > 1 or self.dist.active) and hasattr(
            self.distiller, "token_counts"
        )
        self._window = None  # the loss total of the accumulation window (a device tensor)
        self._first_batch = first
        self._hooks = {  # callback methods looked up once, not per step
            e: [getattr(cb, e) for cb in self.callbacks if hasattr(cb, e)]
            for e in ("on_batch_end", "on_step_end", "on_val_start", "on_epoch_end")
        }
        return self

    def _make_optimizer(self):
        c = self.cfg
        params = [p for p in self.distiller.parameters() if p.requires_grad]
        self._guard = F.StepGuard(params)  # NaN/inf in their gradients stop or skip a step
        if c.optimizer == "sgd":
            return torch.optim.SGD(
                params,
                lr=c.lr,
                momentum=c.momentum,
                nesterov=c.nesterov and c.momentum > 0,
                weight_decay=c.weight_decay,
            )
        elif c.optimizer == "adamw":
            # the fused kernel: one pass over all parameters (on CPU ~8x faster than the
            # per-tensor loop for a text tower's large embedding table)
            fused = not self._fsdp and all(
                p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
            return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay,
                                     fused=fused or None)
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

    def _resume(self, allow_changed: bool = False):
        ck = checkpoint.load(self._ckpt_path())
        R.check_train_config(ck.get("config") or {}, asdict(self.cfg), allow_changed)
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
        try:
            self._load_states(ck["model"], ck["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:  # another student's shapes
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(
                "--resume", str(self._ckpt_path()), f"the checkpoint does not fit this config's "
                f"student ({describe(err, 200)}); resume with the run's own config"
            ) from None
        self.scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"]["cpu"][self.dist.rank])
        if "cuda" in ck["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(ck["rng"]["cuda"], self.device)
        self.state = {"skipped": 0, "epoch_skipped": 0, **ck["state"]}
        if self.dist.main:
            self.log.restore(self.state["epoch"])

    # -- the loop -------------------------------------------------------------------------
    def fit(self, resume: bool = False, *, allow_changed: bool = False) -> dict:
        """Train every epoch (from the last checkpoint with ``resume``), pick the best epoch on
        the validation split by the task's metric, then score the test split once.

        A resume refuses training settings that differ from the checkpoint's (they would not
        continue the same run) unless ``allow_changed``."""
        self.setup()
        if self.out_dir and self.dist.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            R.clean_temp(self.out_dir)  # atomic writes a kill interrupted
            if not resume:
                for f in ("metrics.jsonl", "metrics.csv", "results.json", "best.safetensors"):
                    (self.out_dir / f).unlink(missing_ok=True)
        D.barrier(self.dist)
        if resume:
            self._resume(allow_changed)
        t0 = time.time()
        while self.state["epoch"] < self.cfg.epochs:
            row = self.train_epoch(self.state["epoch"])
            self.state["epoch"] += 1
            self.state["batch"], self.state["sums"], self.state["epoch_skipped"] = 0, {}, 0
            self.save_checkpoint()
            for f in self._hooks["on_epoch_end"]:
                f(self, row)
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
            disable=None if c.progress and self.dist.main else True,  # None: off if no tty
            dynamic_ncols=True,
        )
        t0 = time.time()
        window: list = []
        for b, batch in enumerate(bar, start=st["batch"]):
            if self._global:  # a whole accumulation window at once, to count its tokens
                window.append(batch)
                if (b + 1) % c.accumulate and b + 1 != n:
                    continue
                outs = self.train_window(window, epoch, b + 1 - len(window), n)
                window = []
            else:
                outs = [self.train_step(batch, epoch, b, n)]
            out = outs[-1]
            last = b + 1 == n
            if (b + 1) % c.accumulate == 0 or last:
                if c.checkpoint_every and st["step"] % c.checkpoint_every == 0 and not last:
                    self.save_checkpoint()
            first = b + 1 - len(outs)
            if not bar.disable and any(i % 10 == 0 for i in range(first, b + 1)):
                bar.set_postfix(loss=f"{out.total.item():.3f}")  # .item() syncs a GPU
            for i in range(first, b + 1):
                for f in self._hooks["on_batch_end"]:
                    f(self, i)
        bar.close()
        return self._epoch_row(epoch, time.time() - t0)

    def train_window(self, window: list, epoch: int, b0: int, n: int) -> list:
        """One optimiser step's micro-batches ``b0, b0 + 1, ...`` of ``n``, normalised over
        the global batch: their ``prepare`` stages run first, each term's valid positions
        are summed over the window and all processes, and each micro-batch then divides its
        sums by that total (times processes x accumulate, which DDP's averaging and the
        ``1 / accumulate`` of the backward undo), so the step's gradient is the mean over
        every valid token of the global batch however they fall into micro-batches."""
        st, d = self.state, self.distiller
        ready = []
        for i, batch in enumerate(window):
            d.set_progress(st["step"], self.total_steps, steps_per_epoch=self.steps_per_epoch,
                           epoch=epoch + (b0 + i) / n)
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            ready.append(d.prepare_batch(batch))
        counts = self._global_counts(ready)
        return [self.train_step(p, epoch, b0 + i, n, prepared=True, counts=counts)
                for i, p in enumerate(ready)]

    def _global_counts(self, batches: list) -> dict:
        per = [self.distiller.token_counts(p) for p in batches]
        names = list(per[0])
        if not names:
            return {}
        total = torch.stack([sum(c[k] for c in per) for k in names]).double()
        if self.dist.active:
            torch.distributed.all_reduce(total)
        total = (total.clamp_min(1) / (self.dist.world * self.cfg.accumulate)).float()
        return dict(zip(names, total.unbind()))

    def train_step(self, batch, epoch: int, b: int, n: int, *, prepared=False, counts=None):
        """Forward and backward of micro-batch ``b`` of ``n``; the optimiser steps every
        ``accumulate`` micro-batches (and at the epoch's end). Returns the step's Output.
        ``prepared``/``counts``: see :meth:`train_window`."""
        c, st = self.cfg, self.state
        self.distiller.set_progress(
            st["step"], self.total_steps, steps_per_epoch=self.steps_per_epoch, epoch=epoch + b / n
        )
        opens = b % c.accumulate == 0  # the first micro-batch of an optimiser step
        if opens and self._nan_skip:
            self._snapshot()
        out = self._forward_backward(batch, prepared, counts)
        total = out.total.detach()
        self._window = total if opens or self._window is None else self._window + total
        self._accumulate(out, out.batch if out.batch is not None else batch)
        if (b + 1) % c.accumulate == 0 or b + 1 == n:
            self._optimizer_step(out)
            st["batch"] = b + 1
            for f in self._hooks["on_step_end"]:
                f(self, out)
        return out

    def _forward_backward(self, batch, prepared=False, counts=None):
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        kw = {"prepared": True, "counts": counts} if prepared else {}
        if self.amp_dtype:
            with torch.autocast(self.device.type, dtype=self.amp_dtype):
                out = self.model(batch, **kw)
        else:
            out = self.model(batch, **kw)
        acc = self.cfg.accumulate
        loss = out.total if acc == 1 else out.total / acc  # x/1 is x
        (self.scaler.scale(loss) if self.scaler.is_enabled() else loss).backward()
        return out

    def _optimizer_step(self, out=None):
        c, st = self.cfg, self.state
        lr = lr_at(
            st["step"],
            self.total_steps,
            base=c.lr,
            schedule=c.schedule,
            warmup=self.warmup_steps,
            milestones=tuple(c.milestones),
            gamma=c.gamma,
            min_lr=c.min_lr,
            unit=self.steps_per_epoch if c.schedule_unit == "epoch" else 1,
        )
        for g in self.opt.param_groups:
            if g["lr"] != lr:  # (a constant schedule writes it once)
                g["lr"] = lr
        if c.grad_clip:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.distiller.parameters(), c.grad_clip)
        if self._step_finite():
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self._non_finite(out)
        self.opt.zero_grad(set_to_none=True)
        st["step"] += 1
        st["lr"] = lr
        on_step = getattr(self.distiller, "on_step", None)
        if on_step:
            on_step()
        if getattr(self.distiller, "structure_changed", False):
            self._restructure()
            # a checkpoint from before the event is another model: it cannot be the best one
            st["best_val"], st["best_epoch"] = None, -1

    # -- NaN/inf ---------------------------------------------------------------------------
    def _step_finite(self) -> bool:
        """The window's loss total and the gradients all finite? One host sync per step.
        Under fp16 loss scaling, inf gradients are the scaler's business (it skips them)."""
        return self._guard.ok(self._window, not self.scaler.is_enabled(), self.dist)

    def _where(self) -> str:
        st = self.state
        return (
            f"step {st['step'] + 1} of {self.total_steps} "
            f"(epoch {st['epoch'] + 1} of {self.cfg.epochs})"
        )

    def _non_finite(self, out) -> None:
        """A NaN/inf step: stop, naming the term (or gradient) and the step; with
        ``train.nan: skip`` count it and put back the running sums and buffers it changed."""
        st = self.state
        if self.scaler.is_enabled() and self.cfg.grad_clip:
            self.scaler.update()  # unscale_ ran: close the scaler's iteration
        if not self._nan_skip:
            what = "the loss or the gradients are non-finite"
            if out is not None:
                d = self.distiller
                epoch, params = getattr(d, "epoch", 0.0), d.named_parameters()
                what = F.culprit(out, d.terms, epoch, params, self._window)
            raise F.NonFiniteError(what, self._where())
        st["skipped"] = st.get("skipped", 0) + 1
        st["epoch_skipped"] = st.get("epoch_skipped", 0) + 1
        st["sums"] = self._good_sums
        with torch.no_grad():
            for buf, saved in self._good_bufs:
                buf.copy_(saved)

    def _snapshot(self) -> None:
        """``train.nan: skip``: the running sums and the buffers (BatchNorm statistics,
        memory banks) before a step's forwards, restored if the step is skipped. Costs a
        copy per step, so only with the opt-in."""
        sums = self.state["sums"]
        self._good_sums = {k: v.clone() if torch.is_tensor(v) else v for k, v in sums.items()}
        self._good_bufs = [
            (b, b.detach().clone())
            for name, b in self.distiller.named_buffers()
            if not name.startswith("teachers.")
        ]

    def _accumulate(self, out, batch):
        """Running sums kept as device tensors: no host sync per step (GPU stays async).

        A step's float32 scalars (sample count, total, each term, the task's training sums)
        are stacked, scaled and added to the epoch's sums in one in-place add, so three
        kernels instead of about ten; element by element these are the same float32
        additions as one add per key. ``state["sums"]`` holds views of that vector; other
        values (e.g. a confusion matrix) keep their own add."""
        sums, k = self.state["sums"], len(out.logits)
        total = out.total.detach().float()
        task_sums: dict = {}
        if self.distiller.task.train_metrics:
            self.distiller.task.update(task_sums, out.logits, batch)
        losses = [v.detach().float() for v in out.losses.values()]
        plan = self.__dict__.get("_sum_plan")
        sig = (k, tuple(task_sums), tuple(out.losses))
        if plan is None or plan[0] is not sums or plan[1] != sig:
            vals = [total, total, *task_sums.values(), *losses]
            plan = self._sum_plan = self._plan_sums(sums, sig, vals)
        _, _, one, scale, vector, keep, others = plan
        vals = [one, total, *task_sums.values(), *losses]
        if others:
            for key, i in others:
                sums[key] = sums[key] + vals[i] if key in sums else vals[i]
            vals = [vals[i] for i in keep]
        vector.add_(torch.stack(vals).mul_(scale))

    def _plan_sums(self, sums: dict, sig: tuple, vals: list) -> tuple:
        """How a step's values join ``sums`` while the batch size and the keys stay the same:
        the float32 scalars as one vector (views of it go into ``sums``, starting from what
        ``sums`` already holds: floats after a resume, views of an earlier vector), scaled by
        the sample count (the count itself, summed means) or 1 (the task's sums)."""
        k, task_keys, loss_names = sig
        keys = ["n", "loss", *(f"task:{t}" for t in task_keys), *(f"loss_{n}" for n in loss_names)]
        keep = [
            i for i, v in enumerate(vals)
            if torch.is_tensor(v) and v.dim() == 0 and v.dtype == torch.float32
        ]
        others = [(keys[i], i) for i in range(len(keys)) if i not in keep]
        dev = vals[1].device
        scale = torch.tensor(
            [1.0 if keys[i].startswith("task:") else float(k) for i in keep], device=dev
        )
        vector = torch.stack(
            [torch.as_tensor(sums.get(keys[i], 0.0), dtype=torch.float32, device=dev) for i in keep]
        )
        sums.update(zip([keys[i] for i in keep], vector.unbind()))
        return sums, sig, vals[1].new_ones(()), scale, vector, keep, others

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
        if not self.state["sums"]:  # train.nan: skip, and every step of the epoch was skipped
            raise F.NonFiniteError(
                f"all {self.state.get('epoch_skipped', 0)} steps were non-finite and skipped",
                f"epoch {epoch + 1} of {self.cfg.epochs}",
                F.HINT_SKIPPING,
            )
        bad = F.first_nonfinite(self._student_state())  # one sync per epoch
        if bad is not None:
            raise F.NonFiniteError(
                f"student weight {bad!r} is non-finite",
                f"the end of epoch {epoch + 1} of {self.cfg.epochs} (step {self.state['step']})",
                F.HINT_SKIPPING if self._nan_skip else F.HINT,
            )
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
        if self._nan_skip:
            row["skipped_steps"] = st.get("epoch_skipped", 0)
        self._precise_bn()
        if self.val is not None:
            for f in self._hooks["on_val_start"]:  # e.g. a test-time setting chosen on val
                f(self)
            v = self.evaluate(self.val)
            row.update({f"val_{k}": x for k, x in v.items() if isinstance(x, float)})
            bad = [k for k, x in v.items() if isinstance(x, float) and not math.isfinite(x)]
            if bad:  # a diverged student is never the best epoch
                self._nonfinite_val = bad
            elif task.better(v[task.select], st["best_val"]):
                st["best_val"], st["best_epoch"] = v[task.select], epoch
                self._save_best()
        else:
            st["best_epoch"] = epoch
            self._save_best()
        if self.dist.main:
            self.log.append(row)
        return row

    def _precise_bn(self) -> None:
        """Recompute the student's BN statistics on a fixed train sample (``precise_bn``)."""
        n = self.cfg.precise_bn
        if not n:
            return
        from . import precise_bn as PB

        if getattr(self, "_bn_sample", None) is None:
            self._bn_sample = self.train_data.subset(
                PB.sample_ids(len(self.train_data), n, self.cfg.seed))
        _, io = eval_io(self.distiller.task, self.distiller.io)
        bs = self.cfg.batch_size // self.dist.world
        batches = ({k: v.to(self.device) for k, v in b.items()}
                   for b, _ in eval_batches(self._bn_sample, bs, self.dist.rank, self.dist.world))
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # the training's random stream is untouched
            PB.recompute(self.distiller.student, batches, io.call, self.dist)

    def _save_best(self):
        state = self._student_state()
        if self.out_dir:
            if self.dist.main:
                save_weights(state, self.out_dir / "best.safetensors")
            D.barrier(self.dist)
        else:
            self._best_state = {k: v.detach().clone() for k, v in state.items()}

    def _teacher_val(self) -> dict:
        """Each online teacher's val metric, once (the report draws it beside the student's
        curve): ``teacher_val_<metric>``, or ``teacher_<name>_val_<metric>`` for several."""
        names = [n for n, m in self.distiller.teachers.items() if not getattr(m, "is_store", 0)]
        if self.val is None or not names:
            return {}
        task, out = self.distiller.task, {}
        for n in names:
            key = "teacher" if len(names) == 1 else f"teacher_{n}"
            try:
                v = evaluate(
                    self.distiller.teachers[n],
                    self.val,
                    self.cfg.eval_batch_size,
                    self.device,
                    self.dist,
                    task=task.for_io(self.distiller.teacher_io[n]),
                    io=self.distiller.teacher_io[n],
                )
            except ConfigError as err:  # a teacher whose output the task cannot read (a
                # cross-encoder's score matrix under a retrieval task): the run stands
                if not str(err.field).startswith("task."):
                    raise
                out[f"{key}_val_not_scored"] = f"{err.field}: {err.allowed}"
                continue
            out[f"{key}_val_{task.select}"] = v[task.select]
        return out

    def _finish(self, seconds: float) -> dict:
        if self.state["best_epoch"] < 0:
            bad = ", ".join(f"val_{k}" for k in getattr(self, "_nonfinite_val", ["?"]))
            raise F.NonFiniteError(
                f"no epoch had finite validation metrics (last epoch: {bad} non-finite)",
                "the end of training",
                F.HINT_SKIPPING if self._nan_skip else F.HINT,
            )
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
        if self._nan_skip:
            res["skipped_steps"] = self.state.get("skipped", 0)
        task = self.distiller.task
        res["task"] = {
            "name": task.name,
            "select": task.select,
            "mode": task.mode,
            "columns": [list(c) for c in task.columns],
        }
        res.update(self._teacher_val())
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
            write_atomic(self.out_dir / "results.json", json.dumps(res, indent=2))
        D.barrier(self.dist)
        return res
