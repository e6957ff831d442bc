"""Momentum SGD and Nesterov's accelerated gradient, as in Caffe.

With g the regularized gradient, lr = rate * lr_mult and m = momentum:

    SGD:       V <- m V + lr g;            w <- w - V
    Nesterov:  V' <- m V + lr g;           w <- w - ((1 + m) V' - m V)

The learning rate lives inside the history V (Caffe's form), so changing the
rate mid-training rescales only the new gradient, not the accumulated velocity.
"""
import numpy as np

from .base import Solver, register_solver

__all__ = ["SGDSolver", "NesterovSolver"]


@register_solver("SGD")
class SGDSolver(Solver):
    """Stochastic gradient descent with momentum: V <- m V + lr g, w <- w - V."""

    def compute_update_value(self, param_id, rate):
        blob = self.net.learnable_params[param_id]
        lr = self.local_rate(param_id, rate)
        velocity = self.history[param_id].data
        scaled = self._temp[param_id]
        velocity *= self.param.momentum
        np.multiply(blob.diff, lr, out=scaled)
        velocity += scaled
        blob.diff[...] = velocity


@register_solver("Nesterov")
class NesterovSolver(Solver):
    """Nesterov momentum: V' <- m V + lr g, step (1 + m) V' - m V (step back, then over-step)."""

    def compute_update_value(self, param_id, rate):
        blob = self.net.learnable_params[param_id]
        lr = self.local_rate(param_id, rate)
        m = self.param.momentum
        velocity = self.history[param_id].data
        previous = self._update[param_id]
        previous[...] = velocity
        velocity *= m
        diff = blob.diff
        np.multiply(diff, lr, out=self._temp[param_id])
        velocity += self._temp[param_id]
        np.multiply(velocity, self._scalar(1.0 + m), out=diff)
        previous *= m
        diff -= previous
