"""stop_signals_to: handlers held for a block, restored after; a no-op off the main thread."""

from __future__ import annotations

import signal
import threading

from lptfl.sim.stop_signals import STOP_SIGNALS, stop_signals_to


def _handler(signum, frame) -> None:
    raise AssertionError("not called")


def test_handlers_are_held_inside_the_block_and_restored_after_it_even_on_error():
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        with stop_signals_to(_handler):
            assert all(signal.getsignal(signum) is _handler for signum in STOP_SIGNALS)
            raise RuntimeError("leave the block")
    except RuntimeError:
        pass
    assert {signum: signal.getsignal(signum) for signum in STOP_SIGNALS} == before


def test_off_the_main_thread_the_block_runs_with_the_handlers_unchanged():
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    seen: list[dict] = []

    def body() -> None:
        with stop_signals_to(_handler):
            seen.append({signum: signal.getsignal(signum) for signum in STOP_SIGNALS})

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [before]
