"""Entry point of every job.

    python -m ddlm.main --config=experiments/quickstart.py --workdir=runs/quick [--mode=train|eval|sample]
    python -m ddlm.main --config=experiments/bd3lm.py:block_size=16 --config.train.steps=1000 --workdir=...

Rerunning the same command in the same workdir resumes from its latest checkpoint. Any config field can be
overridden with --config.<path>=<value>; an unknown field or a value of the wrong type is an error.
Multi-process (see ddlm/distributed.py and launch/README.md): srun on SLURM and TPU pods are detected;
launch/multiprocess.py passes --coordinator_address/--num_processes/--process_id. --heartbeat_timeout
bounds how long the others run on after a process dies; SIGTERM saves a checkpoint and exits cleanly.
"""

import os
import sys
import traceback

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from ddlm import distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (experiments/*.py[:arg]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to do.")
_DISTRIBUTED = flags.DEFINE_boolean(
    "distributed",
    None,
    "Join a multi-process job with jax.distributed.initialize(). Unset: only when the flags below, SLURM "
    "(srun, more than one task) or a TPU pod (TPU_WORKER_HOSTNAMES) say so; --distributed: always (jax "
    "detects the cluster); --nodistributed: never.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes, for multi-process runs.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, for multi-process runs.")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout",
    300,
    "Seconds a multi-process job waits for all processes to join at start-up (and at shutdown) before it "
    "fails (jax.distributed.initialize's initialization_timeout and shutdown_timeout_seconds).",
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout",
    30,
    "Seconds without a heartbeat after which a process of a multi-process job counts as dead; every other "
    "process then exits non-zero with one line (jax.distributed's heartbeat_timeout_seconds).",
)
_COLLECTIVE_TIMEOUT = flags.DEFINE_integer(
    "collective_timeout",
    distributed.COLLECTIVE_TIMEOUT_S,
    "Seconds a process of a multi-process job waits in a collective (a step's all-reduce; XLA's "
    "--xla_cpu_collective_timeout_seconds on CPU) and before the first step for the other processes, "
    "before it exits with one line naming what timed out.",
)
_LOG_LEVEL = flags.DEFINE_enum(
    "log_level",
    "warning",
    ["debug", "info", "warning", "error"],
    "Lowest level of the log lines of other libraries (orbax, jax, grain, absl) that are shown; ddlm's "
    "own lines always show (absl's --verbosity / -v sets their level). 'info' brings back orbax's "
    "per-checkpoint details.",
)
flags.mark_flags_as_required(["config", "workdir"])

JOINED_LINE = distributed.JOINED_LINE


def _initialize_distributed():
    """Joins the multi-process job that the flags or the cluster describe (nothing for one process); the
    processes other than 0 then log warnings and errors only."""
    plan = distributed.detect(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
        force=_DISTRIBUTED.value,
    )
    distributed.start(
        plan,
        init_timeout=_DISTRIBUTED_TIMEOUT.value,
        heartbeat_timeout=_HEARTBEAT_TIMEOUT.value,
        collective_timeout=_COLLECTIVE_TIMEOUT.value,
    )
    if plan is not None and not distributed.is_main_process():
        logging.set_verbosity(logging.WARNING)


def _fail(message: str, code: int = 1):
    """The one line a user mistake gets (no traceback), then exit with `code`."""
    logging.flush()
    print(f"ddlm: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def main(argv):
    if len(argv) > 1:
        _fail(_unexpected_arguments(argv), 2)
    from ddlm.train import console

    console.quiet_other_loggers(_LOG_LEVEL.value)
    if os.path.exists(_WORKDIR.value) and not os.path.isdir(_WORKDIR.value):
        _fail(f"--workdir={_WORKDIR.value} is a file; expected a directory (created if missing)", 2)
    try:
        _initialize_distributed()
    except distributed.DistributedConfigError as e:
        _fail(str(e), 2)
    import jax

    from ddlm.train import trainer
    from ddlm.train.sharding import ConfigError

    config, workdir = _CONFIG.value, _WORKDIR.value
    logging.info(
        "JAX %s, process %d of %d, %d devices.",
        jax.__version__,
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
    )
    try:
        if _MODE.value == "train":
            trainer.train_and_evaluate(config, workdir)
        elif _MODE.value == "eval":
            trainer.evaluate(config, workdir)
        else:
            try:
                from ddlm.sampling import cli as sampling_cli
            except ImportError as e:
                raise NotImplementedError(
                    "--mode=sample needs ddlm/sampling/cli.py (run_sampling), which is missing"
                ) from e
            sampling_cli.run_sampling(config, workdir)
    except (ConfigError, ValueError, FileNotFoundError, trainer.NonFiniteError, NotImplementedError) as e:
        # One clear line instead of a traceback: these are problems with the config or the data (every
        # contract check in ddlm raises ValueError naming the field). DDLM_TRACEBACK=1 shows the traceback.
        if os.environ.get("DDLM_TRACEBACK"):
            raise
        _fail(f"{type(e).__name__}: {e}")


def _config_path(argv) -> str | None:
    """The file part of --config=<file>[:arg] (or --config <file>) in `argv`."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a[len("--config=") :].split(":", 1)[0]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
    return None


def _unexpected_arguments(argv) -> str:
    return f"unexpected arguments {argv[1:]}: every option is a flag (--config=..., --workdir=..., ...)"


def _config_file_error(error: BaseException, path: str | None) -> str | None:
    """The one line for an error raised while the config file `path` was loaded: a syntax error (in it or
    in a module it imports), or an exception raised by its code (get_config or its top level): the file, the
    line and the error. None if `error` does not come from loading it (an override's, say).

    '--config: experiments/x.py line 12: SyntaxError: invalid syntax'
    '--config: experiments/x.py line 7 (get_config): KeyError: ...'"""
    if path is None:
        return None
    # ml_collections keeps a load failure of the OSError kind until the config is read, then raises
    # another OSError 'from' it: the original carries the traceback.
    while error.__cause__ is not None and not isinstance(error, SyntaxError):
        error = error.__cause__
    target = os.path.abspath(path)
    text = " ".join(str(error).split())
    if isinstance(error, SyntaxError) and error.filename:
        where = path if os.path.abspath(error.filename) == target else f"{path}: {error.filename}"
        message = " ".join((error.msg or "").split())
        return f"--config: {where} line {error.lineno}: {type(error).__name__}: {message}"
    frames = [f for f in traceback.extract_tb(error.__traceback__) if os.path.abspath(f.filename) == target]
    if not frames:
        return None
    frame = frames[-1]  # the innermost line of the config file on the way to the error
    where = "" if frame.name == "<module>" else f" ({frame.name})"
    return f"--config: {path} line {frame.lineno}{where}: {type(error).__name__}: {text}"


def _last_line_of_traceback(message: str) -> str:
    """ml_collections wraps an error raised by get_config(arg) in a message holding the whole traceback
    text; its last line ('ValueError: unknown config arg ...') is what the user needs."""
    if "Traceback (most recent call last)" not in message:
        return message
    lines = [line for line in message.splitlines() if line.strip()]
    head = lines[0].rsplit(": ", 1)[0]  # 'flag --config=experiments/x.py:arg: Error whilst parsing ...'
    return f"{head}: {lines[-1].strip()}"


def _parse_flags(argv):
    """absl flag parsing, with each mistake reported as one line: a config file that does not exist (or
    fails to load), a bad `:arg` of get_config, and a config override that names no field (or has a bad
    value) -- ml_collections raises AttributeError/KeyError/TypeError for those, which absl would let
    through as a traceback."""
    path = _config_path(argv)
    if path is not None and not os.path.isfile(path):
        _fail(f"--config: no such config file {path!r} (expected experiments/<name>.py[:arg])", 2)
    try:
        rest = flags.FLAGS(argv)
        # A config file that failed to load raises here, at the first attribute read (ml_collections
        # defers it).
        getattr(_CONFIG.value, "keys", None)
    except flags.Error as e:  # a value of the wrong type, a bad :arg, a missing required flag, ...
        if path is not None and _CONFIG.present and _CONFIG.value is None:  # get_config() returned None
            _fail(f"--config: {path}: get_config() returned None; expected an ml_collections.ConfigDict", 2)
        _fail(_last_line_of_traceback(str(e)), 2)
    except Exception as e:  # noqa: BLE001 -- whatever a user's config file raises is reported, not thrown
        line = _config_file_error(e, path)
        if line is not None:
            _fail(line, 2)
        if isinstance(e, OSError):
            _fail(f"--config: {' '.join(str(e).split())}", 2)
        if not isinstance(e, (AttributeError, KeyError, TypeError, ValueError)):
            raise
        message = str(e).replace("\\n", " ").replace("\\'", "'")
        message = " ".join(message.replace("'", "").split())
        overrides = [a for a in argv[1:] if a.startswith("--config.")]
        names = [a.split("=")[0] for a in overrides]
        first_word = message.split(" ", 1)[0]
        hint = next(  # the override whose last part the message starts with ('stepz Did you mean...')
            (n for n in names if n.rsplit(".", 1)[-1] == first_word),
            next(
                (
                    n
                    for n in names
                    if any(part and part in message for part in n[len("--config.") :].split("."))
                ),
                "",
            ),
        )
        _fail(f"bad config override {hint or ' '.join(overrides)}: {type(e).__name__}: {message}", 2)
    if not isinstance(_CONFIG.value, ml_collections.ConfigDict):
        returned = type(_CONFIG.value).__name__
        _fail(f"--config: {path}: get_config() returned {returned}; expected an ml_collections.ConfigDict", 2)
    if len(rest) > 1:
        _fail(_unexpected_arguments(rest), 2)
    return rest


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
