"""TRL side by side: the same LM distillation through TRL 1.16 and through crossdistill.

Same teacher and student (random-init GPT-2s from ``crossdistill.models.hf.create_hf``, a BPE
tokenizer trained here on tiny Shakespeare's train split), same blocks, batch, optimiser
(torch AdamW, constant lr, no clipping) and loss (generalised JSD, beta 0.5, T 1):

  trl_gkd_l0 / cd_jsd_l0      TRL's GKDTrainer, lmbda 0 (supervised KD) / Distiller + Trainer
  trl_gkd_l05 / cd_jsd_l05    lmbda 0.5, sampling T 0.9 (TRL: one coin per step; ours: the
                              ``onpolicy`` prepare stage, one coin per sample)
  trl_distill / cd_jsd_l1     TRL's DistillationTrainer (always on-policy, chunked JSD) /
                              ``onpolicy`` with lmbda 1, sampling T 1
  trl_gold_uld / cd_uld       TRL's GOLDTrainer, ULD across two tokenizers (a char-level student,
                              the BPE teacher) / ``ce`` + 1.5 ``uld`` on ``shakespeare_pair``

GOLD is set to compute our loss (``GOLD_SETTINGS``): positional ULD as in the paper
(``use_extended_uld=False``), ``uld_token_merge_strategy="bayesian"`` (the logits that *predict*
each scored token, as our position-aligned labels; TRL's default "observed" takes the logits *at*
the scored tokens, one position later), CE weight 1 and ULD weight 1.5 (the paper's), lmbda 0
(off-policy, as ours), no EOS on the student (TRL's CE counts it but ULD would skip it, so the
two terms would score different tokens) and the teacher's appended EOS skipped. TRL re-tokenizes
the teacher's prompt and completion text every step (prompt = the window's first character);
``shakespeare_pair`` tokenizes the whole split once and cuts windows, so the teachers' token
sequences differ slightly in training; the fixed-batch loss feeds our Distiller TRL's own teacher
tensors. Two further fixed-batch lines show TRL's default merge strategy and its hybrid ULD next
to our ``uld``/``uld_hybrid``: they are different losses by design (reported, not checked).

TRL runs in float32 without activation checkpointing, like ours (its configs default to bf16
autocast and gradient checkpointing, which change both the numbers and the work; pass
``--trl-defaults`` to keep them). Modes run interleaved (A B A B ...) for ``--repeats``
rounds, each measurement in a fresh subprocess with one thread: tokens/s over the timed
steps after a warm-up (sequence positions trained per second, generation included) and
peak memory = the process's RSS high-water mark above its RSS after set-up (Linux
``clear_refs``; ``max_memory_allocated`` on CUDA). The loss on one fixed batch, same
weights, is computed by TRL's own code (``GKDTrainer.compute_loss``,
``DistillationTrainer._compute_loss``) and by the Distiller; they must agree to 1e-5.

Two more rows: the peak memory of a chunked loss (``losses.tiled.tiled_token_loss``) against
the plain full-logits computation at a 32k vocabulary (target <= 0.3x), and a per-token top-8
teacher store (``teachers.cache_teacher(topk=8)``) at a 32k vocabulary (target <= 40 bytes
per token, read from its manifest).

    python benchmarks/lm_peers.py [--quick] [--repeats 3] [--out DIR]

Writes benchmarks/results/lm_peers.json on a full run (``--out DIR`` writes DIR/lm_peers.json
instead, for any run). Offline: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are set, report_to none.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "lm_peers.json"
PAIRS = (  # (row, TRL mode, crossdistill mode)
    ("GKD lmbda 0 (supervised KD)", "trl_gkd_l0", "cd_jsd_l0"),
    ("GKD lmbda 0.5 (on-policy half)", "trl_gkd_l05", "cd_jsd_l05"),
    ("DistillationTrainer (on-policy, chunked)", "trl_distill", "cd_jsd_l1"),
    ("GOLD ULD (two tokenizers)", "trl_gold_uld", "cd_uld"),
)
TARGETS = {"speed_ratio": 1.0, "memory_ratio": 1.0, "loss_abs": 1e-5, "chunked_ratio": 0.3,
           "store_bytes_per_token": 40}
SPEED_ROWS = ("trl_gkd_l0", "trl_gkd_l05")  # where crossdistill >= 1.0x TRL is a target
QUICK = dict(vocab=512, block=64, prompt=32, batch=8, warmup=2, steps=6, repeats=1,
             max_chars=200_000, teacher=(4, 128), student=(2, 64), loss_tokens=1024,
             store_blocks=16, loss_modes=("loss_full", "loss_tiled"))
FULL = dict(vocab=2048, block=128, prompt=64, batch=16, warmup=3, steps=20, repeats=3,
            max_chars=None, teacher=(4, 256), student=(2, 64), loss_tokens=2048,
            store_blocks=256, loss_modes=("loss_full", "loss_tiled", "loss_trl_chunked"))
# tokens per tile of the chunked loss: 2^20 logits (4 MiB fp32) per tile at any vocabulary
# (tiled_token_loss's own default; set here explicitly so the row does not depend on it)
TILE_LOGITS = 2**20
BIG_VOCAB = 32_768


# -- shared set-up: tokenizer, blocks, models -----------------------------------------------
def setup(spec: dict):
    """The tokenizer (trained on the train split, cached), the train blocks, and seeded
    random-init teacher and student GPT-2s (dropout off, so both sides compute the same)."""
    from crossdistill.data.text import contiguous_split, lm_dataset, shakespeare
    from crossdistill.data.text_source import tokenizer_for

    text = shakespeare()
    if spec["max_chars"]:
        text = text[: spec["max_chars"]]
    train = contiguous_split(text)["train"]
    tok, path = tokenizer_for(train, "bpe", spec["vocab"], spec["cache"])
    need = (spec["warmup"] + spec["steps"]) * spec["batch"]
    data = lm_dataset(train[: max(need * spec["block"] * 8, 20_000)], tok, block=spec["block"])
    data = data.subset(torch.arange(min(need, len(data))))
    teacher = gpt(tok, spec["teacher"], spec["block"], seed=0, init=0.2)
    student = gpt(tok, spec["student"], spec["block"], seed=1)
    return tok, path, data, teacher, student


def pair_setup(spec: dict, rows: int | None = None):
    """The GOLD row's data: ``shakespeare_pair`` (char-level student, the BPE teacher
    tokenizer of ``setup``) and seeded teacher / student GPT-2s over those two vocabularies.
    Positions: 2 x block (TRL's student window is block + 1 tokens, its teacher adds an EOS)."""
    from crossdistill.data.text_pair import shakespeare_pair_split

    data = shakespeare_pair_split("train", tokenizer="char", teacher_tokenizer="bpe",
                                  teacher_vocab_size=spec["vocab"], block=spec["block"],
                                  max_chars=spec["max_chars"], cache_dir=spec["cache"])
    need = rows or (spec["warmup"] + spec["steps"]) * spec["batch"]
    tok_s, tok_t = data.tokenizer, data.teacher_tokenizer
    data = data.subset(torch.arange(min(need, len(data))))
    teacher = gpt(tok_t, spec["teacher"], 2 * spec["block"], seed=0, init=0.2)
    student = gpt(tok_s, spec["student"], 2 * spec["block"], seed=1)
    return tok_s, tok_t, data, teacher, student


def gpt(tok, size, block: int, seed: int, init: float = 0.02, vocab: int | None = None):
    from crossdistill.models.hf import create_hf

    torch.manual_seed(seed)
    layers, dim = size
    ids = (dict(bos_token_id=0, eos_token_id=0, pad_token_id=0) if tok is None else
           dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id))
    cfg = dict(n_layer=layers, n_embd=dim, n_head=4, n_positions=block,
               vocab_size=vocab or len(tok), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
               initializer_range=init, **ids)
    return create_hf("gpt2", config=cfg)


def available() -> dict[str, str | None]:
    """Why a crossdistill mode cannot run yet (None = it can)."""
    import crossdistill  # noqa: F401  (registers)
    from crossdistill.registry import LOSSES, PREPARES

    onpolicy = None if "onpolicy" in PREPARES else "not available yet (onpolicy stage)"
    gold = None if "uld" in LOSSES else "not available yet (uld loss)"
    return {"cd_jsd_l05": onpolicy, "cd_jsd_l1": onpolicy, "cd_uld": gold, "trl_gold_uld": gold}


# -- the TRL side -----------------------------------------------------------------------------
def trl_args(cls, spec: dict, out: str, **kw):
    """A TRL config with crossdistill's training settings (see the module docstring)."""
    same = dict(output_dir=out, report_to="none", per_device_train_batch_size=spec["batch"],
                max_steps=spec["warmup"] + spec["steps"], learning_rate=1e-3,
                lr_scheduler_type="constant", optim="adamw_torch", weight_decay=0.0,
                max_grad_norm=0.0, warmup_steps=0, logging_steps=10**6, save_strategy="no",
                disable_tqdm=True, seed=0, dataloader_num_workers=0,
                use_cpu=spec["device"] == "cpu", push_to_hub=False)
    if not spec.get("trl_defaults"):
        same.update(bf16=False, gradient_checkpointing=False)
    return cls(**same, **kw)


def gkd_collate(prompt: int, mask_prompt: bool):
    """Blocks -> GKD's batch: HF labels (= input ids; the trainer shifts), prompts for
    on-policy generation; ``mask_prompt`` marks the prompt -100 (TRL's ChatML collator)."""

    def collate(rows):
        ids = torch.stack([torch.as_tensor(r["input_ids"]) for r in rows])
        labels = ids.clone()
        if mask_prompt:
            labels[:, :prompt] = -100
        ones = torch.ones_like(ids)
        return {"input_ids": ids, "attention_mask": ones, "labels": labels,
                "prompts": ids[:, :prompt], "prompt_attention_mask": ones[:, :prompt]}

    return collate


# GOLD's settings that make it compute ours (see the module docstring), and ours
GOLD_SETTINGS = dict(lmbda=0.0, use_uld_loss=True, use_extended_uld=False,
                     uld_token_merge_strategy="bayesian", uld_use_hybrid_loss=False,
                     uld_crossentropy_weight=1.0, uld_distillation_weight=1.5,
                     uld_student_temperature=1.0, uld_teacher_temperature=1.0,
                     uld_skip_student_eos=False, uld_skip_teacher_eos=True, beta=0.5)
CD_GOLD_TERMS = ("ce", 1.0), ("uld", 1.5)
GOLD_DIFFERENCES = (
    "TRL re-tokenizes the teacher's prompt/completion text each step (prompt and completion "
    "apart, then an EOS); shakespeare_pair tokenizes the split once and cuts windows",
    "TRL's default uld_token_merge_strategy 'observed' pairs the logits at the scored tokens "
    "(one position after the ones that predict them); ours = its 'bayesian'",
    "hybrid: TRL matches vocabulary strings (byte-level 'Ġ'/'Ċ' never equal a char tokenizer's "
    "' '/'\\n'; '<|endoftext|>' matches), uld_hybrid matches the bytes tokens stand for",
    "TRL's CE counts a student EOS that its ULD skips; the benchmark's student has no EOS",
)
CD_SETTINGS = ("terms ce (weight 1) + uld (weight 1.5, T 1; positional pairs); data "
               "shakespeare_pair (char student, BPE teacher, teacher reads teacher_input_ids)")
TEACHER_IO = {"inputs": {"input_ids": "teacher_input_ids",
                         "attention_mask": "teacher_attention_mask"}}


def gold_windows(data, tok, rows: int | None = None):
    """Student windows (block + 1 ids: inputs and the last label) and their text split as
    GOLD wants it: prompt = the first character (unscored on both sides), completion = rest."""
    ids = data["input_ids"][:rows] if rows else data["input_ids"]
    last = data["labels"][: len(ids), -1:]
    win = torch.cat([ids, last], 1)
    dec = lambda r: tok.decode(r, skip_special_tokens=False,  # noqa: E731
                               clean_up_tokenization_spaces=False)
    rows_ = win.tolist()
    return win, [dec(r[:1]) for r in rows_], [dec(r[1:]) for r in rows_]


def gold_collate(rows):
    """GOLD's off-policy batch: the student window with the prompt character masked, no EOS,
    and the texts TRL re-tokenizes for the teacher (``original_*_text``)."""
    ids = torch.stack([torch.as_tensor(r["input_ids"]) for r in rows])
    labels = ids.clone()
    labels[:, :1] = -100
    ones = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": ones, "labels": labels, "prompts": ids[:, :1],
            "prompt_attention_mask": ones[:, :1],
            "original_prompt_text": [r["original_prompt_text"] for r in rows],
            "original_completion_text": [r["original_completion_text"] for r in rows]}


def trl_trainer(mode: str, spec: dict, tok, data, teacher, student, out: str, callbacks=()):
    import datasets

    ids = data["input_ids"].tolist()
    if mode.startswith("trl_gkd"):
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        lmbda = 0.0 if mode == "trl_gkd_l0" else 0.5
        args = trl_args(GKDConfig, spec, out, lmbda=lmbda, beta=0.5, temperature=0.9,
                        max_new_tokens=spec["block"] - spec["prompt"])
        return GKDTrainer(model=student, teacher_model=teacher, args=args,
                          data_collator=gkd_collate(spec["prompt"], lmbda > 0),
                          train_dataset=datasets.Dataset.from_dict({"input_ids": ids}),
                          processing_class=tok, callbacks=list(callbacks))
    if mode == "trl_distill":
        from trl import DistillationConfig, DistillationTrainer

        args = trl_args(DistillationConfig, spec, out, beta=0.5, temperature=1.0,
                        max_completion_length=spec["block"] - spec["prompt"])
        prompts = [tok.decode(r[: spec["prompt"]]) for r in ids]
        return DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                   train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                                   processing_class=tok, callbacks=list(callbacks))
    if mode == "trl_gold_uld":
        from trl.experimental.gold import GOLDConfig, GOLDTrainer

        win, prompts, comps = gold_windows(data, tok)
        args = trl_args(GOLDConfig, spec, out, **GOLD_SETTINGS,
                        teacher_tokenizer_name_or_path=data.info["teacher_tokenizer"],
                        max_completion_length=spec["block"], remove_unused_columns=False,
                        dataset_kwargs={"skip_prepare_dataset": True})
        rows = datasets.Dataset.from_dict({"input_ids": win.tolist(),
                                           "original_prompt_text": prompts,
                                           "original_completion_text": comps})
        return GOLDTrainer(model=student, teacher_model=teacher, args=args,
                           data_collator=gold_collate, train_dataset=rows,
                           processing_class=tok, callbacks=list(callbacks))
    raise ValueError(mode)


def _clock_callback(warmup: int):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        """Wall time from the start of step ``warmup`` to the end of the last step."""

        t0 = t1 = None
        tokens0 = 0

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup:
                _sync(args.device)
                self.t0, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kw):
            _sync(args.device)
            self.t1 = time.perf_counter()

    return Clock()


# -- the crossdistill side --------------------------------------------------------------------
def cd_trainer(mode: str, spec: dict, tok_path, data, teacher, student):
    import crossdistill as cd

    prepare = []
    if mode in ("cd_jsd_l05", "cd_jsd_l1"):
        lmbda, temp = (0.5, 0.9) if mode == "cd_jsd_l05" else (1.0, 1.0)
        prepare = [{"name": "onpolicy", "prompt_tokens": spec["prompt"], "lmbda": lmbda,
                    "temperature": temp, "max_new_tokens": spec["block"] - spec["prompt"],
                    "tokenizer": str(tok_path)}]
    if mode == "cd_uld":
        d = gold_distiller(student, teacher, data)
    else:
        d = cd.Distiller(student, teacher, [cd.Term("jsd", beta=0.5)], task="lm", prepare=prepare)
    tr = cd.Trainer(d, data, epochs=1, batch_size=spec["batch"], optimizer="adamw", lr=1e-3,
                    weight_decay=0.0, schedule="constant", progress=False, device=spec["device"])
    return tr.setup()


def gold_distiller(student, teacher, data, terms=CD_GOLD_TERMS):
    import crossdistill as cd

    return cd.Distiller(student, teacher, [cd.Term(n, weight=w) for n, w in terms], task="lm",
                        teacher_io=TEACHER_IO, data=data)


def cd_run(tr, warmup: int) -> tuple[float, int]:
    """Seconds and steps from the start of step ``warmup`` to the end of the epoch."""
    from crossdistill.train.console import quiet

    n, t0, steps = len(tr.batches), None, 0
    with quiet():
        for b, batch in enumerate(tr.batches.epoch(0)):
            if b == warmup:
                _sync(tr.device)
                t0 = time.perf_counter()
            tr.train_step(batch, 0, b, n)
            steps += b >= warmup
    _sync(tr.device)
    return time.perf_counter() - t0, steps


# -- one measurement: a fresh process ---------------------------------------------------------
def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak memory (MiB) of a block: CUDA ``max_memory_allocated``, else the RSS high-water
    mark above the RSS at entry (the counter is reset with Linux ``clear_refs``)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.mib = (_status_kib("VmHWM") - self.base) / 1024

    @property
    def kind(self) -> str:
        return "cuda max_memory_allocated" if self.cuda else "RSS high-water above set-up"


def measure(mode: str, spec: dict) -> dict:
    """Train ``warmup + steps`` steps of ``mode``; tokens/s over the timed steps and peak
    memory of the whole training loop above the process after set-up."""
    if mode in ("trl_gold_uld", "cd_uld"):  # tokens = the block's scored student positions
        tok, _, data, teacher, student = pair_setup(spec)
        tok_path = None
    else:
        tok, tok_path, data, teacher, student = setup(spec)
    teacher, student = teacher.to(spec["device"]), student.to(spec["device"])
    tokens_per_step = spec["batch"] * spec["block"]
    with tempfile.TemporaryDirectory(prefix="cd-peers-") as out:
        if mode.startswith("trl"):
            clock = _clock_callback(spec["warmup"])
            tr = trl_trainer(mode, spec, tok, data, teacher, student, out, [clock])
            with PeakMemory(spec["device"]) as mem:
                tr.train()
            seconds = clock.t1 - clock.t0
            tokens = spec["steps"] * tokens_per_step
            if mode == "trl_distill":  # its prompts are re-tokenized text: count what it saw
                tokens = tr.state.num_input_tokens_seen - clock.tokens0
        else:
            tr = cd_trainer(mode, spec, tok_path, data, teacher, student)
            with PeakMemory(spec["device"]) as mem:
                seconds, steps = cd_run(tr, spec["warmup"])
            tokens = steps * tokens_per_step
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens,
            "peak_mib": mem.mib, "memory": mem.kind}


def run_child(mode: str, spec: dict) -> dict:
    """``measure`` (or a loss-memory probe) in a fresh process with ``spec['threads']``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]),
           "MKL_NUM_THREADS": str(spec["threads"])}
    cmd = [sys.executable, __file__, "--child", mode, "--spec", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{mode} failed (exit {done.returncode}):\n" + "\n".join(tail))
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the loss on one fixed batch ---------------------------------------------------------------
def fixed_batch_losses(spec: dict) -> dict:
    """TRL's loss (its own code) and the Distiller's on one batch, same weights."""
    import crossdistill as cd

    tok, _, data, teacher, student = setup(spec)
    ids = data["input_ids"][: spec["batch"]]
    p, ones = spec["prompt"], torch.ones_like(ids)
    out = {}
    with tempfile.TemporaryDirectory(prefix="cd-peers-") as tmp:
        gkd = trl_trainer("trl_gkd_l0", spec, tok, data, teacher, student, tmp)
        distill = trl_trainer("trl_distill", spec, tok, data, teacher, student, tmp)
    d = cd.Distiller(student, teacher, [cd.Term("jsd", beta=0.5)], task="lm")
    with torch.no_grad():
        for name, first in (("gkd_full_block", 0), ("gkd_completion", p)):
            batch = gkd_collate(p, first > 0)([{"input_ids": r} for r in ids])
            trl = gkd.compute_loss(gkd.model, batch).item()
            out[name] = (trl, d(_aligned(ids, first)).total.item())
        inputs = {"prompt_ids": ids[:, :p], "prompt_mask": ones[:, :p],
                  "completion_ids": ids[:, p:], "completion_mask": ones[:, p:]}
        trl = distill._compute_loss(distill.model, inputs, None)[0].item()
        out["distill_chunked"] = (trl, d(_aligned(ids, p)).total.item())
    out.update(gold_fixed_batch(spec))
    return {k: {"trl": v[0], "crossdistill": v[1], "abs_diff": abs(v[0] - v[1]),
                "same": len(v) < 3 or v[2]} for k, v in out.items()}


def gold_fixed_batch(spec: dict) -> dict:
    """GOLD's ``compute_loss`` and the Distiller on one batch; ours reads TRL's own teacher
    tensors (``build_teacher_inputs_from_texts``), position-aligned and without the EOS."""
    from trl.experimental.gold.gold_trainer import ULDLoss, build_teacher_inputs_from_texts

    tok_s, tok_t, data, teacher, student = pair_setup(spec)
    n = spec["batch"]
    with tempfile.TemporaryDirectory(prefix="cd-peers-") as tmp:
        gold = trl_trainer("trl_gold_uld", spec, tok_s, data, teacher, student, tmp)
    win, prompts, comps = gold_windows(data, tok_s, n)
    trl_in = gold_collate([{"input_ids": w, "original_prompt_text": p,
                            "original_completion_text": c}
                           for w, p, c in zip(win, prompts, comps, strict=True)])
    t_ids, t_lab, t_mask, _ = build_teacher_inputs_from_texts(gold.teacher_tokenizer, prompts,
                                                              comps, use_extended_uld=False)
    lab = torch.full_like(t_lab, -100)
    lab[:, :-1] = t_lab[:, 1:]
    lab[lab == tok_t.eos_token_id] = -100  # the appended EOS (TRL skips it); the text has none
    ours_in = {"input_ids": win[:, :-1], "labels": win[:, 1:],
               "attention_mask": torch.ones_like(win[:, :-1]), "teacher_input_ids": t_ids,
               "teacher_labels": lab, "teacher_attention_mask": t_mask.long()}
    out = {}
    with torch.no_grad():
        ours = gold_distiller(student, teacher, data)(ours_in).total.item()
        out["gold_uld_ce"] = (gold.compute_loss(gold.model, trl_in).item(), ours)
        gold.uld_loss_fn.token_merge_strategy = "observed"  # TRL's default: logits one later
        out["gold_uld_observed (differs)"] = (gold.compute_loss(gold.model, trl_in).item(), ours,
                                              False)
        gold.args.uld_use_hybrid_loss = True  # string vs byte vocabulary matches
        gold.args.uld_token_merge_strategy = "bayesian"
        gold.uld_loss_fn = ULDLoss(gold.args, student_tokenizer=tok_s,
                                   teacher_tokenizer=gold.teacher_tokenizer, device="cpu")
        hyb = gold_distiller(student, teacher, data, (("ce", 1.0), ("uld_hybrid", 1.5)))
        out["gold_hybrid (differs)"] = (gold.compute_loss(gold.model, trl_in).item(),
                                        hyb(ours_in).total.item(), False)
    return out


def _aligned(ids, first: int) -> dict:
    """Our position-aligned batch scoring exactly the tokens TRL's shifted labels score:
    ``labels[t] = ids[t + 1]`` for ``t + 1 >= first`` (``first`` = prompt length, or 0)."""
    labels = torch.full_like(ids, -100)
    start = max(first - 1, 0)
    labels[:, start:-1] = ids[:, start + 1 :]
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


# -- chunked vs full-logits loss memory at a 32k vocabulary --------------------------------------
LOSS_MODES = ("loss_full", "loss_tiled", "loss_trl_chunked")


def loss_memory(mode: str, spec: dict) -> dict:
    """Peak memory of one forward + backward of JSD(beta 0.5) over ``loss_tokens`` positions
    at a 32k vocabulary, from hidden states and output weights (random)."""
    from crossdistill.losses import divergences as D
    from crossdistill.losses.tiled import tiled_token_loss

    g = torch.Generator().manual_seed(0)
    n, ds, dt, v = spec["loss_tokens"], 64, 128, BIG_VOCAB
    dev = spec["device"]
    h_s = torch.randn(n, ds, generator=g).to(dev).requires_grad_()
    w_s = (0.1 * torch.randn(v, ds, generator=g)).to(dev).requires_grad_()
    h_t = torch.randn(n, dt, generator=g).to(dev)
    w_t = (0.1 * torch.randn(v, dt, generator=g)).to(dev)
    jsd = lambda lp, lq: D.generalized_jsd(lp, lq, 0.5)  # noqa: E731
    t0 = time.perf_counter()
    with PeakMemory(dev) as mem:
        if mode == "loss_full":
            zs, zt = h_s @ w_s.T, (h_t @ w_t.T).detach()
            loss = jsd(torch.log_softmax(zt, -1), torch.log_softmax(zs, -1)).mean()
        elif mode == "loss_tiled":
            loss = tiled_token_loss(h_s, w_s, h_t, w_t, jsd, token_chunk=spec["token_chunk"])
        else:
            from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

            div, _ = ChunkedDivergenceFunction.apply(h_s, w_s, None, h_t, w_t, None, 0.5, 1.0,
                                                     1.0, None, 1.0, None)
            loss = div.mean()
        loss.backward()
    return {"peak_mib": mem.mib, "loss": loss.item(), "seconds": time.perf_counter() - t0,
            "memory": mem.kind}


# -- top-8 per-token store ------------------------------------------------------------------------
def store_row(spec: dict) -> dict:
    from crossdistill.adapters import ModelIO
    from crossdistill.data import Dataset
    from crossdistill.teachers import cache_teacher

    g = torch.Generator().manual_seed(0)
    n, block = spec["store_blocks"], spec["block"]
    ids = torch.randint(0, BIG_VOCAB, (n, block), generator=g)
    data = Dataset({"input_ids": ids, "idx": torch.arange(n)}, name="random-tokens")
    lm = gpt(None, (1, 32), block, seed=0, vocab=BIG_VOCAB).eval()
    io = ModelIO(inputs={"input_ids": "input_ids"}, field="teacher")
    with tempfile.TemporaryDirectory(prefix="cd-peers-store-") as out:
        cache_teacher(lm, data, out, io=io, topk=8, batch_size=16, progress=False)
        m = json.loads((Path(out) / "manifest.json").read_text())
    return {"vocab": BIG_VOCAB, "topk": 8, "bytes_per_token": m["bytes_per_token"],
            "bytes_per_sample": m["bytes_per_sample"], "positions_per_sample": block}


# -- the run ---------------------------------------------------------------------------------------
def summarise(runs: dict[str, list[dict]], skipped: dict[str, str | None]) -> list[dict]:
    """One row per TRL/crossdistill pair: medians over the rounds, ratios, target checks.
    A side that did not run carries the reason instead of numbers."""
    rows = []
    for label, trl, ours in PAIRS:
        row = {"row": label, "trl_mode": trl, "cd_mode": ours}
        for side, mode in (("trl", trl), ("cd", ours)):
            got = runs.get(mode) or []
            if got:
                row[f"{side}_tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in got)
                row[f"{side}_peak_mib"] = statistics.median(r["peak_mib"] for r in got)
            else:
                row[f"{side}_status"] = skipped.get(mode) or "not run"
        if "trl_tokens_per_s" in row and "cd_tokens_per_s" in row:
            row["speed_ratio"] = row["cd_tokens_per_s"] / row["trl_tokens_per_s"]
            row["memory_ratio"] = row["cd_peak_mib"] / max(row["trl_peak_mib"], 1e-9)
            if trl in SPEED_ROWS:
                row["speed_ok"] = row["speed_ratio"] >= TARGETS["speed_ratio"]
                row["memory_ok"] = row["memory_ratio"] <= TARGETS["memory_ratio"]
        rows.append(row)
    return rows


def _fmt(x, spec: str = ".0f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def print_tables(res: dict) -> None:
    from crossdistill.report import format_table

    table = []
    for r in res["pairs"]:
        def side(s, r=r):
            if f"{s}_tokens_per_s" in r:
                return _fmt(r[f"{s}_tokens_per_s"]), _fmt(r[f"{s}_peak_mib"], ".1f")
            return r.get(f"{s}_status", "-"), "-"

        (ts, tm), (cs, cm) = side("trl"), side("cd")
        ok = "".join(
            ("" if r.get(k) is None else f"{k.split('_')[0]} {'ok' if r[k] else 'MISSED'} ")
            for k in ("speed_ok", "memory_ok")
        )
        table.append((r["row"], ts, cs, _fmt(r.get("speed_ratio", "-"), ".2f"), tm, cm,
                      _fmt(r.get("memory_ratio", "-"), ".2f"), ok.strip() or "-"))
    print(format_table(["row", "TRL tok/s", "cd tok/s", "cd/TRL", "TRL MiB", "cd MiB",
                        "mem cd/TRL", "targets"], table))
    print(f"peak memory = {res['memory_kind']}; tokens/s = positions trained per second "
          "(generation included), median of the rounds")
    loss = [(k, f"{v['trl']:.7f}", f"{v['crossdistill']:.7f}", f"{v['abs_diff']:.2e}",
             "not the same loss" if not v.get("same", True) else
             "ok" if v["abs_diff"] <= TARGETS["loss_abs"] else "MISSED")
            for k, v in res["fixed_batch_loss"].items()]
    print(format_table(["fixed-batch loss", "TRL", "crossdistill", "|diff|", "<= 1e-5"], loss))
    gold = res.get("gold_settings")
    if gold:
        print("GOLD row settings: TRL GOLDConfig(" + ", ".join(
            f"{k}={v!r}" for k, v in gold["trl"].items()) + "); crossdistill: " + gold["cd"])
        print("differs by design: " + "; ".join(gold["differences"]))
    lm = res["loss_memory"]
    print(format_table(
        ["loss at 32k vocab", "peak MiB", "x full", "seconds"],
        [(m, f"{lm[m]['peak_mib']:.1f}", f"{lm[m]['peak_mib'] / lm['loss_full']['peak_mib']:.3f}",
          f"{lm[m]['seconds']:.2f}") for m in LOSS_MODES if m in lm],
    ))
    print(f"chunked / full = {lm['ratio_tiled_over_full']:.3f} (target <= "
          f"{TARGETS['chunked_ratio']}); {lm['tokens']} tokens, vocab {BIG_VOCAB}")
    st = res["store"]
    print(f"store: top-{st['topk']} of {st['vocab']} = {st['bytes_per_token']:g} bytes/token "
          f"(target <= {TARGETS['store_bytes_per_token']})")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, one round (< 3 min)")
    p.add_argument("--repeats", type=int, help="interleaved rounds (default 3, quick 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write DIR/lm_peers.json (default: the results file, full run)")
    p.add_argument("--trl-defaults", action="store_true",
                   help="keep TRL's bf16 autocast and gradient checkpointing defaults")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(args.spec)
        torch.set_num_threads(spec["threads"])
        fn = loss_memory if args.child in LOSS_MODES else measure
        print(json.dumps(fn(args.child, spec)))
        return {}
    spec = dict(QUICK if args.quick else FULL)
    spec.update(device=args.device, threads=args.threads, trl_defaults=args.trl_defaults,
                cache=str(ROOT / "runs" / "cache" / "tokenizers"),
                token_chunk=max(1, TILE_LOGITS // BIG_VOCAB))
    repeats = args.repeats or spec.pop("repeats")
    spec.pop("repeats", None)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    skipped = {k: v for k, v in available().items() if v}
    modes = [m for _, trl, ours in PAIRS for m in (trl, ours) if m not in skipped]
    setup(spec)  # trains and caches the tokenizer once, before any child
    if "cd_uld" in modes or "trl_gold_uld" in modes:
        pair_setup(spec)  # and the char tokenizer of the GOLD row
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    kinds = set()
    for r in range(repeats):
        for m in modes:
            got = run_child(m, spec)
            runs[m].append(got)
            kinds.add(got["memory"])
        print(f"round {r + 1}/{repeats}: " + ", ".join(
            f"{m} {runs[m][-1]['tokens_per_s']:.0f} tok/s" for m in modes), flush=True)
    loss_mem = {m: run_child(m, spec) for m in spec["loss_modes"]}
    loss_mem["ratio_tiled_over_full"] = (
        loss_mem["loss_tiled"]["peak_mib"] / loss_mem["loss_full"]["peak_mib"])
    loss_mem["tokens"] = spec["loss_tokens"]
    res = {
        "quick": args.quick,
        "device": args.device,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "versions": _versions(),
        "spec": spec,
        "repeats": repeats,
        "memory_kind": " / ".join(sorted(kinds)),
        "runs": runs,
        "pairs": summarise(runs, skipped),
        "fixed_batch_loss": fixed_batch_losses(spec),
        "gold_settings": {"trl": GOLD_SETTINGS, "cd": CD_SETTINGS,
                          "differences": GOLD_DIFFERENCES},
        "loss_memory": loss_mem,
        "store": store_row(spec),
        "targets": TARGETS,
    }
    res["seconds"] = time.perf_counter() - t_start
    print_tables(res)
    print(f"total {res['seconds']:.0f} s")
    path = Path(args.out) / "lm_peers.json" if args.out else (None if args.quick else RESULTS)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2))
        print(f"wrote {path}")
    return res


def _versions() -> dict:
    import transformers

    import crossdistill

    out = {"torch": torch.__version__, "transformers": transformers.__version__,
           "crossdistill": crossdistill.__version__}
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:
        out["trl"] = None
    return out


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
