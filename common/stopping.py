"""Stop signals and parent death for the commands that start processes (simulate, coordinator, hospital).

- :func:`stop_signals_raise`: inside the block SIGTERM and SIGHUP unwind the main thread
  like Ctrl-C (raising :class:`Terminated`, a ``KeyboardInterrupt``), so every
  ``finally`` that stops children runs whichever of the three signals arrives.

  Python runs a signal handler at the next bytecode boundary of the main thread, and that
  may be inside code whose exceptions Python only prints: a ``__del__``, a weakref
  callback, or the logging module's after-fork hook while ``subprocess`` starts a child.
  There the exception is lost and the stop with it. So every signal is also *recorded*,
  and loops that wait call :func:`raise_if_stop_pending`, which raises it again.
- :func:`die_with_parent`: a ``preexec_fn`` asking Linux to send the child SIGTERM when
  this process dies, even by SIGKILL (``PR_SET_PDEATHSIG``), when no ``finally`` can run.
- :func:`uninterruptible`: ignore the stop signals while children are being stopped.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType

__all__ = ["STOP_SIGNALS", "Terminated", "die_with_parent", "raise_if_stop_pending", "stop_signals_raise",
           "uninterruptible"]

# Signals that stop `fedclimb` cleanly (SIGINT raises KeyboardInterrupt already).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# Signals that arrived inside stop_signals_raise() and were not yet seen to unwind.
_pending: list[int] = []


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived; unwinds like Ctrl-C so that every cleanup runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def _raise_terminated(signum: int, _frame: FrameType | None) -> None:
    _pending.append(signum)
    raise Terminated(signum)


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    _pending.append(signum)
    raise KeyboardInterrupt


def raise_if_stop_pending() -> None:
    """Raise the stop signal that arrived in the block but was lost on the way (see the module doc).

    A no-op when none arrived. Call it from loops that wait, inside :func:`stop_signals_raise`.
    """
    if not _pending:
        return
    signum = _pending[0]
    _pending.clear()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Inside the block, SIGTERM and SIGHUP raise :class:`Terminated` in the main thread.

    Ctrl-C still raises ``KeyboardInterrupt`` (where it did before). Every one of them is
    also recorded for :func:`raise_if_stop_pending`. Outside the main thread (where Python
    cannot set handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _pending.clear()
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in STOP_SIGNALS}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _raise_interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _pending.clear()


@contextlib.contextmanager
def uninterruptible() -> Iterator[None]:
    """Ignore Ctrl-C, SIGTERM and SIGHUP while stopping children (a second one must not cut it short)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, *STOP_SIGNALS)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn``: the child gets SIGTERM when this thread's process dies (Linux).

    The kernel sends it when the *thread* that started the child exits, so start children
    from the thread that outlives them (the main thread). None on other systems.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec
