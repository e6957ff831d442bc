"""Turn Ctrl-C (SIGINT), SIGTERM and SIGHUP into solver actions, like Caffe's SignalHandler.

The handlers only set a flag; the solver asks `check()` between iterations (and
test batches), so training always stops or snapshots at a clean point. SIGTERM
(what schedulers and containers send) is handled like Ctrl-C. A second Ctrl-C or
SIGTERM before the first was acted on raises KeyboardInterrupt, as an escape
hatch from a long iteration.
"""
import signal
import threading

from .base import NONE, SOLVER_ACTIONS, STOP

__all__ = ["SignalHandler"]

_ESCAPABLE = ("SIGINT", "SIGTERM")


class SignalHandler:
    """`with SignalHandler(sigint_effect="stop", sighup_effect="snapshot") as h:
    solver.set_action_function(h.check)`; the previous handlers come back on exit.

    `stopped_by` names the signal whose "stop" effect ended training (else None).
    """

    def __init__(self, sigint_effect="stop", sighup_effect="snapshot", sigterm_effect="stop"):
        for name, effect in (("sigint_effect", sigint_effect), ("sighup_effect", sighup_effect),
                             ("sigterm_effect", sigterm_effect)):
            if effect not in SOLVER_ACTIONS:
                raise ValueError(f"invalid {name} {effect!r}; use one of {', '.join(SOLVER_ACTIONS)}")
        self.effects = {"SIGINT": sigint_effect, "SIGTERM": sigterm_effect, "SIGHUP": sighup_effect}
        self.pending = {name: False for name in self.effects}
        self.stopped_by = None
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if name in _ESCAPABLE and self.pending[name]:
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
        for name in ("SIGHUP", "SIGTERM", "SIGINT"):
            if self.pending[name]:
                self.pending[name] = False
                effect = self.effects[name]
                if effect == STOP and self.stopped_by is None:
                    self.stopped_by = name
                return effect
        return NONE

    def exit_status(self):
        """128 + the number of the signal that stopped training (130 for Ctrl-C, 143 for
        SIGTERM), the shell's convention for a run ended by a signal; 0 if none did."""
        if self.stopped_by is None:
            return 0
        return 128 + int(getattr(signal, self.stopped_by))
