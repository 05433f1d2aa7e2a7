"""Watching a sampler: the denoising trajectory as a terminal animation and as an HTML page.

A trajectory is int [S, L] for one sequence (row 0 = the start, row k = the state after step k), e.g.
`SampleOutput.trajectory[:, b]`; the HTML page takes several ([S, N, L], one section per sample). Masked
positions are greyed; tokens decoded since the previous row shown are highlighted. Only the rows where
something changed are shown, at most `max_rows` (first-hitting makes one row per token).

The terminal animation redraws one frame in place with `rich.live.Live` (it knows how many screen lines a
wrapped frame takes; a frame taller than the terminal is cropped), and is off when the stream is not a
terminal (a log file or CI gets no frames at all).
"""

from __future__ import annotations

import html
import sys
import time
from typing import Callable, Sequence

import numpy as np
from rich.console import Console
from rich.live import Live
from rich.text import Text

MASK_GLYPH = "\u2591"  # light shade: one per masked token


def _pieces(row: Sequence[int], token_text: Callable[[int], str], mask_id: int):
    return [None if int(t) == mask_id else token_text(int(t)) for t in row]


def changed_rows(trajectory) -> np.ndarray:
    """Indices of the rows of trajectory [S, ...] that differ from the previous one (row 0 always kept)."""
    traj = np.asarray(trajectory)
    keep = np.ones(len(traj), bool)
    keep[1:] = np.any((traj[1:] != traj[:-1]).reshape(len(traj) - 1, -1), axis=-1)
    return np.nonzero(keep)[0]


def shown_rows(trajectory, max_rows: int) -> np.ndarray:
    """The changed rows, thinned evenly to at most max_rows (the first and the last always kept)."""
    rows = changed_rows(trajectory)
    if len(rows) > max_rows:
        rows = rows[np.unique(np.linspace(0, len(rows) - 1, max_rows).round().astype(int))]
    return rows


def _html_rows(traj, token_text, mask_id, rows, nfe):
    out, prev = [], None
    for k in rows:
        row = traj[k]
        cells = []
        for i, piece in enumerate(_pieces(row, token_text, mask_id)):
            if piece is None:
                cells.append('<span class="m">&#9617;</span>')
            else:
                new = prev is not None and int(prev[i]) != int(row[i])
                cells.append(f'<span class="{"n" if new else "t"}">{html.escape(piece)}</span>')
        label = f"{k}" if nfe is None else f"{k} (nfe {nfe[k]})"
        out.append(f'<tr><td class="k">{label}</td><td class="s">{"".join(cells)}</td></tr>')
        prev = row
    return out


def trajectory_html(
    trajectory,
    token_text: Callable[[int], str],
    mask_id: int,
    *,
    title: str = "",
    labels: Sequence[str] | None = None,
    nfe: Sequence[int] | None = None,
    max_rows: int = 64,
) -> str:
    """A standalone HTML page: for each sample, one row per step where something changed (at most
    max_rows of them), masked positions grey, tokens decoded since the previous row highlighted.

    trajectory: int [S, L] (one sample) or [S, N, L] (N samples); labels: one heading per sample;
    nfe: [S] network calls made by each row (optional)."""
    traj = np.asarray(trajectory)
    if traj.ndim == 2:
        traj = traj[:, None]
    steps, num = traj.shape[0] - 1, traj.shape[1]
    sections = []
    for b in range(num):
        rows = shown_rows(traj[:, b], max_rows)
        heading = labels[b] if labels is not None else f"sample {b}"
        changed = len(changed_rows(traj[:, b])) - 1
        note = f"{changed} of {steps} steps changed a token" + (
            f"; {len(rows) - 1} of them shown" if len(rows) - 1 < changed else ""
        )
        sections.append(
            f'<h4>{html.escape(heading)}</h4><p class="note">{note}</p>\n<table>\n'
            + "\n".join(_html_rows(traj[:, b], token_text, mask_id, rows, nfe))
            + "\n</table>"
        )
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
td.k {{ color: #888; padding-right: 1em; vertical-align: top; font-size: 80%; white-space: nowrap; }}
td.s {{ font-family: monospace; white-space: pre-wrap; }}
p.note {{ color: #666; font-size: 85%; }}
span.m {{ color: #bbb; background: #eee; }}
span.n {{ background: #ffe08a; }}
</style></head><body>
<h3>{html.escape(title)}</h3>
<p>{num} sample(s); row k = the state after step k (row 0 = the start), only rows where a token changed;
grey = masked, yellow = decoded since the row above.</p>
{chr(10).join(sections)}
</body></html>
"""


def terminal_frame(row, token_text: Callable[[int], str], mask_id: int, prev=None) -> Text:
    """One frame as rich Text: masked positions dim, tokens changed since `prev` highlighted (no markup is
    parsed from the tokens' text)."""
    out = Text()
    for i, piece in enumerate(_pieces(row, token_text, mask_id)):
        if piece is None:
            out.append(MASK_GLYPH, style="bright_black")
        elif prev is not None and int(prev[i]) != int(row[i]):
            out.append(piece, style="bold yellow")
        else:
            out.append(piece)
    return out


def animate_terminal(
    trajectory,
    token_text: Callable[[int], str],
    mask_id: int,
    *,
    stream=None,
    delay: float = 0.03,
    max_frames: int = 100,
    console: Console | None = None,
) -> int:
    """Plays trajectory [S, L] in the terminal as one frame redrawn in place (the changed rows, thinned to
    at most max_frames). Does nothing when the stream (default stdout) is not a terminal. Returns the
    number of frames drawn."""
    stream = stream or sys.stdout
    if console is None:
        if not (hasattr(stream, "isatty") and stream.isatty()):
            return 0
        console = Console(file=stream, highlight=False)
    traj = np.asarray(trajectory)
    rows = shown_rows(traj, max_frames)
    with Live(console=console, auto_refresh=False, vertical_overflow="crop", transient=False) as live:
        prev = None
        for n, k in enumerate(rows):
            frame = Text(f"step {k}/{len(traj) - 1}  ", style="bright_black")
            frame.append_text(terminal_frame(traj[k], token_text, mask_id, prev))
            live.update(frame, refresh=True)
            prev = traj[k]
            if n + 1 < len(rows):
                time.sleep(delay)
    return len(rows)
