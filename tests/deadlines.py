"""Deadlines of the tests, scaled to the machine's load: a test's outcome must not depend on how busy a shared
machine is, only on what the code does.

    SCALE            >= 1: $DDLM_TEST_TIME_SCALE if set, else the 1-minute load average per core when the
                     session starts (at least 1, at most 8): at load 10 on 2 cores every deadline is 5x
    scaled(seconds)  a deadline (a subprocess's timeout, a wait loop's limit) times SCALE

tests/conftest.py multiplies every test's pytest-timeout (the ini's 300 s or its own marker) by SCALE, and the
tests that start jobs pass their waits through scaled(). A bound that is part of what a test asserts (a dead
process must end the other within the heartbeat timeout + slack) scales its slack only.
"""

from __future__ import annotations

import os

MAX_AUTO_SCALE = 8.0


def _scale() -> float:
    text = os.environ.get("DDLM_TEST_TIME_SCALE")
    if text:
        try:
            value = float(text)
        except ValueError:
            raise SystemExit(f"DDLM_TEST_TIME_SCALE={text!r}: expected a number >= 1") from None
        if not value >= 1:
            raise SystemExit(f"DDLM_TEST_TIME_SCALE={text!r}: expected a number >= 1")
        return value
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        return 1.0
    return min(MAX_AUTO_SCALE, max(1.0, load))


SCALE = _scale()


def scaled(seconds: float) -> float:
    return seconds * SCALE
