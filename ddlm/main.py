"""Entry point of every job.

    python -m ddlm.main --config=experiments/quickstart.py --workdir=runs/quick [--mode=train|eval|sample]
    python -m ddlm.main --config=experiments/bd3lm.py:block_size=16 --config.train.steps=1000 --workdir=...

Rerunning the same command in the same workdir resumes from its latest checkpoint. Any config field can be
overridden with --config.<path>=<value>; an unknown field or a value of the wrong type is an error.
Multi-process: pass --coordinator_address/--num_processes/--process_id, or --distributed=auto on SLURM
and TPU pods (jax.distributed.initialize() then reads the cluster environment).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (experiments/*.py[:arg]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to do.")
_DISTRIBUTED = flags.DEFINE_boolean(
    "distributed", False, "Call jax.distributed.initialize() (auto-detects SLURM / TPU pods)."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes, for multi-process runs.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, for multi-process runs.")
flags.mark_flags_as_required(["config", "workdir"])


def _initialize_distributed():
    import jax

    if _COORDINATOR.value or _NUM_PROCESSES.value:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _initialize_distributed()
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
        logging.flush()
        print(f"ddlm: error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def _parse_flags(argv):
    """absl flag parsing, with a config override that names no field (or a bad value) reported as one
    line: ml_collections raises AttributeError/KeyError/TypeError for those, which absl would let
    through as a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # a value of the wrong type, a missing required flag, ...
        print(f"ddlm: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        message = str(e).replace("\\n", " ").replace("\\'", "'")
        message = " ".join(message.replace("'", "").split())
        overrides = [a for a in argv[1:] if a.startswith("--config.")]
        hint = next(
            (
                a.split("=")[0]
                for a in overrides
                if any(part and part in message for part in a.split("=")[0][len("--config.") :].split("."))
            ),
            "",
        )
        print(
            f"ddlm: error: bad config override {hint or ' '.join(overrides)}: {type(e).__name__}: {message}",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
