"""The data pipeline: joint spatial transforms, dataset checks, batchers over every source,
exact kill-and-resume through map-style datasets, user DataLoaders and prepare stages."""

import pytest
import torch
from conftest import Kill, KillAfter
from torch import nn
from torch.utils.data import DataLoader

from crossdistill import ConfigError, Distiller, Term, Trainer
from crossdistill.data import Dataset
from crossdistill.data.augment import augment_batch
from crossdistill.data.dataset import Batches
from crossdistill.data.loaders import LoaderBatches, MapBatches, make_batches

# -- joint spatial transforms --------------------------------------------------------------


def _marked_images(n=6, h=6, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    on = torch.rand(n, h, w, generator=g) < 0.4
    image = torch.where(on, torch.rand(n, h, w, generator=g) + 0.5, 0.0)[:, None]  # (n,1,h,w)
    image = image.expand(n, 2, h, w).clone()  # two channels, same support
    label = on.long()  # 1 exactly where the image is nonzero
    return image, label


def _assert_aligned(image, label):
    nz = (image != 0).any(1)
    assert torch.equal(nz, label == 1)  # marked pixels moved with the image
    assert torch.all(image.permute(1, 0, 2, 3)[:, label == -100] == 0)  # shifted in: empty


def test_augment_batch_moves_image_and_label_map_together():
    image, label = _marked_images()
    batch = {"image": image.clone(), "seg": label.clone(), "idx": torch.arange(6)}
    kinds = {"image": "image", "seg": "label_map", "idx": "id"}
    augment_batch(batch, kinds, shift=2, flip=True, gen=torch.Generator().manual_seed(3))
    _assert_aligned(batch["image"], batch["seg"])
    assert (batch["seg"] == -100).any()  # some sample was shifted
    assert not torch.equal(batch["seg"], label)
    assert torch.equal(batch["idx"], torch.arange(6))  # non-spatial keys untouched


def test_flip_only_keeps_alignment_and_no_void():
    image, label = _marked_images()
    batch = {"image": image.clone(), "seg": label.clone()}
    augment_batch(
        batch,
        {"image": "image", "seg": "label_map"},
        shift=0,
        flip=True,
        gen=torch.Generator().manual_seed(1),
    )
    _assert_aligned(batch["image"], batch["seg"])
    assert not (batch["seg"] == -100).any()
    flipped = [i for i in range(6) if not torch.equal(batch["seg"][i], label[i])]
    assert flipped and all(torch.equal(batch["seg"][i], label[i].flip(-1)) for i in flipped)


@pytest.mark.parametrize("source", ["dataset", "map"])
def test_batchers_augment_jointly(source):
    image, label = _marked_images(n=8)
    if source == "dataset":
        data = Dataset({"image": image, "seg": label}, {"image": "image", "seg": "label_map"})
    else:
        data = DictItems({"image": image, "seg": label})  # kinds guessed from names/shapes
    batches = make_batches(data, 4, shift=2, flip=True, seed=5)
    assert batches.augmenting
    voids = 0
    for b in batches.epoch(0):
        _assert_aligned(b["image"], b["seg"])
        voids += int((b["seg"] == -100).sum())
    assert voids > 0
    again = list(make_batches(data, 4, shift=2, flip=True, seed=5).epoch(0))
    for x, y in zip(batches.epoch(0), again):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["seg"], y["seg"])


def test_label_map_size_must_match_image():
    image = torch.zeros(3, 1, 6, 6)
    with pytest.raises(ConfigError, match=r"data.seg.*image's size \(6, 6\)"):
        Dataset(
            {"image": image, "seg": torch.zeros(3, 5, 6, dtype=torch.long)},
            {"image": "image", "seg": "label_map"},
        )
    with pytest.raises(ConfigError, match="data.m"):
        Dataset(
            {"image": image, "m": torch.zeros(3, 6, 4, dtype=torch.bool)},
            {"image": "image", "m": "mask"},
        )
    Dataset({"image": image, "seg": torch.zeros(3, 6, 6, dtype=torch.long)})  # guessed: fine


def test_dataset_kind_errors():
    with pytest.raises(ConfigError, match="allowed"):
        Dataset({"x": torch.zeros(2, 3)}, {"x": "picture"})
    with pytest.raises(ConfigError, match="no such key"):
        Dataset({"x": torch.zeros(2, 3)}, {"q": "value"})
    with pytest.raises(ConfigError, match="samples on dim 0"):
        Dataset({"x": torch.zeros(2, 3), "y": torch.zeros(3)})


# -- sources -------------------------------------------------------------------------------

N, D_IN, K = 20, 4, 3


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_IN, generator=g)
    z = torch.randn(N, 2, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return {"x": x, "z": z, "y": y}


class DictItems(torch.utils.data.Dataset):
    """A map-style dataset returning one dict per sample (like HF datasets rows)."""

    def __init__(self, tensors):
        self.t = tensors

    def __len__(self):
        return len(next(iter(self.t.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.t.items()}


def _loader(tensors, batch_size=4):
    return DataLoader(DictItems(tensors), batch_size=batch_size, shuffle=True)


def test_make_batches_picks_the_batcher_and_orders_are_seeded():
    t = _tensors()
    ours, mapped, loader = Dataset(t), DictItems(t), _loader(t)
    assert isinstance(make_batches(ours, 4), Batches)
    assert isinstance(make_batches(mapped, 4), MapBatches)
    assert isinstance(make_batches(loader, 4), LoaderBatches)
    with pytest.raises(ConfigError, match="augment inside your own DataLoader"):
        make_batches(loader, 4, shift=1)
    with pytest.raises(ConfigError):
        make_batches(42, 4)
    # our Dataset and a map-style dataset of the same tensors: the same seeded batches
    a = list(make_batches(ours, 4, seed=1).epoch(1))
    b = list(make_batches(mapped, 4, seed=1).epoch(1))
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert set(x) == set(y) == {"x", "z", "y", "idx"}
        for k in x:
            assert torch.equal(x[k], y[k]), k
    # every epoch is a permutation; epochs differ; a resume start skips exactly
    for src in (ours, mapped, loader):
        bt = make_batches(src, 4, seed=1)
        e0 = list(bt.epoch(0))
        e1 = list(bt.epoch(1))
        rows = torch.cat([b["x"] for b in e0])  # every sample once per epoch
        assert torch.equal(rows[rows[:, 0].argsort()], t["x"][t["x"][:, 0].argsort()])
        assert any(not torch.equal(p["x"], q["x"]) for p, q in zip(e0, e1))
        rest = list(bt.epoch(0, start=3))
        assert len(rest) == 2
        for p, q in zip(e0[3:], rest):
            assert torch.equal(p["x"], q["x"])
        again = list(make_batches(src, 4, seed=1).epoch(0))
        assert all(torch.equal(p["x"], q["x"]) for p, q in zip(e0, again))


def test_loader_batches_do_not_touch_the_global_rng():
    bt = make_batches(_loader(_tensors()), 4, seed=2)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    list(bt.epoch(0))
    assert torch.equal(before, torch.get_rng_state())


# -- kill-and-resume -----------------------------------------------------------------------


class Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(D_IN + 2, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, K)
        )

    def forward(self, x, z):
        return self.net(torch.cat([x, z], -1))


def _distiller(student_seed=0, prepare=()):
    torch.manual_seed(0)
    teacher = nn.Linear(D_IN, K)
    torch.manual_seed(student_seed)
    return Distiller(
        Student(),
        teacher,
        [Term("ce", weight=0.5), Term("kd", weight=0.5)],
        io={"inputs": ["x", "z"]},
        teacher_io={"inputs": ["x"]},
        prepare=prepare,
    )


SETTINGS = dict(
    epochs=2,
    batch_size=4,
    optimizer="adamw",
    lr=1e-2,
    checkpoint_every=2,
    progress=False,
    warmup_epochs=0.5,
)


def _resume_exact(tmp_path, make_data, prepare=(), kill_after=7):
    ref = _distiller(prepare=prepare)
    Trainer(ref, make_data(), out_dir=tmp_path / "a", **SETTINGS).fit()
    d = _distiller(prepare=prepare)
    with pytest.raises(Kill):  # 5 batches per epoch: die in epoch 2, after a checkpoint
        Trainer(
            d, make_data(), out_dir=tmp_path / "b", callbacks=[KillAfter(kill_after)], **SETTINGS
        ).fit()
    d2 = _distiller(student_seed=99, prepare=prepare)  # a fresh process, other initial weights
    Trainer(d2, make_data(), out_dir=tmp_path / "b", **SETTINGS).fit(resume=True)
    ref_state, got = ref.trainable_state(), d2.trainable_state()
    assert set(ref_state) == set(got)
    for k in ref_state:
        assert torch.equal(ref_state[k], got[k]), k
    # and the run really trained (not a trivially equal pair of initial states)
    init = _distiller().student.state_dict()
    assert any(not torch.equal(init[k], v) for k, v in ref.student.state_dict().items())
    return ref


def test_resume_exact_map_style_dataset(tmp_path):
    _resume_exact(tmp_path, lambda: DictItems(_tensors()))


def test_resume_exact_user_dataloader_with_shuffle(tmp_path):
    _resume_exact(tmp_path, lambda: _loader(_tensors()))


def test_resume_exact_dataloader_killed_mid_first_epoch(tmp_path):
    _resume_exact(tmp_path, lambda: _loader(_tensors()), kill_after=3)


# -- prepare stages ------------------------------------------------------------------------

PREPARE = [
    {"name": "gaussian_noise", "key": "x", "std": 0.5},
    {"name": "modality_dropout", "keys": ["x", "z"], "rate": 0.5},
]


def _prepared(seed, step, calls=1):
    d = _distiller(prepare=PREPARE)
    d.seed = seed
    batch = {k: v[:8] for k, v in _tensors().items()}
    d.build(batch).train()
    d.set_progress(step, 10)
    return [d(batch).batch for _ in range(calls)]


def test_prepare_stages_are_seeded():
    a, b = _prepared(3, 5), _prepared(3, 5)
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    assert set(a[0]) >= {"present_x", "present_z"}
    other_seed, other_step = _prepared(4, 5)[0], _prepared(3, 6)[0]
    assert not torch.equal(a[0]["x"], other_seed["x"])
    assert not torch.equal(a[0]["x"], other_step["x"])
    two = _prepared(3, 5, calls=2)  # micro-batches of one step draw differently
    assert not torch.equal(two[0]["x"], two[1]["x"])
    # at least one modality per sample survives; dropped ones are zero
    p = a[0]
    assert torch.all(p["present_x"] | p["present_z"])
    assert torch.all(p["z"][~p["present_z"]] == 0) and torch.all(p["x"][~p["present_x"]] == 0)


def test_prepare_only_in_training():
    d = _distiller(prepare=PREPARE)
    batch = {k: v[:8] for k, v in _tensors().items()}
    d.build(batch).eval()
    out = d(batch).batch
    assert out is batch or all(torch.equal(out[k], batch[k]) for k in batch)


def test_prepare_stage_errors():
    with pytest.raises(ConfigError, match="prepare.rate"):
        _distiller(prepare=[{"name": "modality_dropout", "keys": ["x"], "rate": 2}])
    with pytest.raises(ConfigError, match="bad parameters"):
        _distiller(prepare=[{"name": "gaussian_noise", "sigma": 1}])
    d = _distiller(prepare=[{"name": "gaussian_noise", "key": "nope"}])
    batch = {k: v[:4] for k, v in _tensors().items()}
    d.build(batch).train()
    d.set_progress(0, 1)
    with pytest.raises(ConfigError, match="prepare.key.*batch keys: x, y, z"):
        d(batch)


def test_resume_exact_with_prepare_stages_our_dataset(tmp_path):
    _resume_exact(tmp_path, lambda: Dataset(_tensors()), prepare=PREPARE)


def test_resume_exact_with_prepare_stages_dataloader(tmp_path):
    _resume_exact(tmp_path, lambda: _loader(_tensors()), prepare=PREPARE)


def test_prepare_changes_training():
    """The stages really reach the forward: the same run with and without them differs."""
    runs = []
    for prepare in ((), PREPARE):
        d = _distiller(prepare=prepare)
        Trainer(
            d,
            Dataset(_tensors()),
            epochs=1,
            batch_size=4,
            optimizer="adamw",
            lr=1e-2,
            progress=False,
        ).fit()
        runs.append(d.student.state_dict())
    assert any(not torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_hugging_face_datasets_dataset_is_accepted_as_is(tmp_path):
    """A real ``datasets.Dataset`` (rows are dicts of Python values) trains and resumes."""
    hf = pytest.importorskip("datasets")
    import crossdistill as cd

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (40,), generator=g)
    ds = hf.Dataset.from_dict({"x": x.numpy().tolist(), "y": y.tolist()})

    def fit(out, **kw):
        torch.manual_seed(0)
        s = cd.models.create("mlp", num_classes=10, in_channels=1, img_size=8, hidden=(16,))
        d = cd.Distiller(s)
        cd.Trainer(d, ds, epochs=2, batch_size=8, progress=False, out_dir=out, **kw).fit()
        return s.state_dict()

    a = fit(tmp_path / "a")
    b = fit(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
