"""Corpus preparation: the tfds builder, the cache (reuse, corruption, partial runs, variants side by side,
readers and concurrent preparers) and bad input."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from ddlm.data import corpora, pipeline, sources


def config_for(directory, data_dir):
    c = pipeline.default_config()
    c.corpus, c.data_dir = f"local:{directory}", str(data_dir)
    c.validation_fraction = 0.25
    return c


def write_docs(directory, n=12):
    os.makedirs(directory, exist_ok=True)
    for i in range(n):
        with open(os.path.join(directory, f"doc{i:02d}.txt"), "w") as f:
            f.write(f"Document {i}.\nIt has two lines, the second one longer than the first.\n")


def read_all(config):
    return {split: sorted(corpora.iter_texts(config, split)) for split in ("train", "validation")}


def array_record_files(version_dir):
    return sorted(os.path.join(version_dir, f) for f in os.listdir(version_dir) if ".array_record" in f)


def file_states(version_dir):
    """{file: (inode, size, mtime, sha256)} of a prepared folder: any rewrite, replacement or deletion shows."""
    return {
        f: (st.st_ino, st.st_size, st.st_mtime_ns, sources.file_sha256(os.path.join(version_dir, f)))
        for f in sorted(os.listdir(version_dir))
        for st in [os.stat(os.path.join(version_dir, f))]
    }


def test_builtin_corpora_are_real_text():
    """Shakespeare (38 plays, by scene) and the KJV (1,189 chapters) in the default cache."""
    for name, n_docs, n_bytes, phrase in (
        ("shakespeare", 775, 4_900_000, "To be, or not to be"),
        ("kjv", 1189, 4_100_000, "In the beginning God created"),
    ):
        config = pipeline.default_config()
        config.corpus = name
        prepared = corpora.prepare_corpus(config)
        splits = prepared.manifest["splits"]
        assert splits["train"]["documents"] + splits["validation"]["documents"] == n_docs
        assert 0 < splits["validation"]["documents"] < 0.1 * n_docs
        assert splits["train"]["bytes"] + splits["validation"]["bytes"] > n_bytes
        src = corpora.data_source(config, "train")
        assert len(src) == splits["train"]["documents"]
        texts = list(corpora.iter_texts(config, "train")) + list(corpora.iter_texts(config, "validation"))
        assert any(phrase in t for t in texts)
        assert not any("**" in t or "###" in t for t in texts)  # Markdown stripped


def test_prepare_twice_reuses_the_cache(tmp_path):
    write_docs(tmp_path / "c")
    config = config_for(tmp_path / "c", tmp_path / "cache")
    first = corpora.prepare_corpus(config)
    assert not first.reused
    files = array_record_files(first.version_dir)
    mtimes = [os.stat(f).st_mtime_ns for f in files]
    second = corpora.prepare_corpus(config)
    assert second.reused and second.version_dir == first.version_dir
    assert [os.stat(f).st_mtime_ns for f in files] == mtimes
    data = read_all(config)
    assert len(data["train"]) + len(data["validation"]) == 12 and data["validation"]


@pytest.mark.parametrize("damage", ["flip_bytes", "truncate", "delete_manifest", "extra_file"])
def test_corrupt_or_partial_preparation_is_redone(tmp_path, damage):
    write_docs(tmp_path / "c")
    config = config_for(tmp_path / "c", tmp_path / "cache")
    prepared = corpora.prepare_corpus(config)
    expected = read_all(config)
    target = array_record_files(prepared.version_dir)[0]
    if damage == "flip_bytes":
        with open(target, "r+b") as f:
            f.seek(os.path.getsize(target) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "truncate":
        with open(target, "r+b") as f:
            f.truncate(os.path.getsize(target) // 2)
    elif damage == "delete_manifest":  # what a run killed after tfds finished looks like
        os.remove(os.path.join(prepared.version_dir, corpora.MANIFEST))
    else:
        with open(os.path.join(prepared.version_dir, "stray.array_record-00001-of-00002"), "w") as f:
            f.write("junk")
    again = corpora.prepare_corpus(config)
    assert not again.reused and again.version_dir == prepared.version_dir
    assert read_all(config) == expected
    assert corpora.prepare_corpus(config).reused
    # The damaged copy is renamed aside (one rename), not deleted.
    parent = os.path.dirname(corpora.variant_dir(config))
    (aside,) = [n for n in os.listdir(parent) if n.startswith(".corrupt-")]
    assert os.path.isdir(os.path.join(parent, aside))


def test_crash_during_preparation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    write_docs(tmp_path / "c")
    config = config_for(tmp_path / "c", tmp_path / "cache")
    original = corpora.TextCorpus._generate_examples

    def dying(self, docs):
        for i, example in enumerate(original(self, docs)):
            if i == 3:
                raise RuntimeError("simulated crash while writing")
            yield example

    monkeypatch.setattr(corpora.TextCorpus, "_generate_examples", dying)
    with pytest.raises(Exception, match="simulated crash"):
        corpora.prepare_corpus(config)
    monkeypatch.setattr(corpora.TextCorpus, "_generate_examples", original)
    version_dirs = [r for r, _, fs in os.walk(tmp_path / "cache") if corpora.MANIFEST in fs]
    assert not version_dirs, "a crashed preparation must not leave a manifest"
    data_dir = corpora.variant_dir(config)
    parent = os.path.dirname(data_dir)
    assert os.listdir(parent) == [], "the temporary folder of a failed preparation is removed"
    # A preparer killed outright leaves its temporary folder: the next preparer of the variant removes it.
    stale = os.path.join(parent, f".tmp-{os.path.basename(data_dir)}-99999-deadbeef")
    os.makedirs(os.path.join(stale, "text_corpus"))
    prepared = corpora.prepare_corpus(config)
    assert not prepared.reused
    assert sum(len(v) for v in read_all(config).values()) == 12
    assert os.listdir(parent) == [os.path.basename(data_dir)]


def test_changed_inputs_are_prepared_again(tmp_path):
    write_docs(tmp_path / "c", n=8)
    config = config_for(tmp_path / "c", tmp_path / "cache")
    first = corpora.prepare_corpus(config)
    before = file_states(first.version_dir)
    with open(tmp_path / "c" / "new.txt", "w") as f:
        f.write("A ninth document.\n")
    prepared = corpora.prepare_corpus(config)
    assert not prepared.reused and prepared.version_dir != first.version_dir
    assert sum(len(v) for v in read_all(config).values()) == 9
    assert file_states(first.version_dir) == before  # the earlier variant is not touched


def test_empty_directory_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("not a .txt or .jsonl file")
    with pytest.raises(ValueError, match=r"no \.txt or \.jsonl files found"):
        corpora.prepare_corpus(config_for(tmp_path / "empty", tmp_path / "cache"))
    with pytest.raises(ValueError, match="is not a directory"):
        corpora.prepare_corpus(config_for(tmp_path / "missing", tmp_path / "cache"))


def test_bad_files_are_skipped_counted_and_logged(tmp_path, caplog):
    write_docs(tmp_path / "c", n=6)
    (tmp_path / "c" / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "c" / "blank.txt").write_text("  \n\n")
    (tmp_path / "c" / "lines.jsonl").write_text('{"text": "a jsonl document"}\n\n{"text": ""}\n')
    config = config_for(tmp_path / "c", tmp_path / "cache")
    with caplog.at_level("WARNING"):
        prepared = corpora.prepare_corpus(config)
    assert prepared.manifest["skipped"] == {"not_utf8": 1, "empty": 2}
    assert "latin1.txt: not UTF-8" in caplog.text and "blank.txt: empty document" in caplog.text
    assert sum(s["documents"] for s in prepared.manifest["splits"].values()) == 7


def test_nothing_usable_is_an_error(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "c" / "b.txt").write_text("")
    with pytest.raises(ValueError, match=r"found 0 usable documents.*1 non-UTF-8 files and 1 empty"):
        corpora.prepare_corpus(config_for(tmp_path / "c", tmp_path / "cache"))
    assert not [r for r, _, fs in os.walk(tmp_path / "cache") if corpora.MANIFEST in fs]


def test_jsonl_errors_name_file_and_line(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl").write_text('{"text": "ok"}\n{"text": "ok too"}\n{"body": "wrong field"}\n')
    with pytest.raises(ValueError, match=r"a\.jsonl:3: expected a JSON object with a string field 'text'"):
        corpora.prepare_corpus(config_for(tmp_path / "c", tmp_path / "cache"))
    (tmp_path / "c" / "a.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"a\.jsonl:2: not a JSON object"):
        corpora.prepare_corpus(config_for(tmp_path / "c", tmp_path / "cache"))


def test_jsonl_text_field_is_configurable(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl").write_text("".join(f'{{"body": "doc {i}"}}\n' for i in range(5)))
    config = config_for(tmp_path / "c", tmp_path / "cache")
    config.text_field = "body"
    assert sorted(sum(read_all(config).values(), [])) == [f"doc {i}" for i in range(5)]


def test_unprepared_tfds_name_is_a_clear_error(tmp_path):
    config = pipeline.default_config()
    config.corpus, config.data_dir = "lm1b", str(tmp_path)
    with pytest.raises(ValueError, match="must be a tfds dataset prepared"):
        corpora.data_source(config, "train")


def test_markdown_stripping():
    md = "# Hamlet\n\n## ACT I\n\n### SCENE I.\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho\\'s there?  \n"
    assert (
        sources.strip_play_markdown(md)
        == "Hamlet\n\nACT I\n\nSCENE I.\n\nEnter BERNARDO\n\nBERNARDO\nWho's there?\n"
    )


def test_both_splits_always_exist(tmp_path):
    write_docs(tmp_path / "c", n=3)
    for fraction in (0.0, 1.0):
        config = config_for(tmp_path / "c", tmp_path / f"cache{fraction}")
        config.validation_fraction = fraction
        splits = corpora.prepare_corpus(config).manifest["splits"]
        assert {s: v["documents"] for s, v in splits.items()} == (
            {"train": 2, "validation": 1} if fraction == 0.0 else {"train": 1, "validation": 2}
        )
        data = read_all(config)
        assert len(data["train"]) == splits["train"]["documents"]
        assert sum(len(t.encode()) for t in data["validation"]) == splits["validation"]["bytes"]


@pytest.mark.timeout(120)
def test_prepare_command(tmp_path):
    import subprocess
    import sys

    write_docs(tmp_path / "c", n=5)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [
        sys.executable,
        "-m",
        "ddlm.data.prepare",
        f"--corpus=local:{tmp_path / 'c'}",
        f"--data_dir={tmp_path / 'cache'}",
        "--tokenizer=char",
    ]
    runs = [
        subprocess.run(
            cmd + extra,
            capture_output=True,
            text=True,
            timeout=100,
            cwd=repo,
            env=dict(os.environ, JAX_PLATFORMS="cpu"),
        )
        for extra in ([], [], ["--validation_fraction=0.5"])
    ]
    assert all(r.returncode == 0 for r in runs), "".join(r.stderr[-2000:] for r in runs)
    assert ": prepared " in runs[0].stdout and ": reused " in runs[1].stdout
    assert "CharTokenizer(vocab_size=" in runs[1].stdout
    # Another validation fraction is another variant, in its own folder.
    assert ": prepared " in runs[2].stdout
    folder = [r.stdout.split(": ", 1)[1].split()[1] for r in runs]
    assert folder[0] == folder[1] != folder[2]


# ------------------------------------------------------------------------------------------------ shared cache


def test_two_variants_of_a_corpus_live_side_by_side(tmp_path):
    """Another validation_fraction is another variant: prepared beside the first, which stays as it was and
    is reused afterwards (the fork that rebuilt the quickstart's corpus under it, issue 22)."""
    write_docs(tmp_path / "c", n=16)
    a = config_for(tmp_path / "c", tmp_path / "cache")
    b = config_for(tmp_path / "c", tmp_path / "cache")
    b.validation_fraction = 0.6
    first = corpora.prepare_corpus(a)
    before = file_states(first.version_dir)
    data_a = read_all(a)
    second = corpora.prepare_corpus(b)
    assert not second.reused and second.version_dir != first.version_dir
    assert file_states(first.version_dir) == before
    again = corpora.prepare_corpus(a)
    assert again.reused and again.version_dir == first.version_dir and corpora.prepare_corpus(b).reused
    data_b = read_all(b)
    assert read_all(a) == data_a
    assert len(data_b["validation"]) > len(data_a["validation"])
    assert sorted(data_a["train"] + data_a["validation"]) == sorted(data_b["train"] + data_b["validation"])
    assert second.manifest["inputs"]["validation_fraction"] == 0.6


def test_preparing_a_variant_while_a_reader_iterates_leaves_the_reader_intact(tmp_path, monkeypatch):
    """A reader of variant A (array_record opens a shard's file on its first read, as grain workers do after
    unpickling) reads all of A while variant B is being written, and again after: same records, and A's files
    keep their inode, size, mtime and checksum (nothing of A is deleted, renamed or rewritten)."""
    write_docs(tmp_path / "c", n=16)
    a = config_for(tmp_path / "c", tmp_path / "cache")
    b = config_for(tmp_path / "c", tmp_path / "cache")
    b.validation_fraction = 0.5
    version_dir = corpora.prepare_corpus(a).version_dir
    before = file_states(version_dir)
    expected = {s: [bytes(r["text"]) for r in corpora.data_source(a, s)] for s in ("train", "validation")}
    readers = {s: corpora.data_source(a, s) for s in ("train", "validation")}  # no file opened yet
    during = {}
    original = corpora.TextCorpus._generate_examples

    def reading_meanwhile(self, split):
        for i, example in enumerate(original(self, split)):
            if i == 2 and not during:  # B is half written: A's reader goes through all of A
                during.update({s: [bytes(r["text"]) for r in src] for s, src in readers.items()})
            yield example

    monkeypatch.setattr(corpora.TextCorpus, "_generate_examples", reading_meanwhile)
    assert not corpora.prepare_corpus(b).reused
    assert during == expected
    assert {s: [bytes(r["text"]) for r in src] for s, src in readers.items()} == expected
    assert file_states(version_dir) == before


def test_a_corpus_prepared_by_an_earlier_version_is_read_in_place_and_never_touched(tmp_path, caplog):
    """The layout before variants (<cache>/tfds/text_corpus/<corpus>/<version>, one folder per corpus): a
    folder whose manifest matches is reused where it is; another variant, or a damaged old folder, gets a new
    variant folder and the old one stays as it is (only read, never moved or deleted)."""
    write_docs(tmp_path / "c", n=16)
    a = config_for(tmp_path / "c", tmp_path / "cache")
    prepared = corpora.prepare_corpus(a)
    files = prepared.manifest["files"]
    variant = corpora.variant_dir(a)
    legacy_root = tmp_path / "cache" / corpora.LEGACY_DIR
    os.makedirs(legacy_root)
    os.rename(os.path.join(variant, "text_corpus"), legacy_root / "text_corpus")  # what earlier versions left
    shutil.rmtree(variant)  # tfds also left an empty downloads/ there
    old = corpora.prepare_corpus(a)
    legacy_version_dir = os.path.join(legacy_root, "text_corpus", corpora.corpus_slug(a.corpus), "1.0.0")
    assert old.reused and old.version_dir == legacy_version_dir and old.manifest["files"] == files
    assert not os.path.exists(variant)
    expected = read_all(a)
    before = file_states(legacy_version_dir)
    b = config_for(tmp_path / "c", tmp_path / "cache")
    b.validation_fraction = 0.5
    assert not corpora.prepare_corpus(b).reused
    assert (
        file_states(legacy_version_dir) == before
        and corpora.prepare_corpus(a).version_dir == legacy_version_dir
    )
    target = os.path.join(legacy_version_dir, array_record_files(legacy_version_dir)[0])
    with open(target, "r+b") as f:  # the old folder is damaged: a fresh variant, the old one left alone
        f.truncate(os.path.getsize(target) - 1)
    damaged = file_states(legacy_version_dir)
    with caplog.at_level("WARNING"):
        fresh = corpora.prepare_corpus(a)
    assert not fresh.reused and fresh.version_dir.startswith(variant + os.sep)
    assert fresh.manifest["files"] == files and read_all(a) == expected
    assert file_states(legacy_version_dir) == damaged
    assert "earlier ddlm" in caplog.text and "left as it is" in caplog.text


_PREPARER = """
import json, os, sys, time
from ddlm.data import corpora, pipeline
name, corpus, cache, fraction, sync = sys.argv[1:]
c = pipeline.default_config()
c.corpus, c.data_dir, c.validation_fraction = corpus, cache, float(fraction)
open(os.path.join(sync, name), "w").close()  # imported: ready
while not os.path.exists(os.path.join(sync, "go")):
    time.sleep(0.01)
p = corpora.prepare_corpus(c)
print(json.dumps({"reused": p.reused, "version_dir": p.version_dir, "manifest": p.manifest}))
"""


@pytest.mark.timeout(240)
def test_concurrent_preparers_in_processes_do_not_corrupt_the_cache(tmp_path):
    """Three processes started together: two prepare variant A (one prepares, the other waits on the lock and
    reuses its work), one variant B. All succeed with identical results for A, both variants are intact and
    reused afterwards, and no temporary folder is left."""
    write_docs(tmp_path / "c", n=16)
    sync = tmp_path / "sync"
    sync.mkdir()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    jobs = {"a1": 0.25, "a2": 0.25, "b": 0.5}
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-c",
                _PREPARER,
                name,
                f"local:{tmp_path / 'c'}",
                str(tmp_path / "cache"),
                str(f),
                str(sync),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=repo,
            env=dict(os.environ, JAX_PLATFORMS="cpu"),
        )
        for name, f in jobs.items()
    }
    try:
        deadline = time.monotonic() + 180  # only a failure waits this long
        while not all((sync / n).exists() for n in jobs) and time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs.values()):
                break
            time.sleep(0.05)
        (sync / "go").touch()
        outs = {n: p.communicate(timeout=200) for n, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    for n, (out, err) in outs.items():
        assert procs[n].returncode == 0, (n, err[-2000:])
    results = {n: json.loads(out.strip().splitlines()[-1]) for n, (out, _) in outs.items()}
    assert sorted([results["a1"]["reused"], results["a2"]["reused"]]) == [False, True]
    assert results["a1"]["manifest"] == results["a2"]["manifest"]
    assert results["a1"]["version_dir"] == results["a2"]["version_dir"] != results["b"]["version_dir"]
    a = config_for(tmp_path / "c", tmp_path / "cache")
    b = config_for(tmp_path / "c", tmp_path / "cache")
    b.validation_fraction = 0.5
    for config, name in ((a, "a1"), (b, "b")):
        prepared = corpora.prepare_corpus(config)  # checks every file against the manifest
        assert prepared.reused and prepared.manifest == results[name]["manifest"]
        assert sum(len(v) for v in read_all(config).values()) == 16
    parent = os.path.dirname(corpora.variant_dir(a))
    assert sorted(os.listdir(parent)) == sorted(os.path.basename(corpora.variant_dir(c)) for c in (a, b)), (
        "no temporary folder is left"
    )
