"""The one-line config checks that validation, the RL mode and LoRA share (no imports of theirs: no cycle).

    require(ok, field, expected, value)   ConfigError 'config.<field> must be <expected>, got <value>' unless ok
    is_int(x)                             an int and not a bool
    finite(x)                             a finite number (not a bool)
"""

from __future__ import annotations

import math

from ddlm.sharding import ConfigError


def require(ok: bool, field: str, expected: str, value) -> None:
    """Raises ConfigError 'config.<field> must be <expected>, got <value>' unless `ok`."""
    if not ok:
        raise ConfigError(f"config.{field} must be {expected}, got {value!r}")


def finite(x) -> bool:
    if isinstance(x, bool):
        return False
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
