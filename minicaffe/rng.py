"""The framework's one random generator (Caffe's caffe_rng): fillers, dropout, shuffling.

`set_random_seed(seed)` makes every run with that seed repeat exactly.
"""
import numpy as np

__all__ = ["get_rng", "set_random_seed", "get_rng_state", "set_rng_state"]

_rng = np.random.default_rng()


def get_rng():
    return _rng


def set_random_seed(seed):
    """Reseed the shared generator; a negative seed (Caffe's default -1) means unseeded."""
    global _rng
    _rng = np.random.default_rng(None if seed is None or seed < 0 else int(seed))


def get_rng_state():
    """The shared generator's state as plain data (JSON-serializable), for exact resumes."""
    return _rng.bit_generator.state


def set_rng_state(state):
    """Put the shared generator back to a state from `get_rng_state()`.

    The generator object stays the same, so references already handed out follow too.
    """
    _rng.bit_generator.state = state
