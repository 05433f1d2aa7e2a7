"""ddlm.main with a crash installed, for the kill-and-resume tests (a test-only entry point):

    python tests/killable_main.py --kill_after_checkpoint=STEP[@PROCESS] <ddlm.main's flags>

SIGKILLs the process right after the checkpoint of STEP is complete on disk (the trainer's
AFTER_CHECKPOINT_HOOKS), as a crash or an OOM kill would; with @PROCESS only that process of a
multi-process job dies (every process gets the same flag: they all wait for the checkpoint together).
"""

import functools
import os
import signal
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddlm import command  # noqa: E402
from ddlm import main as ddlm_main  # noqa: E402  (the repository on the path first)

_KILL_AFTER = flags.DEFINE_string(
    "kill_after_checkpoint", None, "STEP or STEP@PROCESS: SIGKILL after that checkpoint is on disk."
)


def kill_hook(spec: str):
    """hook(step) for trainer.AFTER_CHECKPOINT_HOOKS: SIGKILLs this process at the step of `spec`
    ('STEP' or 'STEP@PROCESS')."""
    step_text, _, process_text = spec.partition("@")
    kill_step = int(step_text)

    def hook(step: int) -> None:
        import jax

        if step != kill_step or (process_text and int(process_text) != jax.process_index()):
            return
        logging.warning("--kill_after_checkpoint=%s: killing this process (test hook).", spec)
        logging.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    return hook


def main(argv):
    if _KILL_AFTER.value:
        from ddlm.train import trainer

        trainer.AFTER_CHECKPOINT_HOOKS.append(kill_hook(_KILL_AFTER.value))
    ddlm_main.main(argv)


if __name__ == "__main__":
    app.run(main, flags_parser=functools.partial(command.parse_flags, config=ddlm_main._CONFIG))
