"""MDLM / BD3-LM / DUO import (ddlm/models/hf.py, families 'mdlm', 'bd3lm', 'duo'): tiny checkpoints written here
in the layout of their Hugging Face DITBackbone (`backbone.{vocab_embed.embedding, sigma_map.mlp.{0,2},
blocks.i.{norm1, attn_qkv, attn_out, norm2, mlp.{0,2}, adaLN_modulation}, output_layer.{norm_final,
adaLN_modulation, linear}}`, BD3-LM's modeling_bd3lm.py / MDLM's models/dit.py), checked against a PyTorch
forward written in this file from their code's conventions (F.layer_norm without affine times the weight; qkv
rows ordered (three, head, dim); rotate-half rotary of base 1e4 on q and k; adaLN chunks shift, scale, gate of
the attention then of the MLP; c = silu(sigma_map(sigma)); the 2L block-causal input with positions 0..L-1 for
both halves and BD3-LM's block_diff_mask), independent of ddlm's code: logits to 1e-5 in float32. MDLM and
BD3-LM's published checkpoints read sigma = 0 (time_conditioning=false), DUO's sigma = -log(1 - (1 - 1e-3) t).
The same reference checks that ddlm's own DiT, with the options imports added left at their defaults, is
unchanged (MDLM's DDiT reading sigma = 1000 t; the causal 'ar' network without adaLN). A missing or mis-shaped
tensor is one line naming it."""

import json
import math
import os

import flax
import jax
import jax.numpy as jnp
import model_utils
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file

from ddlm import checkpoints, convert, loading, models, sharding
from ddlm.models import hf
from ddlm.models.transformer import Transformer

V, D, HEADS, COND, LAYERS, L = 259, 32, 4, 16, 2, 16  # the byte tokenizer has 260 ids: one more than V
FAST = {"xla_backend_optimization_level": 0}


# ------------------------------------------------------------------------------------ the reference forward


def _layer_norm(x, weight, bias=None):
    return F.layer_norm(x, [x.shape[-1]]) * weight + (0 if bias is None else bias)


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _rotary(x, n):
    """MDLM's Rotary + flash-attn's non-interleaved apply_rotary_emb: x [B, S, H, Dh] at positions 0..n-1
    (repeated for each half of a 2L input, as BD3-LM's get_qkv rotates x[:, :n] and x[:, n:] alike)."""
    dh = x.shape[-1]
    inv_freq = 1.0 / (10_000 ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh))
    freqs = torch.outer(torch.arange(n, dtype=torch.float64), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1).repeat(x.shape[1] // n, 1)[None, :, None, :]
    return x * emb.cos() + _rotate_half(x) * emb.sin()


def _timestep_embedding(sigma, dim=256):
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float64) / half)
    args = sigma[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def dit_reference(w, tokens, sigma, *, mask=None, adaln=True, causal=False):
    """Logits [B, S, V] of an MDLM/BD3-LM/DUO DITBackbone with tensors w (names without 'backbone.'); tokens
    [B, S] (BD3-LM: [xt | x0], S = 2L, with `mask` its block_diff_mask; logits of the first half)."""
    w = {k: torch.tensor(v, dtype=torch.float64) for k, v in w.items()}
    x = w["vocab_embed.embedding"][tokens]
    b, s, _ = x.shape
    n = s // 2 if mask is not None else s
    c = None
    if adaln:
        h = F.linear(_timestep_embedding(sigma), w["sigma_map.mlp.0.weight"], w["sigma_map.mlp.0.bias"])
        c = F.silu(F.linear(F.silu(h), w["sigma_map.mlp.2.weight"], w["sigma_map.mlp.2.bias"]))
    for i in range(LAYERS):
        p = f"blocks.{i}."
        if adaln:
            mod = F.linear(c, w[p + "adaLN_modulation.weight"], w[p + "adaLN_modulation.bias"])[:, None]
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=2)
        h = _layer_norm(x, w[p + "norm1.weight"])
        if adaln:
            h = h * (1 + scale_a) + shift_a
        qkv = F.linear(h, w[p + "attn_qkv.weight"]).view(b, s, 3, HEADS, D // HEADS)
        q, k, v = _rotary(qkv[:, :, 0], n), _rotary(qkv[:, :, 1], n), qkv[:, :, 2]
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal
        )
        out = F.linear(attn.transpose(1, 2).reshape(b, s, D), w[p + "attn_out.weight"])
        x = x + (gate_a * out if adaln else out)
        h = _layer_norm(x, w[p + "norm2.weight"])
        if adaln:
            h = h * (1 + scale_m) + shift_m
        h = F.gelu(F.linear(h, w[p + "mlp.0.weight"], w[p + "mlp.0.bias"]), approximate="tanh")
        h = F.linear(h, w[p + "mlp.2.weight"], w[p + "mlp.2.bias"])
        x = x + (gate_m * h if adaln else h)
    x = _layer_norm(x, w["output_layer.norm_final.weight"])
    if adaln:
        shift, scale = F.linear(
            c, w["output_layer.adaLN_modulation.weight"], w["output_layer.adaLN_modulation.bias"]
        )[:, None].chunk(2, dim=2)
        x = x * (1 + scale) + shift
    logits = F.linear(x, w["output_layer.linear.weight"], w["output_layer.linear.bias"])
    return logits[:, :n].numpy()


def block_diff_mask(n, block_size):
    """BD3-LM's block_diff_mask (modeling_bd3lm.py) on [2n, 2n] query/key indices."""
    q, kv = torch.arange(2 * n)[:, None], torch.arange(2 * n)[None, :]
    x0_q, x0_kv = q >= n, kv >= n
    block_q = torch.where(x0_q, (q - n) // block_size, q // block_size)
    block_kv = torch.where(x0_kv, (kv - n) // block_size, kv // block_size)
    diagonal = (block_q == block_kv) & (x0_q == x0_kv)
    offset_causal = (block_q > block_kv) & x0_kv & ~x0_q
    causal = (block_q >= block_kv) & x0_kv & x0_q
    return diagonal | offset_causal | causal


# ------------------------------------------------------------------------------------ checkpoints


def dit_tensors(rng, vocab=V, adaln=True):
    """Random tensors of a DITBackbone, every one at a scale where a wrong mapping shows (adaLN non-zero)."""

    def r(*shape, scale=0.15):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    t = {"vocab_embed.embedding": r(vocab, D, scale=0.5), "rotary_emb.inv_freq": r(D // HEADS // 2)}
    if adaln:
        t.update({"sigma_map.mlp.0.weight": r(COND, 256), "sigma_map.mlp.0.bias": r(COND),
                  "sigma_map.mlp.2.weight": r(COND, COND), "sigma_map.mlp.2.bias": r(COND),
                  "output_layer.adaLN_modulation.weight": r(2 * D, COND),
                  "output_layer.adaLN_modulation.bias": r(2 * D)})  # fmt: skip
    for i in range(LAYERS):
        p = f"blocks.{i}."
        t.update({p + "norm1.weight": 1 + r(D), p + "attn_qkv.weight": r(3 * D, D), p + "attn_out.weight": r(D, D),
                  p + "norm2.weight": 1 + r(D), p + "mlp.0.weight": r(4 * D, D), p + "mlp.0.bias": r(4 * D),
                  p + "mlp.2.weight": r(D, 4 * D), p + "mlp.2.bias": r(D)})  # fmt: skip
        if adaln:
            t.update({p + "adaLN_modulation.weight": r(6 * D, COND), p + "adaLN_modulation.bias": r(6 * D)})
    t.update({"output_layer.norm_final.weight": 1 + r(D), "output_layer.linear.weight": r(vocab, D),
              "output_layer.linear.bias": r(vocab)})  # fmt: skip
    return t


def _write(directory, tensors, config, prefix="backbone."):
    os.makedirs(directory, exist_ok=True)
    save_file({prefix + k: v for k, v in tensors.items()}, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)


# MDLM's / BD3-LM's HF config fields (configuration_bd3lm.py; MDLM's are the same without the block fields).
_CONFIG = {"vocab_size": V, "model_length": L, "hidden_dim": D, "cond_dim": COND, "n_blocks": LAYERS,
           "n_heads": HEADS, "dropout": 0.1}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{family: (folder, tensors)}: MDLM (time_conditioning false), BD3-LM (block 4, var_min buffers), DUO
    (time-conditioned, no mask row, no 'backbone.' prefix)."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("dit")
    out = {}
    t = dit_tensors(rng)
    _write(str(root / "mdlm"), t, {**_CONFIG, "model_type": "mdlm", "architectures": ["MDLM"],
                                   "time_conditioning": False})  # fmt: skip
    out["mdlm"] = (str(root / "mdlm"), t)
    t = dit_tensors(rng)
    t.update(sampling_eps_min=np.array(1e-3, np.float32), sampling_eps_max=np.array(0.999, np.float32))
    _write(str(root / "bd3lm"), t, {**_CONFIG, "model_type": "bd3lm", "architectures": ["BD3LM"], "block_size": 4,
                                    "cross_attn": True, "adaln": True, "causal": False, "time_conditioning": False,
                                    "var_min": True})  # fmt: skip
    out["bd3lm"] = (str(root / "bd3lm"), t)
    t = dit_tensors(rng, vocab=V - 1)
    _write(str(root / "duo"), t, {**_CONFIG, "vocab_size": V - 1, "model_type": "duo", "time_conditioning": True},
           prefix="")  # fmt: skip
    out["duo"] = (str(root / "duo"), t)
    return out


def _imported(directory, vocab):
    layout = hf.read_layout(directory)
    model = models.get_model(layout.model, vocab)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    return layout, model, hf.load_params(directory, model, mesh)


def _inputs():
    rng = np.random.default_rng(1)
    x0 = rng.integers(0, V - 1, (2, L))
    xt = np.where(rng.random((2, L)) < 0.5, V - 1, x0)  # V - 1: the checkpoints' mask id (the last row)
    return x0, xt, np.array([0.3, 0.8])


def test_mdlm_logits_equal_the_reference_with_sigma_zero(folders):
    """MDLM's published checkpoint (time_conditioning=false): its adaLN reads sigma = 0 whatever t. Imported
    with the byte tokenizer's 260 ids: the mask row 258 moves to 259, the new id 258 is never predicted."""
    directory, tensors = folders["mdlm"]
    layout, model, params = _imported(directory, V + 1)
    assert (layout.model.name, layout.model.time_input, layout.mask_id) == ("dit", "zero", V - 1)
    _, xt, t = _inputs()
    rows = hf.vocab_rows(V, V - 1, V + 1)
    ddlm_xt = np.where(xt == V - 1, V, xt)  # the mask, in the network's ids
    forward = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t), compiler_options=FAST)
    logits = np.asarray(forward(params, jnp.asarray(ddlm_xt), jnp.asarray(t, jnp.float32)))
    reference = dit_reference(tensors, torch.tensor(xt), torch.zeros(2, dtype=torch.float64))
    err = np.abs(logits[..., rows >= 0] - reference[..., rows[rows >= 0]]).max()
    assert err < 1e-5, err
    np.testing.assert_array_equal(logits[..., V - 1], hf.NEW_ID_BIAS)  # the byte tokenizer's id 258 (eos)
    # sigma = 0 for every t: the logits do not depend on t.
    other = forward(params, jnp.asarray(ddlm_xt), jnp.asarray([0.01, 0.99], jnp.float32))
    np.testing.assert_allclose(np.asarray(other), logits, atol=1e-6)


def test_bd3lm_block_causal_logits_equal_the_reference(folders):
    """BD3-LM's 2L input [xt | x0] with its block_diff_mask, both halves at positions 0..L-1, sigma = 0."""
    directory, tensors = folders["bd3lm"]
    layout, model, params = _imported(directory, V)
    assert (layout.model.name, layout.model.block_size, layout.model.time_input) == ("bd3lm", 4, "zero")
    x0, xt, t = _inputs()
    logits = np.asarray(jax.jit(lambda p, x, t, x0: model.apply({"params": p}, x, t, x0=x0),
                                compiler_options=FAST)(params, jnp.asarray(xt), jnp.asarray(t, jnp.float32),
                                                       jnp.asarray(x0)))  # fmt: skip
    reference = dit_reference(
        tensors, torch.tensor(np.concatenate([xt, x0], 1)), torch.zeros(2, dtype=torch.float64),
        mask=block_diff_mask(L, 4),
    )  # fmt: skip
    err = np.abs(logits - reference).max()
    assert err < 1e-5, err


def test_duo_logits_equal_the_reference_reading_sigma(folders, tmp_path):
    """DUO's time-conditioned network reads sigma = -log(1 - (1 - 1e-3) t) (its LogLinear noise); it has no mask
    row, so ddlm appends one (never predicted). No workdir: ddlm has no sampler for it (one line)."""
    directory, tensors = folders["duo"]
    layout, model, params = _imported(directory, V)
    assert (layout.model.time_input, layout.mask_id, layout.vocab) == ("sigma", None, V - 1)
    _, xt, t = _inputs()
    xt = np.minimum(xt, V - 2)
    forward = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t), compiler_options=FAST)
    logits = np.asarray(forward(params, jnp.asarray(xt), jnp.asarray(t, jnp.float32)))
    sigma = -torch.log1p(-(1 - 1e-3) * torch.tensor(t, dtype=torch.float64))
    err = np.abs(logits[..., : V - 1] - dit_reference(tensors, torch.tensor(xt), sigma)).max()
    assert err < 1e-5, err
    np.testing.assert_array_equal(logits[..., V - 1], hf.NEW_ID_BIAS)
    with pytest.raises(hf.ConversionError, match=r"--family=duo: DUO's network imports .* no workdir is written$"):
        convert.convert(directory, str(tmp_path / "w"), tokenizer="byte")
    assert not os.path.exists(tmp_path / "w")


def test_converted_mdlm_workdir_loads_with_its_papers_sampler(folders, tmp_path):
    """convert(): the MDLM loss and MDLM's cached sampler in the stored config; the loaded parameters are the
    ones load_params gives."""
    directory, _ = folders["mdlm"]
    workdir = str(tmp_path / "mdlm")
    config, params = convert.convert(directory, workdir, tokenizer="byte")
    assert (config.diffusion.loss, config.sampler.name, config.sampler.steps, config.train.seq_len) == (
        "mdlm", "cached", 1000, L)
    assert checkpoints.committed_steps(os.path.join(workdir, "checkpoints")) == [0]
    loaded = loading.load_for_inference(workdir)
    assert loaded.tokenizer.mask_id == V
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bd3lm = convert.converted_config(folders["bd3lm"][0], tokenizer="byte")
    assert (bd3lm.diffusion.loss, bd3lm.sampler.name, bd3lm.sampler.top_p, bd3lm.model.block_size) == (
        "bd3lm", "bd3lm", 0.9, 4)
    with pytest.raises(hf.ConversionError, match=r"--seq_len=6: expected a multiple of the checkpoint's block_size=4"):
        convert.converted_config(folders["bd3lm"][0], tokenizer="byte", seq_len=6)


@pytest.mark.parametrize(
    "family, tensors, config, message",
    [
        ("mdlm", lambda t: t.pop("backbone.blocks.1.adaLN_modulation.bias"), None,
         r"tensor 'backbone.blocks.1.adaLN_modulation.bias' \(shape \(192,\)\) is missing"),
        ("mdlm", lambda t: t.update({"backbone.blocks.0.attn_qkv.weight": np.zeros((96, 16), np.float32)}), None,
         r"tensor 'backbone.blocks.0.attn_qkv.weight' in model.safetensors has shape \(96, 16\), expected \(96, 32\)"),
        ("bd3lm", lambda t: t.pop("backbone.output_layer.linear.bias"), None,
         r"tensor 'backbone.output_layer.linear.bias' \(shape \(259,\)\) is missing"),
        ("bd3lm", None, lambda c: c.update(time_conditioning=True),
         r"config.json: time_conditioning=true is not supported for BD3-LM"),
        ("bd3lm", lambda t: t.update({"backbone.extra.weight": np.zeros((2,), np.float32)}), None,
         r"tensor 'backbone.extra.weight' in model.safetensors is not a parameter of the bd3lm model"),
        ("duo", lambda t: t.update({"sigma_map.mlp.2.weight": np.zeros((16, 8), np.float32)}), None,
         r"tensor 'sigma_map.mlp.2.weight' in model.safetensors has shape \(16, 8\), expected \(16, 16\)"),
    ],
    ids=["mdlm_missing", "mdlm_mis_shaped", "bd3lm_missing", "bd3lm_time", "bd3lm_unknown", "duo_mis_shaped"],
)  # fmt: skip
def test_a_missing_or_mis_shaped_tensor_is_one_line_naming_it(folders, tmp_path, family, tensors, config, message):
    src = folders[family][0]
    dst = str(tmp_path / "hf")
    model_utils.broken_copy(src, dst, tensors, config)
    with pytest.raises(hf.ConversionError, match=message) as info:
        layout = hf.read_layout(dst)
        hf.check_tensors(layout, hf.index_safetensors(dst))
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------ defaults unchanged


def _ddlm_params_as_mdlm(params):
    """A ddlm DiT's parameters under MDLM's tensor names (the inverse of hf._dit_sources' transforms)."""
    p = {"/".join(k): np.asarray(v, np.float64) for k, v in flax.traverse_util.flatten_dict(params).items()}
    t = {"vocab_embed.embedding": p["token_embedding"], "output_layer.norm_final.weight": p["norm_final/scale"],
         "output_layer.linear.weight": p["output_kernel"].T, "output_layer.linear.bias": p["output_bias"]}  # fmt: skip
    if "time_embedding/dense_0/kernel" in p:
        for k, name in enumerate(("mlp.0", "mlp.2")):
            t[f"sigma_map.{name}.weight"] = p[f"time_embedding/dense_{k}/kernel"].T
            t[f"sigma_map.{name}.bias"] = p[f"time_embedding/dense_{k}/bias"]
        t["output_layer.adaLN_modulation.weight"] = p["adaln_final/kernel"].reshape(COND, 2 * D).T
        t["output_layer.adaLN_modulation.bias"] = p["adaln_final/bias"].reshape(-1)
    for i in range(LAYERS):
        b, q = f"block_{i}/", f"blocks.{i}."
        t[q + "norm1.weight"], t[q + "norm2.weight"] = p[b + "norm_attn/scale"], p[b + "norm_mlp/scale"]
        t[q + "attn_qkv.weight"] = p[b + "attn/qkv_kernel"].reshape(D, 3 * D).T
        t[q + "attn_out.weight"] = p[b + "attn/out_kernel"].reshape(D, D).T
        t[q + "mlp.0.weight"], t[q + "mlp.0.bias"] = p[b + "mlp/fc_in/kernel"].T, p[b + "mlp/fc_in/bias"]
        t[q + "mlp.2.weight"], t[q + "mlp.2.bias"] = p[b + "mlp/fc_out/kernel"].T, p[b + "mlp/fc_out/bias"]
        if "time_embedding/dense_0/kernel" in p:
            t[q + "adaLN_modulation.weight"] = p[b + "adaln/kernel"].reshape(COND, 6 * D).T
            t[q + "adaLN_modulation.bias"] = p[b + "adaln/bias"].reshape(-1)
    return t


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_default_dit_is_unchanged_mdlms_ddit_on_1000t(attention):
    """With time_input, max_positions, norm_bias and attention_bias at their defaults, ddlm's DiT creates the
    parameters it always did and computes MDLM's DDiT with sigma = 1000 t (bidirectional, adaLN) / the causal
    network without adaLN (DUO's DDiTBlockCausal), on random parameters (adaLN's zero init randomised); in
    float64, where the two agree to rounding, so any change of formula shows."""
    causal = attention == "causal"
    model = Transformer(vocab_size=V, attention=attention, num_layers=LAYERS, d_model=D, num_heads=HEADS,
                        mlp_dim=4 * D, cond_dim=COND, time_conditioning=not causal, vocab_multiple=1)  # fmt: skip
    _, xt, t = _inputs()
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(xt), jnp.asarray(t, jnp.float32))
    names = sorted("/".join(k) for k in flax.traverse_util.flatten_dict(flax.linen.meta.unbox(abstract["params"])))
    expected = {"token_embedding", "norm_final/scale", "output_kernel", "output_bias"}
    for i in range(LAYERS):
        b = f"block_{i}/"
        expected |= {b + "norm_attn/scale", b + "norm_mlp/scale", b + "attn/qkv_kernel", b + "attn/out_kernel"}
        expected |= {b + f"mlp/fc_{io}/{leaf}" for io in ("in", "out") for leaf in ("kernel", "bias")}
        expected |= set() if causal else {b + "adaln/kernel", b + "adaln/bias"}
    if not causal:
        expected |= {"adaln_final/kernel", "adaln_final/bias"}
        expected |= {f"time_embedding/dense_{k}/{leaf}" for k in (0, 1) for leaf in ("kernel", "bias")}
    assert names == sorted(expected)
    with jax.enable_x64(True):
        model64 = model.clone(dtype=jnp.float64, param_dtype=jnp.float64)
        params = _randomised(jax.tree.map(lambda s: jnp.ones(s.shape, jnp.float64), abstract["params"]))
        t64 = jnp.asarray(t, jnp.float64)
        forward = jax.jit(lambda p, x, t: model64.apply({"params": p}, x, t), compiler_options=FAST)
        logits = np.asarray(forward(params, jnp.asarray(xt), t64))
    reference = dit_reference(_ddlm_params_as_mdlm(params), torch.tensor(xt), 1000 * torch.tensor(t),
                              adaln=not causal, causal=causal)  # fmt: skip
    err = np.abs(logits - reference).max()
    assert err < 1e-9, err


def _randomised(params):
    """Every leaf x of a (boxed) tree replaced by 0.3 N(0, 1) (+ 1 for norm scales), in x's dtype."""
    flat = flax.traverse_util.flatten_dict(flax.linen.meta.unbox(params))
    rng = np.random.default_rng(2)
    return flax.traverse_util.unflatten_dict({
        k: jnp.asarray(0.3 * rng.standard_normal(x.shape) + (k[-1] == "scale"), x.dtype) for k, x in flat.items()
    })  # fmt: skip
