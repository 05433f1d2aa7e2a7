"""LLaDA and Dream import (ddlm/models/hf.py, families 'llada' and 'dream'): tiny checkpoints written here in their
published layouts (LLaDA's modeling_llada.py names `model.transformer.{wte, blocks.i.{attn_norm, q_proj, k_proj,
v_proj, attn_out, ff_norm, ff_proj, up_proj, ff_out}, ln_f, ff_out}` with OLMo's config fields; Dream's
modeling_dream.py: Qwen2's names, model_type 'Dream', a mask_token_id) from a random `transformers`
LlamaForCausalLM / Qwen2ForCausalLM, whose forward with an all-ones 4D attention mask (bidirectional) is the
reference. The imported bidirectional LLaMA network gives its logits to 1e-5 in float32 with the checkpoint's
mask row moved to ddlm's mask id (the last: the two rows swap) and, for Dream, the logit shift (output i from
position i - 1). A missing or mis-shaped tensor, or a config field the network cannot express, is one line
naming it."""

import json
import os

import jax
import jax.numpy as jnp
import model_utils
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from ddlm import convert, models, sharding
from ddlm.models import hf

V = 260  # rows of both checkpoints = the byte tokenizer's ids, so the network keeps V ids (the mask swaps)
MASK = {"llada": 200, "dream": 250}  # the checkpoints' own mask ids, not the last row
FAST = {"xla_backend_optimization_level": 0}
COMMON = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}  # fmt: skip


def _perturbed(model):
    with torch.no_grad():  # random norms and biases (their init is 1 / 0: a wrong mapping would hide)
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval().double()


def _llada(directory):
    """A LLaDA folder from a random LlamaForCausalLM (the same architecture: RMSNorm, SwiGLU, rotate-half rotary,
    GQA, untied output), its tensors under LLaDA's names."""
    model = _perturbed(transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**COMMON, rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    ))  # fmt: skip
    rename = {
        "model.embed_tokens.weight": "wte.weight", "model.norm.weight": "ln_f.weight", "lm_head.weight": "ff_out.weight",
    }  # fmt: skip
    for i in range(2):
        for hf_name, llada_name in (
            ("input_layernorm", "attn_norm"), ("self_attn.q_proj", "q_proj"), ("self_attn.k_proj", "k_proj"),
            ("self_attn.v_proj", "v_proj"), ("self_attn.o_proj", "attn_out"),
            ("post_attention_layernorm", "ff_norm"), ("mlp.gate_proj", "ff_proj"), ("mlp.up_proj", "up_proj"),
            ("mlp.down_proj", "ff_out"),
        ):  # fmt: skip
            rename[f"model.layers.{i}.{hf_name}.weight"] = f"blocks.{i}.{llada_name}.weight"
    state = model.state_dict()
    tensors = {"model.transformer." + rename[k]: v.float().numpy() for k, v in state.items()}
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    config = {
        "model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": 32, "n_heads": 4, "n_kv_heads": 2,
        "n_layers": 2, "mlp_hidden_size": 48, "mlp_ratio": 4, "vocab_size": V, "embedding_size": V,
        "rope_theta": 500.0, "rms_norm_eps": 1e-5, "weight_tying": False, "include_bias": False,
        "include_qkv_bias": False, "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "bias_for_layer_norm": False, "rope": True, "alibi": False,
        "attention_layer_norm": False, "scale_logits": False, "input_emb_norm": False, "clip_qkv": None,
        "block_group_size": 1, "max_sequence_length": 64, "mask_token_id": MASK["llada"],
    }  # fmt: skip
    return model, config


def _dream(directory):
    """A Dream folder: Qwen2's tensors (q/k/v biases, untied), Dream's config (model_type 'Dream', mask id)."""
    model = _perturbed(transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**COMMON, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)
    ))  # fmt: skip
    model.save_pretrained(directory)
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    config.update(model_type="Dream", architectures=["DreamModel"], mask_token_id=MASK["dream"])
    return model, config


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{'llada' | 'dream': (folder, torch float64 reference model)}."""
    torch.manual_seed(0)
    out = {}
    for family, make in (("llada", _llada), ("dream", _dream)):
        directory = str(tmp_path_factory.mktemp(family))
        model, config = make(directory)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f)
        out[family] = (directory, model)
    return out


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_bidirectional_logits_equal_pytorch_with_the_mask_row_moved(folders, family):
    directory, torch_model = folders[family]
    layout = hf.read_layout(directory)
    assert layout.family == family and layout.mask_id == MASK[family]
    assert (layout.model.attention, layout.model.logit_shift) == ("bidirectional", family == "dream")
    model = models.get_model(layout.model, V)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    params = hf.load_params(directory, model, mesh)
    rows = hf.vocab_rows(V, MASK[family], V)  # ddlm id -> checkpoint id: the mask and the last row swap
    assert rows[V - 1] == MASK[family] and rows[MASK[family]] == V - 1
    assert sorted(rows) == list(range(V))
    tokens = np.random.default_rng(1).integers(0, V, (2, 16))
    tokens[:, 3:7] = V - 1  # ddlm's mask id: the checkpoint's mask embedding
    tokens[0, 9] = MASK[family]  # the id the swap moved the last row to
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x), compiler_options=FAST)
    logits = np.asarray(forward(params, jnp.asarray(tokens)))
    ids = torch.tensor(rows[tokens])
    with torch.no_grad():
        bidirectional = torch.ones(2, 1, 16, 16, dtype=torch.bool)  # every query sees every key
        reference = torch_model.float()(ids, attention_mask=bidirectional).logits.double().numpy()
    if family == "dream":  # modeling_dream's generation: logits = cat([logits[:, :1], logits[:, :-1]], 1)
        reference = np.concatenate([reference[:, :1], reference[:, :-1]], axis=1)
    err = np.abs(logits - reference[..., rows]).max()
    assert err < 1e-5, err
    # Bidirectional for real: the first position's logits change with the last token.
    changed = tokens.copy()
    changed[:, -1] = (changed[:, -1] + 1) % V
    assert np.abs(np.asarray(forward(params, jnp.asarray(changed)))[:, 1] - logits[:, 1]).max() > 1e-3


def test_converted_configs_carry_each_papers_sampler(folders, tmp_path):
    """The stored config: LLaDA's / Dream's masked-diffusion loss (linear schedule) and their confidence
    samplers, greedy (their papers' defaults); the network is the layout's."""
    for family, rule in (("llada", "low_confidence"), ("dream", "entropy")):
        config = convert.converted_config(folders[family][0], tokenizer="byte")
        assert (config.diffusion.loss, config.diffusion.schedule) == ("mdlm", "linear")
        assert (config.sampler.name, config.sampler.rule, config.sampler.temperature) == ("parallel", rule, 0.0)
        assert config.model.attention == "bidirectional" and config.data.vocab_size == 0
    with pytest.raises(hf.ConversionError, match=r"--tokenizer=char: its vocab_size=85 is less than the checkpoint's 260 ids$"):
        convert.convert(folders["llada"][0], str(tmp_path / "w"), tokenizer="char")


@pytest.mark.parametrize(
    "family, tensors, config, message",
    [
        ("llada", lambda t: t.pop("model.transformer.blocks.1.up_proj.weight"), None,
         r"tensor 'model.transformer.blocks.1.up_proj.weight' \(shape \(48, 32\)\) is missing"),
        ("llada", lambda t: t.update({"model.transformer.blocks.0.k_proj.weight": np.zeros((32, 32), np.float32)}),
         None, r"tensor 'model.transformer.blocks.0.k_proj.weight' in model.safetensors has shape \(32, 32\), "
         r"expected \(16, 32\)"),
        ("llada", None, lambda c: c.update(attention_layer_norm=True),
         r"config.json: attention_layer_norm=True is not supported \(q/k norms\)"),
        ("llada", None, lambda c: c.update(mask_token_id=V), r"config.json: mask_token_id=260 is not one of the 260"),
        ("dream", lambda t: t.pop("model.layers.0.self_attn.q_proj.bias"), None,
         r"tensor 'model.layers.0.self_attn.q_proj.bias' \(shape \(32,\)\) is missing"),
        ("dream", lambda t: t.update({"lm_head.weight": np.zeros((V, 16), np.float32)}), None,
         r"tensor 'lm_head.weight' in model.safetensors has shape \(260, 16\), expected \(260, 32\)"),
        ("dream", None, lambda c: c.pop("mask_token_id"), r"config.json: mask_token_id is missing"),
    ],
    ids=["llada_missing", "llada_mis_shaped", "llada_qk_norm", "llada_mask", "dream_missing", "dream_mis_shaped",
         "dream_no_mask"],
)  # fmt: skip
def test_a_missing_or_mis_shaped_tensor_is_one_line_naming_it(folders, tmp_path, family, tensors, config, message):
    directory = model_utils.broken_copy(folders[family][0], str(tmp_path / "hf"), tensors, config)
    with pytest.raises(hf.ConversionError, match=message) as info:
        convert.convert(directory, str(tmp_path / "workdir"), tokenizer="byte")
    assert "\n" not in str(info.value)
    assert not os.path.exists(tmp_path / "workdir")
