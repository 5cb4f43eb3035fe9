"""SIGINT/SIGTERM handlers held for the length of a long job that stops cleanly."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_signals_to(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """Route SIGINT and SIGTERM to ``handler`` inside the block, then restore the previous handlers.

    Python installs signal handlers only on the main thread; elsewhere the block runs with the
    process's handlers unchanged.
    """
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, handler_before in previous.items():
            signal.signal(signum, handler_before)
