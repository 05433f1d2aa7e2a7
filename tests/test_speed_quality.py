"""The pure pieces of benchmarks/speed_quality.py: the matched-quality test, prompts and canvases, how the
first streamable unit is timed, and the sampler fields of every setting (valid for its model's sampler)."""

import importlib.util
import pathlib

import ml_collections
import numpy as np
import pytest

from ddlm.sampling import config as sampler_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sq():
    spec = importlib.util.spec_from_file_location("speed_quality", ROOT / "benchmarks" / "speed_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(ppl, ppl_se, ent, ent_se, mauve=None, mauve_se=None):
    row = {"gen_ppl": ppl, "gen_ppl_se": ppl_se, "entropy": ent, "entropy_se": ent_se}
    if mauve is not None:
        row.update(mauve=mauve, mauve_se=mauve_se)
    return row


def test_within_is_two_standard_errors_of_the_difference(sq):
    # sqrt(3^2 + 4^2) = 5: a difference of 10 is exactly 2 SE
    assert sq.within(10.0, 3.0, 20.0, 4.0) and not sq.within(10.0, 3.0, 20.01, 4.0)
    assert sq.within(1.0, float("nan"), 1.0, 0.0) and not sq.within(1.0, float("nan"), 1.5, 0.0)
    assert not sq.within(float("nan"), 1.0, 1.0, 1.0)
    assert sq.within(0.0, 1.0, 3.0, 1.0, z=3.0) and not sq.within(0.0, 1.0, 3.0, 1.0)


def test_matches_needs_gen_ppl_entropy_and_mauve(sq):
    base = _row(7.0, 0.2, 3.00, 0.02, 0.90, 0.01)
    assert sq.matches(_row(7.3, 0.2, 3.02, 0.02, 0.89, 0.01), base)
    assert not sq.matches(_row(8.0, 0.2, 3.00, 0.02, 0.90, 0.01), base)  # gen-ppl 3.5 SE away
    assert not sq.matches(_row(7.0, 0.2, 2.80, 0.02, 0.90, 0.01), base)  # entropy collapsed
    assert not sq.matches(_row(7.0, 0.2, 3.00, 0.02, 0.80, 0.01), base)  # MAUVE
    assert sq.matches(_row(7.0, 0.2, 3.00, 0.02), base)  # no MAUVE on one side: not compared


def test_prompts_and_canvases(sq):
    tok = ml_collections.ConfigDict({"bos_id": 1, "eos_id": 2, "pad_id": 0, "mask_id": 99})
    rows = [[1, 5, 6, 2, 1] + list(range(10, 30)), list(range(30, 60))]
    p = sq.prompts(rows, tok, 3)
    assert p.shape == (3, sq.PROMPT_TOKENS) and p.dtype == np.int32
    np.testing.assert_array_equal(p[0], [1, 5, 6, *range(10, 23)])  # specials dropped, bos first
    np.testing.assert_array_equal(p[1], [1, *range(30, 45)])
    np.testing.assert_array_equal(p[2], p[0])  # cyclic
    with pytest.raises(ValueError, match="fewer than the prompt"):
        sq.prompts([[1, 5, 6]], tok, 1)
    x = sq.canvas(p[:2], 8, 99)
    assert x.shape == (2, sq.PROMPT_TOKENS + 8)
    np.testing.assert_array_equal(x[:, : sq.PROMPT_TOKENS], p[:2])
    assert np.all(x[:, sq.PROMPT_TOKENS :] == 99)
    y = sq.canvas(p[:1], 8, 99, masked=3, fill=7)
    assert list(y[0, sq.PROMPT_TOKENS :]) == [99, 99, 99, 7, 7, 7, 7, 7]


def test_every_setting_is_a_valid_sampler_config_and_has_a_first_unit(sq):
    blocks = {"ar": 0, "mdlm": 0, "bd3lm4": 4, "fdv2_16": 16, "fdv2_4": 4}
    labels = [s.label for s in sq.SETTINGS]
    assert len(set(labels)) == len(labels) and labels[:2] == [sq.BASELINE, sq.SPECULATIVE]
    for s in sq.SETTINGS:
        fields = sq.sampler_fields(s, 112)
        assert fields["temperature"] == 1.0 and fields.get("steps", 1) > 0
        sampler_config.validate(ml_collections.ConfigDict(fields), seq_len=sq.PROMPT_TOKENS + 112)
        how, n = sq.first_unit(s, blocks)
        assert how in ("truncate", "fill") and 0 <= n <= 112
        assert _prompt_fills_blocks(s, blocks)
    assert sq.first_unit(sq.SETTINGS[0], blocks) == ("truncate", 1)
    ancestral = next(s for s in sq.SETTINGS if s.fields["name"] == "ancestral")
    assert sq.sampler_fields(ancestral, 112)["steps"] == 112 and sq.first_unit(ancestral, blocks) == ("fill", 0)


def _prompt_fills_blocks(setting, blocks):
    """The prompt fills whole blocks of every block model (the block samplers prefill it)."""
    block = blocks.get(setting.model, 0) or 1
    return 16 % block == 0


def test_bootstrap_mauve_error_includes_the_samples_noise(sq):
    """Samples from the reference's law score near 1 with a spread from resampling; samples from a shifted
    law score lower; one value per resample."""
    rng = np.random.default_rng(0)
    p = rng.normal(size=(80, 6)).astype(np.float32)
    same = sq.bootstrap_mauve(p, rng.normal(size=(80, 6)).astype(np.float32), reps=4)
    shifted = sq.bootstrap_mauve(p, rng.normal(2.0, 1.0, size=(80, 6)).astype(np.float32), reps=4)
    assert len(same["mauve_resamples"]) == 4 and same["mauve"] == pytest.approx(np.mean(same["mauve_resamples"]))
    assert same["mauve_se"] == pytest.approx(np.std(same["mauve_resamples"], ddof=1)) and same["mauve_se"] > 0
    assert same["mauve"] > 0.6 > shifted["mauve"]
