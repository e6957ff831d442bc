"""Numeric gradient checks with Caffe's GradientChecker rule, for built-in and user layers.

The objective is a fixed random projection of the tops, L = sum_i <R_i, top_i>,
so every output element's gradient is exercised at once. Each input element x is
nudged by +/- stepsize; the central difference (L+ - L-) / (2 * stepsize) must
match the analytic gradient within threshold * max(|analytic|, |numeric|, 1).
Elements within kink_range of kink (e.g. ReLU at 0) are skipped. Run in float64.
"""
import numpy as np

from .blob import Blob
from . import rng as _rng

__all__ = ["check_gradient", "check_gradient_net", "GradientCheckError", "make_blobs"]


class GradientCheckError(AssertionError):
    pass


def make_blobs(*arrays, dtype=np.float64):
    """Blobs holding copies of `arrays` (float64 by default, as the checker wants)."""
    blobs = []
    for a in arrays:
        a = np.asarray(a)
        b = Blob(a.shape, dtype=dtype)
        b.data[...] = a
        blobs.append(b)
    return blobs


def _objective(top, weights):
    return sum(float(np.dot(t.data.ravel(), w.ravel())) for t, w in zip(top, weights))


def _compare(targets, analytic, objective, stepsize, threshold, kink=0.0, kink_range=-1.0):
    """Central differences of `objective` for every element of each (name, blob) target,
    compared with the analytic gradients; returns the failures as text."""
    failures = []
    for name, blob in targets:
        flat = blob.data.reshape(-1)
        grad = analytic[name].reshape(-1)
        for k in range(flat.size):
            x = flat[k]
            if kink_range > 0 and abs(x - kink) <= kink_range:
                continue
            flat[k] = x + stepsize
            plus = objective()
            flat[k] = x - stepsize
            minus = objective()
            flat[k] = x
            numeric = (plus - minus) / (2.0 * stepsize)
            scale = max(abs(grad[k]), abs(numeric), 1.0)
            if abs(grad[k] - numeric) > threshold * scale:
                failures.append(f"{name}[{tuple(int(i) for i in np.unravel_index(k, blob.shape))}]: analytic "
                                f"{grad[k]:.6g} vs numeric {numeric:.6g}")
    return failures


def check_gradient(layer, bottom, top, stepsize=1e-2, threshold=1e-3, kink=0.0, kink_range=-1.0,
                   check_bottom=None, check_params=True, seed=1701, top_ids=None, setup=True):
    """Compare `layer`'s backward with central differences of its forward.

    bottom/top: lists of Blob (use float64). check_bottom: indices of bottoms to check
    (default all); integer-valued bottoms such as labels should be left out.
    top_ids: which tops enter the objective (default all). Raises GradientCheckError.
    The shared RNG is reseeded before every forward so random layers (Dropout) repeat.
    """
    dtypes = {b.dtype for b in list(bottom) + list(top)}
    if len(dtypes) > 1:
        raise GradientCheckError(f"check_gradient: bottoms and tops must share one dtype (float64 for "
                                 f"a meaningful check), got {sorted(str(d) for d in dtypes)}; "
                                 f"create tops as Blob(dtype=np.float64)")
    if setup:
        _rng.set_random_seed(seed)
        layer.setup(bottom, top)
    check_bottom = list(range(len(bottom))) if check_bottom is None else list(check_bottom)
    top_ids = list(range(len(top))) if top_ids is None else list(top_ids)
    used_tops = [top[i] for i in top_ids]

    def forward():
        _rng.set_random_seed(seed)
        layer.reshape(bottom, top)
        layer.forward(bottom, top)
        return used_tops

    forward()
    projection = np.random.default_rng(seed)
    weights = [projection.uniform(-1, 1, t.shape) for t in used_tops]

    # Analytic gradients.
    for t in top:
        t.diff[...] = 0
    for t, w in zip(used_tops, weights):
        t.diff[...] = w
    for b in layer.blobs:
        b.diff[...] = 0
    propagate_down = [i in check_bottom for i in range(len(bottom))]
    if check_params:
        layer.param_propagate_down = [True] * len(layer.blobs)
    layer.backward(top, propagate_down, bottom)

    targets = [(f"bottom[{i}]", bottom[i]) for i in check_bottom]
    if check_params:
        targets += [(f"param[{i}]", b) for i, b in enumerate(layer.blobs)]
    analytic = {name: blob.diff.copy() for name, blob in targets}

    failures = _compare(targets, analytic, lambda: _objective(forward(), weights),
                        stepsize, threshold, kink, kink_range)
    forward()
    if failures:
        more = f" (+{len(failures) - 10} more)" if len(failures) > 10 else ""
        raise GradientCheckError(f"gradient check failed for layer {layer.name!r} ({layer.type}): "
                                 + "; ".join(failures[:10]) + more)


def check_gradient_net(net, blob_names=(), stepsize=1e-2, threshold=1e-3, seed=1701):
    """Check d(net loss)/d(param) for every learnable param and d/d(input) for `blob_names`.

    The net should be built in float64 (`Net(..., dtype=np.float64)`).
    """
    def loss():
        _rng.set_random_seed(seed)
        return net.forward_loss()

    loss()
    net.clear_param_diffs()
    _rng.set_random_seed(seed)
    net.forward_loss()
    net.backward()
    targets = [(f"param {i}", p) for i, p in enumerate(net.learnable_params)]
    targets += [(f"blob {n!r}", net.blobs[n]) for n in blob_names]
    analytic = {name: b.diff.copy() for name, b in targets}
    failures = _compare(targets, analytic, loss, stepsize, threshold)
    if failures:
        raise GradientCheckError("net gradient check failed: " + "; ".join(failures[:10]))
