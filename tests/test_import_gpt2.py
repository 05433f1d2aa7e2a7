"""GPT-2 import (ddlm/models/hf.py, family 'gpt2'): a tiny random GPT2LMHeadModel made locally with `transformers`
(save_pretrained, nothing downloaded; Conv1D weights are [in, out]); the imported DiT 'ar' network (learned
positions, LayerNorm and attention biases, no rotary, untied copy of the tied output) gives PyTorch's logits to
1e-5 in float32, and its log-probabilities over the network's ids are GPT-2's exactly (the ids ddlm adds get an
output bias of -1e9), also from an old export's layout (no `transformer.` prefix, causal-mask buffers); the
converted workdir's greedy 'ar' samples (KV cache, learned positions read at each decode position) are PyTorch's;
a missing or mis-shaped tensor, or a config.json field GPT-2's network cannot express, is one line naming it."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import model_utils
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from ddlm import convert, loading, losses, models, sharding
from ddlm.models import hf

V = 259  # GPT-2's ids in the tiny model; the byte tokenizer's 260 = these + the mask ddlm appends
FAST = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(folder, tokens [2, 12], torch float64 GPT2LMHeadModel) saved with save_pretrained."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=257, eos_token_id=258
    )
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # every parameter perturbed: LayerNorm scales / biases start at 1 / 0 (a wrong mapping
        for p in model.parameters():  # would hide), and at init's scale the greedy continuation is one token
            p.add_(0.2 * torch.randn_like(p))
    directory = str(tmp_path_factory.mktemp("gpt2"))
    model.save_pretrained(directory)
    tokens = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    return directory, tokens, model.eval().double()


def _reference(model, tokens):
    with torch.no_grad():
        return model.float()(tokens).logits.double().numpy()


def _imported(directory, vocab=V + 1):
    layout = hf.read_layout(directory)
    model = models.get_model(layout.model, vocab)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    return model, hf.load_params(directory, model, mesh)


def _logits(model, params, tokens):
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x), compiler_options=FAST)
    return np.asarray(forward(params, jnp.asarray(tokens.numpy())))


def test_gpt2_logits_and_log_probabilities_equal_pytorch(gpt2):
    directory, tokens, torch_model = gpt2
    model, params = _imported(directory)
    c = hf.read_layout(directory).model
    assert (c.name, c.max_positions, c.norm_bias, c.attention_bias, c.tie_embeddings) == ("ar", 32, True, True, False)
    logits = _logits(model, params, tokens)
    reference = _reference(torch_model, tokens)
    err = np.abs(logits[..., :V] - reference).max()
    assert err < 1e-5, err
    np.testing.assert_array_equal(logits[..., V], hf.NEW_ID_BIAS)  # the appended mask: never predicted
    # The next-token NLL over the network's 260 ids is GPT-2's over its 259 (the AR scorer's number).
    nll = np.asarray(losses.autoregressive_loss(jnp.asarray(logits), jnp.asarray(tokens.numpy())))
    ref = torch.nn.functional.cross_entropy(
        torch.tensor(reference[:, :-1]).reshape(-1, V), tokens[:, 1:].reshape(-1), reduction="none"
    )
    np.testing.assert_allclose(nll.reshape(-1), ref.numpy(), atol=1e-5)


def test_an_old_export_without_prefix_and_with_mask_buffers_imports_the_same(gpt2, tmp_path):
    """The hub's gpt2 files: names without `transformer.`, the causal-mask buffers h.i.attn.bias; a config.json
    without model_type is recognised by its architectures."""
    directory, tokens, torch_model = gpt2
    old = str(tmp_path / "old")
    shutil.copytree(directory, old)
    path = os.path.join(old, "model.safetensors")
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(path).items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
    save_file(tensors, path)
    with open(os.path.join(old, "config.json")) as f:
        config = json.load(f)
    del config["model_type"]  # found by its architectures, ['GPT2LMHeadModel']
    with open(os.path.join(old, "config.json"), "w") as f:
        json.dump(config, f)
    assert hf.detect_family(config) == "gpt2"
    model, params = _imported(old)
    np.testing.assert_allclose(_logits(model, params, tokens)[..., :V], _reference(torch_model, tokens), atol=1e-5)


def test_converted_gpt2_samples_pytorchs_greedy_continuation(gpt2, tmp_path):
    """convert() with the byte tokenizer -> the workdir's 'ar' sampler (KV cache: the learned positions of the
    decode path) gives PyTorch's greedy tokens; a converted GPT-2 is an AR scorer (loss 'ar')."""
    from ddlm.sampling import cli

    directory, _, torch_model = gpt2
    workdir = str(tmp_path / "gpt2")
    config, _ = convert.convert(directory, workdir, tokenizer="byte", seq_len=20)
    assert (config.diffusion.loss, config.sampler.name, config.train.seq_len) == ("ar", "ar", 20)
    loaded = loading.load_for_inference(workdir)
    s = config.sampler
    s.prompt, s.greedy, s.num_samples, s.batch_size, s.progress = "to be", True, 2, 2, False
    records = cli.run_sampling(config, workdir)
    tok = loaded.tokenizer
    ids = [tok.bos_id] + tok.encode("to be")
    with torch.no_grad():
        while len(ids) < 20:
            ids.append(int(torch_model.float()(torch.tensor([ids])).logits[0, -1].argmax()))
    assert records[0]["tokens"][:20] == ids
    assert len(set(ids[6:])) > 1


@pytest.mark.parametrize(
    "tensors, config, message",
    [
        (lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"), None,
         r"tensor 'transformer.h.1.mlp.c_fc.bias' \(shape \(128,\)\) is missing"),
        (lambda t: t.update({"transformer.wpe.weight": np.zeros((16, 32), np.float32)}), None,
         r"tensor 'transformer.wpe.weight' in model.safetensors has shape \(16, 32\), expected \(32, 32\)"),
        (None, lambda c: c.update(activation_function="relu"),
         r"config.json: activation_function='relu' is not supported \(GELU's tanh approximation only\)"),
        (None, lambda c: c.update(scale_attn_by_inverse_layer_idx=True),
         r"config.json: scale_attn_by_inverse_layer_idx=True is not supported"),
    ],
    ids=["missing", "mis_shaped", "activation", "layer_scaling"],
)  # fmt: skip
def test_a_missing_or_mis_shaped_tensor_is_one_line_naming_it(gpt2, tmp_path, tensors, config, message):
    directory = model_utils.broken_copy(gpt2[0], str(tmp_path / "hf"), tensors, config)
    with pytest.raises(hf.ConversionError, match=message) as info:
        convert.convert(directory, str(tmp_path / "workdir"), tokenizer="byte")
    assert "\n" not in str(info.value)
    assert not os.path.exists(tmp_path / "workdir")
