"""Load on the server: the official `openai` client against live `python -m ddlm.serve` servers on localhost,
1, 4, 16 and 64 concurrent clients, for the AR baseline and two diffusion decoders.

    python benchmarks/serve_load.py --workdir=runs/quickstart --ar_workdir=runs/quickstart_ar
    python benchmarks/serve_load.py --workdir=runs/quickstart --ar_workdir=runs/quickstart_ar --clients=1,4 \
        --requests_per_client=1 --decoders=ar                      # a quick look

Each decoder gets its own server (a subprocess, default flags: batch sizes 1/4/16, its sampler compiled at
start-up; one uncounted request first). At each concurrency c, c clients each send --requests_per_client streamed
completions one after the other (prompt 'ROMEO:', the whole canvas generated, seed per request), and stop
starting new ones after --max_seconds (--no_stream: whole answers, to see what streaming costs). Reported per (decoder, c): requests/s and output tokens/s over the
level's wall time, time to first token (the first text chunk: block by block for the parallel decoder, token
by token for AR, only at the end for ancestral, whose first position is rarely the first decoded), latency
p50 / p99, and the mean rows per batch the server ran (its /metrics). Errors (503, timeouts) are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import re
import subprocess
import sys
import threading
import time

import numpy as np

DECODERS = {  # label -> (which workdir, --sampler)
    "ar": ("ar_workdir", "ar"),
    "ancestral": ("workdir", "ancestral:steps=128"),
    "parallel": ("workdir", "parallel:block_length=32:rule=threshold:threshold=0.9"),
}
LABELS = {
    "ar": "AR, KV cache",
    "ancestral": "ancestral, 128 steps",
    "parallel": "parallel, threshold 0.9, blocks of 32",
}


def start_server(workdir: str, sampler: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """A `python -m ddlm.serve` subprocess on a free port, once it listens: (process, base url)."""
    cmd = [
        sys.executable,
        "-m",
        "ddlm.serve",
        f"--workdir={workdir}",
        "--port=0",
        f"--sampler={sampler}",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print("  " + line.rstrip(), flush=True)
        match = re.search(r"listening on (http://\S+?)/ ", line)
        if match:
            # Keep reading its output (shown indented), so that a full pipe never blocks the server.
            threading.Thread(
                target=lambda: [print("  " + x.rstrip(), flush=True) for x in proc.stdout], daemon=True
            ).start()
            return proc, match.group(1)
    raise RuntimeError(f"the server did not start: {' '.join(cmd)} exited with {proc.wait()}")


async def one_request(client, model: str, prompt: str, seed: int, stream: bool = True) -> dict:
    t0 = time.perf_counter()
    if not stream:  # the whole answer at once (no host callbacks in the compiled loop, no chunks)
        r = await client.completions.create(model=model, prompt=prompt, seed=seed)
        end = time.perf_counter() - t0
        return {"ttft": end, "latency": end, "tokens": r.usage.completion_tokens}
    first, tokens = None, 0
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        seed=seed,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if first is None and any(c.text for c in chunk.choices):
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter() - t0
    return {"ttft": first if first is not None else end, "latency": end, "tokens": tokens}


async def level(
    url: str, model: str, clients: int, per_client: int, max_seconds: float, stream: bool
) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
    results, errors = [], []
    t0 = time.perf_counter()

    async def worker(i):
        for k in range(per_client):
            if time.perf_counter() - t0 > max_seconds:
                return
            try:
                results.append(await one_request(client, model, "ROMEO:", seed=1000 * i + k, stream=stream))
            except Exception as e:  # noqa: BLE001 -- counted and shown
                errors.append(f"{type(e).__name__}: {e}")

    await asyncio.gather(*(worker(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    return {"results": results, "errors": errors, "wall": wall}


def metrics(url: str) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=60) as r:
        return json.loads(r.read())


def mean_rows(before: dict, after: dict) -> float:
    rows = {
        int(k): after["batch_rows"].get(k, 0) - before["batch_rows"].get(k, 0) for k in after["batch_rows"]
    }
    batches = sum(rows.values())
    return sum(k * v for k, v in rows.items()) / batches if batches else float("nan")


def row(label: str, clients: int, out: dict, rows: float) -> str:
    r = out["results"]
    if not r:
        return f"| {label} | {clients} | 0 | - | - | - | - | - | {len(out['errors'])} |"
    latency = np.array([x["latency"] for x in r])
    ttft = np.array([x["ttft"] for x in r])
    tokens = sum(x["tokens"] for x in r)
    return (
        f"| {label} | {clients} | {len(r)} | {len(r) / out['wall']:.2f} | {tokens / out['wall']:,.0f} | "
        f"{np.percentile(ttft, 50):.2f} | {np.percentile(latency, 50):.2f} / {np.percentile(latency, 99):.2f} | "
        f"{rows:.1f} | {len(out['errors'])} |"
    )


def header() -> str:
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True
    ).stdout.strip()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{datetime.date.today()}, revision {rev}, {platform.node()}, {os.cpu_count()} CPUs, "
        f"load average {load} (1/5/15 min) at the start"
    )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="runs/quickstart", help="the diffusion model's workdir")
    parser.add_argument("--ar_workdir", default="runs/quickstart_ar", help="the AR baseline's workdir")
    parser.add_argument("--decoders", default="ar,ancestral,parallel", help=f"some of {list(DECODERS)}")
    parser.add_argument("--clients", default="1,4,16,64", help="concurrency levels")
    parser.add_argument("--requests_per_client", type=int, default=2)
    parser.add_argument("--max_seconds", type=float, default=300.0, help="per level: no new request after it")
    parser.add_argument("--no_stream", action="store_true", help="whole answers: TTFT = latency")
    parser.add_argument(
        "--server_flags", default="", help="more flags for python -m ddlm.serve (space-separated)"
    )
    args = parser.parse_args()
    decoders = [d for d in args.decoders.split(",") if d]
    for d in decoders:
        if d not in DECODERS:
            parser.error(f"--decoders: unknown {d!r}; expected some of {list(DECODERS)}")
    clients = [int(c) for c in args.clients.split(",")]
    extra = ["--max_queue=256", *args.server_flags.split()]
    print(header(), flush=True)
    lines = [
        (
            "| decoder | clients | requests | requests/s | output tokens/s | TTFT p50 (s) | latency p50 / p99 (s) "
            "| rows per batch | errors |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in decoders:
        which, sampler = DECODERS[d]
        workdir = getattr(args, which)
        proc, url = start_server(workdir, sampler, extra)
        model = os.path.basename(os.path.abspath(workdir))
        try:
            asyncio.run(level(url, model, 1, 1, args.max_seconds, True))  # a first request, not counted
            for c in clients:
                before = metrics(url)
                stream = not args.no_stream
                out = asyncio.run(level(url, model, c, args.requests_per_client, args.max_seconds, stream))
                label = LABELS[d] + ("" if stream else " (not streamed)")
                lines.append(row(label, c, out, mean_rows(before, metrics(url))))
                print(lines[-1], flush=True)
                for e in sorted(set(out["errors"]))[:3]:
                    print(f"    error: {e}", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    print()
    print(header())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
