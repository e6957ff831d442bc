"""Learning-rate schedules (`lr_policy` in the solver file), as in Caffe's SGDSolver.

With `it` the number of updates done so far:

    fixed      base_lr
    step       base_lr * gamma ^ floor(it / stepsize)
    exp        base_lr * gamma ^ it
    inv        base_lr * (1 + gamma * it) ^ (-power)
    multistep  base_lr * gamma ^ (number of stepvalue entries already reached)
    poly       base_lr * (1 - it / max_iter) ^ power
    sigmoid    base_lr / (1 + exp(-gamma * (it - stepsize)))

`multistep` is the one stateful policy: Caffe advances `current_step` by at
most one per call, and `current_step` is what a .solverstate stores.
"""
import math

__all__ = ["LR_POLICIES", "learning_rate", "check_lr_policy"]

LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


def check_lr_policy(param):
    """Raise ValueError for an lr_policy Caffe would reject (Caffe only finds out at iteration 0)."""
    policy = param.lr_policy
    if policy not in LR_POLICIES:
        what = f"unknown lr_policy {policy!r}" if policy else "lr_policy is not set"
        raise ValueError(f"{what}; use one of {', '.join(LR_POLICIES)}")
    if policy in ("step", "sigmoid") and param.stepsize <= 0:
        raise ValueError(f"lr_policy {policy!r} needs a positive stepsize, got {param.stepsize}")
    if policy in ("step", "exp", "inv", "multistep", "sigmoid") and param.gamma < 0:
        raise ValueError(f"lr_policy {policy!r} needs gamma >= 0, got {param.gamma}")
    if policy == "poly" and param.max_iter <= 0:
        raise ValueError("lr_policy 'poly' needs a positive max_iter")


def learning_rate(param, it, current_step=0):
    """(rate, new current_step) for iteration `it` under `param.lr_policy`."""
    policy = param.lr_policy
    base = param.base_lr
    if policy == "fixed":
        rate = base
    elif policy == "step":
        current_step = it // param.stepsize
        rate = base * param.gamma ** current_step
    elif policy == "exp":
        rate = base * param.gamma ** it
    elif policy == "inv":
        rate = base * (1.0 + param.gamma * it) ** (-param.power)
    elif policy == "multistep":
        if current_step < len(param.stepvalue) and it >= param.stepvalue[current_step]:
            current_step += 1
        rate = base * param.gamma ** current_step
    elif policy == "poly":
        left = 1.0 - it / param.max_iter
        # Past max_iter C's pow gives NaN for a fractional power; Python would give a complex.
        rate = base * left ** param.power if left >= 0 or param.power.is_integer() else math.nan
    elif policy == "sigmoid":
        rate = base / (1.0 + math.exp(-param.gamma * (it - param.stepsize)))
    else:
        check_lr_policy(param)  # raises with the list of known policies
        raise AssertionError("unreachable")
    return float(rate), current_step
