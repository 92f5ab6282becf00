"""SIGTERM bookkeeping from the first line of a job: whether the process received it.

A job imports torch and Lightning before :func:`lws_lightning.jobs.run_job` can handle the
signal, which takes seconds. This module imports nothing heavy, so the command installs
:func:`remember` first, and ``run_job`` stops the job as soon as it starts.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

_received = threading.Event()


def remember() -> None:
    """Record SIGTERM instead of ending the process, until a job installs its own handler.

    Signal handlers can be set only in the main thread, so elsewhere this does nothing.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _record)


def _record(signum: int, frame: FrameType | None) -> None:
    mark_received()


def mark_received() -> None:
    """Record that SIGTERM arrived."""
    _received.set()


def received() -> bool:
    """Return whether SIGTERM arrived since the last :func:`clear`."""
    return _received.is_set()


def clear() -> None:
    """Forget a SIGTERM that has been acted on."""
    _received.clear()
