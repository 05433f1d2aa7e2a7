"""`python -m ddlm.serve --workdir=runs/quickstart`: serves a checkpoint over HTTP (ddlm/serve/__init__.py).

    python -m ddlm.serve --workdir=runs/quickstart [--port=8000] [--host=127.0.0.1]
        [--sampler=parallel:block_length=32:rule=threshold] [--api_key=...] [--batch_sizes=1,4,16]

Every flag mistake (a missing workdir, a busy port, a bad sampler spec) is one line before anything loads.
"""

from __future__ import annotations

import functools
import os
import socket
import sys

from absl import app, flags

from ddlm import command

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir whose newest checkpoint is served.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (127.0.0.1: this machine only).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on (0: a free one, printed).")
_SAMPLER = flags.DEFINE_string(
    "sampler",
    "",
    "Default sampler, name[:field=value...] of config.sampler fields (e.g. parallel:block_length=32:"
    "rule=threshold:threshold=0.9); '' = the checkpoint config's. Requests may override some fields (ddlm).",
)
_MODEL_NAME = flags.DEFINE_string(
    "model_name", "", "The model's name in the API; '' = the workdir's folder name."
)
_API_KEY = flags.DEFINE_string(
    "api_key", None, "Requests must send 'Authorization: Bearer <key>'; default $DDLM_API_KEY ('' = no key)."
)
_BATCH_SIZES = flags.DEFINE_list(
    "batch_sizes", ["1", "4", "16"], "Compiled batch sizes (rows are padded up)."
)
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 64, "Requests that may wait; more are refused with 503.")
_MAX_WAIT_MS = flags.DEFINE_float("max_wait_ms", 10.0, "How long a batch waits for more requests to join it.")
_MAX_N = flags.DEFINE_integer("max_n", 8, "Most generations (n x prompts) per request.")
_MAX_PROMPT = flags.DEFINE_integer(
    "max_prompt_tokens", 0, "Longest prompt in tokens (0 = the canvas less one)."
)
_TIMEOUT = flags.DEFINE_float("request_timeout", 300.0, "Seconds a request may wait and run (504 after).")
_WARMUP = flags.DEFINE_boolean(
    "warmup", True, "Compile the default sampler for every batch size before serving."
)
_MAX_PROGRAMS = flags.DEFINE_integer("max_programs", 16, "Compiled (settings, batch size) programs kept.")
_USE_EMA = flags.DEFINE_boolean("use_ema", True, "Serve the EMA parameters.")
_LOG_LEVEL = flags.DEFINE_enum(
    "log_level",
    "warning",
    ["debug", "info", "warning", "error"],
    "Other libraries' log lines shown (uvicorn too).",
)
_COMPILATION_CACHE = command.define_compilation_cache_flag()
flags.mark_flags_as_required(["workdir"])


def _check_flags() -> tuple[tuple[int, ...], str]:
    """(batch sizes, api key) after the checks that need nothing loaded; FlagError otherwise."""
    if not os.path.isdir(_WORKDIR.value):
        raise command.FlagError(f"--workdir={_WORKDIR.value}: no such directory")
    try:
        sizes = tuple(int(s) for s in _BATCH_SIZES.value)
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise command.FlagError(f"--batch_sizes={','.join(_BATCH_SIZES.value)}: expected integers >= 1")
    for name, flag, low in (
        ("max_queue", _MAX_QUEUE, 0),
        ("max_n", _MAX_N, 1),
        ("max_programs", _MAX_PROGRAMS, 1),
        ("max_prompt_tokens", _MAX_PROMPT, 0),
        ("port", _PORT, 0),
    ):
        if flag.value < low or (name == "port" and flag.value > 65535):
            raise command.FlagError(f"--{name}={flag.value}: out of range")
    if _MAX_N.value > max(sizes):
        raise command.FlagError(f"--max_n={_MAX_N.value} is more than the largest batch size {max(sizes)}")
    if _TIMEOUT.value <= 0 or _MAX_WAIT_MS.value < 0:
        raise command.FlagError("--request_timeout must be > 0 and --max_wait_ms >= 0")
    with socket.socket(socket.AF_INET6 if ":" in _HOST.value else socket.AF_INET) as s:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((_HOST.value, _PORT.value))
        except OSError as e:
            raise command.FlagError(
                f"--host={_HOST.value} --port={_PORT.value}: cannot listen there ({e.strerror})"
            )
    key = _API_KEY.value if _API_KEY.value is not None else os.environ.get("DDLM_API_KEY", "")
    return sizes, key


def main(argv):
    del argv
    from ddlm.train import console

    console.quiet_other_loggers(_LOG_LEVEL.value)
    with command.one_line_errors():
        sizes, api_key = _check_flags()
        from ddlm import compilation_cache

        compilation_cache.enable(_COMPILATION_CACHE.value)  # before the warm-up compiles
        from ddlm.serve import engine as engine_lib

        try:
            sampler = engine_lib.parse_sampler_spec(_SAMPLER.value) if _SAMPLER.value else {}
        except ValueError as e:
            raise command.FlagError(str(e)) from None
        import jax
        import uvicorn

        from ddlm import loading
        from ddlm.serve import app as app_lib
        from ddlm.serve import scheduler as scheduler_lib
        from ddlm.serve import schemas

        loaded = loading.load_for_inference(
            _WORKDIR.value, ema=_USE_EMA.value, devices=jax.local_devices()[:1]
        )
        try:
            engine = engine_lib.Engine(
                loaded, sampler=sampler, batch_sizes=sizes, max_programs=_MAX_PROGRAMS.value
            )
        except ValueError as e:  # the --sampler spec against this network and its context
            raise (command.FlagError(str(e)) if str(e).startswith("--sampler") else e) from None
        name = _MODEL_NAME.value or os.path.basename(os.path.abspath(_WORKDIR.value))
        sc = engine.base
        print(
            f"ddlm serve: {name} (checkpoint step {loaded.step}), sampler {sc.name}, canvas {engine.seq_len} "
            f"tokens, batch sizes {list(engine.batch_sizes)}",
            flush=True,
        )
        if _WARMUP.value:
            seconds = engine.warmup()
            print(f"ddlm serve: compiled {engine.compiles} programs in {seconds:.1f}s", flush=True)
        scheduler = scheduler_lib.Scheduler(
            engine, max_queue=_MAX_QUEUE.value, max_wait_s=_MAX_WAIT_MS.value / 1e3
        )
        limits = schemas.Limits(
            max_n=_MAX_N.value,
            max_prompt_tokens=_MAX_PROMPT.value or engine.seq_len - 1,
            max_timeout=_TIMEOUT.value,
        )
        application = app_lib.create_app(
            engine,
            scheduler,
            model_name=name,
            api_key=api_key or None,
            limits=limits,
            request_timeout=_TIMEOUT.value,
        )
    # The compiled loop's host callback needs the GIL while the event loop streams: hand it over in 0.5 ms
    # rather than Python's default 5 ms, which a streamed token per step would otherwise wait for.
    sys.setswitchinterval(5e-4)
    scheduler.start()
    config = uvicorn.Config(
        application,
        host=_HOST.value,
        port=_PORT.value,
        log_level=_LOG_LEVEL.value,
        access_log=_LOG_LEVEL.value in ("debug", "info"),
    )
    server = uvicorn.Server(config)

    async def announce():
        sockets = [s for srv in server.servers for s in srv.sockets]
        host, port = sockets[0].getsockname()[:2] if sockets else (_HOST.value, _PORT.value)
        shown = f"[{host}]" if ":" in host else host
        print(
            f"ddlm serve: listening on http://{shown}:{port}/ (the page; API under /v1)"
            + (", API key required" if api_key else ""),
            flush=True,
        )

    _run(server, announce)
    scheduler.stop()
    sys.exit(0)


def _run(server, announce) -> None:
    """uvicorn's serve() with a line once the socket listens (port 0 picks a free port: it says which)."""
    import asyncio

    async def serve():
        task = asyncio.ensure_future(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            await announce()
        await task

    asyncio.run(serve())


if __name__ == "__main__":
    app.run(main, flags_parser=functools.partial(command.parse_flags))
