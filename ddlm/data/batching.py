"""The last stages every input pipeline shares: worker processes for the map stages, and the iterator
that hands global batches to the trainer (``ddlm.data.pipeline`` for text, ``ddlm.data.sft`` for SFT)."""

from __future__ import annotations

import grain
import jax
from absl import flags


def prefetch(it_ds: grain.IterDataset, config) -> grain.IterDataset:
    """Runs the map stages in ``config.num_workers`` grain worker processes (0: in this process)."""
    if config.num_workers <= 0:
        return it_ds
    if not flags.FLAGS.is_parsed():
        # grain's worker processes read absl flags; a library caller may not have parsed them.
        flags.FLAGS.mark_as_parsed()
    return it_ds.mp_prefetch(
        grain.MultiprocessingOptions(
            num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer_size
        )
    )


class DataIterator(grain.DatasetIterator):
    """Yields {'tokens': int32 [global_batch, seq_len], 'loss_mask': float32 [global_batch, seq_len]}.

    With a ``sharding`` the values are global ``jax.Array``s assembled from every process's local
    rows (``jax.make_array_from_process_local_data``); without one, this process's numpy rows.
    A grain ``DatasetIterator``: ``get_state()``/``set_state()`` and orbax's
    ``grain.checkpoint.CheckpointSave(it)`` / ``CheckpointRestore(it)`` work on it.
    """

    def __init__(self, parent: grain.DatasetIterator, *, sharding, global_shape: tuple[int, int], rows=None):
        """rows: this process's slice of each global batch `parent` yields (shard_by_process=False)."""
        super().__init__(parent)
        self._sharding = sharding
        self._global_shape = global_shape
        self._rows = rows

    def __next__(self):
        batch = next(self._parent)
        if self._rows is not None:
            batch = {k: v[self._rows] for k, v in batch.items()}
        if self._sharding is None:
            return batch
        return {
            k: jax.make_array_from_process_local_data(self._sharding, v, self._global_shape)
            for k, v in batch.items()
        }

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)

    @property
    def dropped_tokens(self) -> int:
        """Tokens left at the end of a finite stream that did not fill a batch (this process)."""
        return self._parent.dropped_tokens

    @property
    def truncated_tokens(self) -> int:
        """Tokens cut from documents (pad mode) or responses (SFT) longer than seq_len (this process)."""
        return self._parent.truncated_tokens
