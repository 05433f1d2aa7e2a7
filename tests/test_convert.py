"""Hugging Face checkpoint import (ddlm/convert.py, ddlm/models/hf.py): tiny random LlamaForCausalLM (untied, grouped-query
attention) and Qwen2ForCausalLM (tied, q/k/v biases) made locally with `transformers` (save_pretrained, nothing
downloaded); the imported network's logits equal PyTorch's on the same tokens (1e-5 in float32, and in
float64), also loaded sharded over 8 fake devices; a missing, mis-shaped or unknown tensor is one error
naming it; the written checkpoint loads for inference, refuses to be resumed, and its greedy 'ar' samples
through the sampling CLI are PyTorch's greedy continuation."""

import importlib.util
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

from ddlm import checkpoints, loading, models, sharding
from ddlm import convert
from ddlm.models import hf as hf_layout
from ddlm.sharding import ConfigError

HF_VOCAB = 259  # + the mask id the converter appends = 260 = the byte tokenizer's vocabulary
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8}  # fmt: skip
FAST = {"xla_backend_optimization_level": 0}


def _tokenizer_files(directory):
    """A small BPE tokenizer.json (trained here on a few lines) with <s> / </s>, and its tokenizer_config.json."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers import models as tm

    tok = Tokenizer(tm.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text = ["to be or not to be that is the question", "whether tis nobler in the mind to suffer"] * 20
    tok.train_from_iterator(
        text, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"])
    )
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": None}, f)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """{'llama' | 'qwen2': (folder, tokens [2, 16], torch float64 model)} saved with save_pretrained."""
    torch.manual_seed(0)
    common = {
        "vocab_size": HF_VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    }  # fmt: skip
    made = {
        "llama": transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**common, rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
        ),
        "qwen2": transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(**common, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
        ),
        # LLaMA 3.1's rope scaling, pre-trained at 8 positions: the 16 tokens reach the interpolated band.
        "llama31": transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**common, rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                     rope_scaling=LLAMA3_SCALING)
        ),
    }
    out = {}
    for name, model in made.items():
        with torch.no_grad():  # random norms and biases (their init is 1 / 0: a wrong mapping would hide)
            for pname, p in model.named_parameters():
                if "norm" in pname or "bias" in pname:
                    p.add_(0.3 * torch.randn_like(p))
        directory = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(directory)
        if name == "llama":
            _tokenizer_files(directory)
        tokens = torch.randint(0, HF_VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
        out[name] = (directory, tokens, model.eval().double())
    return out


def _reference(model, tokens, dtype):
    with torch.no_grad():
        return model.to(dtype)(tokens).logits.double().numpy()


def _imported(directory, mesh, dtype=jnp.float32):
    config = convert.converted_config(directory, tokenizer="byte")
    model = models.get_model(config.model, HF_VOCAB + 1)
    params = hf_layout.load_params(directory, model, mesh)
    return model.clone(dtype=dtype, param_dtype=dtype), params


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama31"])
def test_imported_logits_equal_pytorch(hf_models, name):
    directory, tokens, torch_model = hf_models[name]
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    model, params = _imported(directory, mesh)
    assert model.tie_embeddings == (name == "qwen2") and model.qkv_bias == (name == "qwen2")
    assert model.rope_scaling == (("llama3", 8.0, 1.0, 4.0, 8.0) if name == "llama31" else ())
    # The appended mask id starts at the mean embedding; the rows padding the table to 384 are zero.
    emb = np.asarray(params["token_embedding"])
    np.testing.assert_allclose(emb[HF_VOCAB], emb[:HF_VOCAB].mean(axis=0), atol=1e-6)
    assert emb.shape == (384, 32) and not np.any(emb[HF_VOCAB + 1 :])
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x), compiler_options=FAST)
    logits = np.asarray(forward(params, jnp.asarray(tokens.numpy())))
    assert logits.shape == (2, 16, HF_VOCAB + 1)
    np.testing.assert_allclose(
        logits[..., :HF_VOCAB], _reference(torch_model, tokens, torch.float32), atol=1e-5
    )
    # Both in float64: the float64 attention path (its own GQA grouping) is the same function too, to the
    # float32 rounding of the rotary angles, which transformers computes in float32 whatever the dtype.
    with jax.enable_x64(True):
        model64 = model.clone(dtype=jnp.float64, param_dtype=jnp.float64)
        p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        logits64 = np.asarray(model64.apply({"params": p64}, jnp.asarray(tokens.numpy())))
    np.testing.assert_allclose(
        logits64[..., :HF_VOCAB], _reference(torch_model, tokens, torch.float64), atol=1e-6
    )


@pytest.mark.parametrize(
    "scaling", [{"rope_type": "linear", "factor": 2.0}, LLAMA3_SCALING], ids=["linear", "llama3"]
)
def test_rotary_frequencies_of_a_scaled_rope_equal_transformers(scaling):
    """layers.rotary_inv_freq against transformers' ROPE_INIT_FUNCTIONS (whose attention factor is 1 for both)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from ddlm.models import layers

    config = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=2, rope_theta=500.0, max_position_embeddings=64, rope_scaling=scaling
    )
    expected, factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    c = models.default_config()
    hf_layout._rope({"rope_theta": 500.0, "rope_scaling": scaling}, c)
    from ddlm.models.factory import rope_scaling_of

    got = layers.rotary_inv_freq(16, 500.0, rope_scaling_of(c))
    assert factor == 1.0
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=1e-6)
    assert not np.allclose(np.asarray(got), np.asarray(layers.rotary_inv_freq(16, 500.0)))


def test_sharded_import_over_8_devices_places_each_tensor_and_keeps_the_logits(hf_models):
    directory, tokens, torch_model = hf_models["qwen2"]
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model, params = _imported(directory, mesh)
    q = params["block_0"]["attn"]["q_kernel"]  # [d, heads, head_dim]: ('embed', 'heads', 'kv')
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (16, 2, 8)
    emb = params["token_embedding"]  # [V', d] = [384, 32]: ('vocab', 'embed')
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    x = jax.device_put(
        jnp.tile(jnp.asarray(tokens.numpy()), (2, 1)), sharding.batch_sharding(mesh)
    )  # batch 4
    with sharding.mesh_context(mesh):
        logits = jax.jit(lambda p, x: model.apply({"params": p}, x), compiler_options=FAST)(params, x)
    reference = _reference(torch_model, tokens, torch.float32)
    np.testing.assert_allclose(np.asarray(logits)[:2, :, :HF_VOCAB], reference, atol=1e-5)


@pytest.mark.parametrize(
    "tensors, config, message",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), None,
         r"tensor 'model.layers.1.mlp.up_proj.weight' \(shape \(48, 32\)\) is missing"),
        (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)}), None,
         r"tensor 'model.layers.0.self_attn.k_proj.weight' in model.safetensors has shape \(32, 32\), expected \(16, 32\)"),
        (lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros((32,), np.float32)}), None,
         r"tensor 'model.layers.0.self_attn.o_proj.bias' in model.safetensors is not a parameter"),
        (None, lambda c: c.update(num_hidden_layers=3),
         r"tensor 'model.layers.2.input_layernorm.weight' \(shape \(32,\)\) is missing"),
        (None, lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 8.0}),
         r"config.json: rope scaling 'yarn' is not supported"),
        (None, lambda c: c.update(model_type="gemma"), r"config.json: model_type 'gemma' \(architectures .*\) is not supported"),
    ],
    ids=["missing", "mismatched", "unexpected", "config_more_layers", "rope_scaling", "model_type"],
)  # fmt: skip
def test_a_missing_or_mismatched_tensor_is_one_error_naming_it(hf_models, tmp_path, tensors, config, message):
    directory = model_utils.broken_copy(hf_models["llama"][0], str(tmp_path / "hf"), tensors, config)
    with pytest.raises(hf_layout.ConversionError, match=message) as info:
        convert.convert(directory, str(tmp_path / "workdir"), tokenizer="byte")
    assert "\n" not in str(info.value)
    assert not checkpoints.committed_steps(str(tmp_path / "workdir" / "checkpoints"))


def _torch_greedy(model, ids, length, eos):
    """PyTorch's greedy continuation of ids up to `length` tokens, stopping after eos."""
    ids = list(ids)
    with torch.no_grad():
        while len(ids) < length:
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == eos:
                break
    return ids


def test_converted_checkpoint_samples_pytorchs_greedy_continuation(hf_models, tmp_path):
    """convert() -> <workdir>/checkpoints/0 + config.py (tokenizer 'hf' from the folder's tokenizer.json);
    --mode=sample's code path with the 'ar' sampler (KV cache, greedy, until eos) gives PyTorch's tokens."""
    from ddlm.sampling import cli
    from ddlm.train import trainer

    directory, _, torch_model = hf_models["llama"]
    workdir = str(tmp_path / "tinyllama")
    convert.convert(directory, workdir, seq_len=24)
    spec = importlib.util.spec_from_file_location("converted", os.path.join(workdir, "config.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert (config.model.name, config.model.attention, config.data.tokenizer) == ("llama", "causal", "hf")
    loaded = loading.load_for_inference(workdir)  # the stored config; the parameters ('params', no EMA)
    assert loaded.step == 0 and loaded.tokenizer.vocab_size == HF_VOCAB + 1
    s = config.sampler
    s.prompt, s.greedy, s.stop_at_eos, s.num_samples, s.batch_size, s.progress = (
        "to be or",
        True,
        True,
        2,
        2,
        False,
    )
    records = cli.run_sampling(config, workdir)
    tok = loaded.tokenizer
    expected = _torch_greedy(torch_model.float(), [tok.bos_id] + tok.encode("to be or"), 24, tok.eos_id)
    got = records[0]["tokens"][: len(expected)]
    assert got == expected, (got, expected)
    assert len(set(expected[5:])) > 1  # a real continuation, not one repeated id
    # A converted folder is a start (config.train.init_from), not a run to resume.
    with pytest.raises(ConfigError, match="holds converted parameters only.*init_from="):
        trainer.train_and_evaluate(config, workdir)


# ------------------------------------------------------------------------------------------------ hardening

HOSTILE = [
    'hf""";import os;os.system("touch PWNED");"""x',  # closes the docstring the config.py used to have
    "q'''r\"s\\\\t\\n\nu\\",  # quotes of both kinds, backslashes (one at the end), an escape, a newline
]


@pytest.mark.parametrize("name", HOSTILE, ids=["docstring_injection", "quotes_backslashes_newline"])
def test_a_hostile_folder_name_converts_and_never_becomes_code(hf_models, tmp_path, monkeypatch, name):
    """The folder's path (in the config's tokenizer_path and in config.py) is data: importing the generated
    config.py runs nothing of it, and its get_config() is the converted config, path included."""
    directory = str(tmp_path / "s" / name)
    shutil.copytree(hf_models["llama"][0], directory)
    monkeypatch.chdir(tmp_path)  # where an injected `touch PWNED` would leave its file
    config, _ = convert.convert(directory, str(tmp_path / "workdir"), seq_len=24)
    assert config.data.tokenizer_path == os.path.join(directory, "tokenizer.json")
    spec = importlib.util.spec_from_file_location("converted", str(tmp_path / "workdir" / "config.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not os.path.exists(tmp_path / "PWNED") and not os.path.exists(tmp_path / "s" / "PWNED")
    assert module.CONVERTED_FROM == directory
    assert module.get_config().to_dict() == json.loads(config.to_json_best_effort())


def _damage(path, how):
    data = open(path, "rb").read()
    damaged = {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "garbage_header": b"\x20\x00\x00\x00\x00\x00\x00\x00{this is not the json header} " + data[40:],
    }[how]
    with open(path, "wb") as f:
        f.write(damaged)


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage_header"])
def test_a_damaged_safetensors_file_is_one_error_naming_it(hf_models, tmp_path, how):
    directory = str(tmp_path / "hf")
    shutil.copytree(hf_models["llama"][0], directory)
    _damage(os.path.join(directory, "model.safetensors"), how)
    with pytest.raises(hf_layout.ConversionError, match="model.safetensors: not a readable safetensors file") as e:
        convert.convert(directory, str(tmp_path / "workdir"), tokenizer="byte")
    assert "\n" not in str(e.value) and directory in str(e.value)
    assert not os.path.exists(tmp_path / "workdir")


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"model_type": "llama",', r"hf/config.json: not valid JSON \(Expecting"),
        ("[1, 2]", r"hf/config.json: expected a JSON object of model fields, got a list"),
        (lambda c: c.pop("hidden_size"), r"config.json: hidden_size is missing \(expected a positive integer\)"),
        (lambda c: c.update(hidden_size="32"), r"config.json: hidden_size='32'; expected a positive integer"),
        (lambda c: c.update(num_hidden_layers=0), r"config.json: num_hidden_layers=0; expected a positive"),
        (lambda c: c.update(num_key_value_heads=3), r"num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
        (lambda c: c.update(hidden_size=30, head_dim=None), r"hidden_size=30 is not a multiple of num_attention_heads=4"),
        (lambda c: c.update(rms_norm_eps="tiny"), r"config.json: rms_norm_eps='tiny'; expected a number >= 0"),
        (lambda c: c.update(rope_theta=-1.0), r"config.json: rope_theta=-1.0; expected a number > 0"),
    ],
    ids=["not_json", "not_object", "missing", "string", "zero_layers", "kv_heads", "head_split", "eps", "theta"],
)  # fmt: skip
def test_a_malformed_config_json_is_one_error_naming_file_and_field(hf_models, tmp_path, text, message):
    directory = str(tmp_path / "hf")
    shutil.copytree(hf_models["llama"][0], directory)
    path = os.path.join(directory, "config.json")
    if callable(text):
        with open(path) as f:
            hf = json.load(f)
        text(hf)
        text = json.dumps(hf)
    with open(path, "w") as f:
        f.write(text)
    with pytest.raises(hf_layout.ConversionError, match=message) as e:
        convert.convert(directory, str(tmp_path / "workdir"), tokenizer="byte")
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "workdir")


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"seq_len": -1}, r"--seq_len=-1: expected a sequence length >= 2"),
        ({"seq_len": 1}, r"--seq_len=1: expected a sequence length >= 2"),
        ({"tokenizer": "nope"}, r"--tokenizer=nope: config.data.tokenizer must be"),
        ({"family": "nope"}, r"--family=nope: expected one of \('llama', 'qwen2', 'llada', 'dream', 'gpt2'"),
        ({"family": "gpt2"}, r"config.json: tie_word_embeddings=False is not supported"),  # a LLaMA read as GPT-2
        ({"tokenizer": "char"}, r"--tokenizer=char: its vocab_size=85 is less than the checkpoint's 259 ids \+ the mask"),
    ],
)
def test_a_bad_flag_value_is_refused_before_anything_is_written(hf_models, tmp_path, flags, message):
    with pytest.raises(hf_layout.ConversionError, match=message):
        convert.convert(hf_models["llama"][0], str(tmp_path / "workdir"), **{"tokenizer": "byte", **flags})
    assert not os.listdir(tmp_path)


def test_a_failed_conversion_leaves_no_workdir_and_touches_nothing_that_existed(hf_models, tmp_path, monkeypatch):
    """The checkpoint and config.py are written into a sibling folder renamed to the workdir last: a
    failure after the checkpoint was written (here: the disk fills while config.py is written) leaves
    neither a workdir nor the sibling; an empty workdir that existed stays. A workdir that is not empty, or
    the leftover sibling of a killed conversion, is refused with nothing touched."""
    directory = hf_models["llama"][0]

    def full_disk(path, *args):
        open(path, "w").close()  # a half-written config.py beside the complete checkpoint
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(convert, "write_config_py", full_disk)
    for existed in (False, True):
        workdir = tmp_path / f"run_{existed}"
        if existed:
            workdir.mkdir()
        with pytest.raises(OSError, match="No space left"):
            convert.convert(directory, str(workdir), tokenizer="byte")
        assert os.path.isdir(workdir) == existed and (not existed or not os.listdir(workdir))
    assert sorted(os.listdir(tmp_path)) == ["run_True"]  # no .run_*.converting left behind
    monkeypatch.undo()

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(hf_layout.ConversionError, match="busy is not empty; choose a new workdir"):
        convert.convert(directory, str(busy), tokenizer="byte")
    assert os.listdir(busy) == ["notes.txt"]
    leftover = tmp_path / ".killed.converting"
    leftover.mkdir()
    with pytest.raises(hf_layout.ConversionError, match=r"\.killed\.converting exists: the leftover"):
        convert.convert(directory, str(tmp_path / "killed"), tokenizer="byte")
    assert os.path.isdir(leftover) and not os.path.exists(tmp_path / "killed")
    convert.convert(directory, str(tmp_path / "run_True"), tokenizer="byte")  # the empty folder: converted
    assert checkpoints.committed_steps(str(tmp_path / "run_True" / "checkpoints")) == [0]
    assert os.path.isfile(tmp_path / "run_True" / "config.py")


def test_bfloat16_safetensors_convert_to_their_float32_values(hf_models, tmp_path):
    """Published checkpoints store bfloat16 (numpy reads it as ml_dtypes.bfloat16, registered by jax)."""
    directory = str(tmp_path / "bf16")
    shutil.copytree(hf_models["qwen2"][0], directory)
    path = os.path.join(directory, "model.safetensors")
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    save_torch({k: v.to(torch.bfloat16) for k, v in load_torch(path).items()}, path)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    _, params = _imported(directory, mesh)
    expected = load_torch(path)["model.layers.1.mlp.down_proj.weight"].float().numpy().T
    np.testing.assert_array_equal(np.asarray(params["block_1"]["mlp"]["down_kernel"]), expected)


def _run_cli(*args, cwd):
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "ddlm.convert", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_command_line_mistakes_are_one_line(hf_models, tmp_path):
    """A missing flag: one line, code 2 (absl's own is two lines); a damaged file: one line naming it, code 1."""
    proc = _run_cli(f"--workdir={tmp_path / 'w'}", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "ddlm: error: --hf_dir is required: Hugging Face model folder: config.json + *.safetensors (+ "
        "tokenizer.json)"
    ], proc.stderr
    directory = str(tmp_path / "hf")
    shutil.copytree(hf_models["llama"][0], directory)
    _damage(os.path.join(directory, "model.safetensors"), "truncated")
    proc = _run_cli(f"--hf_dir={directory}", f"--workdir={tmp_path / 'w'}", "--tokenizer=byte", cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"ddlm: error: ConversionError: {directory}/model.safetensors: not a readable")
    assert not os.path.exists(tmp_path / "w")
