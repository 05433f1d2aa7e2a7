"""Entry point of every job.

    python -m ddlm.main --config=experiments/quickstart.py --workdir=runs/quick [--mode=train|eval|sample]
    python -m ddlm.main --config=experiments/bd3lm.py:block_size=16 --config.train.steps=1000 --workdir=...

Rerunning the same command in the same workdir resumes from its latest checkpoint. Any config field can be
overridden with --config.<path>=<value>; an unknown field or a value of the wrong type is an error.
Compiled programs are loaded from JAX's persistent compilation cache when a previous job compiled them
(ddlm/compilation_cache.py: ~/.cache/ddlm/jax; --nocompilation_cache or DDLM_COMPILATION_CACHE=0 turns it
off); the job's last line says how many it compiled and how many it loaded.
Multi-process (see ddlm/distributed.py and launch/README.md): srun on SLURM and TPU pods are detected;
launch/multiprocess.py passes --coordinator_address/--num_processes/--process_id. --heartbeat_timeout
bounds how long the others run on after a process dies; SIGTERM saves a checkpoint and exits cleanly.
"""

import functools
import os

from absl import app, flags, logging
from ml_collections import config_flags

from ddlm import command, compilation_cache, distributed, logs

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
_LOG_LEVEL = command.define_log_level_flag()
_COMPILATION_CACHE = command.define_compilation_cache_flag()
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


def check_config(config, mode: str) -> None:
    """The config's own mistakes, each one ValueError naming the field, before jax starts its devices, the
    processes of a multi-process job meet, or a workdir, checkpoint or corpus is touched: every field
    (ddlm.train.validation; the device count is checked once the devices are known), the local data paths
    the run reads (train and eval), and the sections of the mode (config.eval, config.sampler)."""
    from ddlm.train import trainer, validation

    validation.validate_config(config, devices_known=False)
    if mode in ("train", "eval"):
        trainer.check_data_paths(config.data)
    if mode == "eval":
        from ddlm.eval import cli as eval_cli

        eval_cli.resolve_config(config.eval)
    if mode == "sample":
        from ddlm.sampling import cli as sampling_cli

        sampling_cli.check_config(config)


def main(argv):
    if len(argv) > 1:  # command.parse_flags refuses them; a caller of main() may not
        command.fail(f"unexpected arguments {argv[1:]}: every option is a flag, --name=value", 2)
    logs.quiet_other_loggers(_LOG_LEVEL.value)
    if os.path.exists(_WORKDIR.value) and not os.path.isdir(_WORKDIR.value):
        command.fail(f"--workdir={_WORKDIR.value} is a file; expected a directory (created if missing)", 2)
    config, workdir = _CONFIG.value, _WORKDIR.value
    with command.one_line_errors((ValueError, FileNotFoundError)):
        check_config(config, _MODE.value)
    compilation_cache.enable(_COMPILATION_CACHE.value)  # before anything compiles
    try:
        _initialize_distributed()
    except distributed.DistributedConfigError as e:
        command.fail(str(e), 2)
    import jax

    from ddlm.train import trainer

    logging.info(
        "JAX %s, process %d of %d, %d devices.",
        jax.__version__,
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
    )
    # One clear line instead of a traceback: these are problems with the config or the data (every
    # contract check in ddlm raises ValueError naming the field). DDLM_TRACEBACK=1 shows the traceback.
    with command.one_line_errors((ValueError, FileNotFoundError, trainer.NonFiniteError)):
        if _MODE.value == "train":
            trainer.train_and_evaluate(config, workdir)
        elif _MODE.value == "eval":
            trainer.evaluate(config, workdir)
        else:
            from ddlm.sampling import cli as sampling_cli

            sampling_cli.run_sampling(config, workdir)
    logging.info(compilation_cache.summary())


if __name__ == "__main__":
    app.run(main, flags_parser=functools.partial(command.parse_flags, config=_CONFIG))
