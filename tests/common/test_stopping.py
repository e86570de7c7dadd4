"""common/stopping.py: a stop signal whose exception Python drops is raised again by the waiting loop.

Python runs a signal handler at the next bytecode boundary of the main thread. If that is
inside a ``__del__`` (or the logging module's after-fork hook while ``subprocess`` starts a
child), the handler's exception is printed and dropped, and a command that relied on it
alone would keep running after SIGTERM.
"""

from __future__ import annotations

import os
import signal

import pytest

from common.stopping import Terminated, raise_if_stop_pending, stop_signals_raise
from conftest import lose_signal


@pytest.fixture
def ctrl_c_default():
    """Ctrl-C with Python's own handler, as in a terminal (a background job starts with it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_dropped_stop_signal_is_raised_by_the_next_check(sig: int) -> None:
    with stop_signals_raise():
        lose_signal(sig)  # returns normally: the Terminated raised in __del__ was dropped
        with pytest.raises(Terminated) as caught:
            raise_if_stop_pending()
        assert caught.value.signum == sig
        raise_if_stop_pending()  # raised once, then cleared


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_dropped_ctrl_c_is_raised_as_keyboard_interrupt(ctrl_c_default: None) -> None:
    with stop_signals_raise():
        lose_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt) as caught:
            raise_if_stop_pending()
        assert not isinstance(caught.value, Terminated)


def test_nothing_pending_raises_nothing_and_leaving_the_block_forgets() -> None:
    raise_if_stop_pending()
    before, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(Terminated):
        with stop_signals_raise():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10_000):  # delivered here, raised normally, and unwinds the block
                pass
    raise_if_stop_pending()  # the block's exit cleared the record
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal.getsignal(signal.SIGINT) is before_int


def test_ctrl_c_is_recorded_only_inside_the_block(ctrl_c_default: None) -> None:
    with stop_signals_raise():
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_ctrl_c_stays_ignored() -> None:
    """A job started in the background ignores SIGINT; the block must not turn Ctrl-C back on."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop_signals_raise():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
