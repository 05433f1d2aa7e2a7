"""A workdir in a bucket: what ddlm itself writes there (write probe, checkpoint listing, metrics, sample
folders) goes through etils.epath, checked on a fake gs:// filesystem (fsspec, backed by a local folder).
Checkpoint arrays go through orbax/tensorstore's own GCS driver, which no fake reaches: the file:// route
of the same code is trained end to end in tests/test_distributed.py."""

import json
import os

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from ddlm import checkpoints, paths
from ddlm.train import metrics as metrics_lib


@pytest.fixture
def bucket(tmp_path):
    """gs://fake/... is tmp_path/fake/... for etils.epath (through fsspec, as with gcsfs)."""
    root = str(tmp_path)

    class FakeGCS(LocalFileSystem):
        protocol = ("gs", "gcs")

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path)
            if path.startswith("gs://"):
                path = os.path.join(root, path[len("gs://") :])
            return super()._strip_protocol(path)

        def __init__(self, *args, finalize_on_close=True, **kwargs):
            del finalize_on_close  # gcsfs's option, passed by etils
            super().__init__(*args, **kwargs)

    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    from etils.epath import backend

    backend.fsspec_backend._get_filesystem.cache_clear()
    yield tmp_path / "fake"
    backend.fsspec_backend._get_filesystem.cache_clear()


def test_resolve_keeps_buckets_and_makes_file_uris_local(tmp_path):
    assert paths.resolve("gs://b/run/") == "gs://b/run"
    assert paths.resolve(f"file://{tmp_path}/x") == f"{tmp_path}/x"
    assert paths.resolve("runs/x") == os.path.abspath("runs/x")
    with pytest.raises(ValueError, match="must be absolute"):
        paths.resolve("file://relative/x")


def test_a_bucket_data_dir_keeps_prepared_data_on_the_host(monkeypatch, tmp_path):
    import ml_collections

    from ddlm.data import corpora

    monkeypatch.setenv("DDLM_DATA_DIR", str(tmp_path / "cache"))
    bucket_dir = ml_collections.ConfigDict({"data_dir": "gs://b/tfds"})
    assert corpora.cache_dir(bucket_dir) == str(tmp_path / "cache")  # not '<cwd>/gs:/b/tfds'
    assert corpora.cache_dir(ml_collections.ConfigDict({"data_dir": "d"})) == os.path.abspath("d")


def test_probe_listing_metrics_and_sample_folders_on_a_bucket(bucket):
    workdir = "gs://fake/run"
    checkpoints.check_writable(workdir, "--workdir")
    assert (bucket / "run").is_dir() and not os.listdir(bucket / "run")  # the probe was removed
    for name in ("2", "4", "6.orbax-checkpoint-tmp"):
        (bucket / "run" / "checkpoints" / name).mkdir(parents=True)
    assert checkpoints.committed_steps(f"{workdir}/checkpoints") == [2, 4]

    with metrics_lib.MetricWriter(workdir) as writer:
        for step in (1, 2, 3):
            writer.write(step, "train", {"loss": 1.0 / step})
        writer.flush()  # before a checkpoint: the rows are in the bucket
        rows = [json.loads(line) for line in (bucket / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(bucket / "run" / "tensorboard"))
    # A run resumed from step 2 drops the bucket's rows past it, then appends its own.
    with metrics_lib.MetricWriter(workdir, resume_step=2) as writer:
        writer.write(3, "train", {"loss": 0.5})
    rows = [json.loads(line) for line in (bucket / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.5)]

    from ddlm.sampling import cli as sampling_cli

    first = sampling_cli._new_run_dir(f"{workdir}/samples", "step4-ancestral")
    second = sampling_cli._new_run_dir(f"{workdir}/samples", "step4-ancestral")
    assert (first, second) == (f"{workdir}/samples/step4-ancestral", f"{workdir}/samples/step4-ancestral-2")
    assert sorted(os.listdir(bucket / "run" / "samples")) == ["step4-ancestral", "step4-ancestral-2"]
