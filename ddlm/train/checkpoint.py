"""The checkpoint code lives in ddlm/checkpoints.py (sampling/ and eval/ load checkpoints too, and must not
import train/); this name stays importable for existing callers."""

from ddlm.checkpoints import Checkpointer, CheckpointError  # noqa: F401
