"""ddlm/checkpoints.py and the trainer's restore/save path: nothing lost on resume.

One tiny run (1 layer, width 32, byte tokenizer, 4 steps, checkpoints at 2 and 4, one device) is trained
in-process once for the module; each test works on a copy of its workdir. Covered: a changed shape or
tokenizer is a one-line error that leaves every checkpoint file byte-identical; a changed corpus is an
error unless allow_data_change; checksums are sharding-invariant and a flipped byte in an array file falls
back to the previous checkpoint with a warning naming the leaf; so do an edited data-iterator state, an
edited or deleted metadata folder, while honest checkpoints of every format restore bit for bit; corrupt
checkpoints get a new quarantine name every time; the NaN guard names only a committed step; a failed
asynchronous save (a full disk: RLIMIT_FSIZE in a child) and an unwritable directory are one line, never a
hang, and a damaged array file is one warning line, without orbax's and asyncio's tracebacks;
metrics.jsonl and TensorBoard have each step once after a resume; eval/sample on an empty workdir is one
line and creates nothing; the inference loader rebuilds the network from the stored config, and a changed
tokenizer is the incompatible-config line."""

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

from ddlm import checkpoints, loading
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
        # Same parameter shapes, another function: only the stored config can tell.
        ({"model.time_input": "sigma"}, ["model.time_input: 'scaled_t' -> 'sigma'"]),
    ],
    ids=["d_model", "tokenizer", "scan_layers", "time_input"],
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
    loaded = loading.load_for_inference(trained, devices=DEVICES)
    assert loaded.step == 4 and loaded.config.model.d_model == 32 and loaded.tokenizer.vocab_size == 260
    assert loaded.config.train.steps == 4  # the whole config was stored, not only the compatibility subset
    import orbax.checkpoint as ocp

    raw = ocp.PyTreeCheckpointer().restore(os.path.join(trained, "checkpoints", "4", "state"))
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(raw["ema_params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(checkpoints.IncompatibleCheckpointError, match=r"model.num_layers: 1 -> 2"):
        loading.load_for_inference(trained, _config(**{"model.num_layers": 2}), devices=DEVICES)
    # step=: an older checkpoint (a distillation round's student), read exactly; a step not on disk is one line.
    older = loading.load_for_inference(trained, devices=DEVICES, step=2)
    raw2 = ocp.PyTreeCheckpointer().restore(os.path.join(trained, "checkpoints", "2", "state"))
    assert older.step == 2
    for a, b in zip(jax.tree.leaves(older.params), jax.tree.leaves(raw2["ema_params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(older.params), jax.tree.leaves(loaded.params)))
    with pytest.raises(checkpoints.CheckpointError, match=r"^no checkpoint at step 3 in .*; committed steps: \[2, 4\]$"):
        loading.load_for_inference(trained, devices=DEVICES, step=3)


def test_changed_tokenizer_for_inference_is_the_incompatible_config_line(trained):
    """Issue 21 item 9: --mode=sample|eval with another tokenizer ended in KeyError: 'corpus' (the loader
    compares the tokenizer's fingerprint only, and the corpus name was looked up in its current metadata)."""
    stored = {"data": {"corpus": "shakespeare", "tokenizer_fingerprint": "aaaa"}}
    current = {"data": {"tokenizer_fingerprint": "bbbb"}}
    assert checkpoints.data_differences(stored, current, fields=("tokenizer_fingerprint",)) == [
        "data.tokenizer_fingerprint: 'aaaa' -> 'bbbb'"
    ]
    with pytest.raises(checkpoints.IncompatibleCheckpointError) as error:
        loading.load_for_inference(trained, _config(**{"data.tokenizer": "char"}), devices=DEVICES)
    message = str(error.value)
    assert "\n" not in message and "incompatible config" in message
    assert "data.tokenizer: 'byte' -> 'char'" in message and "data.tokenizer_fingerprint" in message

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": REPO}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ddlm.main",
            f"--config={QUICKSTART}:smoke",
            "--config.data.tokenizer=char",
            f"--workdir={trained}",
            "--mode=sample",
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
    assert len(errors) == 1 and "incompatible config" in errors[0], proc.stderr[-3000:]
    assert "data.tokenizer: 'byte' -> 'char'" in errors[0]


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
    loaded = loading.load_for_inference(workdir, devices=DEVICES)
    assert loaded.step == 2 and os.path.isdir(os.path.join(ckpt_dir, "4"))


def _data_state(step_dir: str):
    """The data-iterator state stored in checkpoint `step_dir` (grain's file: 'J' + the state as JSON)."""
    with open(os.path.join(step_dir, "data", "process_0-of-1.json")) as f:
        return json.loads(f.read()[1:])


def _edit_data_state(step_dir):
    path = os.path.join(step_dir, "data", "process_0-of-1.json")
    with open(path) as f:
        text = f.read()
    edited = text.replace('"batches": 4', '"batches": 5')  # one value: the position in the epoch
    assert edited != text
    with open(path, "w") as f:
        f.write(edited)


def _edit_metadata(step_dir):
    path = os.path.join(step_dir, "ddlm", "metadata")
    with open(path) as f:
        meta = json.load(f)
    meta["compatibility"]["train.seq_len"] = 17  # still valid JSON, still the current config's keys
    with open(path, "w") as f:
        json.dump(meta, f)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_edit_data_state, "data/process_0-of-1.json differs from its checksum"),
        (lambda step_dir: shutil.rmtree(os.path.join(step_dir, "ddlm")), "its ddlm/ metadata is missing"),
        (_edit_metadata, "its ddlm/ metadata differs from its checksum"),
    ],
    ids=["data_state_edited", "metadata_deleted", "metadata_edited"],
)
def test_damaged_data_state_or_metadata_falls_back(trained, tmp_path, caplog, damage, reason):
    """Issue 21 item 4: an edited data-iterator state restored silently (the run diverged), and a deleted
    ddlm/ folder made the checkpoint pass as an older one with every check skipped."""
    workdir = _copy(trained, tmp_path)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    damage(os.path.join(ckpt_dir, "4"))
    setup, meta = _setup_and_meta(_config())
    iterator = trainer.make_iterator(setup, "train", batch_size=8)
    with caplog.at_level(logging.WARNING), checkpoints.Checkpointer(ckpt_dir) as ckpt:
        state, step = ckpt.restore_latest(setup.abstract_state(), iterator, metadata=meta)
    assert step == 2 and int(state.step) == 2
    assert "Checkpoint at step 4 is corrupt" in caplog.text and reason in caplog.text, caplog.text
    assert iterator.get_state() == _data_state(os.path.join(ckpt_dir, "2"))  # step 2's position
    assert checkpoints.committed_steps(ckpt_dir) == [2]
    (quarantined,) = os.listdir(os.path.join(workdir, "checkpoints_corrupt"))
    assert quarantined.startswith("4-")


def _as_older_format(step_dir: str, version: int):
    """Rewrites checkpoint `step_dir` as an older ddlm wrote it: version 1 (ddlm/ with array checksums, no
    data checksums, no digest in orbax's record) or 0 (no ddlm/ at all, orbax's record lists no such item)."""
    record_path = os.path.join(step_dir, "_CHECKPOINT_METADATA")
    with open(record_path) as f:
        record = json.load(f)
    record["custom_metadata"] = {}
    if version == 0:
        shutil.rmtree(os.path.join(step_dir, "ddlm"))
        del record["item_handlers"]["ddlm"]
    else:
        meta_path = os.path.join(step_dir, "ddlm", "metadata")
        with open(meta_path) as f:
            meta = json.load(f)
        meta["format"] = 1
        del meta["data_checksums"]
        with open(meta_path, "w") as f:
            json.dump(meta, f)
    with open(record_path, "w") as f:
        json.dump(record, f)


def test_honest_checkpoints_of_every_format_restore_bit_identically(trained, tmp_path, caplog):
    """Issue 21 item 4: the new checks leave honest checkpoints alone: the current format and the older
    ones (format 1; no ddlm/ metadata) restore the same arrays and data position, bit for bit, as orbax
    reads them from disk; the older ones with a warning that they were not verified."""
    import orbax.checkpoint as ocp

    raw = ocp.PyTreeCheckpointer().restore(os.path.join(trained, "checkpoints", "4", "state"))
    setup, meta = _setup_and_meta(_config())
    for version in (checkpoints.FORMAT_VERSION, 1, 0):
        workdir = _copy(trained, tmp_path / f"v{version}")
        ckpt_dir = os.path.join(workdir, "checkpoints")
        if version < checkpoints.FORMAT_VERSION:
            _as_older_format(os.path.join(ckpt_dir, "4"), version)
        iterator = trainer.make_iterator(setup, "train", batch_size=8)
        caplog.clear()
        with caplog.at_level(logging.WARNING), checkpoints.Checkpointer(ckpt_dir) as ckpt:
            state, step = ckpt.restore_latest(setup.abstract_state(), iterator, metadata=meta)
        assert step == 4, caplog.text
        restored = jax.tree_util.tree_flatten_with_path(state)[0]
        on_disk = dict(zip(*checkpoints.leaf_paths(raw), strict=True))
        for path, value in zip(checkpoints.leaf_paths(state)[0], (v for _, v in restored), strict=True):
            np.testing.assert_array_equal(np.asarray(value), np.asarray(on_disk[path]), err_msg=path)
        assert iterator.get_state() == _data_state(os.path.join(ckpt_dir, "4"))
        assert "corrupt" not in caplog.text and not os.path.exists(workdir + "/checkpoints_corrupt")
        assert ("older ddlm" in caplog.text) == (version < checkpoints.FORMAT_VERSION), caplog.text


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


# What a job prints around a damaged checkpoint or a failed save: the one line. The child is set up as
# ddlm.main sets up a job (absl's handler, console.quiet_other_loggers at --log_level, `ddlm: error:` lines).
_JOB = """
import os
import resource
import sys

from absl import app

if os.environ.get("FILE_SIZE_LIMIT"):  # a write past it fails with EFBIG, as one on a full disk with ENOSPC
    limit = int(os.environ["FILE_SIZE_LIMIT"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # (Python ignores SIGXFSZ)


def main(argv):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ddlm import checkpoints, loading
    from ddlm.train import console

    what, directory, log_level = argv[1:]
    console.quiet_other_loggers(log_level)
    if what == "restore":
        loaded = loading.load_for_inference(directory, devices=jax.devices()[:1])
        print("restored step", loaded.step)
        from orbax_race import abandon_orbax_work

        abandon_orbax_work()  # which reads orbax abandons depends on timing: the worst case, made certain
        return
    rng = np.random.default_rng(0)
    state = {f"w{i}": jnp.asarray(rng.standard_normal((64, 256)), jnp.float32) for i in range(4)}
    ckpt = checkpoints.Checkpointer(directory)
    ckpt.save(1, state)
    try:
        ckpt.close()
    except checkpoints.CheckpointError as e:
        print(f"ddlm: error: {e}", file=sys.stderr)  # as ddlm.main reports it
        sys.exit(1)


app.run(main)
"""


def _job(*args, file_size_limit=None):
    """Runs _JOB with `args`; file_size_limit: the child's RLIMIT_FSIZE in bytes."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "",
        "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
        "FILE_SIZE_LIMIT": str(file_size_limit or ""),
    }
    return subprocess.run(
        [sys.executable, "-c", _JOB, *args], env=env, capture_output=True, text=True, timeout=180, check=False
    )


def test_damaged_array_file_is_one_warning_line(trained, tmp_path):
    """Issue 21 item 5: detection worked, but the warning came with 67 to 5,008 lines of orbax/asyncio
    tracebacks (and two orbax warnings about the read-only mode on every load)."""
    workdir = _copy(trained, tmp_path)
    data_dir = os.path.join(workdir, "checkpoints", "4", "state", "ocdbt.process_0", "d")
    for name in os.listdir(data_dir):  # every array's data file (a loader reads the EMA parameters only)
        os.remove(os.path.join(data_dir, name))
    proc = _job("restore", workdir, "warning")
    assert proc.returncode == 0 and "restored step 2" in proc.stdout, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-5000:]
    assert "Checkpoint at step 4 is corrupt or unreadable" in lines[0], lines
    assert "Error reading" in lines[0] and "See full TensorStore details" not in lines[0]  # the cause


def test_full_disk_is_one_final_line_and_the_details_are_at_info(tmp_path):
    """Issue 21 item 5: a full disk printed 612 lines with 50 tracebacks before the one that says what
    happened; with --log_level=info orbax's records of the failure are still there."""
    proc = _job("save", str(tmp_path / "warning"), "warning", file_size_limit=32 * 1024)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-5000:]
    assert lines[-1].startswith("ddlm: error: the checkpoint of step 1 was not written"), lines[-1]
    assert "File too large" in lines[-1] and "the last committed checkpoint is none" in lines[-1]

    proc = _job("save", str(tmp_path / "info"), "info", file_size_limit=32 * 1024)
    # At info level orbax's background threads may log their record of the failure after ddlm's line (seen once
    # in a full suite): the error line is the last of ddlm's own, not necessarily the last on stderr.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ddlm: error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("ddlm: error: the checkpoint of step 1 was not written")
    assert proc.stderr.count("Traceback") >= 2 and "File too large" in proc.stderr  # orbax's own records


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
        loading.load_for_inference(empty, _config(), devices=DEVICES)
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


def test_a_shortened_error_keeps_the_operating_systems_reason():
    """A long tensorstore error is cut in the middle; the OS reason ('File too large') leads the line when the cut
    took it (a longer workdir path moved it there under pytest-xdist), and a short error stays as it is."""
    long = "Error writing /" + "x" * 300 + ": File too large [tensorstore_spec=" + "{" * 400 + "]"
    short = checkpoints._shorten(long)
    assert short.startswith("File too large: Error writing /") and len(short) < 440, short
    tail_reason = "Error writing /" + "y" * 500 + ": No space left on device"
    assert checkpoints._shorten(tail_reason).count("No space left on device") == 1
    assert checkpoints._shorten("ValueError: bad\nsecond line") == "ValueError: bad"
