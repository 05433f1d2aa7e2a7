"""The first words of every benchmark's header: when, which code, on what, how loaded.

    machine.describe()  -> '2026-12-07, revision 9c0f403, cpu (cpu, 1 device(s)), vm, 2 CPUs, load 1.4 1.7 2.9'

A figure without its device, revision and load cannot be compared with another; the scripts in benchmarks/ import
this (they run as `python benchmarks/<script>.py`, which puts this folder on the path).
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

import jax


def revision() -> str:
    """The checkout's short commit hash ('?' outside git)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def describe() -> str:
    device = jax.devices()[0]
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{datetime.date.today()}, revision {revision()}, {device.platform} ({device.device_kind}, "
        f"{jax.device_count()} device(s)), {platform.node()}, {os.cpu_count()} CPUs, load {load}"
    )
