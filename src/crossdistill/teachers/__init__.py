"""Teacher signals: online teachers (plain modules), stores (precomputed by sample id) and
mixtures of several teachers."""

from .fingerprint import inputs_fingerprint, transform_description, weights_hash
from .mixture import Mixture
from .store import TeacherStore, cache_teacher, topk_decode

__all__ = [
    "Mixture",
    "TeacherStore",
    "cache_teacher",
    "inputs_fingerprint",
    "topk_decode",
    "transform_description",
    "weights_hash",
]
