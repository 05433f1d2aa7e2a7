"""ddlm/checkpoints.py and the trainer's restore/save path: nothing lost on resume.

One tiny run (1 layer, width 32, byte tokenizer, 4 steps, checkpoints at 2 and 4, one device) is trained
in-process once for the module; each test works on a copy of its workdir. Covered: a changed shape or
tokenizer is a one-line error that leaves every checkpoint file byte-identical; a changed corpus is an
error unless allow_data_change; checksums are sharding-invariant and a flipped byte in an array file falls
back to the previous checkpoint with a warning naming the leaf; corrupt checkpoints get a new quarantine
name every time; the NaN guard names only a committed step; a failed asynchronous save and an unwritable
directory are one line, never a hang; metrics.jsonl and TensorBoard have each step once after a resume;
eval/sample on an empty workdir is one line and creates nothing; the inference loader rebuilds the
network from the stored config."""

import errno
import glob
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddlm import checkpoints
from ddlm.train import metrics as metrics_lib
from ddlm.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "experiments", "quickstart.py")


def _config(**overrides):
    """The quickstart's smoke config (1 layer, width 32, seq 16, batch 8), byte tokenizer, 4 steps."""
    spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    config.data.tokenizer = "byte"
    config.mesh.data = 1
    config.train.steps, config.train.ckpt_every = 4, 2
    for key, value in overrides.items():
        config.update_from_flattened_dict({key: value})
    return config


DEVICES = jax.devices()[:1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir trained for 4 steps with checkpoints at 2 and 4."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    trainer.train_and_evaluate(_config(), workdir, devices=DEVICES)
    assert checkpoints.committed_steps(os.path.join(workdir, "checkpoints")) == [2, 4]
    return workdir


def _copy(trained, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(trained, copy)
    return copy


def _tree_hashes(directory):
    """{relative path: sha256} of every file under `directory`."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _setup_and_meta(config):
    setup = trainer.build(config, DEVICES)
    return setup, checkpoints.checkpoint_metadata(config, setup.tokenizer)


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "override, expected",
    [
        ({"model.d_model": 64}, ["model.d_model: 32 -> 64"]),
        ({"data.tokenizer": "char"}, ["data.tokenizer: 'byte' -> 'char'", "tokenizer.vocab_size: 260 ->"]),
        ({"model.scan_layers": True}, ["model.scan_layers: False -> True"]),
    ],
    ids=["d_model", "tokenizer", "scan_layers"],
)
def test_incompatible_resume_is_one_line_and_touches_no_file(trained, tmp_path, override, expected):
    """Issue 9 item 1: before, every checkpoint was moved to checkpoints_corrupt/ and training restarted."""
    workdir = _copy(trained, tmp_path)
    before = _tree_hashes(workdir)
    with pytest.raises(checkpoints.IncompatibleCheckpointError) as error:
        trainer.train_and_evaluate(_config(**override), workdir, devices=DEVICES)
    message = str(error.value)
    assert "\n" not in message and "step 4" in message, message
    for field in expected:
        assert field in message, message
    assert _tree_hashes(workdir) == before  # checkpoints, metrics and events: every byte as it was
    assert not os.path.exists(workdir + "/checkpoints_corrupt") and sorted(os.listdir(workdir)) == sorted(
        os.listdir(trained)
    )


def test_changed_corpus_is_an_error_unless_allowed(trained, tmp_path):
    """Issue 9 item 2: another corpus with the same (byte) vocabulary restored silently."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i}.txt").write_text(f"Document {i}: some other text, not Shakespeare at all.\n" * 3)
    workdir = _copy(trained, tmp_path)
    before = _tree_hashes(workdir)
    changed = _config(**{"data.corpus": f"local:{corpus}"})
    with pytest.raises(checkpoints.DataChangedError) as error:
        trainer.train_and_evaluate(changed, workdir, devices=DEVICES)
    message = str(error.value)
    assert "\n" not in message and "data.corpus_fingerprint" in message and "allow_data_change" in message
    assert f"local:{corpus}" in message
    assert _tree_hashes(workdir) == before

    # allow_data_change: the model and optimizer are restored, the data iterator is not.
    setup, meta = _setup_and_meta(changed)
    iterator = trainer.make_iterator(setup, "train", batch_size=8)
    fresh_state = iterator.get_state()
    with checkpoints.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        state, step = ckpt.restore_latest(
            setup.abstract_state(), iterator, metadata=meta, allow_data_change=True
        )
    assert step == 4 and int(state.step) == 4
    assert iterator.get_state() == fresh_state
    # The same corpus restores the iterator's position (the check above is not vacuous).
    setup, meta = _setup_and_meta(_config())
    iterator = trainer.make_iterator(setup, "train", batch_size=8)
    fresh_state = iterator.get_state()
    with checkpoints.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        ckpt.restore_latest(setup.abstract_state(), iterator, metadata=meta)
    assert iterator.get_state() != fresh_state


def test_load_for_inference_rebuilds_the_network_from_the_stored_config(trained):
    loaded = checkpoints.load_for_inference(trained, devices=DEVICES)
    assert loaded.step == 4 and loaded.config.model.d_model == 32 and loaded.tokenizer.vocab_size == 260
    assert loaded.config.train.steps == 4  # the whole config was stored, not only the compatibility subset
    import orbax.checkpoint as ocp

    raw = ocp.PyTreeCheckpointer().restore(os.path.join(trained, "checkpoints", "4", "state"))
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(raw["ema_params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(checkpoints.IncompatibleCheckpointError, match=r"model.num_layers: 1 -> 2"):
        checkpoints.load_for_inference(trained, _config(**{"model.num_layers": 2}), devices=DEVICES)


# ------------------------------------------------------------------------------------------------ contents


def test_checksums_are_sharding_invariant_and_see_one_flipped_bit():
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.standard_normal((8, 6)).astype(np.float32),
        "bf16": rng.standard_normal((8, 6)).astype(jnp.bfloat16),
        "i8": rng.integers(-100, 100, (8, 6)).astype(np.int8),
        "bool": rng.random((8, 6)) > 0.5,
        "scalar": np.float32(3.0),
    }
    local = checkpoints.leaf_checksums(arrays)
    sharded = {
        k: jax.device_put(v, NamedSharding(mesh, P("a", "b") if np.ndim(v) else P()))
        for k, v in arrays.items()
    }
    assert checkpoints.leaf_checksums(sharded) == local
    for name, value in arrays.items():
        words = np.array(value).reshape(-1).view(np.uint8).copy()
        for byte in (0, words.size - 1):  # the first and the last byte of the array
            flipped = words.copy()
            flipped[byte] ^= 1 << 6
            changed = {**arrays, name: flipped.view(np.asarray(value).dtype).reshape(np.shape(value))}
            sums = checkpoints.leaf_checksums(changed)
            assert sums[name] != local[name] and {k: v for k, v in sums.items() if k != name} == {
                k: v for k, v in local.items() if k != name
            }
    # Position matters: two swapped values change the sum.
    swapped = arrays["f32"].copy()
    swapped[0, 0], swapped[3, 2] = arrays["f32"][3, 2], arrays["f32"][0, 0]
    assert checkpoints.leaf_checksums({**arrays, "f32": swapped})["f32"] != local["f32"]


def _rewrite_with_one_bit_flipped(step_dir: str, setup, scratch: str):
    """Replaces the arrays of checkpoint `step_dir` by the same state with the lowest mantissa bit of one
    EMA embedding entry flipped (a change of one ulp that decodes without error: orbax compresses its
    array files, so a flipped byte there usually fails to decode, which the fallback handles anyway); the
    stored metadata, with the original checksums, is kept."""
    with checkpoints.Checkpointer(os.path.dirname(step_dir), read_only=True) as ckpt:
        state, _ = ckpt.restore_latest(setup.abstract_state())
    emb = np.asarray(state.ema_params["token_embedding"]).copy()
    emb.view(np.uint32)[5, 7] ^= 1
    ema = {
        **state.ema_params,
        "token_embedding": jax.device_put(emb, state.ema_params["token_embedding"].sharding),
    }
    with checkpoints.Checkpointer(scratch, async_save=False) as ckpt:
        ckpt.save(4, state.replace(ema_params=ema))
    shutil.rmtree(os.path.join(step_dir, "state"))
    shutil.copytree(os.path.join(scratch, "4", "state"), os.path.join(step_dir, "state"))


def test_flipped_bit_falls_back_and_corrupt_checkpoints_are_never_overwritten(
    trained, tmp_path, caplog, monkeypatch
):
    """Issue 9 items 3 (a flipped byte restored silently) and 1 (quarantine overwrote an earlier one)."""
    monkeypatch.setattr(checkpoints, "_utc_stamp", lambda: "20261130-120000")  # both in the same second
    workdir = _copy(trained, tmp_path)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    setup, meta = _setup_and_meta(_config())
    _rewrite_with_one_bit_flipped(os.path.join(ckpt_dir, "4"), setup, str(tmp_path / "scratch"))
    damaged = str(tmp_path / "damaged4")
    shutil.copytree(os.path.join(ckpt_dir, "4"), damaged)

    quarantined = []
    for attempt in range(2):  # the same step found corrupt twice: two quarantine entries, the first intact
        if attempt:
            shutil.copytree(damaged, os.path.join(ckpt_dir, "4"))
            first = _tree_hashes(os.path.join(workdir, "checkpoints_corrupt"))
        caplog.clear()
        with caplog.at_level(logging.WARNING), checkpoints.Checkpointer(ckpt_dir) as ckpt:
            state, step = ckpt.restore_latest(setup.abstract_state(), metadata=meta)
        assert step == 2 and int(state.step) == 2
        assert "Checkpoint at step 4 is corrupt" in caplog.text, caplog.text
        assert "checksum mismatch in leaf ema_params/token_embedding" in caplog.text, caplog.text
        quarantined = sorted(os.listdir(os.path.join(workdir, "checkpoints_corrupt")))
        assert quarantined == ["4-20261130-120000", "4-20261130-120000-1"][: attempt + 1], quarantined
        assert checkpoints.committed_steps(ckpt_dir) == [2]
    assert _tree_hashes(os.path.join(workdir, "checkpoints_corrupt", quarantined[0])) == {
        k.split(os.sep, 1)[1]: v for k, v in first.items()
    }

    # Read-only users (eval, sampling) skip a corrupt checkpoint and leave it where it is.
    shutil.copytree(damaged, os.path.join(ckpt_dir, "4"))
    loaded = checkpoints.load_for_inference(workdir, devices=DEVICES)
    assert loaded.step == 2 and os.path.isdir(os.path.join(ckpt_dir, "4"))


# ------------------------------------------------------------------------------------------------ saving


def _tiny_state(value=1.0):
    return {"w": jnp.full((3, 4), value), "step": jnp.array(1, jnp.int32)}


def _fail_commits(monkeypatch):
    """Every asynchronous save fails in orbax's background thread when it renames the finished checkpoint
    into place (as a full disk would)."""
    from orbax.checkpoint._src.path import atomicity

    async def fail(self):
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", fail)


def test_nan_guard_names_a_committed_step_and_failed_saves_surface(tmp_path, monkeypatch):
    """Issue 9 items 4 (the guard named a step whose async save never committed) and 5 (async failures)."""
    bad = {"finite": 0.0, "loss": float("nan"), "grad_norm": float("nan")}
    directory = str(tmp_path / "checkpoints")
    ckpt = checkpoints.Checkpointer(directory, keep=5)
    ckpt.save(2, _tiny_state())
    with pytest.raises(trainer.NonFiniteError, match="last good checkpoint is step 2") as error:
        trainer._check_finite(bad, 3, "stop", ckpt, [])
    assert os.path.isdir(os.path.join(directory, "2")), error  # committed when named

    _fail_commits(monkeypatch)
    ckpt.save(4, _tiny_state())  # fails in the background
    with pytest.raises(trainer.NonFiniteError, match="last good checkpoint is step 2"):
        trainer._check_finite(bad, 5, "stop", ckpt, [])
    ckpt.save(6, _tiny_state())
    with pytest.raises(checkpoints.CheckpointError) as error:
        ckpt.save(8, _tiny_state())  # the next save reports that 6 never committed
    message = str(error.value)
    assert (
        "\n" not in message and "step 6 was not written" in message and "No space left on device" in message
    )
    assert "last committed checkpoint is step 2" in message
    ckpt.save(10, _tiny_state())
    with pytest.raises(checkpoints.CheckpointError, match="step 10 was not written"):
        ckpt.close()  # so does closing
    assert checkpoints.committed_steps(directory) == [2]


def test_unwritable_directories_are_one_line(tmp_path):
    # A file where the checkpoint directory or the workdir must go (chmod does not stop root).
    (tmp_path / "checkpoints").write_text("not a directory")
    with pytest.raises(checkpoints.CheckpointError, match="checkpoint directory .* is not writable") as error:
        checkpoints.Checkpointer(str(tmp_path / "checkpoints"))
    assert "\n" not in str(error.value)
    with pytest.raises(checkpoints.CheckpointError, match="--workdir .* is not writable"):
        trainer.train_and_evaluate(_config(), str(tmp_path / "checkpoints" / "run"), devices=DEVICES)


SETPRIV = shutil.which("setpriv")
_READ_ONLY_MID_RUN = """
import os, sys
import jax.numpy as jnp
from ddlm import checkpoints
directory = sys.argv[1]
ckpt = checkpoints.Checkpointer(directory, keep=3)
ckpt.save(1, {"w": jnp.ones(3)})
ckpt.wait()
os.chmod(directory, 0o555)
try:
    ckpt.save(2, {"w": jnp.ones(3)})
except checkpoints.CheckpointError as e:
    print("ddlm: error:", e)
    ckpt.close(raise_errors=False)
    sys.exit(3)
"""


@pytest.mark.skipif(SETPRIV is None, reason="needs util-linux setpriv to drop CAP_DAC_OVERRIDE")
def test_checkpoint_directory_turned_read_only_fails_fast(tmp_path):
    """Issue 9 item 5: orbax waited 5 minutes per save for a directory it could not create. The child
    drops CAP_DAC_OVERRIDE, so permission bits bind even when the tests run as root."""
    directory = str(tmp_path / "checkpoints")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": REPO}
    cmd = [SETPRIV, "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c", _READ_ONLY_MID_RUN]
    try:
        proc = subprocess.run(
            [*cmd, directory], env=env, capture_output=True, text=True, timeout=120, check=False
        )
    finally:
        if os.path.isdir(directory):
            os.chmod(directory, 0o755)
    if "Operation not permitted" in proc.stderr and proc.returncode not in (0, 3):
        pytest.skip(f"setpriv cannot drop capabilities here: {proc.stderr[-300:]}")
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ddlm: error:")]
    assert len(lines) == 1 and "is not writable" in lines[0] and "PermissionError" in lines[0], proc.stdout
    assert checkpoints.committed_steps(directory) == [1]


# ------------------------------------------------------------------------------------------------ metrics


def _events(path):
    """The Event protos of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    with open(path, "rb") as f:
        blob = f.read()
    out, at = [], 0
    while at + 12 <= len(blob):
        (length,) = struct.unpack("<Q", blob[at : at + 8])
        out.append(event_pb2.Event.FromString(blob[at + 12 : at + 12 + length]))
        at += 12 + length + 4
    return out


def _scalar_steps(events, tag):
    return [e.step for e in events if any(v.tag == tag for v in e.summary.value)]


def test_metric_writer_flush_puts_every_scalar_on_disk(tmp_path):
    """Issue 9 item 7: tensorboardX's SummaryWriter.flush() does not wait for its queue."""
    writer = metrics_lib.MetricWriter(str(tmp_path))
    for step in (1, 2, 3):
        writer.write(step, "train", {"loss": 1.0 / step})
    writer.flush()
    (events_file,) = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    assert _scalar_steps(_events(events_file), "train/loss") == [1, 2, 3]  # read while the writer is open
    writer.close()


def test_resume_writes_each_step_once(trained, tmp_path, monkeypatch):
    """Issue 9 item 7: a run killed after step 4's metrics but before checkpoint 4 committed resumes from 2;
    metrics.jsonl had steps 3 and 4 twice. And each checkpoint is saved only once the scalars up to its
    step are on disk (a kill after it commits must not lose them)."""
    workdir = _copy(trained, tmp_path)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))  # as if the kill came before it committed
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "split": "tra')  # and tore the last line
    old_events = set(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")))
    on_disk_at_save = {}
    save = checkpoints.Checkpointer.save

    def save_and_look(self, step, *args, **kwargs):
        (new,) = set(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))) - old_events
        on_disk_at_save[step] = _scalar_steps(_events(new), "train/loss")
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoints.Checkpointer, "save", save_and_look)
    trainer.train_and_evaluate(_config(), workdir, devices=DEVICES)
    assert on_disk_at_save == {4: [3, 4]}

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [4]
    (new_events,) = set(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))) - old_events
    events = _events(new_events)
    starts = [e.step for e in events if e.HasField("session_log")]
    assert starts == [3]  # TensorBoard purges the interrupted run's events from step 3 on
    assert _scalar_steps(events, "train/loss") == [3, 4]


# ------------------------------------------------------------------------------------------------ read-only modes


def test_eval_and_sample_on_an_empty_workdir_create_nothing(tmp_path):
    """Issue 9 item 16: a clear line, then an orbax traceback at exit, and an empty checkpoints/ left."""
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoint in .*train first"):
        checkpoints.load_for_inference(empty, _config(), devices=DEVICES)
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoint in .*train first"):
        trainer.evaluate(_config(), empty, devices=DEVICES)
    assert os.listdir(empty) == []

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": REPO}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ddlm.main",
            f"--config={QUICKSTART}:smoke",
            f"--workdir={empty}",
            "--mode=eval",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ddlm: error")]
    assert len(errors) == 1 and "no checkpoint in" in errors[0], proc.stderr[-3000:]
    assert os.listdir(empty) == []
