import pytest

from crossdistill import LOSSES, ConfigError, Registry


def test_unknown_name_lists_nearest_and_all():
    with pytest.raises(ConfigError) as e:
        LOSSES.get("kdd", "terms.loss")
    msg = str(e.value)
    assert "terms.loss" in msg and "'kdd'" in msg and "kd" in msg and "available" in msg


def test_register_twice_fails():
    r = Registry("things")
    r.register("a")(lambda: 1)
    with pytest.raises(KeyError):
        r.register("a")(lambda: 2)
    assert r.names() == ["a"] and "a" in r and r.meta("a")["name"] == "a"
