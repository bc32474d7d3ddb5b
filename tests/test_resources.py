"""Resource checks refuse with the figure and the limit, before any data load."""

import pytest

from crossdistill import config as C
from crossdistill import resources as R
from crossdistill.errors import ConfigError

RAW = {
    "student": {"model": "cnn", "channels": [8, 16]},
    "data": {"name": "digits", "batch_size": 16},
    "terms": [{"loss": "ce"}],
}


def _cfg(**over):
    raw = {**RAW, **over}
    return C.validate(raw)


@pytest.mark.parametrize("device", ["cuda:7", "meta", "", "garbage", "cuda:x"])
def test_devices_checked_against_this_torch(device):
    cfg = _cfg(train={"device": device})
    if device.startswith("cuda") and device in R.devices_here():
        pytest.skip("this machine has that device")
    with pytest.raises(ConfigError) as e:
        R.check(cfg)
    assert e.value.field == "train.device" and "available: cpu" in e.value.allowed


def test_cpu_and_figures():
    f = R.check(_cfg())
    assert f["params"]["student"] > 0 and f["train_bytes"] > 0


def test_memory_limit_names_figure_and_limit():
    with pytest.raises(ConfigError) as e:
        R.check(_cfg(), limit=1000)
    assert "GiB" in str(e.value) and "available" in e.value.allowed


def test_data_size_limit():
    with pytest.raises(ConfigError) as e:
        R.check(_cfg(data={"name": "digits", "img_size": 1024}), limit=10**8)
    assert e.value.field == "data.img_size" and "1,797 samples" in e.value.allowed


def test_make_trainer_checks_before_loading(monkeypatch):
    from crossdistill import build

    def boom(_cfg):
        raise AssertionError("data loaded before the resource check")

    monkeypatch.setattr(build, "load_splits", boom)
    with pytest.raises(ConfigError):
        build.make_trainer(_cfg(train={"device": "garbage"}))
