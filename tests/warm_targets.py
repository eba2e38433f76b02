"""Targets that tests/test_warm_child.py runs in a warm child (usercode.run(..., warm=KEY))."""
from __future__ import annotations

import os
import time


def pid() -> int:
    return os.getpid()


def until_cancelled(seconds: float) -> int:
    """Works in steps, checking for a cancel between them (as the query plan does per checkpoint)."""
    from diffin_core.errors import check_cancelled
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        check_cancelled()
        time.sleep(0.02)
    return os.getpid()


def ignores_cancel(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def refuse() -> None:
    from diffin_core.errors import DiffinError
    raise DiffinError("no such query")


def die() -> None:
    os._exit(3)
