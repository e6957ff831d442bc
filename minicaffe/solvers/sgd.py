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

    def update_values(self, lr, diff, history, update, temp):
        (velocity,) = history
        velocity *= self.param.momentum
        diff *= lr                          # g is not needed after this: scale it in place
        velocity += diff
        np.copyto(diff, velocity)


@register_solver("Nesterov")
class NesterovSolver(Solver):
    """Nesterov momentum: V' <- m V + lr g, step (1 + m) V' - m V (step back, then over-step)."""

    def update_values(self, lr, diff, history, update, temp):
        (velocity,) = history
        m = self.param.momentum
        previous = update
        np.copyto(previous, velocity)
        velocity *= m
        diff *= lr
        velocity += diff
        np.multiply(velocity, self._scalar(1.0 + m), out=diff)
        previous *= m
        diff -= previous
