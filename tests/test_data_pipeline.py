"""The grain pipeline: exact epochs over simulated processes, padding, sharding, workers, resume."""

import collections
import json
import os
import subprocess
import sys
import textwrap

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ddlm.data import corpora, pipeline, tokenizers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()


def write_corpus(directory, n_docs=60, seed=0, max_words=80):
    """Unique documents 'doc<i>: ...' of 0..max_words words, half as .txt files, half in a .jsonl."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    docs = {}
    lines = []
    for i in range(n_docs):
        n = int(rng.integers(0, max_words))
        text = f"doc{i:04d}: " + " ".join(rng.choice(WORDS, size=n)) + ("\n" if i % 3 else "")
        docs[f"doc{i:04d}"] = text
        if i % 2:
            with open(os.path.join(directory, f"d{i:04d}.txt"), "w") as f:
                f.write(text)
        else:
            lines.append(json.dumps({"text": text}))
    with open(os.path.join(directory, "more.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return docs


def local_config(directory, data_dir, tokenizer="byte", packing="wrap"):
    c = pipeline.default_config()
    c.corpus, c.data_dir, c.tokenizer, c.packing = f"local:{directory}", str(data_dir), tokenizer, packing
    c.validation_fraction = 0.2
    return c


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(config, tokenizer, {key: framed token list} of the train split)."""
    root = tmp_path_factory.mktemp("data")
    write_corpus(root / "corpus")
    config = local_config(root / "corpus", root / "cache")
    tok = tokenizers.get_tokenizer(config)
    framed = {}
    for text in corpora.iter_texts(config, "train"):
        framed[text.split(":")[0]] = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
    return config, tok, framed


def split_at_eos(stream, eos_id):
    """Cuts a token stream after every eos: (complete framed documents, trailing partial one)."""
    docs, start = [], 0
    for i in np.flatnonzero(stream == eos_id):
        docs.append(stream[start : i + 1].tolist())
        start = i + 1
    return docs, stream[start:].tolist()


@pytest.mark.parametrize("n_proc", [1, 2, 4])
def test_wrap_epoch_every_token_once(corpus, n_proc):
    config, tok, framed = corpus
    seq_len, local_batch = 24, 2
    total = sum(map(len, framed.values()))
    by_key = {tuple(v): k for k, v in framed.items()}
    seen = collections.Counter()
    emitted = dropped = partial_tokens = 0
    partial_keys, n_batches = [], set()
    keys = [t.split(":")[0] for t in corpora.iter_texts(config, "train")]  # data-source order
    shard_tokens = [sum(len(framed[k]) for k in keys[p::n_proc]) for p in range(n_proc)]
    for p in range(n_proc):
        it = pipeline.make_iterator(
            config,
            tok,
            "train",
            global_batch_size=local_batch * n_proc,
            seq_len=seq_len,
            seed=3,
            num_epochs=1,
            process_index=p,
            process_count=n_proc,
        )
        batches = list(it)
        assert batches, "every process must yield batches"
        n_batches.add(len(batches))
        dropped_once = it.dropped_tokens
        with pytest.raises(StopIteration):  # an ended iterator stays ended, counting nothing twice
            next(it)
        assert it.dropped_tokens == dropped_once
        for b in batches:
            assert b["tokens"].shape == (local_batch, seq_len) and b["tokens"].dtype == np.int32
            assert b["loss_mask"].dtype == np.float32 and np.all(b["loss_mask"] == 1.0)
        stream = np.concatenate([b["tokens"].reshape(-1) for b in batches])
        assert stream[0] == tok.bos_id
        complete, partial = split_at_eos(stream, tok.eos_id)
        for d in complete:
            seen[by_key[tuple(d)]] += 1  # KeyError if a document came out altered
        if partial:  # the document cut by the end of the last batch: a prefix of a real one
            key = tok.decode(partial).split(":")[0]
            assert framed[key][: len(partial)] == partial
            partial_keys.append(key)
            partial_tokens += len(partial)
        emitted += stream.size
        assert it.dropped_tokens == shard_tokens[p] - stream.size
        dropped += it.dropped_tokens
    # Every process stops with the poorest one (a multi-host step needs them all).
    assert n_batches == {min(shard_tokens) // (local_batch * seq_len)}, n_batches
    assert max(seen.values()) == 1, "a document appeared twice"
    missing = set(framed) - set(seen)
    assert set(partial_keys) <= missing
    # Every token of the split is emitted exactly once or is part of the counted remainder.
    assert emitted + dropped == total
    assert sum(len(framed[k]) for k in missing) == dropped + partial_tokens
    if n_proc == 1:
        assert dropped < local_batch * seq_len  # only what cannot fill a batch


def test_pad_mode_one_document_per_sequence(corpus):
    config, tok, framed = corpus
    config = config.copy_and_resolve_references()
    config.packing = "pad"
    seq_len, local_batch, n_proc = 64, 3, 2
    seen, truncated, dropped, n_batches = collections.Counter(), 0, 0, set()
    for p in range(n_proc):
        it = pipeline.make_iterator(
            config,
            tok,
            "train",
            global_batch_size=local_batch * n_proc,
            seq_len=seq_len,
            seed=1,
            num_epochs=1,
            process_index=p,
            process_count=n_proc,
        )
        batches = list(it)
        n_batches.add(len(batches))
        for b in batches:
            for row, mask in zip(b["tokens"], b["loss_mask"]):
                n_real = int(mask.sum())
                np.testing.assert_array_equal(mask, np.arange(seq_len) < n_real)  # real tokens first
                np.testing.assert_array_equal(row[n_real:], tok.pad_id)
                assert tok.pad_id not in row[:n_real].tolist()
                key = tok.decode(row[:n_real]).split(":")[0]
                full = framed[key]
                assert row[:n_real].tolist() == full[:seq_len]  # the whole document, or its start
                assert n_real == min(len(full), seq_len)
                seen[key] += 1
        truncated += it.truncated_tokens
        dropped += it.dropped_tokens
    assert len(n_batches) == 1 and max(seen.values()) == 1
    assert truncated == sum(max(0, len(framed[k]) - seq_len) for k in seen)
    assert truncated > 0  # the corpus has documents longer than the sequence
    assert len(framed) - len(seen) <= n_proc * (local_batch - 1)  # only partial last batches dropped


def test_global_sharded_batches(corpus):
    config, tok, _ = corpus
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    kw = dict(global_batch_size=16, seq_len=32, seed=5)
    it_np = pipeline.make_iterator(config, tok, "train", **kw)
    it_jax = pipeline.make_iterator(config, tok, "train", sharding=sharding, **kw)
    for _ in range(3):
        a, b = next(it_np), next(it_jax)
        assert isinstance(b["tokens"], jax.Array) and b["tokens"].sharding == sharding
        assert b["tokens"].shape == (16, 32) and b["tokens"].dtype == jax.numpy.int32
        assert b["loss_mask"].dtype == jax.numpy.float32
        np.testing.assert_array_equal(np.asarray(b["tokens"]), a["tokens"])
    with pytest.raises(ValueError, match="sharding=None when simulating"):
        pipeline.make_iterator(
            config, tok, "train", sharding=sharding, process_index=0, process_count=2, **kw
        )


def test_epochs_reshuffle_and_seed(corpus):
    config, tok, _ = corpus
    kw = dict(global_batch_size=2, seq_len=16, process_index=0, process_count=1)
    first = [next(pipeline.make_iterator(config, tok, "train", seed=s, **kw))["tokens"] for s in (0, 0, 1)]
    np.testing.assert_array_equal(first[0], first[1])
    assert not np.array_equal(first[0], first[2])
    # Two epochs of pad mode: the same documents, in a different order.
    config = config.copy_and_resolve_references()
    config.packing = "pad"
    it = pipeline.make_iterator(config, tok, "train", global_batch_size=1, seq_len=512, seed=0, num_epochs=2)
    rows = [tuple(b["tokens"][0]) for b in it]
    half = len(rows) // 2
    assert sorted(rows[:half]) == sorted(rows[half:]) and rows[:half] != rows[half:]


@pytest.mark.timeout(240)
def test_workers_give_the_same_batches_and_resume(corpus):
    config, tok, _ = corpus
    kw = dict(global_batch_size=4, seq_len=32, seed=2)
    expected = [next(it) for it in [pipeline.make_iterator(config, tok, "train", **kw)] for _ in range(6)]
    config = config.copy_and_resolve_references()
    config.num_workers = 2
    it = pipeline.make_iterator(config, tok, "train", **kw)
    got = [next(it) for _ in range(3)]
    state = it.get_state()
    it.close()
    it2 = pipeline.make_iterator(config, tok, "train", **kw)
    it2.set_state(state)
    got += [next(it2) for _ in range(3)]
    it2.close()
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e["tokens"], g["tokens"])


RESTORE_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, grain, orbax.checkpoint as ocp
    from ddlm.data import pipeline, tokenizers
    config = pipeline.default_config()
    config.corpus, config.tokenizer, config.packing = sys.argv[2], "char", sys.argv[3]
    tok = tokenizers.get_tokenizer(config)
    it = pipeline.make_iterator(config, tok, "train", global_batch_size=4, seq_len=64, seed=7)
    mngr = ocp.CheckpointManager(sys.argv[1])
    mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it)))
    batches = [next(it) for _ in range(4)]
    np.savez(sys.argv[1] + "/after.npz", tokens=np.stack([b["tokens"] for b in batches]),
             loss_mask=np.stack([b["loss_mask"] for b in batches]))
""")


@pytest.mark.timeout(200)
@pytest.mark.parametrize("corpus_name,packing", [("shakespeare", "wrap"), ("kjv", "pad")])
def test_restore_in_a_new_process(tmp_path, corpus_name, packing):
    """Save the iterator mid-epoch with orbax; a new process restoring it continues identically."""
    config = pipeline.default_config()
    config.corpus, config.tokenizer, config.packing = corpus_name, "char", packing
    tok = tokenizers.get_tokenizer(config)
    it = pipeline.make_iterator(config, tok, "train", global_batch_size=4, seq_len=64, seed=7)
    for _ in range(5):
        next(it)
    ckpt = str(tmp_path / "ckpt")
    mngr = ocp.CheckpointManager(ckpt, options=ocp.CheckpointManagerOptions(create=True))
    mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = [next(it) for _ in range(4)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    out = subprocess.run(
        [sys.executable, "-c", RESTORE_SCRIPT, ckpt, corpus_name, packing],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    after = np.load(ckpt + "/after.npz")
    np.testing.assert_array_equal(after["tokens"], np.stack([b["tokens"] for b in expected]))
    np.testing.assert_array_equal(after["loss_mask"], np.stack([b["loss_mask"] for b in expected]))


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


class _MaskEmittingTokenizer(tokenizers.ByteTokenizer):
    def _encode(self, text):
        return [self.mask_id] if "doc0003" in text else super()._encode(text)


def test_invalid_token_ids_name_the_document(corpus):
    config, _, _ = corpus
    it = pipeline.make_iterator(
        config, _MaskEmittingTokenizer(), "train", global_batch_size=1, seq_len=8, seed=0, num_epochs=1
    )
    with pytest.raises(ValueError, match=r"document 'd0003.txt', field 'text'.*reserved mask id 259"):
        for _ in it:
            pass


def test_sequence_longer_than_corpus_and_batch_larger_than_split(tmp_path):
    write_corpus(tmp_path / "c", n_docs=30, max_words=5)
    config = local_config(tmp_path / "c", tmp_path / "cache")
    tok = tokenizers.get_tokenizer(config)
    with pytest.raises(ValueError, match="seq_len=100000 is larger than the whole split"):
        pipeline.make_iterator(config, tok, "train", global_batch_size=1, seq_len=100_000)
    it = pipeline.make_iterator(config, tok, "validation", global_batch_size=64, seq_len=32, num_epochs=1)
    with pytest.raises(ValueError, match="ran out before one batch"):
        next(it)


def test_config_errors(corpus):
    config, tok, _ = corpus
    config = config.copy_and_resolve_references()
    with pytest.raises(ValueError, match="global_batch_size=6 must be a positive multiple"):
        pipeline.make_iterator(
            config, tok, "train", global_batch_size=6, seq_len=8, process_count=4, process_index=0
        )
    with pytest.raises(ValueError, match="split must be 'train' or 'validation'"):
        pipeline.make_iterator(config, tok, "test", global_batch_size=1, seq_len=8)
    config.vocab_size = 1000
    with pytest.raises(ValueError, match="config.data.vocab_size=1000"):
        pipeline.make_iterator(config, tok, "train", global_batch_size=1, seq_len=8)
    config.vocab_size, config.packing = 0, "bucket"
    with pytest.raises(ValueError, match="config.data.packing must be 'wrap' or 'pad'"):
        pipeline.make_iterator(config, tok, "train", global_batch_size=1, seq_len=8)


def test_default_config_fields():
    c = pipeline.default_config()
    for field in ("corpus", "data_dir", "tokenizer", "vocab_size", "packing", "num_workers", "shuffle_seed"):
        assert field in c
    # Every field carries a one-line comment in the source.
    import inspect

    src = inspect.getsource(pipeline.default_config)
    for line in src.splitlines():
        if line.strip().startswith("c.") and "=" in line and "ConfigDict" not in line:
            assert "#" in line, f"default_config field without a comment: {line.strip()}"


TWO_PROCESS_SCRIPT = """import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
import numpy as np
import jax.numpy as jnp
from jax.experimental import multihost_utils
from ddlm.data import pipeline, tokenizers
config = pipeline.default_config()
config.corpus, config.tokenizer = "shakespeare", "char"
tok = tokenizers.get_tokenizer(config)
mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
it = pipeline.make_iterator(config, tok, "train", global_batch_size=8, seq_len=32, seed=4, sharding=sharding)
b = next(it)
assert b["tokens"].shape == (8, 32) and b["tokens"].sharding == sharding
train_tokens = multihost_utils.process_allgather(b["tokens"], tiled=True)
count = jax.jit(lambda m: jnp.sum(m), out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
n_batches, total = 0, 0.0
for vb in pipeline.make_iterator(config, tok, "validation", global_batch_size=8, seq_len=256, seed=0,
                                 sharding=sharding, num_epochs=1):
    total += float(count(vb["loss_mask"]))  # a collective: unequal batch counts would hang here
    n_batches += 1
if pid == 0:
    np.savez(out, train_tokens=np.asarray(train_tokens), n_batches=n_batches, total=total)
print("done", pid, n_batches, flush=True)
"""


@pytest.mark.timeout(240)
def test_two_real_processes_make_global_batches(tmp_path):
    """jax.distributed with 2 processes x 4 CPU devices: each process feeds its rows of the global
    batch; a finite validation epoch gives both the same number of batches (a collective per batch
    would hang otherwise); the values equal the simulated-process pipeline's."""
    import socket

    config = pipeline.default_config()
    config.corpus, config.tokenizer = "shakespeare", "char"
    tok = tokenizers.get_tokenizer(config)  # prepare before the two processes start
    sock = socket.socket()
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
    sock.close()
    script, out = tmp_path / "worker.py", tmp_path / "out.npz"
    script.write_text(TWO_PROCESS_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = REPO
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(port), str(out)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=200)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    got = np.load(out)
    rows, n_batches, total = [], set(), 0.0
    for p in range(2):
        kw = dict(seed=4, process_index=p, process_count=2)
        rows.append(
            next(pipeline.make_iterator(config, tok, "train", global_batch_size=8, seq_len=32, **kw))[
                "tokens"
            ]
        )
        val = list(
            pipeline.make_iterator(
                config, tok, "validation", global_batch_size=8, seq_len=256, num_epochs=1, **{**kw, "seed": 0}
            )
        )
        n_batches.add(len(val))
        total += sum(float(b["loss_mask"].sum()) for b in val)
    np.testing.assert_array_equal(got["train_tokens"], np.concatenate(rows))
    assert n_batches == {int(got["n_batches"])} and float(got["total"]) == total


def test_prepared_tfds_dataset_by_name(tmp_path):
    """A corpus that is neither built in nor local is a tfds dataset prepared under data_dir (as
    lm1b or openwebtext on a cluster), read by name with tfds.data_source; tfds split slicing works."""
    kjv = pipeline.default_config()
    kjv.corpus = "kjv"
    prepared = corpora.prepare_corpus(kjv)
    config = pipeline.default_config()
    config.corpus = "text_corpus/kjv"  # <builder>/<config> as tfds names it
    config.data_dir = os.path.dirname(os.path.dirname(os.path.dirname(prepared.version_dir)))
    config.tokenizer, config.train_split, config.eval_split = "byte", "train[:20]", "validation[:5]"
    assert len(corpora.data_source(config, "train")) == 20
    expected = list(corpora.iter_texts(kjv, "validation"))[:5]
    assert list(corpora.iter_texts(config, "validation")) == expected
    tok = tokenizers.get_tokenizer(config)
    it = pipeline.make_iterator(
        config, tok, "validation", global_batch_size=2, seq_len=64, seed=0, num_epochs=1
    )
    stream = np.concatenate([b["tokens"].reshape(-1) for b in it])
    framed = [[tok.bos_id] + tok.encode(t) + [tok.eos_id] for t in expected]
    assert stream.size + it.dropped_tokens == sum(map(len, framed))


def test_tokenizer_not_matching_the_corpus_names_the_document(tmp_path, corpus):
    """A char alphabet saved for another corpus cannot encode this one: the error says where."""
    config, _, _ = corpus
    alphabet = tmp_path / "alphabet.json"
    alphabet.write_text(json.dumps({"alphabet": "abcdefghijklmnopqrstuvwxyz :\n"}))
    config = config.copy_and_resolve_references()
    config.tokenizer, config.tokenizer_path = "char", str(alphabet)
    tok = tokenizers.get_tokenizer(config)
    it = pipeline.make_iterator(config, tok, "train", global_batch_size=1, seq_len=8, num_epochs=1)
    with pytest.raises(ValueError, match=r"document '.*', field 'text': character '\d' is not in"):
        next(it)
