"""The training loop shared by every solver (Caffe's Solver + SGDSolver machinery).

One iteration, as in Caffe:

    clear param diffs -> (test, every test_interval) -> forward/backward iter_size times
    -> clip_gradients (global L2 norm) -> per param: normalize by iter_size,
    regularize (weight_decay x decay_mult, L2 or L1), compute_update_value
    -> net.update() (data -= diff) -> iter += 1 -> snapshot when due

A solver type only overrides `compute_update_value(param_id, rate)`, which turns
the param's regularized gradient (its diff) into the step to subtract, keeping
whatever running averages it needs in `self.history`. The history is stored in
Caffe's order (one blob per learnable param; AdaDelta and Adam append a second
set), so .solverstate files move between Caffe and minicaffe.
"""
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import time

import numpy as np

from ..blob import Blob
from ..errors import MinicaffeError
from ..layer import LayerError, building_model
from ..net import Net
from ..proto import caffe_pb2
from ..proto_io import TEMP_PREFIX, ProtoFileError, field_location, read_net_param, read_proto, \
    read_solver_param, stage_file
from ..rng import get_rng_state, set_random_seed, set_rng_state
from ..threads import parallel_for
from .lr_policies import check_lr_policy, learning_rate

__all__ = ["Solver", "SolverError", "DivergenceError", "SnapshotError", "register_solver", "solver_registry", "get_solver",
           "load_solver_param", "NONE", "STOP", "SNAPSHOT", "SOLVER_ACTIONS"]

log = logging.getLogger("minicaffe.solver")

# What an action function (e.g. the CLI's signal handler) may ask for between iterations.
NONE, STOP, SNAPSHOT = "none", "stop", "snapshot"
SOLVER_ACTIONS = (STOP, SNAPSHOT, NONE)

_SOLVERS = {}


class SolverError(MinicaffeError, ValueError):
    """A solver file or solver state that cannot be used as given."""


class DivergenceError(MinicaffeError, ArithmeticError):
    """Training produced a non-finite loss or parameter; the text says where it started."""


class SnapshotError(MinicaffeError, OSError):
    """A snapshot could not be written; the previous snapshot files are untouched."""


# Next to each .solverstate: what Caffe's SolverState cannot hold (data cursors, random
# generator states), so that a resume continues exactly. Caffe ignores the extra file.
RESUME_SUFFIX = ".resume.json"
RESUME_FORMAT = "minicaffe resume state"


def register_solver(type_name):
    """Class decorator: make `type: "<type_name>"` in a solver file build this Solver subclass."""
    def decorate(cls):
        cls.type = type_name
        _SOLVERS[type_name] = cls
        return cls
    return decorate


def solver_registry():
    """{type string: Solver class} of every registered solver."""
    return dict(_SOLVERS)


def load_solver_param(path):
    """The SolverParameter in a prototxt / YAML / binary file (the deprecated solver_type upgraded)."""
    return read_solver_param(path)


def get_solver(param, **kwargs):
    """Build the solver its `type` field names, from a solver file path or a SolverParameter."""
    source = kwargs.pop("source", None)
    if isinstance(param, (str, os.PathLike)):
        source = os.fspath(param)
        param = read_solver_param(source)
    else:
        param = read_solver_param(param)
    cls = _SOLVERS.get(param.type)
    if cls is None:
        where = f"{field_location(source, 'type')}: " if source else ""
        raise SolverError(f"{where}unknown solver type {param.type!r}; known types: "
                          f"{', '.join(sorted(_SOLVERS))}")
    return cls(param, source=source, **kwargs)


def _g(x):
    """A number the way C++ streams print it (6 significant digits), as in Caffe's log lines."""
    return f"{float(x):g}"


def _resolve(path, base_dir):
    """`path` as Caffe sees it (relative to the current directory), else relative to base_dir."""
    if not path or os.path.isabs(path) or os.path.exists(path) or not base_dir:
        return path
    alt = os.path.join(base_dir, path)
    return alt if os.path.exists(alt) else path


class Solver:
    """Trains `self.net`, tests `self.test_nets`, writes and restores snapshots.

    `Solver(path_or_SolverParameter)`; subclasses implement `compute_update_value`.
    `source` names the solver file when `param` is a message read from it: relative
    paths inside fall back to that file's folder, and it names default snapshots.
    """

    type = None
    history_per_param = 1   # AdaDelta and Adam keep two running averages per param

    def __init__(self, param, *, source=None, dtype=np.float32):
        if isinstance(param, (str, os.PathLike)):
            source = os.fspath(param)
            param = read_solver_param(source)
        else:
            param = read_solver_param(param)   # a checked, upgraded copy
        self.param = param
        self.source = source
        self.base_dir = os.path.dirname(os.path.abspath(source)) if source else None
        self.dtype = np.dtype(dtype)
        self.iter = 0
        self.current_step = 0
        self.learning_rate = float("nan")   # the rate used by the last update
        self.smoothed_loss = 0.0
        self.requested_early_exit = False
        self._action_function = None
        self._callbacks = {"on_start": [], "on_gradients_ready": [], "on_iteration_end": []}
        self._losses = []

        self.check_param()
        self.snapshot_prefix = self._snapshot_prefix()
        self._check_snapshot_writable()
        self._remove_stale_temporaries()
        self.last_snapshot = None   # the .solverstate of the newest complete snapshot
        if param.random_seed >= 0:
            set_random_seed(param.random_seed)
        self.net = self._init_train_net()
        self.test_nets = self._init_test_nets()
        self.pre_solve()

    # -- checks ------------------------------------------------------------------
    def check_param(self):
        """Reject settings Caffe would reject (here, before any net is built)."""
        p = self.param
        try:
            check_lr_policy(p)
        except ValueError as exc:
            raise SolverError(self._where(str(exc))) from None
        if p.max_iter < 0:
            raise SolverError(self._where(f"max_iter must be >= 0, got {p.max_iter}", "max_iter"))
        if p.average_loss < 1:
            raise SolverError(self._where(f"average_loss must be at least 1, got {p.average_loss}", "average_loss"))
        if p.iter_size < 1:
            raise SolverError(self._where(f"iter_size must be at least 1, got {p.iter_size}", "iter_size"))
        if p.weight_decay and p.regularization_type not in ("L2", "L1"):
            raise SolverError(self._where(f"unknown regularization_type {p.regularization_type!r}; "
                                          "use L2 or L1"))
        if p.snapshot < 0:
            raise SolverError(self._where(f"snapshot must be >= 0, got {p.snapshot}", "snapshot"))
        if p.snapshot_format == caffe_pb2.SolverParameter.HDF5:
            try:
                import h5py  # noqa: F401
            except ImportError:
                raise SolverError(self._where(
                    "snapshot_format: HDF5 needs h5py (pip install 'minicaffe[hdf5]'), or use "
                    "snapshot_format: BINARYPROTO")) from None

    def _where(self, message, field=None):
        """`message` prefixed with the solver file (and the line setting `field`, if given)."""
        if not self.source:
            return message
        where = field_location(self.source, field) if field else self.source
        return f"{where}: {message}"

    def _snapshot_prefix(self):
        """snapshot_prefix as Caffe's upgrade leaves it: unset -> the solver file's path minus its
        extension; a directory -> that directory / the solver file's stem."""
        p = self.param
        if not p.HasField("snapshot_prefix"):
            return os.path.splitext(self.source)[0] if self.source else ""
        prefix = p.snapshot_prefix
        folder = os.path.dirname(prefix)
        if self.base_dir and folder and not os.path.isabs(prefix) and not os.path.isdir(folder):
            alt = os.path.join(self.base_dir, prefix)
            if os.path.isdir(os.path.dirname(alt)):
                prefix = alt
        if self.source and os.path.isdir(prefix):
            prefix = os.path.join(prefix, os.path.splitext(os.path.basename(self.source))[0])
        return prefix

    def _check_snapshot_writable(self):
        """Create (and remove) a file where snapshots go: os.access misjudges some filesystems
        (read-only mounts, ACLs, network and FUSE filesystems)."""
        if not self.param.snapshot:
            return
        if not self.snapshot_prefix:
            raise SolverError(self._where("snapshot is set but snapshot_prefix is not"))
        folder = os.path.dirname(os.path.abspath(self.snapshot_prefix))
        problem = None
        if not os.path.isdir(folder):
            problem = "it does not exist"
        else:
            try:
                fd, probe = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix="-write-check")
                os.close(fd)
                os.unlink(probe)
            except OSError as exc:
                problem = exc.strerror or str(exc)
        if problem:
            raise SolverError(self._where(
                f"cannot write to snapshot prefix {self.snapshot_prefix!r}: the directory "
                f"{folder} must exist and be writable ({problem})"))

    def _remove_stale_temporaries(self):
        """Delete the temporary files of snapshots that a killed run was writing."""
        if not self.snapshot_prefix:
            return
        folder = os.path.dirname(os.path.abspath(self.snapshot_prefix))
        marker = f"-{os.path.basename(self.snapshot_prefix)}_iter_"
        try:
            names = [n for n in os.listdir(folder) if n.startswith(TEMP_PREFIX) and marker in n]
        except OSError:
            return
        for name in names:
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass
        if names:
            log.info("Removed %d temporary snapshot file%s left in %s by an interrupted run",
                     len(names), "s" if len(names) != 1 else "", folder)

    # -- nets ----------------------------------------------------------------------
    def _read_net(self, path, field):
        resolved = _resolve(path, self.base_dir)
        if not os.path.exists(resolved):
            beside = os.path.abspath(os.path.join(self.base_dir, path)) if self.base_dir else None
            where = f" or {beside}" if beside and beside != os.path.abspath(path) else ""
            raise SolverError(self._where(f"{field}: net file {path!r} not found (looked in "
                                          f"{os.path.abspath(path)}{where})"))
        return read_net_param(resolved), f"{field} file {resolved}", resolved

    def _build_net(self, net_param, phase, extra_state, label, source=None):
        state = caffe_pb2.NetState(phase=phase)
        state.MergeFrom(net_param.state)
        if extra_state is not None:
            state.MergeFrom(extra_state)
        net_param.state.CopyFrom(state)
        try:
            with building_model(source):  # Python layer modules may sit next to the net file
                net = Net(net_param, state.phase, dtype=self.dtype)
        except (LayerError, ProtoFileError) as exc:
            raise type(exc)(f"{label}: {exc}") from None
        for entry in self.param.weights:
            for path in entry.split(","):
                path = path.strip()
                if path:
                    log.info("Finetuning from %s", path)
                    net.copy_from(_resolve(path, self.base_dir))
        return net

    def _init_train_net(self):
        p = self.param
        given = [f for f in ("net", "net_param", "train_net", "train_net_param") if p.HasField(f)]
        if len(given) != 1:
            what = "must specify a train net" if not given else f"specifies {len(given)} train nets"
            raise SolverError(self._where(f"the solver {what}: give exactly one of net, net_param, "
                                          "train_net, train_net_param"))
        field = given[0]
        if field.endswith("_param"):
            net_param, label, source = read_net_param(getattr(p, field)), field, None
        else:
            net_param, label, source = self._read_net(getattr(p, field), field)
        log.info("Creating training net from %s", label)
        return self._build_net(net_param, caffe_pb2.TRAIN, p.train_state, f"train net ({label})",
                               source)

    def _init_test_nets(self):
        p = self.param
        if p.HasField("net") and p.HasField("net_param"):
            raise SolverError(self._where("give net or net_param, not both"))
        generic = p.HasField("net") or p.HasField("net_param")
        n_specific = len(p.test_net_param) + len(p.test_net)
        if (len(p.test_iter) < n_specific) if generic else (len(p.test_iter) != n_specific):
            raise SolverError(self._where(
                f"test_iter must be given once per test net: {len(p.test_iter)} test_iter for "
                f"{n_specific} test_net/test_net_param entries"))
        n_total = max(len(p.test_iter), n_specific)
        if len(p.test_state) and len(p.test_state) != n_total:
            raise SolverError(self._where(f"test_state must be given once per test net "
                                          f"({n_total}) or not at all, got {len(p.test_state)}"))
        if n_total and p.test_interval <= 0:
            raise SolverError(self._where("test nets need a positive test_interval"))
        sources = [(read_net_param(np_), "test_net_param", None) for np_ in p.test_net_param]
        sources += [self._read_net(path, "test_net") for path in p.test_net]
        for _ in range(n_total - len(sources)):
            if p.HasField("net_param"):
                sources.append((read_net_param(p.net_param), "net_param", None))
            else:
                sources.append(self._read_net(p.net, "net"))
        nets = []
        for i, (net_param, label, source) in enumerate(sources):
            log.info("Creating test net (#%d) specified by %s", i, label)
            state = p.test_state[i] if len(p.test_state) else None
            net = self._build_net(net_param, caffe_pb2.TEST, state, f"test net #{i} ({label})", source)
            net.share_with(self.net)   # Caffe shares before each test; sharing now keeps them in step
            net.debug_info = p.debug_info
            nets.append(net)
        return nets

    # -- the update template ---------------------------------------------------
    def pre_solve(self):
        """Zeroed history (Caffe's order) and scratch buffers shaped like each learnable param."""
        params = self.net.learnable_params
        self.history = [Blob(p.shape, self.dtype) for _ in range(self.history_per_param)
                        for p in params]
        self._update = [np.zeros(p.shape, self.dtype) for p in params]
        self._temp = [np.zeros(p.shape, self.dtype) for p in params]
        self._params_finite = None   # set by the fused update: no separate check needed
        self._make_blocks()

    def _scalar(self, x):
        """x rounded to the net's float type, as Caffe's Dtype arithmetic would hold it."""
        return float(self.dtype.type(x))

    def get_learning_rate(self):
        rate, self.current_step = learning_rate(self.param, self.iter, self.current_step)
        return self._scalar(rate)

    @property
    def lr(self):
        """pycaffe's SGDSolver.lr: the learning rate for the current iteration."""
        return self._scalar(learning_rate(self.param, self.iter, self.current_step)[0])

    def share_weights(self, net):
        """pycaffe's Solver.share_weights: `net` uses this solver's trained weights
        (Caffe's net->ShareTrainedLayersWith(solver->net()))."""
        net.share_with(self.net)

    def local_rate(self, param_id, rate):
        return self._scalar(rate * self.net.params_lr[param_id])

    def apply_update(self):
        """Turn the accumulated gradients into one update of the weights; iter += 1."""
        rate = self.get_learning_rate()
        self.learning_rate = rate
        if self.param.display and self.iter % self.param.display == 0:
            log.info("Iteration %d, lr = %s", self.iter, _g(rate))
        self.clip_gradients()
        if self._can_fuse():
            self._params_finite = self._fused_update(rate)
        else:
            for param_id in range(len(self.net.learnable_params)):
                self.normalize(param_id)
                self.regularize(param_id)
                self.compute_update_value(param_id, rate)
            self.net.update()
            self._params_finite = None
        self.iter += 1   # iter counts the weight updates done

    # Elements per block of the fused update: the block's weights, diff, history and scratch
    # (256 KiB each) stay in cache through all its passes. Measured on CaffeNet's 61M params
    # (2-core EPYC): 4096 -> 1.5x slower than unblocked (Python overhead per block), 16384 ->
    # 0.7x, 65536 -> 0.55x, 262144 -> 0.6x.
    FUSED_BLOCK = 65536

    def _can_fuse(self):
        """The fused update runs the same elementwise steps as the per-param methods, so it is
        used only when none of them is overridden and no [Update] debug lines are wanted."""
        cls = type(self)
        return (not self.net.debug_info and cls.update_values is not Solver.update_values
                and cls.compute_update_value is Solver.compute_update_value
                and cls.normalize is Solver.normalize and cls.regularize is Solver.regularize
                and type(self.net).update is Net.update)

    def _fused_update(self, rate):
        """normalize, regularize, update_values and data -= diff, block by block over every
        param (blocks spread over the worker threads); returns whether all data is finite.

        Each element goes through exactly the operations of the per-param path, in the same
        order, so both give the same bits."""
        params = self.net.learnable_params
        n = len(params)
        scale = self._scalar(1.0 / self.param.iter_size) if self.param.iter_size != 1 else None
        l1 = self.param.regularization_type == "L1"
        per_param = []
        for param_id, blob in enumerate(params):
            hist = tuple(self.history[k * n + param_id].data.reshape(-1)
                         for k in range(self.history_per_param))
            per_param.append((blob.data.reshape(-1), blob.diff.reshape(-1), hist,
                              self._update[param_id].reshape(-1), self._temp[param_id].reshape(-1),
                              self.local_rate(param_id, rate), self._decay(param_id)))
        if self._block_counts != tuple(p.count() for p in params):
            self._make_blocks()   # a param was reshaped by hand
        blocks = self._blocks
        bad = []

        def run(lo, hi):
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):   # workers too
                run_blocks(lo, hi)

        def run_blocks(lo, hi):
            for param_id, start, stop in blocks[lo:hi]:
                data, diff, hist, update, temp, lr, decay = per_param[param_id]
                w, d, u, t = data[start:stop], diff[start:stop], update[start:stop], temp[start:stop]
                if scale is not None:
                    d *= scale
                if decay:
                    _add_decay(w, d, t, decay, l1)
                self.update_values(lr, d, tuple(h[start:stop] for h in hist), u, t)
                np.subtract(w, d, out=w)
                # A float32 sum is finite when every element is, unless it overflows: recheck then.
                if not math.isfinite(w.sum()) and not np.isfinite(w).all():
                    bad.append(param_id)

        parallel_for(len(blocks), run, self._block_elements)
        return not bad

    def _make_blocks(self):
        """(param_id, start, stop) blocks of at most FUSED_BLOCK elements covering every param."""
        step = self.FUSED_BLOCK
        self._blocks = [(param_id, lo, min(lo + step, p.count()))
                        for param_id, p in enumerate(self.net.learnable_params)
                        for lo in range(0, p.count(), step)]
        self._block_counts = tuple(p.count() for p in self.net.learnable_params)
        total = sum(self._block_counts)
        self._block_elements = max(1, total // max(len(self._blocks), 1))

    def clip_gradients(self):
        """Scale all diffs down together when their global L2 norm exceeds clip_gradients."""
        clip = self.param.clip_gradients
        if clip < 0:
            return
        params = self.net.learnable_params
        l2norm = math.sqrt(sum(p.sumsq_diff() for p in params))
        if l2norm > clip:
            scale = clip / l2norm
            log.info("Gradient clipping: scaling down gradients (L2 norm %s > %s) by scale "
                     "factor %s", _g(l2norm), _g(clip), _g(scale))
            for p in params:
                p.scale_diff(scale)

    def normalize(self, param_id):
        """Average the gradient over the iter_size forward/backward passes that summed into it."""
        if self.param.iter_size == 1:
            return
        diff = self.net.learnable_params[param_id].diff
        diff *= self._scalar(1.0 / self.param.iter_size)

    def _decay(self, param_id):
        return self._scalar(self.param.weight_decay * self.net.params_weight_decay[param_id])

    def regularize(self, param_id):
        """Add the weight-decay gradient: decay * w (L2) or decay * sign(w) (L1)."""
        decay = self._decay(param_id)
        if not decay:
            return
        blob = self.net.learnable_params[param_id]
        _add_decay(blob.data, blob.diff, self._temp[param_id], decay,
                   self.param.regularization_type == "L1")

    def update_values(self, lr, diff, history, update, temp):
        """Overwrite `diff` (the regularized gradient) with the step to subtract, updating the
        running averages in `history` (this param's history arrays, in Caffe's order); `update`
        and `temp` are scratch. All arrays have diff's shape (whole params or blocks of them)
        and every operation is elementwise. lr is the param's rate (rate x lr_mult)."""
        raise NotImplementedError(f"{type(self).__name__} must implement update_values "
                                  "or compute_update_value")

    def compute_update_value(self, param_id, rate):
        """Overwrite learnable_params[param_id].diff with the step to subtract from its data."""
        n = len(self.net.learnable_params)
        self.update_values(self.local_rate(param_id, rate), self.net.learnable_params[param_id].diff,
                           tuple(self.history[k * n + param_id].data
                                 for k in range(self.history_per_param)),
                           self._update[param_id], self._temp[param_id])

    # -- the loop --------------------------------------------------------------------
    def add_callback(self, on_start=None, on_gradients_ready=None, on_iteration_end=None):
        """Functions (no arguments) called at the start of each iteration, once the gradients
        are computed, and after the update (and snapshot) of each iteration."""
        for name, fn in (("on_start", on_start), ("on_gradients_ready", on_gradients_ready),
                         ("on_iteration_end", on_iteration_end)):
            if fn is not None:
                self._callbacks[name].append(fn)

    def set_action_function(self, fn):
        """`fn()` returns "none", "stop" or "snapshot"; asked after every iteration and test batch."""
        self._action_function = fn

    def requested_action(self):
        action = self._action_function() if self._action_function else NONE
        if action not in SOLVER_ACTIONS:
            raise SolverError(f"the action function returned {action!r}; expected one of "
                              f"{', '.join(SOLVER_ACTIONS)}")
        return action

    def _run(self, which):
        for fn in self._callbacks[which]:
            fn()

    def _update_smoothed_loss(self, loss, start_iter):
        """Running mean of the last average_loss iteration losses (what `display` prints)."""
        average_loss = self.param.average_loss
        if len(self._losses) < average_loss:
            self._losses.append(loss)
            n = len(self._losses)
            self.smoothed_loss = (self.smoothed_loss * (n - 1) + loss) / n
        else:
            idx = (self.iter - start_iter) % average_loss
            self.smoothed_loss += (loss - self._losses[idx]) / average_loss
            self._losses[idx] = loss

    def step(self, iters):
        """Run `iters` training iterations (fewer if stopped).

        Stops with DivergenceError when the loss or a parameter is no longer finite.
        numpy's floating-point warnings are silenced meanwhile: that check reports it.
        """
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            self._step(int(iters))

    def _step(self, iters):
        p = self.param
        start_iter = self.iter
        stop_iter = self.iter + iters
        self._losses = []
        self.smoothed_loss = 0.0
        timer = time.perf_counter()
        iterations_last = self.iter
        while self.iter < stop_iter:
            self.net.clear_param_diffs()
            if p.test_interval and self.iter % p.test_interval == 0 and (
                    self.iter > 0 or p.test_initialization):
                self.test_all()
                if self.requested_early_exit:
                    break
            self._run("on_start")
            display = p.display and self.iter % p.display == 0
            self.net.debug_info = bool(display and p.debug_info)
            loss = 0.0
            for _ in range(p.iter_size):
                loss += self.net.forward_backward()
            loss /= p.iter_size
            self._update_smoothed_loss(loss, start_iter)
            if display:
                lapse = time.perf_counter() - timer
                per_s = (self.iter - iterations_last) / (lapse or 1.0)
                log.info("Iteration %d (%s iter/s, %ss/%d iters), loss = %s", self.iter, _g(per_s),
                         _g(lapse), p.display, _g(self.smoothed_loss))
                timer = time.perf_counter()
                iterations_last = self.iter
                self._log_outputs(self.net, "Train", lambda name: self.net.blobs[name].data.ravel())
            if not math.isfinite(loss):
                self._diverged(self.iter, f"the loss is {_g(loss)}")   # weights not updated yet
            self._run("on_gradients_ready")
            self.apply_update()
            finite = self._params_finite
            if not (self.net.params_finite() if finite is None else finite):
                self._diverged(self.iter - 1, f"the update (lr = {_g(self.learning_rate)}) made parameters "
                               "non-finite")
            request = self.requested_action()
            if (p.snapshot and self.iter % p.snapshot == 0) or request == SNAPSHOT:
                self.snapshot()
            self._run("on_iteration_end")
            if request == STOP:
                self.requested_early_exit = True
                break

    def _diverged(self, iteration, what):
        where = self.net.non_finite_report()
        if self.last_snapshot:
            kept = f"the last snapshot, {self.last_snapshot}, was written before it"
        else:
            kept = "no snapshot was written"
        raise DivergenceError(
            f"training diverged at iteration {iteration}: {what}"
            + (f"; the first non-finite values: {where}" if where else "")
            + f". Lower base_lr (now {_g(self.param.base_lr)}) or check the input data; {kept}")

    def solve(self, resume_file=None):
        """Train to max_iter (resuming from a .solverstate if given), snapshot, final test."""
        p = self.param
        log.info("Solving %s", self.net.name)
        log.info("Learning Rate Policy: %s", p.lr_policy)
        self.requested_early_exit = False
        if resume_file:
            log.info("Restoring previous solver status from %s", resume_file)
            self.restore(resume_file)
        start_iter = self.iter
        self.step(p.max_iter - self.iter)
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
            self.snapshot()
        if self.requested_early_exit:
            log.info("Optimization stopped early.")
            return
        # One more forward pass so the final loss (and test scores) get displayed.
        if p.display and self.iter % p.display == 0:
            loss = self.net.forward_loss()
            self._update_smoothed_loss(loss, start_iter)
            log.info("Iteration %d, loss = %s", self.iter, _g(self.smoothed_loss))
        if p.test_interval and self.iter % p.test_interval == 0:
            self.test_all()
        log.info("Optimization Done.")

    # -- testing -----------------------------------------------------------------------
    def test_all(self):
        """Score every test net; a list of {output name: mean score} (one per net tested)."""
        results = []
        for test_net_id in range(len(self.test_nets)):
            if self.requested_early_exit:
                break
            results.append(self.test(test_net_id))
        return results

    def test(self, test_net_id=0):
        """Run test_iter batches of one test net; log and return the mean of each output."""
        p = self.param
        log.info("Iteration %d, Testing net (#%d)", self.iter, test_net_id)
        net = self.test_nets[test_net_id]
        net.share_with(self.net)
        n_iter = p.test_iter[test_net_id]
        scores = None
        loss = 0.0
        for _ in range(n_iter):
            request = self.requested_action()
            while request != NONE:
                if request == SNAPSHOT:
                    self.snapshot()
                elif request == STOP:
                    self.requested_early_exit = True
                request = self.requested_action()
            if self.requested_early_exit:
                break
            iter_loss = net.forward_loss()
            if p.test_compute_loss:
                loss += iter_loss
            values = np.concatenate([net.blobs[n].data.ravel().astype(np.float64)
                                     for n in net.outputs] or [np.zeros(0)])
            scores = values if scores is None else scores + values
        if self.requested_early_exit:
            log.info("Test interrupted.")
            return None
        if p.test_compute_loss and n_iter:
            log.info("Test loss: %s", _g(loss / n_iter))
        if scores is None:
            return {}
        means = _by_output(net, scores / n_iter)
        self._log_outputs(net, "Test", means.get)
        return {name: float(m[0]) if m.size == 1 else m for name, m in means.items()}

    def _log_outputs(self, net, kind, values_of):
        weights = net.blob_loss_weights
        k = 0
        for name in net.outputs:
            w = weights.get(name, 0.0)
            for v in values_of(name):
                extra = f" (* {_g(w)} = {_g(w * v)} loss)" if w else ""
                log.info("    %s net output #%d: %s = %s%s", kind, k, name, _g(v), extra)
                k += 1

    # -- snapshots ---------------------------------------------------------------------
    def snapshot_filename(self, extension):
        return f"{self.snapshot_prefix}_iter_{self.iter}{extension}"

    def snapshot(self):
        """Write <prefix>_iter_N.caffemodel (or .caffemodel.h5), the matching .solverstate and,
        next to it, the resume state (.solverstate.resume.json: data cursors, random states).

        All three are written to temporaries first and then renamed, the .solverstate last,
        so a .solverstate on disk always has its weights and resume state. If writing fails
        (disk full, permissions) SnapshotError names the file and nothing on disk changes.
        """
        hdf5 = self.param.snapshot_format == caffe_pb2.SolverParameter.HDF5
        kind = "HDF5" if hdf5 else "binary proto"
        model = self.snapshot_filename(".caffemodel.h5" if hdf5 else ".caffemodel")
        state = self.snapshot_filename(".solverstate.h5" if hdf5 else ".solverstate")
        log.info("Snapshotting to %s file %s", kind, model)
        diff = self.param.snapshot_diff
        model_bytes = (self.net.hdf5_bytes(diff) if hdf5
                       else self.net.to_proto(diff).SerializeToString())
        log.info("Snapshotting solver state to %s file %s", kind, state)
        state_bytes = (self._state_hdf5_bytes(model) if hdf5
                       else self.solver_state(model).SerializeToString())
        resume_bytes = json.dumps(self.resume_state(state_bytes)).encode()
        self._publish([(model, model_bytes), (state + RESUME_SUFFIX, resume_bytes),
                       (state, state_bytes)])
        self.last_snapshot = state
        return model, state

    def _publish(self, files):
        """Stage every (path, bytes) in a temporary, then rename them in order."""
        staged = []
        current = None
        try:
            for current, data in files:
                staged.append((stage_file(current, data), current))
            for tmp, current in staged:
                os.replace(tmp, current)
        except BaseException as exc:
            for tmp, _ in staged:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            if not isinstance(exc, OSError):
                raise
            kept = (f"the last complete snapshot is {self.last_snapshot}" if self.last_snapshot
                    else "no earlier snapshot of this run to keep")
            raise SnapshotError(f"cannot write snapshot file {current}: "
                                f"{exc.strerror or exc}; {kept}") from None

    def resume_state(self, state_bytes=b""):
        """What the resume state file holds: the generator states and each data layer's
        position, tied (by checksum) to the .solverstate bytes it was written with."""
        return {
            "format": RESUME_FORMAT, "version": 1, "iter": self.iter,
            "solverstate_sha256": hashlib.sha256(state_bytes).hexdigest(),
            "rng": get_rng_state(),
            "train_net": self.net.snapshot_state(),
            "test_nets": [net.snapshot_state() for net in self.test_nets],
        }

    def solver_state(self, model_filename=""):
        """A caffe_pb2.SolverState: iter, learned_net, history, current_step."""
        state = caffe_pb2.SolverState(iter=self.iter, current_step=self.current_step)
        if model_filename:
            state.learned_net = model_filename
        for h in self.history:
            h.to_proto(False, state.history.add())
        return state

    def _state_hdf5_bytes(self, model_filename):
        import h5py
        buf = io.BytesIO()
        with h5py.File(buf, "w") as f:
            f.create_dataset("iter", data=np.array([self.iter], np.int32))
            f.create_dataset("learned_net", data=np.bytes_(model_filename.encode()))
            f.create_dataset("current_step", data=np.array([self.current_step], np.int32))
            group = f.create_group("history")
            for i, h in enumerate(self.history):
                group.create_dataset(str(i), data=h.data)
        return buf.getvalue()

    def restore(self, path):
        """Continue from a .solverstate (or .solverstate.h5): iter, weights, history, lr step."""
        path = os.fspath(path)
        if path.endswith(".h5"):
            iter_, learned_net, current_step, history = self._read_state_hdf5(path)
        else:
            state = read_proto(path, caffe_pb2.SolverState())
            iter_, current_step = state.iter, state.current_step
            learned_net = state.learned_net if state.HasField("learned_net") else None
            history = list(state.history)
        if len(history) != len(self.history):
            raise SolverError(f"{path}: holds {len(history)} history blobs but a {self.type} solver "
                              f"for this net keeps {len(self.history)}; was it written for "
                              "another net or solver type?")
        if learned_net:
            self.net.copy_from(self._find_learned_net(learned_net, path))
        for i, (blob, saved) in enumerate(zip(self.history, history)):
            what = f"{path}: history blob {i}"
            if isinstance(saved, np.ndarray):
                if saved.size != blob.count():
                    raise SolverError(f"{what} has shape {saved.shape}, expected {blob.shape}")
                blob.data[...] = saved.reshape(blob.shape)
            else:
                try:
                    blob.from_proto(saved, reshape=False, what=what)
                except ValueError as exc:
                    raise SolverError(str(exc)) from None
        self.iter = int(iter_)
        self.current_step = int(current_step)
        self._restore_resume_state(path)
        self.last_snapshot = path
        log.info("%s: restored iteration %d from %s", self.type, self.iter, path)

    def _restore_resume_state(self, path):
        """Continue data cursors and random generators from the file next to the state, if it
        belongs to it; without one (a state written by Caffe) they start afresh, as in Caffe."""
        resume_path = path + RESUME_SUFFIX
        if not os.path.exists(resume_path):
            log.info("No %s next to %s: data layers start from their first record and random "
                     "draws start afresh (as in Caffe)", os.path.basename(resume_path), path)
            return
        try:
            with open(resume_path, "rb") as f:
                saved = json.loads(f.read())
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            if not isinstance(saved, dict) or saved.get("format") != RESUME_FORMAT:
                raise ValueError("not a minicaffe resume state")
        except (OSError, ValueError) as exc:
            raise SolverError(f"{resume_path}: cannot read it ({exc}); delete it to resume "
                              "without data positions") from None
        if saved.get("solverstate_sha256") != digest:
            log.warning("Ignoring %s: it was written with another version of %s", resume_path, path)
            return
        try:
            set_rng_state(saved["rng"])
            unknown = self.net.restore_state(saved.get("train_net", {}))
            for net, states in zip(self.test_nets, saved.get("test_nets", [])):
                unknown += net.restore_state(states)
        except LayerError as exc:
            raise SolverError(f"{resume_path}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise SolverError(f"{resume_path}: malformed resume state ({exc}); delete it to "
                              "resume without data positions") from None
        if unknown:
            log.warning("%s: no layer named %s in this net; their saved positions are ignored",
                        resume_path, ", ".join(repr(n) for n in unknown))
        log.info("Restored data positions and random states from %s", resume_path)

    @staticmethod
    def _find_learned_net(learned_net, state_path):
        """The weights file a state names: as written, else next to the state file."""
        if os.path.exists(learned_net):
            return learned_net
        alt = os.path.join(os.path.dirname(state_path), os.path.basename(learned_net))
        if os.path.exists(alt):
            return alt
        raise SolverError(f"{state_path}: its weights file {learned_net!r} was not found "
                          f"(nor {alt})")

    @staticmethod
    def _read_state_hdf5(path):
        try:
            import h5py
        except ImportError:
            raise SolverError(f"{path}: reading HDF5 solver states needs h5py "
                              "(pip install 'minicaffe[hdf5]')") from None
        if not os.path.exists(path):
            raise SolverError(f"{path}: no such file")
        with h5py.File(path, "r") as f:
            iter_ = int(np.asarray(f["iter"]).ravel()[0])
            current_step = int(np.asarray(f["current_step"]).ravel()[0])
            learned_net = None
            if "learned_net" in f:
                raw = f["learned_net"][()]
                learned_net = raw.rstrip(b"\0").decode() if isinstance(raw, bytes) else str(raw)
            group = f["history"]
            history = [np.asarray(group[str(i)]) for i in range(len(group))]
        return iter_, learned_net, current_step, history

    def __repr__(self):
        return f"<{type(self).__name__} iter={self.iter} net={self.net.name!r}>"


def _add_decay(data, diff, temp, decay, l1):
    """diff += decay * data (L2) or decay * sign(data) (L1); temp is scratch of data's shape."""
    if l1:
        np.sign(data, out=temp)
        temp *= decay
    else:
        np.multiply(data, decay, out=temp)
    diff += temp


def _by_output(net, values):
    """{output name: its slice of `values`}, for values laid out output after output."""
    out, offset = {}, 0
    for name in net.outputs:
        n = net.blobs[name].count()
        out[name] = values[offset: offset + n]
        offset += n
    return out
