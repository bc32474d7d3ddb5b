import pytest
import torch

import crossdistill as cd


@pytest.fixture
def one_thread():
    """Single-threaded (the shared 2-core CPU is slower with thread contention); restores the
    thread count afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def digits():
    """Small stratified slices of sklearn's digits (real data, embedded)."""
    return {
        s: cd.data.load("digits", s, limit=n)
        for s, n in (("train", 200), ("val", 100), ("test", 100))
    }


@pytest.fixture
def tiny_cnn():
    torch.manual_seed(0)
    return cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8, channels=(8, 16, 16))


@pytest.fixture
def tiny_vit():
    torch.manual_seed(1)
    return cd.models.create(
        "vit", num_classes=10, in_channels=1, img_size=8, patch=2, dim=16, depth=2, heads=2
    )


class Kill(Exception):
    """A simulated crash (SIGKILL) raised by :class:`KillAfter`."""


class KillAfter:
    """A callback that crashes the run after ``n`` batches of the whole run."""

    def __init__(self, n):
        self.n, self.seen = n, 0

    def on_batch_end(self, trainer, b):
        self.seen += 1
        if self.seen == self.n:
            raise Kill
