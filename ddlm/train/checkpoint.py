"""Checkpoints: orbax CheckpointManager (async, keep N) holding the train state and the data iterator.

Layout: <workdir>/checkpoints/<step>/{state, data}. `state` is the whole TrainState (params, opt_state,
ema_params, step, rng); `data` is the grain iterator's state, so a resumed run sees exactly the batches an
uninterrupted one would. Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a half-written checkpoint (a killed job) is never listed; a listed one that fails to restore
(truncated or deleted files) is moved aside to <workdir>/checkpoints_corrupt/ with a warning and the
previous one is used.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from grain import checkpoint as grain_checkpoint
from jax.experimental import multihost_utils


class _IteratorState:
    """What grain's orbax handler saves/restores for a data iterator, frozen at save time.

    Saves are asynchronous and the iterator keeps moving, so we capture `get_state()` when `save` is
    called. grain's handler writes `get_state()` as text: dict states (grain DatasetIterator) are
    JSON-encoded here, bytes states pass through."""

    def __init__(self, iterator, state=None):
        self._iterator = iterator
        self._state = state

    def get_state(self) -> bytes:
        state = self._state
        if isinstance(state, bytes):
            return b"B" + state
        return b"J" + json.dumps(state).encode()

    def set_state(self, blob: bytes):
        kind, payload = blob[:1], blob[1:]
        self._iterator.set_state(payload if kind == b"B" else json.loads(payload.decode()))

    def start_prefetch(self):  # called by grain's handler after restore
        if hasattr(self._iterator, "start_prefetch"):
            self._iterator.start_prefetch()


class Checkpointer:
    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.corrupt_directory = self.directory + "_corrupt"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # remove half-written checkpoints of a killed run
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            frozen = _IteratorState(data_iterator, data_iterator.get_state())
            items["data"] = grain_checkpoint.CheckpointSave(frozen)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state, data_iterator=None) -> tuple[Any, int | None]:
        """Restores the newest readable checkpoint into `abstract_state`'s shardings (resharding if the
        mesh changed since it was written) and sets `data_iterator`'s state. Returns (state, step), or
        (None, None) when there is no checkpoint."""
        for step in reversed(self.all_steps()):
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            if data_iterator is not None:
                items["data"] = grain_checkpoint.CheckpointRestore(_IteratorState(data_iterator))
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 -- any failure to read means this checkpoint is unusable
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                logging.warning(
                    "Checkpoint at step %d is corrupt or unreadable (%s); moving it to %s and falling back "
                    "to the previous checkpoint.",
                    step,
                    reason[:300],
                    self.corrupt_directory,
                )
                self._move_aside(step)
                continue
            return restored["state"], step
        return None, None

    def _move_aside(self, step: int):
        if jax.process_index() == 0:
            os.makedirs(self.corrupt_directory, exist_ok=True)
            src = os.path.join(self.directory, str(step))
            dst = os.path.join(self.corrupt_directory, str(step))
            if os.path.exists(dst):
                shutil.rmtree(dst)
            shutil.move(src, dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"ddlm_checkpoint_move_aside_{step}")
        self.manager.reload()
