"""Watching a sampler: the denoising trajectory as a terminal animation and as an HTML table.

A trajectory is int [S, L] (one sequence; row 0 = the start, row k = the state after step k), e.g.
`SampleOutput.trajectory[:, b]`. Masked positions are greyed; tokens decoded at a step are highlighted.
"""

from __future__ import annotations

import html
import sys
import time
from typing import Callable, Sequence

import numpy as np

MASK_GLYPH = "\u2591"  # light shade: one per masked token


def _pieces(row: Sequence[int], token_text: Callable[[int], str], mask_id: int):
    return [None if int(t) == mask_id else token_text(int(t)) for t in row]


def changed_rows(trajectory) -> np.ndarray:
    """Indices of the rows that differ from the previous one (row 0 always kept)."""
    traj = np.asarray(trajectory)
    keep = np.ones(len(traj), bool)
    keep[1:] = np.any(traj[1:] != traj[:-1], axis=-1)
    return np.nonzero(keep)[0]


def trajectory_html(
    trajectory,
    token_text: Callable[[int], str],
    mask_id: int,
    *,
    title: str = "",
    nfe: Sequence[int] | None = None,
) -> str:
    """A standalone HTML page: one row per step, masked positions grey, newly decoded tokens highlighted."""
    traj = np.asarray(trajectory)
    rows = []
    prev = None
    for k, row in enumerate(traj):
        cells = []
        for i, piece in enumerate(_pieces(row, token_text, mask_id)):
            if piece is None:
                cells.append('<span class="m">&#9617;</span>')
            else:
                new = prev is not None and int(prev[i]) != int(row[i])
                cells.append(f'<span class="{"n" if new else "t"}">{html.escape(piece)}</span>')
        label = f"{k}" if nfe is None else f"{k} (nfe {nfe[k]})"
        rows.append(f'<tr><td class="k">{label}</td><td class="s">{"".join(cells)}</td></tr>')
        prev = row
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; }}
table {{ border-collapse: collapse; }}
td.k {{ color: #888; padding-right: 1em; vertical-align: top; font-size: 80%; white-space: nowrap; }}
td.s {{ font-family: monospace; white-space: pre-wrap; }}
span.m {{ color: #bbb; background: #eee; }}
span.n {{ background: #ffe08a; }}
</style></head><body>
<h3>{html.escape(title)}</h3>
<p>{len(traj)} rows (row 0 = start, row k = after step k); grey = masked, yellow = decoded at this step.</p>
<table>
{chr(10).join(rows)}
</table></body></html>
"""


def terminal_frame(row, token_text: Callable[[int], str], mask_id: int, color: bool = True) -> str:
    out = []
    for piece in _pieces(row, token_text, mask_id):
        if piece is None:
            out.append(f"\x1b[90m{MASK_GLYPH}\x1b[0m" if color else MASK_GLYPH)
        else:
            out.append(piece)
    return "".join(out)


def animate_terminal(
    trajectory,
    token_text: Callable[[int], str],
    mask_id: int,
    *,
    stream=None,
    delay: float = 0.05,
    max_frames: int = 200,
) -> int:
    """Plays the trajectory in the terminal (only the rows where something changed, at most max_frames).
    On a TTY each frame redraws the previous one; otherwise frames are printed one after another.
    Returns the number of frames shown."""
    stream = stream or sys.stdout
    traj = np.asarray(trajectory)
    rows = changed_rows(traj)
    if len(rows) > max_frames:
        rows = rows[np.linspace(0, len(rows) - 1, max_frames).round().astype(int)]
    tty = hasattr(stream, "isatty") and stream.isatty()
    prev_lines = 0
    for n, k in enumerate(rows):
        frame = f"step {k:>5}/{len(traj) - 1}  " + terminal_frame(traj[k], token_text, mask_id, color=tty)
        if tty and prev_lines:
            stream.write(f"\x1b[{prev_lines}F\x1b[J")  # back to the frame's first line, clear below
        stream.write(frame + "\n")
        stream.flush()
        prev_lines = frame.count("\n") + 1
        if tty and n + 1 < len(rows):
            time.sleep(delay)
    return len(rows)
