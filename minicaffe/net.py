"""Net: a DAG of layers built from a NetParameter, run forward and backward.

Construction follows Caffe's Net::Init: filter layers by phase/level/stage,
insert Split layers where one top feeds several bottoms, create blobs (in-place
layers reuse their bottom blob), set layers up, wire shared parameters, and
work out which layers need backward.
"""
import collections
import logging
import math
import os
import warnings

import numpy as np

from . import caffemodel_reader
from .blob import Blob
from .layer import LayerError, building_model
from .layer_factory import create_layer
from .fold import fold_affine_chains, freeze_weights
from .fuse import fuse_normalization_chains
from .memory_plan import share_dead_buffers
from .proto import caffe_pb2
from .proto_io import ProtoFileError, check_regular_file, read_net_param, read_proto, write_binary

__all__ = ["Net", "filter_net", "insert_splits", "state_meets_rule", "is_hdf5_file"]

log = logging.getLogger("minicaffe.net")

# HDF5's signature; it sits at offset 0 or, after a user block, at 512, 1024, 2048, ...
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def is_hdf5_file(path):
    """Does the file at `path` hold HDF5 (by its signature, as Caffe's H5Fis_hdf5)?"""
    with open(path, "rb") as f:
        offset = 0
        while True:
            f.seek(offset)
            head = f.read(8)
            if len(head) < 8:
                return False
            if head == _HDF5_MAGIC:
                return True
            offset = 512 if offset == 0 else offset * 2


# -- NetParameter passes ---------------------------------------------------------
def state_meets_rule(state, rule):
    """Does NetState `state` satisfy NetStateRule `rule`? (Caffe's StateMeetsRule.)"""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def filter_net(param, state):
    """A copy of `param` keeping only the layers whose include/exclude rules admit `state`."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    out.ClearField("layer")
    for layer in param.layer:
        if len(layer.include) and len(layer.exclude):
            raise LayerError(f"layer {layer.name!r}: specify include or exclude rules, not both")
        keep = not len(layer.include)
        if any(state_meets_rule(state, r) for r in layer.exclude):
            keep = False
        if any(state_meets_rule(state, r) for r in layer.include):
            keep = True
        if keep:
            out.layer.add().CopyFrom(layer)
    return out


def _empty_net_message(param, state):
    """Why a net has nothing to run: no layers at all, or none that admit `state`."""
    phase = caffe_pb2.Phase.Name(state.phase)
    if not len(param.layer):
        return ("the net has no layers (an empty or comment-only file, or not a net file at "
                "all); a net needs at least one `layer { ... }`")
    rest = f", level {state.level}" if state.level else ""
    rest += f", stages {list(state.stage)}" if len(state.stage) else ""
    return (f"none of the net's {len(param.layer)} layers is included in phase {phase}{rest}: "
            f"their include/exclude rules filter them all out")


def _split_layer_name(layer_name, blob_name, top_index):
    return f"{blob_name}_{layer_name}_{top_index}_split"


def _split_blob_name(layer_name, blob_name, top_index, split_index):
    return f"{blob_name}_{layer_name}_{top_index}_split_{split_index}"


def insert_splits(param):
    """Copy of `param` with a Split layer after every top that feeds more than one consumer.

    A top with a nonzero loss_weight counts as one consumer itself, as in Caffe.
    """
    last_top = {}                      # blob name -> (layer, top index) that last produced it
    source_of_bottom = {}              # (layer, bottom index) -> (layer, top index)
    consumers = collections.Counter()  # (layer, top index) -> number of consumers
    loss_weight = {}
    for i, layer in enumerate(param.layer):
        for j, name in enumerate(layer.bottom):
            if name not in last_top:
                raise LayerError(f"layer {layer.name!r} ({layer.type}): unknown bottom blob "
                                 f"{name!r} (bottom {j}); no earlier layer produces it")
            source_of_bottom[i, j] = last_top[name]
            consumers[last_top[name]] += 1
        for j, name in enumerate(layer.top):
            last_top[name] = (i, j)
        for j, w in enumerate(layer.loss_weight):
            loss_weight[i, j] = w
            if w:
                consumers[i, j] += 1

    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    out.ClearField("layer")
    next_split = collections.Counter()
    for i, layer in enumerate(param.layer):
        new = out.layer.add()
        new.CopyFrom(layer)
        for j, name in enumerate(layer.bottom):
            src = source_of_bottom[i, j]
            if consumers[src] > 1:
                src_layer = param.layer[src[0]].name
                new.bottom[j] = _split_blob_name(src_layer, name, src[1], next_split[src])
                next_split[src] += 1
        for j, name in enumerate(layer.top):
            n = consumers[i, j]
            if n <= 1:
                continue
            split = out.layer.add(name=_split_layer_name(layer.name, name, j), type="Split")
            split.bottom.append(name)
            split.top.extend(_split_blob_name(layer.name, name, j, k) for k in range(n))
            w = loss_weight.get((i, j), 0.0)
            if w:
                # The split's first top carries the loss; consumers read from the second on.
                new.ClearField("loss_weight")
                split.loss_weight.extend([w] + [0.0] * (n - 1))
                next_split[i, j] = 1
    return out


# -- the Net -----------------------------------------------------------------------
class Net:
    """A network for one phase, built from a prototxt path or a NetParameter.

    pycaffe-style: `Net(model, phase, weights=None, level=0, stages=())`; the
    older `Net(model, weights, phase)` form is accepted too.

    `inference=True` is a forward-only net whose blobs share buffers once no later layer reads
    them (see memory_plan.py): after `forward()` only the inputs, the outputs and the blobs named
    in `keep_blobs` hold their values, and there is no backward pass. Its in-place BatchNorm /
    Scale / Bias layers after a Convolution or InnerProduct are folded into that layer's weights
    (fold.py) when the net is built and whenever `copy_from` loads weights; after changing
    `net.params` by hand, call `net.fold_params()`.
    """

    def __init__(self, model, phase=None, *args, weights=None, level=0, stages=(),
                 dtype=np.float32, inference=False, keep_blobs=()):
        if isinstance(phase, (str, os.PathLike)):   # Net(model, weights, phase)
            if args:
                weights, phase, args = phase, args[0], args[1:]
            else:
                raise TypeError("Net(model, weights, phase): phase is missing")
        if args:
            raise TypeError(f"Net() got unexpected positional arguments {args!r}")
        if isinstance(stages, str):
            stages = [stages]
        self.source = model if isinstance(model, (str, os.PathLike)) else None
        param = read_net_param(model)
        state = caffe_pb2.NetState()
        state.CopyFrom(param.state)
        if phase is not None:
            if phase not in (caffe_pb2.TRAIN, caffe_pb2.TEST):
                raise ValueError(f"phase must be minicaffe.TRAIN or minicaffe.TEST, got {phase!r}")
            state.phase = phase
        elif not param.HasField("state") or not param.state.HasField("phase"):
            raise ValueError("Net needs a phase: Net(model, minicaffe.TRAIN or minicaffe.TEST)")
        if level:
            state.level = level
        if stages:
            state.ClearField("stage")
            state.stage.extend(stages)
        self.phase = state.phase
        self.state = state
        self.dtype = np.dtype(dtype)
        try:
            with building_model(self.source):  # Python layer modules may sit next to the prototxt
                self._init(param)
        except (LayerError, ProtoFileError) as exc:
            if self.source is not None and not str(exc).startswith(os.fspath(self.source)):
                # Keep what the error itself was chained to (a Python layer's own exception).
                raise type(exc)(f"{os.fspath(self.source)}: {exc}") from exc.__cause__
            raise
        self.inference = bool(inference)
        for layer, need_backward in zip(self.layers, self.layer_need_backward):
            layer.forward_only = self.inference or not need_backward
        self._forward_plan, self._fold_stale = None, False
        if weights:
            for w in ([weights] if isinstance(weights, (str, os.PathLike)) else weights):
                self.copy_from(w)
        if isinstance(keep_blobs, str):
            keep_blobs = [keep_blobs]
        unknown = [name for name in keep_blobs if name not in self.blobs]
        if unknown:
            raise KeyError(f"keep_blobs: net {self.name!r} has no blob named {unknown[0]!r}")
        if not self.inference and keep_blobs:
            raise ValueError("keep_blobs only applies to Net(..., inference=True); "
                             "a default Net keeps every blob")
        self.kept_blobs = set(self.input_names) | set(self.output_names) | set(keep_blobs)
        if self.inference:
            share_dead_buffers(self.layers, self._bottom_vecs, self._top_vecs,
                               [self.blobs[name] for name in sorted(self.kept_blobs)])
            self.fold_params()
        # Whole-net passes run each in-place BatchNorm -> Scale (-> ReLU) chain as one step
        # (fuse.py), with the same results; set fuse_chains = False to run every layer itself.
        self.fuse_chains = True
        self._fused = {} if self.inference else fuse_normalization_chains(
            self.layers, self.bottom_ids, self.top_ids, self.layer_need_backward, self.bottom_need_backward)
        self._fused_steps = None
        self._forward_fused = False   # the last forward ran the fused chains

    def fold_params(self):
        """Inference nets: recompute the folded Convolution/InnerProduct weights from net.params."""
        if not self.inference:
            raise RuntimeError("fold_params() is for nets built with inference=True")
        # The chains are in place, so every blob still ends up holding the value it has unfolded.
        folds = fold_affine_chains(self.layers, self.bottom_ids, self.top_ids,
                                   [tops[0].count if tops else 0 for tops in self._top_vecs])
        skipped = {j for _, chain in folds.values() for j in chain}
        self._forward_plan = [(i, folds[i][0] if i in folds else layer, self._bottom_vecs[i], self._top_vecs[i])
                              for i, layer in enumerate(self.layers) if i not in skipped]
        freeze_weights(step[1] for step in self._forward_plan)
        self._fold_stale = False

    # -- construction ----------------------------------------------------------
    def _init(self, param):
        self.name = param.name
        self.force_backward = param.force_backward
        self.debug_info = param.debug_info
        filtered = filter_net(param, self.state)
        if not len(filtered.layer):
            raise LayerError(_empty_net_message(param, self.state))
        param = insert_splits(filtered)
        self.net_param = param
        self._hooks = {"before_forward": [], "after_forward": [],
                       "before_backward": [], "after_backward": []}

        self.layers = []
        self.layer_names = []
        self.blobs = collections.OrderedDict()
        self.bottom_ids, self.top_ids = [], []        # per layer: blob names
        self._bottom_vecs, self._top_vecs = [], []    # per layer: Blob lists
        self.bottom_need_backward = []
        self.layer_need_backward = []
        self.params = collections.OrderedDict()
        self.learnable_params = []
        self.params_lr, self.params_weight_decay = [], []
        self._param_owner_of = []                    # per (layer, j): index into learnable_params
        self._spec_had_lr, self._spec_had_decay = [], []  # was lr/decay_mult set explicitly
        self.param_display_names = []
        producer = {}                                # blob name -> layer that produced it
        blob_need_backward = {}
        available = collections.OrderedDict()        # produced, not yet consumed
        param_names = {}                             # shared ParamSpec name -> learnable index

        for layer_param in param.layer:
            layer_param = _with_phase(layer_param, self.phase)
            name = layer_param.name
            if len(layer_param.propagate_down) and len(layer_param.propagate_down) != len(layer_param.bottom):
                raise LayerError(f"layer {name!r}: propagate_down must be given once per bottom "
                                 f"({len(layer_param.bottom)}), got {len(layer_param.propagate_down)}")
            layer = create_layer(layer_param, self.phase)
            bottoms, need_down = [], []
            for j, bname in enumerate(layer_param.bottom):
                if bname not in self.blobs:
                    raise LayerError(f"layer {name!r} ({layer_param.type}): unknown bottom blob {bname!r}")
                bottoms.append(self.blobs[bname])
                down = blob_need_backward.get(bname, False)
                if len(layer_param.propagate_down):
                    down = down and layer_param.propagate_down[j]
                need_down.append(down)
                available.pop(bname, None)
            tops = []
            for j, tname in enumerate(layer_param.top):
                if j < len(layer_param.bottom) and layer_param.bottom[j] == tname:
                    blob = self.blobs[tname]  # in place, as Caffe allows for any layer
                elif tname in self.blobs:
                    raise LayerError(f"top blob {tname!r} is produced by both layer "
                                     f"{producer[tname]!r} and layer {name!r}; give one a new top name "
                                     f"(only in-place layers may reuse their own bottom's name)")
                else:
                    blob = Blob((), self.dtype, name=tname)
                    self.blobs[tname] = blob
                producer[tname] = name
                tops.append(blob)
                available[tname] = True
            n_auto = max(layer.exact_num_top or 0, layer.min_num_top or 0)
            if layer.auto_top_blobs and len(tops) < n_auto:
                for k in range(len(tops), n_auto):
                    tname = f"(automatic) {name} top {k}"
                    blob = Blob((), self.dtype, name=tname)
                    self.blobs[tname] = blob
                    tops.append(blob)   # anonymous: never a net output, as in Caffe
            try:
                layer.setup(bottoms, tops)
            except LayerError:
                raise
            except (ValueError, IndexError, TypeError, KeyError) as exc:
                raise LayerError(f"layer {name!r} ({layer_param.type}): setup failed: {exc}") from exc

            self.layers.append(layer)
            self.layer_names.append(name)
            self.bottom_ids.append(list(layer_param.bottom))
            self.top_ids.append([b.name for b in tops])
            self._bottom_vecs.append(bottoms)
            self._top_vecs.append(tops)
            need_backward = any(need_down)
            need_backward |= self._append_params(layer, param_names)
            for t in tops:
                blob_need_backward[t.name] = blob_need_backward.get(t.name, False) or need_backward
            self.bottom_need_backward.append(need_down)
            self.layer_need_backward.append(need_backward)

        _check_unique_param_layer_names(self.layers)
        self._prune_backward(blob_need_backward)
        # Caffe collects the leftover blobs in a std::set, so net outputs come sorted by name
        # (this is the order `caffe test` and the solver's test lines print them in).
        self.output_names = sorted(available)
        self.input_names = [t for layer, tops in zip(self.layers, self.top_ids)
                            if layer.type == "Input" for t in tops]
        self.layer_dict = collections.OrderedDict(zip(self.layer_names, self.layers))
        self._blob_loss_weights = {}
        for layer, tops in zip(self.layers, self._top_vecs):
            for t, w in zip(tops, layer.loss_weights):
                if w:
                    self._blob_loss_weights[t.name] = w

    def _append_params(self, layer, param_names):
        """Register `layer`'s blobs as learnable params (or as shares of earlier ones)."""
        specs = layer.layer_param.param
        if len(specs) > len(layer.blobs):
            raise LayerError(f"layer {layer.name!r} ({layer.type}) has {len(layer.blobs)} parameter "
                             f"blobs but {len(specs)} param specs")
        if layer.blobs:
            self.params[layer.name] = layer.blobs
        needs = False
        owners = []
        for j, blob in enumerate(layer.blobs):
            spec = specs[j] if j < len(specs) else caffe_pb2.ParamSpec()
            learn = spec.lr_mult != 0
            # Caffe's Net: force_backward computes every param diff, lr_mult 0 or not.
            layer.param_propagate_down[j] = learn or bool(self.force_backward)
            needs |= learn
            display = spec.name or f"{layer.name}[{j}]"
            if spec.name and spec.name in param_names:
                owner = param_names[spec.name]
                owner_blob = self.learnable_params[owner]
                if spec.share_mode == caffe_pb2.ParamSpec.PERMISSIVE:
                    if owner_blob.count() != blob.count():
                        raise LayerError(f"layer {layer.name!r}: shared param {spec.name!r} has "
                                         f"{blob.count()} elements here but {owner_blob.count()} "
                                         f"in its owner")
                elif owner_blob.shape != blob.shape:
                    raise LayerError(f"layer {layer.name!r}: shared param {spec.name!r} has shape "
                                     f"{blob.shape} here but {owner_blob.shape} in its owner "
                                     f"(set share_mode: PERMISSIVE to share by count)")
                for field, values, given in (("lr_mult", self.params_lr, self._spec_had_lr),
                                             ("decay_mult", self.params_weight_decay,
                                              self._spec_had_decay)):
                    value = getattr(spec, field)
                    if spec.HasField(field) and value != values[owner]:
                        # An explicit setting on a sharer applies to the owner, once.
                        if given[owner]:
                            raise LayerError(f"layer {layer.name!r}: shared param {spec.name!r} "
                                             f"sets {field} {value} but its owner uses "
                                             f"{values[owner]}")
                        values[owner] = value
                        given[owner] = True
                blob.share_data(owner_blob)
                blob.share_diff(owner_blob)
                owners.append(owner)
                continue
            index = len(self.learnable_params)
            if spec.name:
                param_names[spec.name] = index
            self.learnable_params.append(blob)
            self.params_lr.append(spec.lr_mult)
            self.params_weight_decay.append(spec.decay_mult)
            self._spec_had_lr.append(spec.HasField("lr_mult"))
            self._spec_had_decay.append(spec.HasField("decay_mult"))
            self.param_display_names.append(display)
            owners.append(index)
        self._param_owner_of.append(owners)
        return needs

    def _prune_backward(self, blob_need_backward):
        """Skip backward for layers that do not lead to a loss; honour force_backward."""
        under_loss = set()
        for i in reversed(range(len(self.layers))):
            layer, tops = self.layers[i], self._top_vecs[i]
            contributes = any(w for w in layer.loss_weights) or any(t.name in under_loss for t in tops)
            if not contributes:
                self.layer_need_backward[i] = False
                self.bottom_need_backward[i] = [False] * len(self._bottom_vecs[i])
            else:
                under_loss.update(b.name for b in self._bottom_vecs[i])
            if self.force_backward:
                self.layer_need_backward[i] = True
                self.bottom_need_backward[i] = [
                    bool(down or layer.allow_force_backward(j))
                    for j, down in enumerate(self.bottom_need_backward[i])]
                if len(layer.layer_param.propagate_down):
                    self.bottom_need_backward[i] = [
                        d and bool(p) for d, p in zip(self.bottom_need_backward[i],
                                                      layer.layer_param.propagate_down)]

    # -- pycaffe-style accessors -------------------------------------------------
    @property
    def inputs(self):
        return list(self.input_names)

    @property
    def outputs(self):
        return list(self.output_names)

    @property
    def top_names(self):
        return collections.OrderedDict(zip(self.layer_names, self.top_ids))

    @property
    def bottom_names(self):
        return collections.OrderedDict(zip(self.layer_names, self.bottom_ids))

    # pycaffe's underscore views, indexed as in Caffe's Net (blobs in creation order).
    @property
    def _layer_names(self):
        return list(self.layer_names)

    @property
    def _blob_names(self):
        return list(self.blobs)

    @property
    def _blobs(self):
        return list(self.blobs.values())

    def _blob_index(self):
        return {name: i for i, name in enumerate(self.blobs)}

    @property
    def _inputs(self):
        index = self._blob_index()
        return [index[name] for name in self.input_names]

    @property
    def _outputs(self):
        index = self._blob_index()
        return [index[name] for name in self.output_names]

    def _bottom_ids(self, i):
        index = self._blob_index()
        return [index[name] for name in self.bottom_ids[i]]

    def _top_ids(self, i):
        index = self._blob_index()
        return [index[name] for name in self.top_ids[i]]

    @property
    def blob_loss_weights(self):
        return {name: self._blob_loss_weights.get(name, 0.0) for name in self.blobs}

    def _layer_index(self, which, default):
        if which is None:
            return default
        if isinstance(which, int):
            return which
        try:
            return self.layer_names.index(which)
        except ValueError:
            raise KeyError(f"no layer named {which!r} in net {self.name!r}") from None

    # -- running ------------------------------------------------------------------
    def forward_plan(self, start=0, end=None):
        """The (index, layer, bottom, top) steps that forward runs for layers start..end: every
        layer, except on inference nets run whole, where folded layers are left out."""
        end = len(self.layers) - 1 if end is None else end
        if self._fold_stale:
            self.fold_params()
        if self._forward_plan is not None and start == 0 and end == len(self.layers) - 1:
            return self._forward_plan
        return [(i, self.layers[i], self._bottom_vecs[i], self._top_vecs[i]) for i in range(start, end + 1)]

    def forward_from_to(self, start=0, end=None):
        """Run layers start..end (inclusive) and return their summed weighted loss."""
        loss = 0.0
        before, after = self._hooks["before_forward"], self._hooks["after_forward"]
        debug = self.debug_info
        whole = start == 0 and (end is None or end == len(self.layers) - 1)
        fused = whole and self._fusing("before_forward", "after_forward")
        steps = self.fused_steps()[0] if fused else self.forward_plan(start, end)
        self._forward_fused = fused
        for i, layer, bottom, top in steps:
            for hook in before:
                hook(i)
            try:
                layer.reshape(bottom, top)
                loss += layer.run_forward(bottom, top)
                if debug:
                    self._forward_debug_info(i)
            except LayerError:
                raise
            except Exception as exc:
                if isinstance(exc, (KeyboardInterrupt, MemoryError)):
                    raise
                raise type(exc)(f"layer {layer.name!r} ({layer.type}) forward: {exc}") from exc
            for hook in after:
                hook(i)
        return loss

    def backward_from_to(self, start=None, end=0):
        if self.inference:
            raise RuntimeError(f"net {self.name!r} was built with inference=True: its blobs share "
                               f"buffers, so it has no backward pass; build it without inference=True")
        start = len(self.layers) - 1 if start is None else start
        before, after = self._hooks["before_backward"], self._hooks["after_backward"]
        debug = self.debug_info
        if (self._forward_fused and start == len(self.layers) - 1 and end == 0
                and self._fusing("before_backward", "after_backward")):
            steps = self.fused_steps()[1]
        else:
            if self._forward_fused:   # the chains' layers run one by one: give them their state
                for step, _ in self._fused.values():
                    step.restore_layer_state()
            steps = [(i, self.layers[i], self.layer_need_backward[i]) for i in range(start, end - 1, -1)]
        for i, layer, need_backward in steps:
            for hook in before:
                hook(i)
            if not need_backward:
                for hook in after:
                    hook(i)
                continue
            try:
                layer.run_backward(self._top_vecs[i], self.bottom_need_backward[i],
                                   self._bottom_vecs[i])
                if debug:
                    self._backward_debug_info(i)
            except LayerError:
                raise
            except Exception as exc:
                if isinstance(exc, (KeyboardInterrupt, MemoryError)):
                    raise
                raise type(exc)(f"layer {layer.name!r} ({layer.type}) backward: {exc}") from exc
            for hook in after:
                hook(i)

    def _fusing(self, *hook_kinds):
        """Whether a whole-net pass may run the fused chains: not while anything looks at the
        blobs between layers (debug_info, or callbacks of that pass)."""
        return (bool(self._fused) and self.fuse_chains and not self.debug_info
                and not any(self._hooks[kind] for kind in hook_kinds))

    def fused_steps(self):
        """The whole-net forward steps (index, layer or fused chain, bottom, top) and backward
        steps (index, layer or fused chain, whether it runs backward), in running order, with each
        fused chain (fuse.py) standing at its BatchNorm's index."""
        if self._fused_steps is None:
            inside = {j for _, chain in self._fused.values() for j in chain[1:]}
            forward, backward = [], []
            for i, layer in enumerate(self.layers):
                if i in inside:
                    continue
                step, chain = self._fused.get(i, (layer, [i]))
                forward.append((i, step, self._bottom_vecs[i], self._top_vecs[i]))
                backward.append((i, step, any(self.layer_need_backward[j] for j in chain)))
            self._fused_steps = forward, backward[::-1]
        return self._fused_steps

    # pycaffe's _forward/_backward: Net::ForwardFromTo / BackwardFromTo by layer index.
    def _forward(self, start, end):
        return self.forward_from_to(start, end)

    def _backward(self, start, end):
        self.backward_from_to(start, end)

    # pycaffe's hooks: `fn(layer_index)` around every layer's forward/backward (Net::Callback).
    def before_forward(self, fn):
        self._hooks["before_forward"].append(fn)

    def after_forward(self, fn):
        self._hooks["after_forward"].append(fn)

    def before_backward(self, fn):
        self._hooks["before_backward"].append(fn)

    def after_backward(self, fn):
        self._hooks["after_backward"].append(fn)

    def forward_loss(self):
        """Forward through the whole net; the total weighted loss (Caffe's Net::Forward)."""
        return self.forward_from_to(0, len(self.layers) - 1)

    def forward(self, blobs=None, start=None, end=None, **kwargs):
        """pycaffe's forward: set inputs from kwargs, run, return {output name: data array}."""
        for name, value in kwargs.items():
            if name not in self.blobs:
                raise KeyError(f"forward(): net {self.name!r} has no blob named {name!r}")
            blob = self.blobs[name]
            value = np.asarray(value)
            if value.shape != blob.shape:
                blob.reshape(value.shape)
            blob.data[...] = value
        start_i = self._layer_index(start, 0)
        end_i = self._layer_index(end, len(self.layers) - 1)
        self.forward_from_to(start_i, end_i)
        names = list(self.top_ids[end_i]) if end is not None else list(self.output_names)
        names += [b for b in (blobs or []) if b not in names]
        if self.inference:
            lost = [name for name in names if name not in self.kept_blobs]
            if lost:
                raise KeyError(f"forward(): blob {lost[0]!r} of inference net {self.name!r} shares its "
                               f"buffer with later blobs; name it in Net(..., keep_blobs=[...]) to read it")
        return {name: self.blobs[name].data for name in names}

    def backward(self, diffs=None, start=None, end=None, **kwargs):
        """pycaffe's backward: set output diffs from kwargs, run, return {input name: diff array}."""
        for name, value in kwargs.items():
            if name not in self.blobs:
                raise KeyError(f"backward(): net {self.name!r} has no blob named {name!r}")
            self.blobs[name].diff = value
        start_i = self._layer_index(start, len(self.layers) - 1)
        end_i = self._layer_index(end, 0)
        self.backward_from_to(start_i, end_i)
        names = list(self.bottom_ids[end_i]) if end is not None else list(self.input_names)
        names += [b for b in (diffs or []) if b not in names]
        return {name: self.blobs[name].diff for name in names}

    def forward_all(self, blobs=None, **kwargs):
        """pycaffe's forward_all: feed arrays of any length through the net in batches of its input
        batch size (the last batch zero-padded); {output name: array over all inputs}."""
        if not kwargs:
            return {name: value.copy() for name, value in self.forward(blobs=blobs).items()}
        lengths = {name: len(value) for name, value in kwargs.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"forward_all(): inputs have different lengths {lengths}")
        total = next(iter(lengths.values()))
        batch = self.blobs[next(iter(kwargs))].shape[0]
        parts = {}
        for start in range(0, total, batch):
            chunk = {}
            for name, value in kwargs.items():
                piece = np.asarray(value[start:start + batch])
                if len(piece) < batch:
                    padding = np.zeros((batch - len(piece),) + piece.shape[1:], dtype=piece.dtype)
                    piece = np.concatenate([piece, padding])
                chunk[name] = piece
            for name, value in self.forward(blobs=blobs, **chunk).items():
                parts.setdefault(name, []).append(value.copy())
        return _joined(parts, total)

    def forward_backward_all(self, blobs=None, diffs=None, **kwargs):
        """pycaffe's forward_backward_all: kwargs hold input arrays (fed forward) and output
        diffs (fed backward) of any length, run in batches of the net's batch size;
        returns ({blob: data over all items}, {blob: diff over all items})."""
        inputs = {k: np.asarray(v) for k, v in kwargs.items() if k in self.input_names}
        outputs = {k: np.asarray(v) for k, v in kwargs.items() if k in self.output_names}
        unknown = sorted(set(kwargs) - set(inputs) - set(outputs))
        if unknown:
            raise KeyError(f"forward_backward_all(): {unknown} are neither inputs "
                           f"{self.input_names} nor outputs {self.output_names} of net {self.name!r}")
        if not kwargs:
            raise ValueError("forward_backward_all() needs input or output arrays as keyword "
                             "arguments")
        total = len(next(iter(kwargs.values())))
        lengths = {k: len(v) for k, v in kwargs.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"forward_backward_all(): arrays have different lengths {lengths}")
        batch = next(iter(self.blobs.values())).shape[0]
        all_outs, all_diffs = {}, {}
        for first in range(0, total, batch):
            fwd = {k: _padded(v[first:first + batch], batch) for k, v in inputs.items()}
            bwd = {k: _padded(v[first:first + batch], batch) for k, v in outputs.items()}
            for name, value in self.forward(blobs=blobs, **fwd).items():
                all_outs.setdefault(name, []).append(value.copy())
            for name, value in self.backward(diffs=diffs, **bwd).items():
                all_diffs.setdefault(name, []).append(value.copy())
        return _joined(all_outs, total), _joined(all_diffs, total)

    def set_input_arrays(self, data, labels):
        """pycaffe's set_input_arrays: feed (N, C, H, W) data and N labels to the MemoryData
        layer that must come first in the net (N a multiple of its batch size)."""
        labels = np.asarray(labels)
        if labels.ndim == 1:
            labels = np.ascontiguousarray(labels[:, np.newaxis, np.newaxis, np.newaxis])
        return self._set_input_arrays(data, labels)

    def _set_input_arrays(self, data, labels):
        first = self.layers[0] if self.layers else None
        if first is None or first.type != "MemoryData":
            raise RuntimeError("set_input_arrays may only be called if the first layer is a "
                               "MemoryDataLayer")
        first.set_input_arrays(data, labels)

    def forward_backward(self):
        loss = self.forward_loss()
        self.backward_from_to()
        if self.debug_info:
            self._params_debug_info()
        return loss

    def reshape(self):
        for layer, bottom, top in zip(self.layers, self._bottom_vecs, self._top_vecs):
            layer.reshape(bottom, top)

    def clear_param_diffs(self):
        for blob in self.learnable_params:
            blob.diff.fill(0)

    def update(self):
        if self.debug_info:
            self._update_debug_info()
        for blob in self.learnable_params:
            blob.update()

    # -- debug_info: Caffe's per-layer magnitude lines (Net::*DebugInfo), same text ----------
    def _param_display_name(self, layer_index, j):
        """Caffe's param_display_names_: the ParamSpec name, else the index within the layer."""
        specs = self.layers[layer_index].layer_param.param
        return (specs[j].name if j < len(specs) else "") or str(j)

    def _forward_debug_info(self, i):
        layer, name = self.layers[i], self.layer_names[i]
        for blob in self._top_vecs[i]:
            log.info("    [Forward] Layer %s, top blob %s data: %s", name, blob.name,
                     _mean_abs(blob.data))
        for j, blob in enumerate(layer.blobs):
            log.info("    [Forward] Layer %s, param blob %s data: %s", name,
                     self._param_display_name(i, j), _mean_abs(blob.data))

    def _backward_debug_info(self, i):
        layer, name = self.layers[i], self.layer_names[i]
        for blob, down in zip(self._bottom_vecs[i], self.bottom_need_backward[i]):
            if down:
                log.info("    [Backward] Layer %s, bottom blob %s diff: %s", name, blob.name,
                         _mean_abs(blob.diff))
        for j, blob in enumerate(layer.blobs):
            if layer.param_propagate_down[j]:
                log.info("    [Backward] Layer %s, param blob %d diff: %s", name, j,
                         _mean_abs(blob.diff))

    def _params_debug_info(self):
        # Caffe sums in Dtype and logs this line at ERROR severity (Net::Backward).
        f = self.dtype.type
        asum_data = asum_diff = sumsq_data = sumsq_diff = f(0)
        for blob in self.learnable_params:
            asum_data += f(blob.asum_data())
            asum_diff += f(blob.asum_diff())
            sumsq_data += f(blob.sumsq_data())
            sumsq_diff += f(blob.sumsq_diff())
        log.error("    [Backward] All net params (data, diff): L1 norm = (%s, %s); "
                  "L2 norm = (%s, %s)", _g(asum_data), _g(asum_diff),
                  _g(np.sqrt(sumsq_data)), _g(np.sqrt(sumsq_diff)))

    def _update_debug_info(self):
        """[Update] lines as Caffe's Net::Update printed them (shared params first, then owners);
        Caffe 1.0 still defines UpdateDebugInfo but no longer calls it."""
        entries = []   # (is_owner, layer index, j, learnable index)
        for i, owners in enumerate(self._param_owner_of):
            for j, index in enumerate(owners):
                entries.append((self.layers[i].blobs[j] is self.learnable_params[index], i, j, index))
        owner_of = {index: (i, j) for is_owner, i, j, index in entries if is_owner}
        for want_owner in (False, True):
            for is_owner, i, j, index in entries:
                if is_owner != want_owner:
                    continue
                blob = self.layers[i].blobs[j]
                name, display = self.layer_names[i], self._param_display_name(i, j)
                if is_owner:
                    log.info("    [Update] Layer %s, param %s data: %s; diff: %s", name, display,
                             _mean_abs(blob.data), _mean_abs(blob.diff))
                else:
                    oi, oj = owner_of[index]
                    log.info("    [Update] Layer %s, param blob %s (owned by layer %s, param %s) "
                             "diff: %s", name, display, self.layer_names[oi],
                             self._param_display_name(oi, oj), _mean_abs(blob.diff))

    # -- divergence --------------------------------------------------------------------------
    def params_finite(self):
        """Whether every learnable parameter is finite: a blob's sum is finite when no element is
        inf or nan, unless the float32 sum overflows, which the elementwise check then settles
        (a float64 sum would cast through a temporary buffer on every call)."""
        with np.errstate(over="ignore", invalid="ignore"):
            return all(math.isfinite(data.sum()) or bool(np.isfinite(data).all())
                       for data in (blob.data for blob in self.learnable_params))

    def non_finite_report(self):
        """Where non-finite numbers first appear after a forward/backward pass, as a phrase
        ("layer 'ip1' (InnerProduct) forward: top 'ip1' data has 3 non-finite values"), or None.

        Forward is searched in net order (the first top that went bad), then backward in the
        order it runs (the first bottom diff that went bad), then the parameters. An in-place
        layer shares its top with the layer before it, which is then the one named.
        """
        for i, (layer, tops) in enumerate(zip(self.layers, self._top_vecs)):
            for blob in tops:
                bad = _count_non_finite(blob.data)
                if bad:
                    return (f"layer {layer.name!r} ({layer.type}) forward: top {blob.name!r} data "
                            f"has {_values(bad, blob.count())}")
        for i in reversed(range(len(self.layers))):
            if not self.layer_need_backward[i]:
                continue
            layer = self.layers[i]
            for blob, down in zip(self._bottom_vecs[i], self.bottom_need_backward[i]):
                bad = _count_non_finite(blob.diff) if down else 0
                if bad:
                    return (f"layer {layer.name!r} ({layer.type}) backward: bottom {blob.name!r} "
                            f"diff has {_values(bad, blob.count())}")
        for i, layer in enumerate(self.layers):
            for j, blob in enumerate(layer.blobs):
                bad = _count_non_finite(blob.data)
                if bad:
                    return (f"layer {layer.name!r} ({layer.type}) param "
                            f"{self._param_display_name(i, j)} has {_values(bad, blob.count())}")
        return None

    # -- exact resume --------------------------------------------------------------------------
    def snapshot_state(self):
        """{layer name: layer.snapshot_state()} for the layers that keep a position or generator."""
        states = {}
        for name, layer in zip(self.layer_names, self.layers):
            state = layer.snapshot_state()
            if state is not None:
                states[name] = state
        return states

    def restore_state(self, states):
        """Give each layer its saved state back; names that are not in this net are listed."""
        unknown = []
        for name, state in states.items():
            layer = self.layer_dict.get(name)
            if layer is None:
                unknown.append(name)
            else:
                layer.restore_state(state)
        return unknown

    # -- weights ---------------------------------------------------------------
    def share_with(self, other):
        """Use `other`'s weights for layers of the same name (test nets share the train net's)."""
        for name, layer in self.layer_dict.items():
            source = other.layer_dict.get(name)
            if source is None or not layer.blobs:
                continue
            if len(source.blobs) != len(layer.blobs):
                raise LayerError(f"layer {name!r}: {len(layer.blobs)} param blobs here but "
                                 f"{len(source.blobs)} in the net to share with")
            for j, (mine, theirs) in enumerate(zip(layer.blobs, source.blobs)):
                if mine.shape != theirs.shape:
                    raise LayerError(f"layer {name!r} param {j}: shape {mine.shape} here but "
                                     f"{theirs.shape} in the net to share with")
                mine.share_data(theirs)
    share_trained_layers_with = share_with

    def copy_from(self, source):
        """Load weights by layer name from a weights file or a NetParameter (Caffe's
        CopyTrainedLayersFrom). A file is HDF5 or binary protobuf by its content, whatever
        its extension; layers of the file the net lacks are logged and skipped."""
        self._fold_stale = self.inference   # folded weights are recomputed at the next forward
        if isinstance(source, caffe_pb2.NetParameter):
            return self._copy_from_param(source, "NetParameter")
        label = os.fspath(source)
        check_regular_file(label, "weights file")  # a FIFO or device must not hang the read
        try:
            size = os.path.getsize(label)
        except FileNotFoundError:
            raise ProtoFileError(f"{label}: no such weights file") from None
        if os.path.isdir(label):
            raise ProtoFileError(f"{label}: is a directory, not a weights file")
        if size == 0:
            raise ProtoFileError(f"{label}: the weights file is empty (0 bytes); an unfinished "
                                 f"download or snapshot?")
        if is_hdf5_file(label):
            return self._copy_from_hdf5(label)
        streamed = caffemodel_reader.scan(label)  # None: a layout for protobuf (groups)
        if streamed is not None:
            with streamed:  # values go from the file into the blobs, one blob at a time
                return self._copy_from_param(streamed, label)
        param = caffe_pb2.NetParameter()
        try:
            with open(label, "rb") as f:
                param.ParseFromString(f.read())
        except Exception as exc:
            raise ProtoFileError(f"{label}: neither HDF5 nor a binary .caffemodel ({exc})") from None
        if not len(param.layer) and not len(param.layers):
            raise ProtoFileError(f"{label}: the weights file holds no layers (is it a "
                                 f"binary .caffemodel?)")
        try:
            param = read_net_param(param)
        except ValueError as exc:  # an upgrade that does not apply, or a non-UTF-8 name
            raise ProtoFileError(f"{label}: {exc}") from None
        return self._copy_from_param(param, label)

    def _copy_from_param(self, param, label):
        """Copy by layer name from a NetParameter or a caffemodel_reader.StreamedNet."""
        copied, names = 0, []
        for src in param.layer:
            names.append(src.name)
            layer = self.layer_dict.get(src.name)
            if layer is None:
                log.info("Ignoring source layer %s", src.name)
                continue
            if not len(src.blobs):
                continue
            if len(src.blobs) != len(layer.blobs):
                raise LayerError(f"{label}: layer {src.name!r} has {len(src.blobs)} parameter blobs "
                                 f"in the file but {len(layer.blobs)} in the net")
            for j, (blob, proto) in enumerate(zip(layer.blobs, src.blobs)):
                shape = caffemodel_reader.blob_shape(proto)
                if not _shapes_match(blob.shape, shape):
                    raise LayerError(f"{label}: layer {src.name!r} param {j}: the file has shape "
                                     f"{shape} but the net expects {blob.shape}")
                caffemodel_reader.load_blob(blob, proto, what=f"{label}: layer {src.name!r} param {j}")
            copied += 1
        self._warn_if_nothing_matched(label, names, copied)
        return self

    def _warn_if_nothing_matched(self, label, names, copied):
        if copied or not any(layer.blobs for layer in self.layers):
            return
        matching = [n for n in names if n in self.layer_dict]
        message = (f"{label}: copied weights for 0 layers: none of its {len(names)} layers "
                   + ("has parameters for" if matching else "is named like")
                   + f" a layer of net {self.name!r} (weights are matched by layer name); "
                   f"the net keeps its initial weights")
        log.warning("%s", message)
        warnings.warn(message, stacklevel=3)

    def _copy_from_hdf5(self, path):
        try:
            import h5py
        except ImportError:
            raise ImportError(f"{path}: reading HDF5 weights needs h5py: pip install 'minicaffe[hdf5]'") from None
        copied, names = 0, []
        with h5py.File(path, "r") as f:
            if "data" not in f:
                raise ProtoFileError(f"{path}: an HDF5 file without the 'data' group of Caffe's "
                                     f"HDF5 weights")
            group = f["data"]
            for name in group:
                names.append(name)
                layer = self.layer_dict.get(name)
                if layer is None:
                    log.info("Ignoring source layer %s", name)
                    continue
                if len(group[name]) != len(layer.blobs):
                    raise LayerError(f"{path}: layer {name!r} has {len(group[name])} parameter "
                                     f"blobs in the file but {len(layer.blobs)} in the net")
                for j, blob in enumerate(layer.blobs):
                    values = np.asarray(group[name][str(j)])
                    if values.size != blob.count():
                        raise LayerError(f"{path}: layer {name!r} param {j}: the file has shape "
                                         f"{values.shape} but the net expects {blob.shape}")
                    blob.data[...] = values.reshape(blob.shape)
                copied += bool(layer.blobs)
        self._warn_if_nothing_matched(path, names, copied)
        return self

    def load_hdf5(self, path):
        """pycaffe's load_hdf5: weights from Caffe's HDF5 layout (data/<layer>/<index>)."""
        self._fold_stale = self.inference
        return self._copy_from_hdf5(os.fspath(path))

    def to_proto(self, write_diff=False):
        """A NetParameter with every layer's definition and its parameter blobs."""
        out = caffe_pb2.NetParameter(name=self.name)
        for layer in self.layers:
            lp = out.layer.add()
            if isinstance(layer.layer_param, caffe_pb2.LayerParameter):
                lp.CopyFrom(layer.layer_param)
            else:  # a fork's LayerParameter (proto.extend): same wire format
                lp.ParseFromString(layer.layer_param.SerializeToString())
            lp.ClearField("blobs")
            for blob in layer.blobs:
                blob.to_proto(write_diff, lp.blobs.add())
        return out

    def save(self, path, write_diff=False):
        """Write the weights as a binary .caffemodel (atomically), whatever the extension,
        as pycaffe's Net.save does; save_hdf5 writes HDF5."""
        write_binary(self.to_proto(write_diff), os.fspath(path))

    def save_hdf5(self, path, write_diff=False):
        from .proto_io import atomic_write
        atomic_write(path, self.hdf5_bytes(write_diff))

    def hdf5_bytes(self, write_diff=False):
        """The weights as the bytes of a Caffe HDF5 weights file (what save_hdf5 writes)."""
        try:
            import h5py
        except ImportError:
            raise ImportError("saving HDF5 weights needs h5py: pip install 'minicaffe[hdf5]'") from None
        import io
        buf = io.BytesIO()
        with h5py.File(buf, "w") as f:
            data = f.create_group("data")
            diff = f.create_group("diff") if write_diff else None
            for layer in self.layers:
                if not layer.blobs:
                    continue
                g = data.create_group(layer.name)
                for j, blob in enumerate(layer.blobs):
                    g.create_dataset(str(j), data=blob.data)
                    if diff is not None:
                        diff.require_group(layer.name).create_dataset(str(j), data=blob.diff)
        return buf.getvalue()

    def to_onnx(self, path, opset=None, batch=None):
        """Export this net to an ONNX model at `path` (needs the minicaffe[onnx] extra)."""
        from . import onnx as _onnx   # lazy: the core never needs onnx
        return _onnx.export(self, path, opset=opset or _onnx.DEFAULT_OPSET, batch=batch)

    def __repr__(self):
        return f"<Net {self.name!r} phase={'TRAIN' if self.phase == caffe_pb2.TRAIN else 'TEST'} " \
               f"layers={len(self.layers)}>"


def _joined(parts, total):
    """Per-batch arrays joined over the items (padding dropped); scalars (a loss) stacked."""
    return {name: np.concatenate(values)[:total] if values[0].ndim else np.stack(values)
            for name, values in parts.items()}


def _padded(values, batch):
    """`values` zero-padded along axis 0 to `batch` items."""
    if len(values) == batch:
        return values
    padding = np.zeros((batch - len(values),) + values.shape[1:], dtype=values.dtype)
    return np.concatenate([values, padding])


def _check_unique_param_layer_names(layers):
    """Weights are saved and loaded by layer name, so a name shared by two layers, one of them
    with parameters, would make the net's own snapshot load wrongly. Caffe lets parameterless
    layers share a name (BVLC's mnist_autoencoder has two losses named "loss"), so do we."""
    first = {}
    for i, layer in enumerate(layers):
        if layer.name in first:
            j, other = first[layer.name]
            if layer.blobs or other.blobs:
                raise LayerError(f"layer {j} ({other.type}) and layer {i} ({layer.type}) are both "
                                 f"named {layer.name!r}; a layer with parameters needs a unique "
                                 f"name (weights are saved and loaded by layer name)")
        else:
            first[layer.name] = (i, layer)


def _g(x):
    """A number as C++ streams print it (6 significant digits), as in Caffe's log lines."""
    return f"{float(x):g}"


def _mean_abs(values):
    """Caffe's asum / count in the blob's precision, printed like a C++ stream."""
    with np.errstate(all="ignore"):
        total = np.abs(values).sum(dtype=values.dtype) if values.size else values.dtype.type(0)
        return _g(values.dtype.type(total) / values.dtype.type(values.size))


def _count_non_finite(values):
    return values.size - int(np.count_nonzero(np.isfinite(values)))


def _values(bad, count):
    return f"{bad} non-finite value{'s' if bad != 1 else ''} (of {count})"


def _with_phase(layer_param, phase):
    lp = caffe_pb2.LayerParameter()
    lp.CopyFrom(layer_param)
    lp.phase = phase
    return lp


def _shapes_match(net_shape, file_shape):
    """Caffe's ShapeEquals: exact, or a legacy 4-d shape equal after padding with leading 1s."""
    if tuple(net_shape) == tuple(file_shape):
        return True
    if len(file_shape) == 4 and len(net_shape) <= 4:
        padded = (1,) * (4 - len(net_shape)) + tuple(net_shape)
        return padded == tuple(file_shape)
    return False


def read_net(path):
    """The NetParameter in a prototxt/YAML/binary file, upgraded (for tools)."""
    return read_net_param(path)


def load_blob_proto(path):
    """A numpy array from a .binaryproto BlobProto file (e.g. a mean file)."""
    proto = read_proto(path, caffe_pb2.BlobProto())
    blob = Blob(Blob.proto_shape(proto))
    return blob.from_proto(proto).data.copy()
