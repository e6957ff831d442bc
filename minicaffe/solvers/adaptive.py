"""Solvers with per-weight step sizes: AdaGrad, RMSProp, AdaDelta, Adam (Caffe's equations).

g is the regularized gradient, lr = rate * lr_mult, all operations elementwise:

    AdaGrad:   H <- H + g^2;                        step = lr g / (sqrt(H) + delta)
    RMSProp:   H <- d H + (1 - d) g^2   (d=rms_decay); step = lr g / (sqrt(H) + delta)
    AdaDelta:  H <- m H + (1 - m) g^2;  u = g sqrt((U + delta) / (H + delta));
               U <- m U + (1 - m) u^2;              step = lr u
    Adam:      M <- b1 M + (1 - b1) g;  V <- b2 V + (1 - b2) g^2   (b1=momentum, b2=momentum2)
               step = lr sqrt(1 - b2^t) / (1 - b1^t) * M / (sqrt(V) + delta),  t = iter + 1

AdaDelta's U and Adam's V are the second half of `history` (Caffe's layout).
"""
import math

import numpy as np

from .base import Solver, SolverError, register_solver

__all__ = ["AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver", "AdamSolver"]


def _scale_by_rms(grad, acc, delta, out):
    """out = grad / (sqrt(acc) + delta)."""
    np.sqrt(acc, out=out)
    out += delta
    np.divide(grad, out, out=out)


def _running_mean(acc, value, decay, scratch):
    """acc <- decay * acc + (1 - decay) * value (value may be `scratch`)."""
    acc *= decay
    np.multiply(value, 1.0 - decay, out=scratch)
    acc += scratch


@register_solver("AdaGrad")
class AdaGradSolver(Solver):
    """AdaGrad: each weight's step shrinks with the sum of its squared gradients."""

    def check_param(self):
        super().check_param()
        if self.param.momentum != 0:
            raise SolverError(self._where("momentum cannot be used with AdaGrad; remove it"))

    def update_values(self, lr, diff, history, update, temp):
        (acc,) = history
        np.square(diff, out=update)
        acc += update
        _scale_by_rms(diff, acc, self.param.delta, update)
        np.multiply(update, lr, out=diff)


@register_solver("RMSProp")
class RMSPropSolver(Solver):
    """RMSProp: the step divides by a running RMS of recent gradients (decay rms_decay)."""

    def check_param(self):
        super().check_param()
        if self.param.momentum != 0:
            raise SolverError(self._where("momentum cannot be used with RMSProp; remove it"))
        if not 0 <= self.param.rms_decay < 1:
            raise SolverError(self._where(f"rms_decay must lie in [0, 1), got {self.param.rms_decay}"))

    def update_values(self, lr, diff, history, update, temp):
        (acc,) = history
        np.square(diff, out=update)
        _running_mean(acc, update, self.param.rms_decay, update)
        _scale_by_rms(diff, acc, self.param.delta, update)
        np.multiply(update, lr, out=diff)


@register_solver("AdaDelta")
class AdaDeltaSolver(Solver):
    """AdaDelta: step = g * RMS(past steps) / RMS(past gradients), times the learning rate."""

    history_per_param = 2

    def update_values(self, lr, diff, history, update, temp):
        grad_acc, step_acc = history
        m = self.param.momentum
        delta = self.param.delta
        np.square(diff, out=update)
        _running_mean(grad_acc, update, m, update)
        np.add(step_acc, delta, out=update)
        np.add(grad_acc, delta, out=temp)
        np.divide(update, temp, out=update)
        np.sqrt(update, out=update)
        diff *= update                      # the step before the learning rate
        np.square(diff, out=update)
        _running_mean(step_acc, update, m, update)
        diff *= lr


@register_solver("Adam")
class AdamSolver(Solver):
    """Adam: bias-corrected running means of the gradient (momentum) and its square (momentum2)."""

    history_per_param = 2

    def update_values(self, lr, diff, history, update, temp):
        mean, sq_mean = history
        b1, b2 = self.param.momentum, self.param.momentum2
        t = self.iter + 1
        correction = self._scalar(math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t))
        _running_mean(mean, diff, b1, temp)
        np.square(diff, out=temp)
        _running_mean(sq_mean, temp, b2, temp)
        _scale_by_rms(mean, sq_mean, self.param.delta, temp)
        np.multiply(temp, self._scalar(lr * correction), out=diff)
