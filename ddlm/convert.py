"""Import of a Hugging Face checkpoint (local files) as an ordinary ddlm workdir: checkpoints/0 (parameters
only) and config.py. The families and their layouts are ddlm/models/hf.py's: LLaMA, Qwen2 and GPT-2 (causal),
LLaDA and Dream (bidirectional LLaMA-family diffusion models), MDLM and BD3-LM (their DiT); the family is
--family, else config.json's model_type, else its architectures.

    python -m ddlm.convert --hf_dir=/path/to/TinyLlama-1.1B --workdir=runs/tinyllama
    python -m ddlm.main --mode=sample --config=runs/tinyllama/config.py --workdir=runs/tinyllama \\
        --config.sampler.prompt="Once upon a time" --config.sampler.stop_at_eos=True
    python -m ddlm.convert --hf_dir=/path/to/gpt2-large --workdir=runs/gpt2_large --tokenizer=gpt2  # a scorer
    python -m ddlm.convert --hf_dir=/path/to/mdlm-owt --workdir=runs/mdlm_owt --tokenizer=gpt2
    # adapt it to diffusion (ddlm/train/adapt.py): a new workdir that starts from its parameters
    python -m ddlm.main --config=runs/tinyllama/config.py --workdir=runs/tinyllama_mdlm \\
        --config.train.init_from=runs/tinyllama --config.model.attention=bidirectional \\
        --config.model.logit_shift=True --config.diffusion.loss=mdlm --config.data.corpus=...

The network's layout and the tensor loading are ddlm/models/hf.py's; this module builds the experiment config
stored with the checkpoint (the family's network, its loss and sampler as its paper used them: `_RECIPES`,
the checkpoint's tokenizer) and writes the workdir, so it sits beside ddlm.main, above the trainer's config
library it uses. The tokenizer is 'hf' (the folder's tokenizer.json) or any ddlm tokenizer with at least the
checkpoint's ids (plus the mask, for families without one): the network gets the tokenizer's vocabulary
(hf.vocab_rows), so that, e.g., GPT-2 converted with --tokenizer=gpt2 scores the samples of a ddlm model
trained with that tokenizer, id for id.

The workdir must be new (or an empty folder); it appears complete or not at all (written as a sibling
folder, renamed last). Its config.py holds the config as JSON text and the source folder's path as Python
string literals (repr): no user string is ever written as code.
"""

from __future__ import annotations

import os
import shutil
import time

import jax
import ml_collections
import numpy as np

from ddlm import checkpoints, command, models, paths, sharding
from ddlm.data import tokenizers
from ddlm.models import hf as layouts
from ddlm.models.hf import ConversionError
from ddlm.train import config_lib as cl

# family -> (loss, schedule, schedule kwargs, sampler fields): the objective each family was trained with and
# the sampler its paper reports (experiments/README.md, "Imported models", has the settings behind each).
_RECIPES = {
    "ar": ("ar", "loglinear", {"eps": 1e-3}, {"name": "ar"}),
    "llada": ("mdlm", "linear", {"eps": 0.0}, {"name": "parallel", "steps": 128, "temperature": 0.0,
                                               "rule": "low_confidence"}),
    "dream": ("mdlm", "linear", {"eps": 0.0}, {"name": "parallel", "steps": 128, "temperature": 0.0,
                                               "rule": "entropy"}),
    "mdlm": ("mdlm", "loglinear", {"eps": 1e-3}, {"name": "cached", "steps": 1000}),
    "bd3lm": ("bd3lm", "loglinear", {"eps": 1e-3}, {"name": "bd3lm", "top_p": 0.9}),
}  # fmt: skip
# config.json's context length field of each family.
_CONTEXT_FIELD = {"llada": "max_sequence_length", "gpt2": "n_positions", "mdlm": "model_length",
                  "bd3lm": "model_length", "duo": "model_length"}  # fmt: skip


def _recipe(layout) -> tuple:
    if layout.family == "duo":
        raise ConversionError(
            "--family=duo: DUO's network imports (ddlm.models.hf.load_params), but ddlm has no loss or sampler "
            "for a uniform-state x0-predictor yet (config.diffusion.process='uniform' samplers read SEDD's log "
            "ratios), so no workdir is written"
        )
    if layout.family in ("llama", "qwen2", "gpt2"):
        return _RECIPES["ar"]
    if layout.family == "bd3lm" and layout.model.name == "dit":  # cross_attn=false: an MDLM
        return _RECIPES["mdlm"]
    return _RECIPES[layout.family]


def converted_config(
    hf_dir: str, *, tokenizer: str = "", seq_len: int = 0, family: str = ""
) -> ml_collections.ConfigDict:
    """The experiment config stored with a converted checkpoint: the family's network, loss and sampler
    (`_RECIPES`), the checkpoint's tokenizer ('hf' reading its tokenizer.json, data.vocab_size the
    network's; or a ddlm tokenizer, data.vocab_size 0 = its own, checked by `convert`); train.seq_len =
    seq_len or min(the checkpoint's context length, 1024)."""
    if type(seq_len) is not int or (seq_len != 0 and seq_len < 2):
        raise ConversionError(
            f"--seq_len={seq_len}: expected a sequence length >= 2 (0 = min(max_position_embeddings, 1024))"
        )
    hf = layouts.read_hf_config(hf_dir)
    layout = layouts.read_layout(hf_dir, family)
    loss, schedule, schedule_kwargs, sampler_fields = _recipe(layout)
    tokenizer_json = os.path.join(os.path.abspath(hf_dir), "tokenizer.json")
    if not tokenizer:
        tokenizer = "hf" if os.path.exists(tokenizer_json) else ""
    if not tokenizer:
        raise ConversionError(
            f"--hf_dir={hf_dir} has no tokenizer.json: pass --tokenizer=<a ddlm tokenizer with at least "
            f"{layout.min_network_vocab()} ids> (e.g. byte for 260, gpt2 for GPT-2's 50,257 + pad + mask)"
        )
    data = cl.data_config(
        tokenizer=tokenizer, vocab_size=layout.min_network_vocab() if tokenizer == "hf" else 0
    )
    if tokenizer == "hf":
        data.tokenizer_path = tokenizer_json
    context = layouts._count(hf, _CONTEXT_FIELD.get(layout.family, "max_position_embeddings"), 1024)
    seq_len = seq_len or min(context, 1024)
    if layout.model.name == "bd3lm" and seq_len % layout.model.block_size:
        raise ConversionError(
            f"--seq_len={seq_len}: expected a multiple of the checkpoint's block_size={layout.model.block_size}"
        )
    if layout.model.max_positions and seq_len > layout.model.max_positions:
        raise ConversionError(
            f"--seq_len={seq_len}: the checkpoint has {layout.model.max_positions} learned positions"
        )
    sampler = cl.sampler_config(name=sampler_fields["name"])
    sampler.update(sampler_fields)
    config = cl.base_config(
        model=layout.model,
        diffusion=cl.diffusion_config(loss, schedule=schedule, **schedule_kwargs),
        data=data,
        optim=cl.optim_config(lr=1e-5, warmup_steps=0),
        mesh=cl.mesh_config(),
        train=cl.train_config(steps=1, batch_size=8, seq_len=seq_len),
        sampler=sampler,
    )
    return config


def convert(
    hf_dir: str,
    workdir: str,
    *,
    tokenizer: str = "",
    seq_len: int = 0,
    family: str = "",
    devices=None,
    log_every: int = 0,
    timings: dict | None = None,
):
    """Writes <workdir>/checkpoints/0 (parameters only: 'params' and 'step', the stored config, checksums)
    and <workdir>/config.py (get_config() returning that config, for --config). Returns (config, params);
    `timings` (a dict, optional) receives the seconds of the load onto the mesh ('load_s') and of the
    checkpoint write ('save_s').

    workdir must be new (or an empty folder): nothing that exists is touched. Everything is written into
    a sibling folder, .<name>.converting, renamed to workdir last, so a failed or killed conversion never
    leaves a workdir that looks converted (a failure removes the sibling; a kill leaves it, and the next
    conversion to the same workdir names it)."""
    config = converted_config(hf_dir, tokenizer=tokenizer, seq_len=seq_len, family=family)
    workdir, partial = _new_workdir(workdir)
    try:
        tok = tokenizers.get_tokenizer(config.data)
    except ValueError as e:  # the tokenizer's own message names config.data; the user gave --tokenizer
        raise ConversionError(f"--tokenizer={config.data.tokenizer}: {e}") from None
    layout = layouts.read_layout(hf_dir, family)
    if tok.vocab_size < layout.min_network_vocab():
        raise ConversionError(
            f"--tokenizer={config.data.tokenizer}: its vocab_size={tok.vocab_size} is less than the checkpoint's "
            f"{layout.vocab} ids" + (" + the mask id ddlm appends" if layout.mask_id is None else "")
        )
    model = models.get_model(config.model, tok.vocab_size)
    devices = list(jax.devices() if devices is None else devices)
    mesh = sharding.make_mesh(config.mesh, devices)
    t0 = time.time()
    params = layouts.load_params(hf_dir, model, mesh, family=layout.family, log_every=log_every)
    jax.block_until_ready(params)
    t1 = time.time()
    step = jax.device_put(np.zeros((), np.int32), sharding.replicated(mesh))
    meta = {
        **checkpoints.params_only_metadata(config, tok),
        "converted_from": os.path.abspath(hf_dir),
        "family": layout.family,
    }
    try:
        ckpt_dir = os.path.join(partial, checkpoints.CHECKPOINTS_DIR)
        with checkpoints.Checkpointer(ckpt_dir, keep=1, async_save=False) as checkpointer:
            checkpointer.save(0, {"params": params, "step": step}, metadata=meta, force=True)
        if jax.process_index() == 0:
            write_config_py(os.path.join(partial, "config.py"), config, os.path.abspath(hf_dir))
            os.rename(partial, workdir)  # onto a missing or empty folder only
    except BaseException:
        if jax.process_index() == 0:
            shutil.rmtree(partial, ignore_errors=True)  # created by this conversion (_new_workdir)
        raise
    if timings is not None:
        timings.update(load_s=t1 - t0, save_s=time.time() - t1)
    return config, params


def _new_workdir(workdir: str) -> tuple[str, str]:
    """(workdir, the sibling folder the conversion writes first) as absolute local paths; a ConversionError,
    with nothing changed, unless workdir is new or an empty folder and the sibling does not exist."""
    if paths.is_remote(workdir):
        raise ConversionError(f"--workdir={workdir}: expected a local folder (copy the converted one to a bucket)")
    workdir = os.path.abspath(workdir)
    partial = os.path.join(os.path.dirname(workdir), f".{os.path.basename(workdir)}.converting")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConversionError(f"--workdir={workdir} is a file; expected a new folder (nothing changed)")
    if checkpoints.committed_steps(os.path.join(workdir, checkpoints.CHECKPOINTS_DIR)):
        raise ConversionError(
            f"--workdir={workdir} already holds a checkpoint; choose a new workdir (nothing changed)"
        )
    if os.path.isdir(workdir) and os.listdir(workdir):
        raise ConversionError(
            f"--workdir={workdir} is not empty; choose a new workdir (nothing changed)"
        )
    if os.path.lexists(partial):
        raise ConversionError(
            f"{partial} exists: the leftover of an interrupted conversion to --workdir={workdir}? remove it "
            "(nothing changed)"
        )
    return workdir, partial


def write_config_py(path: str, config, converted_from: str) -> None:
    """<workdir>/config.py: get_config() returns `config`. No string of the user's (the folder's path, the
    tokenizer's) becomes code: the config goes in as JSON text and the path as a Python literal, each
    written with repr(), which Python reads back as the same string whatever its quotes or newlines."""
    text = config.to_json_best_effort(indent=1)
    lines = "\n".join(f"    {line!r}" for line in text.splitlines(keepends=True))
    with open(path, "w", encoding="utf-8") as f:
        f.write(_CONFIG_PY.format(converted_from=repr(converted_from), config=lines))


_CONFIG_PY = '''"""The config of a checkpoint that ddlm.convert converted from the Hugging Face folder CONVERTED_FROM:
its network, its loss and sampler, the checkpoint's tokenizer. Use it with --config=<this file>; override fields
on the command line."""

import json

import ml_collections

CONVERTED_FROM = {converted_from}
CONFIG = json.loads(
{config}
)


def get_config(arg=None):
    del arg
    return ml_collections.ConfigDict(CONFIG)
'''


def main(argv):
    from absl import flags

    del argv  # command.parse_flags refused positional arguments
    f = flags.FLAGS
    t0, timings = time.time(), {}
    with command.one_line_errors():
        for flag in ("hf_dir", "workdir"):
            if not f[flag].value:
                raise command.FlagError(f"--{flag} is required: {f[flag].help}")
        if f.log_every < 0:
            raise command.FlagError(f"--log_every={f.log_every}: expected a number of tensors >= 0 (0 = never)")
        config, params = convert(
            f.hf_dir,
            f.workdir,
            tokenizer=f.tokenizer,
            seq_len=f.seq_len,
            family=f.family,
            log_every=f.log_every,
            timings=timings,
        )
    print(
        f"converted {f.hf_dir} ({config.model.num_layers} layers, {config.model.d_model} wide, "
        f"{models.count_params(params):,} parameters) to {f.workdir} in {time.time() - t0:.1f}s (load onto the mesh "
        f"{timings['load_s']:.1f}s, checkpoint write {timings['save_s']:.1f}s); sample with\n"
        f"  python -m ddlm.main --mode=sample --config={os.path.join(f.workdir, 'config.py')} --workdir={f.workdir}"
    )


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string(
        "hf_dir", None, "Hugging Face model folder: config.json + *.safetensors (+ tokenizer.json)"
    )
    flags.DEFINE_string("workdir", None, "new ddlm workdir to write the checkpoint and config.py to")
    flags.DEFINE_string(
        "tokenizer", "", "ddlm tokenizer of the config ('' = 'hf' with the folder's tokenizer.json)"
    )
    flags.DEFINE_integer("seq_len", 0, "train.seq_len of the config (0 = min(max_position_embeddings, 1024))")
    flags.DEFINE_string(
        "family", "", "llama | qwen2 | llada | dream | gpt2 | mdlm | bd3lm ('' = config.json's model_type)"
    )
    flags.DEFINE_integer("log_every", 0, "print progress every this many tensors (0 = never)")
    app.run(main, flags_parser=command.parse_flags)
