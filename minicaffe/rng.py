"""The framework's one random generator (Caffe's caffe_rng): fillers, dropout, shuffling.

`set_random_seed(seed)` makes every run with that seed repeat exactly.
"""
import numpy as np

__all__ = ["get_rng", "set_random_seed"]

_rng = np.random.default_rng()


def get_rng():
    return _rng


def set_random_seed(seed):
    """Reseed the shared generator; a negative seed (Caffe's default -1) means unseeded."""
    global _rng
    _rng = np.random.default_rng(None if seed is None or seed < 0 else int(seed))
