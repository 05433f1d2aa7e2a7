"""Corpus preparation: the tfds builder, the cache (reuse, corruption, partial runs) and bad input."""

import os

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
    assert not again.reused
    assert read_all(config) == expected
    assert corpora.prepare_corpus(config).reused


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
    prepared = corpora.prepare_corpus(config)
    assert not prepared.reused
    assert sum(len(v) for v in read_all(config).values()) == 12


def test_changed_inputs_are_prepared_again(tmp_path):
    write_docs(tmp_path / "c", n=8)
    config = config_for(tmp_path / "c", tmp_path / "cache")
    corpora.prepare_corpus(config)
    with open(tmp_path / "c" / "new.txt", "w") as f:
        f.write("A ninth document.\n")
    prepared = corpora.prepare_corpus(config)
    assert not prepared.reused
    assert sum(len(v) for v in read_all(config).values()) == 9


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
            cmd,
            capture_output=True,
            text=True,
            timeout=100,
            cwd=repo,
            env=dict(os.environ, JAX_PLATFORMS="cpu"),
        )
        for _ in range(2)
    ]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    assert ": prepared " in runs[0].stdout and ": reused " in runs[1].stdout
    assert "CharTokenizer(vocab_size=" in runs[1].stdout
