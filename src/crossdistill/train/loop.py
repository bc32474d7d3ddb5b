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
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import Batches, Dataset
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
    data: Dataset,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    dist: D.Dist | None = None,
) -> dict[str, float]:
    """Accuracy and mean CE of ``model`` on the labelled samples of ``data``.

    Under torch.distributed each rank scores every ``world``-th sample (shards padded to equal
    length so collective forwards, e.g. FSDP's, stay in step) and the sums are all-reduced.
    """
    d = dist or D.Dist()
    was = model.training
    model.eval()
    ids = torch.arange(len(data))
    per = -(-len(ids) // d.world)
    ids = torch.cat([ids, ids[: per * d.world - len(ids)]])[d.rank :: d.world]
    real = torch.arange(len(ids)) * d.world + d.rank < len(data)  # padding is not counted
    sums = {"correct": 0.0, "loss": 0.0, "n": 0.0}
    for start in range(0, len(ids), batch_size):
        batch = data.batch(ids[start : start + batch_size])
        keep = (batch["y"] >= 0) & real[start : start + batch_size]
        logits = model(batch["x"].to(device)).float()
        y = batch["y"].to(device)
        k = keep.to(device)
        if k.any():
            sums["loss"] += F.cross_entropy(logits[k], y[k], reduction="sum").item()
            sums["correct"] += (logits[k].argmax(1) == y[k]).sum().item()
            sums["n"] += k.sum().item()
    model.train(was)
    sums = D.all_reduce_sums(sums, d)
    n = max(sums["n"], 1)
    return {"acc": sums["correct"] / n, "loss": sums["loss"] / n, "n": int(sums["n"])}


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
    def _setup(self):
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
        self.batches = Batches(
            self.train_data,
            c.batch_size // self.dist.world,
            shuffle=True,
            seed=c.seed,
            shift=c.augment_shift,
            flip=c.augment_flip,
            rank=self.dist.rank,
            world=self.dist.world,
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
        params = [p for p in self.distiller.parameters() if p.requires_grad]
        if c.optimizer == "sgd":
            self.opt = torch.optim.SGD(
                params,
                lr=c.lr,
                momentum=c.momentum,
                nesterov=c.nesterov and c.momentum > 0,
                weight_decay=c.weight_decay,
            )
        elif c.optimizer == "adamw":
            self.opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        else:
            raise ConfigError("train.optimizer", c.optimizer, "allowed: sgd, adamw")
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
            "best_val": -1.0,
            "best_epoch": -1,
            "sums": {},
        }

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
        self._setup()
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
            row = self._run_epoch(self.state["epoch"])
            self.state["epoch"] += 1
            self.state["batch"], self.state["sums"] = 0, {}
            self.save_checkpoint()
            for cb in self.callbacks:
                getattr(cb, "on_epoch_end", lambda *a: None)(self, row)
        self.results = self._finish(time.time() - t0)
        return self.results

    def _run_epoch(self, epoch: int) -> dict:
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
        self.distiller.total_epochs = c.epochs
        for b, batch in enumerate(bar, start=st["batch"]):
            self.distiller.epoch = epoch + b / n
            out = self._forward_backward(batch)
            self._accumulate(out, batch)
            last = b + 1 == n
            if (b + 1) % c.accumulate == 0 or last:
                self._optimizer_step()
                st["batch"] = b + 1
                if c.checkpoint_every and st["step"] % c.checkpoint_every == 0 and not last:
                    self.save_checkpoint()
            if c.progress and b % 10 == 0:  # .item() syncs a GPU: only when shown
                bar.set_postfix(loss=f"{out.total.item():.3f}")
            for cb in self.callbacks:
                getattr(cb, "on_batch_end", lambda *a: None)(self, b)
        bar.close()
        return self._epoch_row(epoch, time.time() - t0)

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

    def _accumulate(self, out, batch):
        """Running sums kept as device tensors: no host sync per step (GPU stays async)."""
        sums = self.state["sums"]
        y = batch["y"].to(out.logits.device)
        k = len(y)
        labelled = y >= 0
        add = {
            "n": torch.tensor(float(k)),
            "loss": out.total.detach().float() * k,
            "correct": ((out.logits.detach().argmax(1) == y) & labelled).sum().float(),
            "labelled": labelled.sum().float(),
        }
        add.update({f"loss_{name}": v.detach().float() * k for name, v in out.losses.items()})
        for key, v in add.items():
            sums[key] = sums[key] + v if key in sums else v

    @staticmethod
    def _floats(sums: dict) -> dict[str, float]:
        return {k: float(v) for k, v in sums.items()}

    def _epoch_row(self, epoch: int, seconds: float) -> dict:
        s, st = D.all_reduce_sums(self._floats(self.state["sums"]), self.dist), self.state
        row = {
            "epoch": epoch,
            "step": st["step"],
            "lr": st.get("lr", self.cfg.lr),
            "train_loss": s["loss"] / s["n"],
            "train_acc": s["correct"] / max(1, s["labelled"]),
            "epoch_time": seconds,
        }
        row.update({k: v / s["n"] for k, v in s.items() if k.startswith("loss_")})
        if self.val is not None:
            v = evaluate(
                self.distiller.student, self.val, self.cfg.eval_batch_size, self.device, self.dist
            )
            row.update(val_acc=v["acc"], val_loss=v["loss"])
            if v["acc"] > st["best_val"]:
                st["best_val"], st["best_epoch"] = v["acc"], epoch
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
        student = self.distiller.student
        best = load_weights(self.out_dir / "best.safetensors") if self.out_dir else self._best_state
        self._load_student_state(best)
        res = {
            "best_epoch": self.state["best_epoch"],
            "best_val_acc": self.state["best_val"],
            "train_seconds": seconds,
            "epochs": self.cfg.epochs,
            "world": self.dist.world,
            "student_params": sum(v.numel() for v in best.values() if v.is_floating_point()),
        }
        if self.test is not None:
            t = evaluate(student, self.test, self.cfg.eval_batch_size, self.device, self.dist)
            res.update(test_acc=t["acc"], test_loss=t["loss"])
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
