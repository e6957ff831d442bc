"""Recurrent layers: LSTMUnit (one LSTM step), RNN and LSTM (whole sequences).

Inputs are time-major: x is (T, N, ...) for T timesteps of N independent streams,
and cont (T, N) holds sequence-continuation indicators: cont[t, n] == 0 marks the
start of a new sequence in stream n, so the state carried into step t is treated
as zero (and no gradient flows back through it).

Caffe implements RNN and LSTM by unrolling them into an internal Net of
InnerProduct, Eltwise, Scale, TanH and LSTMUnit layers. Here the same computation
is written out directly: one matrix product for the inputs of all timesteps, then a
loop over time vectorized over the streams. The parameter blobs have the order,
shapes and fillers of Caffe's unrolled net, so Caffe .caffemodel weights load.
"""
import logging

import numpy as np

from ..blob import Blob
from ..fillers import fill
from ..layer import Layer, register_layer

__all__ = ["LSTMUnitLayer", "RNNLayer", "LSTMLayer"]

log = logging.getLogger(__name__)


def _sigmoid(x, out):
    """Logistic function via tanh, which cannot overflow for large |x|."""
    np.multiply(x, 0.5, out=out)
    np.tanh(out, out=out)
    out *= 0.5
    out += 0.5
    return out


def _abs_mean(a):
    return float(np.abs(a).mean()) if a.size else 0.0


# -- one LSTM step, shared by LSTMUnit and LSTM ------------------------------------
def lstm_activations(pre, acts, cont, dim):
    """Gate activations from pre-activations `pre` (..., 4*dim) in Caffe's order i, f, o, g.

    i, f, o are sigmoids and g is a tanh; the forget gate is multiplied by `cont`
    (shape (...)), which zeroes it where a new sequence starts. `acts` may be `pre`.
    """
    _sigmoid(pre[..., : 3 * dim], out=acts[..., : 3 * dim])
    np.tanh(pre[..., 3 * dim:], out=acts[..., 3 * dim:])
    acts[..., dim: 2 * dim] *= cont[..., None]
    return acts


def lstm_cell_forward(acts, c_prev, c, tanh_c, h):
    """c = f * c_prev + i * g and h = o * tanh(c), written into c, tanh_c and h."""
    dim = c.shape[-1]
    i, f, o, g = (acts[..., k * dim: (k + 1) * dim] for k in range(4))
    np.multiply(f, c_prev, out=c)
    c += i * g
    np.tanh(c, out=tanh_c)
    np.multiply(o, tanh_c, out=h)


def lstm_cell_backward(acts, c_prev, tanh_c, dc, dh, dc_prev=None, dpre=None):
    """Backward of one LSTM step with Caffe's formulas.

    dc, dh: gradients w.r.t. this step's c and h. Writes the gradient w.r.t. c_prev
    into `dc_prev` and w.r.t. the gate pre-activations into `dpre` (either may be
    None). The forget-gate term uses the cont-masked f, as Caffe does, which is the
    exact derivative for binary cont. `dc_prev` may alias `dc`.
    """
    dim = c_prev.shape[-1]
    i, f, o, g = (acts[..., k * dim: (k + 1) * dim] for k in range(4))
    # The cell gets gradient both directly and through h = o * tanh(c).
    c_term = 1 - tanh_c * tanh_c
    c_term *= o
    c_term *= dh
    c_term += dc
    if dpre is not None:
        di, df, do, dg = (dpre[..., k * dim: (k + 1) * dim] for k in range(4))
        np.multiply(c_term, g, out=di)
        di *= i * (1 - i)
        np.multiply(c_term, c_prev, out=df)
        df *= f * (1 - f)
        np.multiply(dh, tanh_c, out=do)
        do *= o * (1 - o)
        np.multiply(c_term, i, out=dg)
        dg *= 1 - g * g
    if dc_prev is not None:
        np.multiply(c_term, f, out=dc_prev)


@register_layer("LSTMUnit")
class LSTMUnitLayer(Layer):
    """One LSTM step: c = cont * f * c_prev + i * g, h = o * tanh(c).

    Bottoms: c_prev (1, N, D), gate inputs x (1, N, 4D) split as [i, f, o, g]
    (sigmoid, sigmoid, sigmoid, tanh), cont (1, N). Tops: c (1, N, D), h (1, N, D).
    """

    exact_num_bottom = 3
    exact_num_top = 2
    _acts = None  # gate activations from forward, reused by backward

    def allow_force_backward(self, bottom_index):
        return bottom_index != 2

    def reshape(self, bottom, top):
        c_prev, x, cont = bottom
        for k, (blob, axes) in enumerate(zip(bottom, (3, 3, 2))):
            if blob.num_axes != axes:
                raise self.error(f"bottom[{k}] must have {axes} axes, got shape {blob.shape}")
            if blob.shape[0] != 1:
                raise self.error(f"bottom[{k}] must hold a single timestep (first axis 1), "
                                 f"got shape {blob.shape}")
            if blob.shape[1] != c_prev.shape[1]:
                raise self.error(f"bottom[{k}] has {blob.shape[1]} streams (axis 1) but c_prev "
                                 f"has {c_prev.shape[1]}")
        self.hidden_dim = c_prev.shape[2]
        if x.shape[2] != 4 * self.hidden_dim:
            raise self.error(f"the gate input must have 4 * {self.hidden_dim} = "
                             f"{4 * self.hidden_dim} channels (axis 2), got {x.shape[2]}")
        top[0].reshape(c_prev.shape)
        top[1].reshape(c_prev.shape)
        if self._acts is None or self._acts.shape != x.shape:
            self._acts = np.empty(x.shape, dtype=x.dtype)
            self._tanh_c = np.empty(c_prev.shape, dtype=c_prev.dtype)

    def forward(self, bottom, top):
        c_prev, x, cont = (b.data for b in bottom)
        lstm_activations(x, self._acts, cont, self.hidden_dim)
        lstm_cell_forward(self._acts, c_prev, top[0].data, self._tanh_c, top[1].data)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[2]:
            raise self.error("cannot backpropagate to the sequence indicators (bottom[2])")
        if not (propagate_down[0] or propagate_down[1]):
            return
        # tanh(c) is recomputed from the top, as Caffe does; the gates come from forward.
        np.tanh(top[0].data, out=self._tanh_c)
        lstm_cell_backward(self._acts, bottom[0].data, self._tanh_c, top[0].diff, top[1].diff,
                           dc_prev=bottom[0].diff if propagate_down[0] else None,
                           dpre=bottom[1].diff if propagate_down[1] else None)


# -- whole sequences -------------------------------------------------------------
class RecurrentLayer(Layer):
    """Shared plumbing of RNN and LSTM (Caffe's RecurrentLayer).

    Bottoms: x (T, N, ...), cont (T, N), optional x_static (N, ...), then with
    `expose_hidden` the initial states (1, N, D) named in `state_names`.
    Tops: the output (T, N, D), then with `expose_hidden` the final states (1, N, D).
    Without `expose_hidden` the final states of one forward pass are the initial
    states of the next (zeros at first), so a long sequence may be fed in chunks.
    """

    state_names = ()          # recurrent states, e.g. ("h", "c")
    input_weight = None       # names of the parameters, set by the subclasses
    input_bias = None
    static_weight = None

    def __init__(self, layer_param=None, phase=None):
        super().__init__(layer_param, phase)
        exposed = len(self.state_names) if self.layer_param.recurrent_param.expose_hidden else 0
        self.min_num_bottom = 2 + exposed
        self.max_num_bottom = 3 + exposed
        self.exact_num_top = 1 + exposed
        self._state = None        # carried final states, one (N, D) array per state name
        self._allocated_n = None  # batch size the scratch buffers were made for

    def allow_force_backward(self, bottom_index):
        return bottom_index != 1

    # -- setup ---------------------------------------------------------------------
    def param_shapes(self):
        """[(name, shape, is_bias)] in the order of Caffe's unrolled net."""
        raise NotImplementedError

    def layer_setup(self, bottom, top):
        p = self.layer_param.recurrent_param
        if p.num_output <= 0:
            raise self.error("recurrent_param.num_output must be positive")
        self.num_output = p.num_output
        self.expose_hidden = p.expose_hidden
        self.debug_info = p.debug_info
        self._check_sequence_inputs(bottom)
        self.T, self.N = bottom[0].shape[:2]
        self.static_input = len(bottom) > 2 + (len(self.state_names) if self.expose_hidden else 0)
        if self.static_input:
            if bottom[2].num_axes < 1 or bottom[2].shape[0] != self.N:
                raise self.error(f"the static input bottom[2] must be (N, ...) with N = {self.N} "
                                 f"streams, got shape {bottom[2].shape}")
        self.input_dim = bottom[0].count(2)
        self.static_dim = bottom[2].count(1) if self.static_input else 0

        specs = self.param_shapes()
        self.param_names = [name for name, _, _ in specs]
        if self.blobs_loaded:
            if len(self.blobs) != len(specs):
                raise self.error(f"{len(self.blobs)} parameter blobs were given but this layer "
                                 f"has {len(specs)}: {', '.join(self.param_names)}")
            for k, (blob, (name, shape, _)) in enumerate(zip(self.blobs, specs)):
                if blob.count() != int(np.prod(shape)):
                    raise self.error(f"parameter {name} has shape {blob.shape}, expected {shape}")
                if blob.dtype != self.dtype:
                    converted = Blob(shape, dtype=self.dtype, name=blob.name)
                    converted.data[...] = blob.data.reshape(shape)
                    self.blobs[k] = converted
                else:
                    blob.reshape(shape)
        else:
            self.blobs = []
            for name, shape, is_bias in specs:
                filler = p.bias_filler if is_bias else p.weight_filler
                blob = Blob(shape, dtype=self.dtype, name=f"{self.name}.{name}")
                self.blobs.append(fill(blob, filler, f"layer {self.name!r} {name}"))

    def _check_sequence_inputs(self, bottom):
        x, cont = bottom[0], bottom[1]
        if x.num_axes < 2:
            raise self.error(f"bottom[0] must have at least 2 axes (timesteps, streams, ...), "
                             f"got shape {x.shape}")
        if cont.num_axes != 2 or cont.shape != x.shape[:2]:
            raise self.error(f"bottom[1] (cont) must have shape (timesteps, streams) = "
                             f"{x.shape[:2]}, got {cont.shape}")

    def param(self, name):
        return self.blobs[self.param_names.index(name)]

    def reshape(self, bottom, top):
        self._check_sequence_inputs(bottom)
        if bottom[0].shape[0] != self.T:
            raise self.error(f"the number of timesteps changed from {self.T} to "
                             f"{bottom[0].shape[0]}; a recurrent layer is unrolled for a fixed T")
        if bottom[0].count(2) != self.input_dim:
            raise self.error(f"input has {bottom[0].count(2)} features per step "
                             f"(shape {bottom[0].shape}) but the weights expect {self.input_dim}")
        old_n, self.N = self.N, bottom[0].shape[1]
        T, N, D = self.T, self.N, self.num_output
        if self.static_input and (bottom[2].shape[0] != N or bottom[2].count(1) != self.static_dim):
            raise self.error(f"the static input must have shape ({N}, {self.static_dim} features), "
                             f"got {bottom[2].shape}")
        state_shape = (1, N, D)
        first = 2 + self.static_input
        if self.expose_hidden:
            for k, name in enumerate(self.state_names):
                if bottom[first + k].shape != state_shape:
                    raise self.error(f"initial state {name}_0 (bottom[{first + k}]) must have shape "
                                     f"{state_shape}, got {bottom[first + k].shape}")
        # Carried state: Caffe keeps the leading streams when the batch shrinks (it
        # reuses its buffers) and starts from zeros when the batch grows.
        if self._state is None or (N > old_n):
            self._state = [np.zeros((N, D), dtype=self.dtype) for _ in self.state_names]
        elif N < old_n:
            self._state = [s[:N].copy() for s in self._state]
        top[0].reshape((T, N, D))
        for t in top[1:]:
            t.reshape(state_shape)
        if N != self._allocated_n:  # the Net reshapes before every forward
            self._allocate(T, N, D)
            self._allocated_n = N

    def reset(self):
        """Forget the carried hidden state (Caffe's RecurrentLayer::Reset)."""
        if self._state is not None:
            for s in self._state:
                s[...] = 0

    # -- shared pieces of forward/backward -------------------------------------------
    def _initial_states(self, bottom):
        if self.expose_hidden:
            first = 2 + self.static_input
            return [bottom[first + k].data.reshape(self.N, -1)
                    for k in range(len(self.state_names))]
        return self._state

    def _finish_forward(self, top, final_states):
        if self.expose_hidden:
            for t, s in zip(top[1:], final_states):
                t.data[...] = s.reshape(t.shape)
        else:
            for carried, s in zip(self._state, final_states):
                carried[...] = s

    def _project_inputs(self, bottom, out):
        """out (T, N, H) = W x_t + b (+ W_static x_static) for every t in one product."""
        T, N = self.T, self.N
        flat = out.reshape(T * N, -1)
        np.matmul(bottom[0].data.reshape(T * N, -1), self.param(self.input_weight).data.T, out=flat)
        flat += self.param(self.input_bias).data
        if self.static_input:
            out += bottom[2].data.reshape(N, -1) @ self.param(self.static_weight).data.T

    def _project_inputs_backward(self, bottom, propagate_down, dpre):
        """Gradients of _project_inputs, given dpre (T, N, H) w.r.t. its output."""
        T, N = self.T, self.N
        d_flat = dpre.reshape(T * N, -1)
        x_flat = bottom[0].data.reshape(T * N, -1)
        W = self.param(self.input_weight)
        b = self.param(self.input_bias)
        index = self.param_names.index
        if self.param_propagate_down[index(self.input_weight)]:
            W.diff[...] += d_flat.T @ x_flat
        if self.param_propagate_down[index(self.input_bias)]:
            b.diff[...] += d_flat.sum(axis=0)
        if propagate_down[0]:
            np.matmul(d_flat, W.data, out=bottom[0].diff.reshape(T * N, -1))
        if self.static_input:
            # The static term enters every timestep, so its gradient sums over time.
            d_static = dpre.sum(axis=0)
            xs = bottom[2].data.reshape(N, -1)
            Ws = self.param(self.static_weight)
            if self.param_propagate_down[index(self.static_weight)]:
                Ws.diff[...] += d_static.T @ xs
            if propagate_down[2]:
                np.matmul(d_static, Ws.data, out=bottom[2].diff.reshape(N, -1))

    def _check_backward(self, propagate_down, bottom):
        if propagate_down[1]:
            raise self.error("cannot backpropagate to the sequence indicators (bottom[1])")
        if self.expose_hidden:
            # Caffe shares only the data of the exposed states with the unrolled net, so
            # no gradient reaches h_0/c_0 (and the diffs of the final-state tops are unused).
            first = 2 + self.static_input
            for k in range(first, len(bottom)):
                if propagate_down[k]:
                    bottom[k].diff[...] = 0

    def _debug(self, direction, what, name, t, values):
        log.info("    [%s] Layer %s_%s_%d, %s blob %s_%d %s: %.6g", direction, self.name, name,
                 t + 1, "top" if direction == "Forward" else "bottom", what, t + 1,
                 "data" if direction == "Forward" else "diff", _abs_mean(values))


@register_layer("RNN")
class RNNLayer(RecurrentLayer):
    """Elman RNN: h_t = tanh(W_xh x_t + b_h + W_hh (cont_t h_{t-1}) [+ W_xh_static x_static]),
    o_t = tanh(W_ho h_t + b_o). Output o (T, N, D).

    Parameters (Caffe's order): W_xh (D, K), b_h (D,), [W_xh_static (D, K_static)],
    W_hh (D, D), W_ho (D, D), b_o (D,). With expose_hidden: bottom h_0, top h_T (1, N, D).
    """

    state_names = ("h",)
    input_weight, input_bias, static_weight = "W_xh", "b_h", "W_xh_static"

    def param_shapes(self):
        D = self.num_output
        specs = [("W_xh", (D, self.input_dim), False), ("b_h", (D,), True)]
        if self.static_input:
            specs.append(("W_xh_static", (D, self.static_dim), False))
        specs += [("W_hh", (D, D), False), ("W_ho", (D, D), False), ("b_o", (D,), True)]
        return specs

    def _allocate(self, T, N, D):
        dt = self.dtype
        self._pre = np.empty((T, N, D), dtype=dt)       # hidden pre-activations, then their diffs
        self._h = np.empty((T, N, D), dtype=dt)
        self._h_conted = np.empty((T, N, D), dtype=dt)  # cont_t * h_{t-1}
        self._o = np.empty((T, N, D), dtype=dt)         # own copy: the top may be changed in place
        self._scratch = np.empty((N, D), dtype=dt)

    def forward(self, bottom, top):
        cont = bottom[1].data
        W_hh = self.param("W_hh").data
        (h_prev,) = self._initial_states(bottom)
        self._project_inputs(bottom, self._pre)
        for t in range(self.T):
            np.multiply(h_prev, cont[t][:, None], out=self._h_conted[t])
            np.matmul(self._h_conted[t], W_hh.T, out=self._scratch)
            self._pre[t] += self._scratch
            np.tanh(self._pre[t], out=self._h[t])
            h_prev = self._h[t]
            if self.debug_info:
                self._debug("Forward", "h", "h_neuron", t, self._h[t])
        o = self._o.reshape(self.T * self.N, -1)
        np.matmul(self._h.reshape(self.T * self.N, -1), self.param("W_ho").data.T, out=o)
        o += self.param("b_o").data
        np.tanh(o, out=o)
        top[0].data[...] = self._o
        self._finish_forward(top, [self._h[-1]])

    def backward(self, top, propagate_down, bottom):
        self._check_backward(propagate_down, bottom)
        T, N = self.T, self.N
        cont = bottom[1].data
        W_hh = self.param("W_hh").data
        W_ho = self.param("W_ho")
        index = self.param_names.index
        # Output layer o = tanh(W_ho h + b_o).
        d_o = top[0].diff * (1 - self._o * self._o)
        d_o_flat = d_o.reshape(T * N, -1)
        h_flat = self._h.reshape(T * N, -1)
        if self.param_propagate_down[index("W_ho")]:
            W_ho.diff[...] += d_o_flat.T @ h_flat
        if self.param_propagate_down[index("b_o")]:
            self.param("b_o").diff[...] += d_o_flat.sum(axis=0)
        # dh collects the gradient of each h_t, then becomes that of its pre-activation.
        dh = self._pre
        np.matmul(d_o_flat, W_ho.data, out=dh.reshape(T * N, -1))
        for t in reversed(range(T)):
            if t + 1 < T:
                dh[t] += self._scratch
            dh[t] *= 1 - self._h[t] * self._h[t]
            if self.debug_info:
                self._debug("Backward", "h_neuron_input", "h_neuron", t, dh[t])
            if t > 0:
                # Back through h_conted_{t-1} = cont_t * h_{t-1}: a reset cuts the flow.
                np.matmul(dh[t], W_hh, out=self._scratch)
                self._scratch *= cont[t][:, None]
        if self.param_propagate_down[index("W_hh")]:
            self.param("W_hh").diff[...] += dh.reshape(T * N, -1).T @ self._h_conted.reshape(T * N, -1)
        self._project_inputs_backward(bottom, propagate_down, dh)


@register_layer("LSTM")
class LSTMLayer(RecurrentLayer):
    """LSTM: gates_t = W_xc x_t + b_c + W_hc (cont_t h_{t-1}) [+ W_xc_static x_static], then
    an LSTMUnit step gives c_t and h_t. Output h (T, N, D).

    Parameters (Caffe's order): W_xc (4D, K), b_c (4D,), [W_xc_static (4D, K_static)],
    W_hc (4D, D); gate order i, f, o, g. With expose_hidden: bottoms h_0, c_0 and tops
    h_T, c_T, each (1, N, D).
    """

    state_names = ("h", "c")
    input_weight, input_bias, static_weight = "W_xc", "b_c", "W_xc_static"

    def param_shapes(self):
        D = self.num_output
        specs = [("W_xc", (4 * D, self.input_dim), False), ("b_c", (4 * D,), True)]
        if self.static_input:
            specs.append(("W_xc_static", (4 * D, self.static_dim), False))
        specs.append(("W_hc", (4 * D, D), False))
        return specs

    def _allocate(self, T, N, D):
        dt = self.dtype
        self._gates = np.empty((T, N, 4 * D), dtype=dt)   # pre-activations, then activations
        self._dgates = np.empty((T, N, 4 * D), dtype=dt)
        self._c = np.empty((T, N, D), dtype=dt)
        self._tanh_c = np.empty((T, N, D), dtype=dt)
        self._h = np.empty((T, N, D), dtype=dt)           # own copy: the top may be changed in place
        self._h_conted = np.empty((T, N, D), dtype=dt)    # cont_t * h_{t-1}
        self._c0 = np.empty((N, D), dtype=dt)
        self._scratch = np.empty((N, 4 * D), dtype=dt)
        self._dh = np.empty((N, D), dtype=dt)
        self._dc = np.empty((N, D), dtype=dt)

    def forward(self, bottom, top):
        cont = bottom[1].data
        W_hc = self.param("W_hc").data
        h_prev, c_prev = self._initial_states(bottom)
        self._c0[...] = c_prev  # backward needs c_0 even after the carried state moves on
        c_prev = self._c0
        self._project_inputs(bottom, self._gates)
        D = self.num_output
        for t in range(self.T):
            np.multiply(h_prev, cont[t][:, None], out=self._h_conted[t])
            np.matmul(self._h_conted[t], W_hc.T, out=self._scratch)
            self._gates[t] += self._scratch
            lstm_activations(self._gates[t], self._gates[t], cont[t], D)
            lstm_cell_forward(self._gates[t], c_prev, self._c[t], self._tanh_c[t], self._h[t])
            h_prev, c_prev = self._h[t], self._c[t]
            if self.debug_info:
                self._debug("Forward", "c", "unit", t, self._c[t])
                self._debug("Forward", "h", "unit", t, self._h[t])
        top[0].data[...] = self._h
        self._finish_forward(top, [self._h[-1], self._c[-1]])

    def backward(self, top, propagate_down, bottom):
        self._check_backward(propagate_down, bottom)
        T, N = self.T, self.N
        cont = bottom[1].data
        W_hc = self.param("W_hc").data
        dh, dc = self._dh, self._dc
        # Nothing flows back into the final states: Caffe cannot backpropagate across batches.
        dc[...] = 0
        for t in reversed(range(T)):
            if t + 1 < T:
                dh += top[0].diff[t]
            else:
                dh[...] = top[0].diff[t]
            c_prev = self._c[t - 1] if t > 0 else self._c0
            lstm_cell_backward(self._gates[t], c_prev, self._tanh_c[t], dc, dh,
                               dc_prev=dc, dpre=self._dgates[t])
            if self.debug_info:
                self._debug("Backward", "gate_input", "unit", t, self._dgates[t])
            if t > 0:
                # Back through h_conted_{t-1} = cont_t * h_{t-1}: a reset cuts the flow.
                np.matmul(self._dgates[t], W_hc, out=dh)
                dh *= cont[t][:, None]
        if self.param_propagate_down[self.param_names.index("W_hc")]:
            self.param("W_hc").diff[...] += (self._dgates.reshape(T * N, -1).T
                                             @ self._h_conted.reshape(T * N, -1))
        self._project_inputs_backward(bottom, propagate_down, self._dgates)
