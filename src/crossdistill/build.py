"""Turn a validated :class:`RunConfig` into live objects: data, models, distiller, trainer."""

from __future__ import annotations

from pathlib import Path

from . import data as D
from . import models
from .config import RunConfig
from .distiller import Distiller, Term
from .errors import ConfigError
from .io import load_into
from .train import TrainConfig, Trainer


def load_splits(cfg: RunConfig) -> dict[str, D.Dataset]:
    d = cfg.data
    common = dict(root=d.root, img_size=d.img_size, split_seed=d.split_seed)
    return {
        "train": D.load(d.name, "train", labelled=d.labelled, **common),
        "val": D.load(d.name, "val", **common),
        "test": D.load(d.name, "test", **common),
    }


def make_model(spec, field: str, data: D.Dataset, *, checkpoint: bool = True):
    kwargs = {
        "num_classes": data.num_classes,
        "in_channels": data.input_shape[0],
        "img_size": data.input_shape[1],
        **spec.kwargs(),
    }
    model = models.create(spec.model, field=field, **kwargs)
    if checkpoint and spec.checkpoint:
        load_into(model, spec.checkpoint, f"{field}.checkpoint")
    return model


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
        except ConfigError as e:
            raise ConfigError(f"terms.{i}.{e.field.split('.')[-1]}", e.value, e.allowed) from None
    return terms


def make_teacher(spec, field: str, train: D.Dataset):
    """An online teacher (model + checkpoint) or a :class:`TeacherStore` checked against the
    training split (and against the model's weights when both are given)."""
    if spec.store:
        from .teachers import TeacherStore, weights_hash

        store = TeacherStore(spec.store, f"{field}.store")
        model_hash = None
        if spec.model and spec.checkpoint:
            model_hash = weights_hash(make_model(spec, field, train))
        store.check(teacher_hash=model_hash, data=train)
        return store
    if not spec.model or not spec.checkpoint:
        raise ConfigError(
            f"{field}.checkpoint",
            spec.checkpoint,
            "a teacher needs model + checkpoint (a trained .safetensors file; train "
            "one first with a config that has no teacher) or store",
        )
    return make_model(spec, field, train)


def make_distiller(cfg: RunConfig, splits: dict[str, D.Dataset]) -> Distiller:
    train = splits["train"]
    if cfg.teacher is not None and cfg.teachers:
        raise ConfigError("teachers", sorted(cfg.teachers), "use either teacher or teachers")
    teacher = None
    if cfg.teacher is not None:
        teacher = make_teacher(cfg.teacher, "teacher", train)
    elif cfg.teachers:
        teacher = {n: make_teacher(s, f"teachers.{n}", train) for n, s in cfg.teachers.items()}
    mixture = None
    if cfg.mixture is not None:
        from .teachers import Mixture

        mixture = Mixture(**cfg.mixture.model_dump())
    student = make_model(cfg.student, "student", train)
    hooks = []
    terms = make_terms(cfg)
    if cfg.method is not None:
        from . import methods

        one = teacher if not isinstance(teacher, dict) else None
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
    return Distiller(
        student, teacher, terms, num_samples=int(train.idx.max()) + 1, hooks=hooks, mixture=mixture
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
    splits = load_splits(cfg)
    distiller = make_distiller(cfg, splits)
    tc = train_config(cfg)
    for k, v in overrides.items():
        setattr(tc, k, v)
    return Trainer(
        distiller, splits["train"], splits["val"], splits["test"], config=tc, out_dir=out_dir
    )


def default_out_dir(cfg: RunConfig) -> Path:
    return Path(cfg.out_dir or f"runs/{cfg.name or cfg.digest()}")
