"""Turn a validated :class:`RunConfig` into live objects: data, models, distiller, trainer."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from . import data as D
from . import models, resources
from .config import RunConfig
from .distiller import Distiller, Term
from .errors import ConfigError
from .io import load_into
from .registry import LOSSES, METHODS
from .train import TrainConfig, Trainer


def load_splits(cfg: RunConfig) -> dict[str, D.Dataset]:
    d = cfg.data
    if D.DATASETS.meta(d.name).get("splits"):
        common = dict(root=d.root, split_seed=d.split_seed, **d.params)
        return {s: D.load_split(d.name, s, **common) for s in D.SPLITS}
    common = dict(root=d.root, img_size=d.img_size, split_seed=d.split_seed)
    return {
        "train": D.load(d.name, "train", labelled=d.labelled, **common),
        "val": D.load(d.name, "val", **common),
        "test": D.load(d.name, "test", **common),
    }


def task_of(cfg: RunConfig):
    """The run's task: the config's ``task``, else the data source's."""
    from . import tasks

    spec = cfg.task if cfg.task is not None else D.DATASETS.meta(cfg.data.name).get("task")
    return tasks.build(spec)


def zoo_kwargs(spec, field: str, data: D.Dataset) -> dict:
    """A zoo model's constructor arguments: the config's, over what the data implies
    (``num_classes``; ``in_channels`` and ``img_size`` for images) where the factory takes it.
    The export's JSON spec records exactly these."""
    shape = data.input_shape
    implied = {"num_classes": data.num_classes}
    if len(shape) == 3:  # (C, H, W) images
        implied.update(
            in_channels=shape[0], img_size=shape[1] if shape[1] == shape[2] else shape[1:]
        )
    params = inspect.signature(models.MODELS.get(spec.model, field)).parameters
    return {**{k: v for k, v in implied.items() if k in params}, **spec.kwargs()}


def make_model(spec, field: str, data: D.Dataset, *, checkpoint: bool = True):
    kind = spec.kind(field)
    if kind == "model":
        model = models.create(spec.model, field=field, **zoo_kwargs(spec, field, data))
    else:
        from .models.hf import create_hf

        if spec.kwargs():
            k = next(iter(spec.kwargs()))
            raise ConfigError(
                f"{field}.{k}",
                spec.kwargs()[k],
                "HF models take their options under config: {...} (and head, attn_implementation)",
            )
        config = dict(spec.config or {})
        if kind == "hf" and spec.head in ("causal_lm", "masked_lm"):
            config.setdefault("vocab_size", data.num_classes)
            tok = getattr(data, "tokenizer", None)  # special ids inside our vocabulary
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if tok is not None and getattr(tok, key, None) is not None:
                    config.setdefault(key, getattr(tok, key))
        elif kind == "hf" and spec.head == "sequence_classification":
            config.setdefault("num_labels", data.num_classes)
        model = create_hf(
            spec.hf,
            config=config if kind == "hf" else None,
            hf_path=spec.hf_path,
            head=spec.head,
            attn_implementation=spec.attn_implementation,
            field=field,
        )
    if kind != "model":
        _check_positions(model, data, field)
    if checkpoint and spec.checkpoint:
        load_into(model, spec.checkpoint, f"{field}.checkpoint")
    return model


def _check_positions(model, data: D.Dataset, field: str) -> None:
    """Token blocks longer than an HF model's position table fail here, not as an index
    error inside its embedding."""
    cfg = getattr(model, "config", None)
    limits = [getattr(cfg, k, None) for k in ("n_positions", "max_position_embeddings")]
    limit = next((v for v in limits if isinstance(v, int) and v > 0), None)
    ids = getattr(data, "tensors", {}).get("input_ids")
    if limit and ids is not None and ids.dim() >= 2 and ids.shape[-1] > limit:
        raise ConfigError(
            "data.params.block",
            int(ids.shape[-1]),
            f"longer than the {limit} positions of {field} ({type(model).__name__}); use a "
            f"block <= {limit} or a model with more positions (config: n_positions)",
        )


def make_terms(cfg: RunConfig) -> list[Term]:
    terms = []
    for i, t in enumerate(cfg.terms):
        params = dict(t.model_extra or {})
        try:
            terms.append(
                Term(
                    t.loss,
                    student=t.student,
                    teacher=t.teacher,
                    projector=t.projector,
                    projector_params=t.projector_params,
                    weight=t.weight,
                    warmup=t.warmup,
                    name=t.name,
                    teacher_model=t.teacher_model,
                    **params,
                )
            )
            terms[-1].field = f"terms.{i}"  # later errors (taps, shapes) name terms.<i>
        except ConfigError as e:  # terms.<name>.x (or terms.<loss>.x) -> terms.<i>.x
            rest = e.field
            for prefix in (f"terms.{t.name or t.loss}", f"terms.{t.loss}", "terms"):
                if rest.startswith(prefix + "."):
                    rest = rest[len(prefix) + 1 :]
                    break
            raise ConfigError(f"terms.{i}.{rest}", e.value, e.allowed) from None
    return terms


def cached_teacher(spec, field: str, base: Path | None, run_data=None, run_train=None):
    """Train the teacher of ``spec.from_config`` once; later runs reuse it, keyed by the
    teacher config's hash (``runs/cache/<name>-<hash>``). Returns (model, its config).
    When the teacher config reads the run's own data (``run_data``), the run's train split
    (``run_train``) sizes the model instead of loading the data a second time."""
    from . import config as C

    path = _config_path(spec.from_config, base)
    tcfg = C.load(path)
    out = Path("runs/cache") / f"{tcfg.name}-{tcfg.digest()}"
    weights = out / "student.safetensors"
    if not weights.is_file():
        print(f"training teacher {path} once (cached in {out})")
        trainer = make_trainer(tcfg, out)
        trainer.fit()  # leaves the best-on-val weights in the student, as exported
        (out / "config.yaml").write_text(C.dump(tcfg))
        return trainer.distiller.clean_student(), tcfg
    same_data = run_data is not None and tcfg.data.model_dump() == run_data.model_dump()
    train = run_train if same_data and run_train is not None else load_splits(tcfg)["train"]
    model = make_model(tcfg.student, field, train, checkpoint=False)
    load_into(model, weights, f"{field}.from_config")
    return model, tcfg


def _config_path(from_config: str, base: Path | None) -> Path:
    """A teacher config path, beside the run's config file unless it exists as given."""
    path = Path(from_config)
    if not path.is_absolute() and base is not None and not path.is_file():
        path = base.parent / path
    return path


def make_teacher(spec, field: str, train: D.Dataset, base: Path | None = None, run_data=None):
    """An online teacher (model + checkpoint, or a config trained once and cached), or a
    :class:`TeacherStore` checked against the training split (and against the model's
    weights when both are given)."""
    if spec.from_config:
        model, tcfg = cached_teacher(spec, field, base, run_data, train)
        return model, {**tcfg.student.io(), **spec.io()}  # the run's inputs win (paired data)
    if spec.store:
        from .teachers import TeacherStore, weights_hash

        store = TeacherStore(spec.store, f"{field}.store")
        model = None
        if (spec.model or spec.hf or spec.hf_path) and (spec.checkpoint or spec.hf_path):
            model = make_model(spec, field, train)
        store.check(teacher_hash=None if model is None else weights_hash(model), data=train)
        if model is not None:  # the hash cannot see reordered rows or another teacher's shard
            store.verify_against(model, train)
            store.attach_source(model)  # for recipes built from the weights (BiStil's init)
        return store, spec.io()
    if not (spec.model or spec.hf or spec.hf_path) or not (spec.checkpoint or spec.hf_path):
        raise ConfigError(
            f"{field}.checkpoint",
            spec.checkpoint,
            "a teacher needs model + checkpoint (a trained .safetensors file; train "
            "one first with a config that has no teacher), from_config or store",
        )
    return make_model(spec, field, train), spec.io()


def make_distiller(
    cfg: RunConfig, splits: dict[str, D.Dataset], seed: int | None = None
) -> Distiller:
    """The distiller of ``cfg``; the student starts from ``seed`` (default ``train.seed``)."""
    train = splits["train"]
    if cfg.teacher is not None and cfg.teachers:
        raise ConfigError("teachers", sorted(cfg.teachers), "use either teacher or teachers")
    teacher, teacher_io = None, None
    base = getattr(cfg, "_path", None)
    if cfg.teacher is not None:
        teacher, teacher_io = make_teacher(cfg.teacher, "teacher", train, base, cfg.data)
    elif cfg.teachers:
        built = {
            n: make_teacher(s, f"teachers.{n}", train, base, cfg.data)
            for n, s in cfg.teachers.items()
        }
        teacher = {n: m for n, (m, _) in built.items()}
        teacher_io = {n: io for n, (_, io) in built.items()}
    mixture = None
    if cfg.mixture is not None:
        from .teachers import Mixture

        mixture = Mixture(**cfg.mixture.model_dump())
    # the student's init cannot depend on a cached teacher (training one draws numbers)
    torch.manual_seed(cfg.train.seed if seed is None else seed)
    student = make_model(cfg.student, "student", train)
    hooks = []
    terms = make_terms(cfg)
    if cfg.method is not None:
        from . import methods

        # a method that reads named teachers (registered ``teachers="named"``) gets the
        # ``teachers:`` section as a dict; any other gets the one ``teacher:``
        fn = METHODS.get(cfg.method.name, "method.name")
        named = getattr(fn, "__registry_meta__", {}).get("teachers") == "named"
        one = teacher if named or not isinstance(teacher, dict) else None
        recipe = methods.build(cfg.method.name, student, one, **cfg.method.kwargs())
        terms, hooks = recipe.terms + terms, recipe.hooks
    if not terms:
        terms = [Term("ce")]
    needs_teacher = [t.name for t in terms if t.teacher]
    if needs_teacher and teacher is None:
        raise ConfigError(
            "teacher",
            None,
            f"terms {needs_teacher} need a teacher; add a teacher "
            "section or use label-only terms (ce)",
        )
    io = cfg.student.io()
    ios = teacher_io if cfg.teachers else {"teacher": dict(teacher_io or {})}
    _check_vocab(student, teacher, terms, train, cfg, io, ios)
    from .losses.crosstok import check_teacher_io

    check_teacher_io(terms, train, ios, several=bool(cfg.teachers))  # its own token ids
    return Distiller(
        student,
        teacher,
        terms,
        task=task_of(cfg),
        io=io,
        teacher_io=(ios if cfg.teachers else ios["teacher"]) or None,
        num_samples=int(train.idx.max()) + 1,
        hooks=hooks,
        mixture=mixture,
        prepare=cfg.prepare,
        data=train,
    )


def _tokenizer_of(data) -> tuple:
    p = data.params if data is not None else {}
    return data.name if data is not None else None, p.get("tokenizer"), p.get("vocab_size")


def _same_tokenizer(spec, cfg, train) -> bool:
    """Whether a teacher provably uses the data's tokenizer: a cached teacher trained on the
    same tokenizer settings, or a checkpoint directory holding an identical tokenizer."""
    if spec is None:
        return False
    if spec.from_config:
        from . import config as C

        tcfg = C.load(_config_path(spec.from_config, getattr(cfg, "_path", None)))
        return _tokenizer_of(tcfg.data) == _tokenizer_of(cfg.data)
    if spec.hf_path and (Path(spec.hf_path) / "tokenizer.json").is_file():
        from .text.tokenizer import load_tokenizer

        tok = load_tokenizer(spec.hf_path, "teacher.hf_path")
        return tok.get_vocab() == train.tokenizer.get_vocab()
    return False


def _check_vocab(student, teacher, terms, train, cfg, io, teacher_io) -> None:
    """Same-tokenizer losses between HF LMs of different vocabularies: two tables padded
    beyond the data's tokenizer (``len(tokenizer)``) are sliced to it through the adapters;
    different tokenizers (or a table smaller than the data's) fail here, clearly."""
    sv = getattr(getattr(student, "config", None), "vocab_size", None)
    teachers = teacher if isinstance(teacher, dict) else {"teacher": teacher}
    specs = cfg.teachers if cfg.teachers else {"teacher": cfg.teacher}
    n = getattr(train, "num_classes", None) if getattr(train, "tokenizer", None) else None
    for name, t in teachers.items():
        tv = getattr(getattr(t, "config", None), "vocab_size", None)
        logit_terms = [x.field for x in terms if [str(p) for p in x.teacher] == ["logits"]
                       and (x.teacher_model in (None, name))
                       and not LOSSES.meta(x.loss).get("cross_tokenizer")]
        if not (sv and tv and sv != tv and logit_terms):
            continue
        if n and min(sv, tv) >= n and _same_tokenizer(specs.get(name), cfg, train):
            io["classes"] = n
            teacher_io[name]["classes"] = n
            continue
        where = (f"student vocabulary {sv}, {name} vocabulary {tv}"
                 + (f", data tokenizer {n}" if n else ""))
        raise ConfigError(
            logit_terms[0],
            where,
            "a same-tokenizer loss needs one vocabulary (tables padded beyond the data's "
            "tokenizer are sliced to it); for different tokenizers use the cross-tokenizer "
            "losses (ULD, ALM) of the sequence-KD family",
        )


def train_config(cfg: RunConfig) -> TrainConfig:
    t = cfg.train.model_dump()
    t["milestones"] = tuple(t["milestones"])
    return TrainConfig(
        batch_size=cfg.data.batch_size,
        augment_shift=cfg.data.augment.shift,
        augment_flip=cfg.data.augment.flip,
        **t,
    )


def make_trainer(cfg: RunConfig, out_dir: str | Path | None = None, **overrides) -> Trainer:
    """Everything checked and built; nothing trained yet. ``trainer.fit()`` trains."""
    resources.check(cfg)  # device, data size, memory: before any data load or build
    splits = load_splits(cfg)
    seed = overrides.get("seed", cfg.train.seed)
    torch.manual_seed(seed)  # models, projectors and heads start from the run's seed
    distiller = make_distiller(cfg, splits, seed)
    tc = train_config(cfg)
    for k, v in overrides.items():
        setattr(tc, k, v)
    return Trainer(
        distiller, splits["train"], splits["val"], splits["test"], config=tc, out_dir=out_dir
    )
