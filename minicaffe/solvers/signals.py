"""Turn Ctrl-C (SIGINT) and SIGHUP into solver actions, like Caffe's SignalHandler.

The handlers only set a flag; the solver asks `check()` between iterations (and
test batches), so training always stops or snapshots at a clean point. A second
Ctrl-C before the first was acted on raises KeyboardInterrupt, as an escape hatch
from a long iteration.
"""
import signal
import threading

from .base import NONE, SOLVER_ACTIONS

__all__ = ["SignalHandler"]


class SignalHandler:
    """`with SignalHandler(sigint_effect="stop", sighup_effect="snapshot") as h:
    solver.set_action_function(h.check)`; the previous handlers come back on exit."""

    def __init__(self, sigint_effect="stop", sighup_effect="snapshot"):
        for name, effect in (("sigint_effect", sigint_effect), ("sighup_effect", sighup_effect)):
            if effect not in SOLVER_ACTIONS:
                raise ValueError(f"invalid {name} {effect!r}; use one of {', '.join(SOLVER_ACTIONS)}")
        self.effects = {"SIGINT": sigint_effect, "SIGHUP": sighup_effect}
        self.pending = {"SIGINT": False, "SIGHUP": False}
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.pending[name]:
            raise KeyboardInterrupt
        self.pending[name] = True

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self   # signal handlers can only be set from the main thread
        for name in self.effects:
            signum = getattr(signal, name, None)
            if signum is not None:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False

    def check(self):
        """The action for the signal received since the last call (SIGHUP first), else "none"."""
        for name in ("SIGHUP", "SIGINT"):
            if self.pending[name]:
                self.pending[name] = False
                return self.effects[name]
        return NONE
