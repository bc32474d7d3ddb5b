"""ConfigError across process boundaries."""

from crossdistill.errors import ConfigError


def test_config_errors_survive_pickling():
    """A ConfigError raised in a worker process reaches the parent intact (a multiprocessing
    pool otherwise hangs on an error whose __init__ wants more arguments)."""
    import pickle

    import torch

    from crossdistill.schema import _Bad
    from crossdistill.train.finite import NonFiniteError

    for err in (ConfigError("data.size", 3, "at least 28"), _Bad("x", 1, "y"),
                NonFiniteError("loss nan", "step 3"), ConfigError("model", lambda: 0, "a name")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and back.field == err.field
    back = pickle.loads(pickle.dumps(ConfigError("t", torch.ones(2), "ok")))
    assert torch.equal(back.value, torch.ones(2))
