"""Import of a Hugging Face LLaMA / Qwen2 causal LM (local files) as an ordinary ddlm workdir: checkpoints/0
(parameters only) and config.py.

    python -m ddlm.convert --hf_dir=/path/to/TinyLlama-1.1B --workdir=runs/tinyllama
    python -m ddlm.main --mode=sample --config=runs/tinyllama/config.py --workdir=runs/tinyllama \\
        --config.sampler.prompt="Once upon a time" --config.sampler.stop_at_eos=True
    # adapt it to diffusion (ddlm/train/adapt.py): a new workdir that starts from its parameters
    python -m ddlm.main --config=runs/tinyllama/config.py --workdir=runs/tinyllama_mdlm \\
        --config.train.init_from=runs/tinyllama --config.model.attention=bidirectional \\
        --config.model.logit_shift=True --config.diffusion.loss=mdlm --config.data.corpus=...

The network's layout and the tensor loading are ddlm/models/hf.py's; this module builds the experiment config
stored with the checkpoint (the LLaMA network, loss 'ar', the checkpoint's tokenizer, the 'ar' sampler) and
writes the workdir, so it sits beside ddlm.main, above the trainer's config library it uses.

The workdir must be new (or an empty folder); it appears complete or not at all (written as a sibling
folder, renamed last). Its config.py holds the config as JSON text and the source folder's path as Python
string literals (repr): no user string is ever written as code.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
import ml_collections
import numpy as np

from ddlm import checkpoints, command, models, paths, sharding
from ddlm.data import tokenizers
from ddlm.models.hf import ConversionError, _count, load_params, model_config_from_hf, read_hf_config
from ddlm.train import config_lib as cl


def converted_config(hf_dir: str, *, tokenizer: str = "", seq_len: int = 0) -> ml_collections.ConfigDict:
    """The experiment config stored with a converted checkpoint: the LLaMA network (causal), the AR loss, the
    checkpoint's tokenizer ('hf' reading its tokenizer.json, or a ddlm tokenizer whose vocab_size equals the
    checkpoint's + 1), the 'ar' sampler; train.seq_len = seq_len or min(max_position_embeddings, 1024)."""
    if type(seq_len) is not int or (seq_len != 0 and seq_len < 2):
        raise ConversionError(
            f"--seq_len={seq_len}: expected a sequence length >= 2 (0 = min(max_position_embeddings, 1024))"
        )
    hf = read_hf_config(hf_dir)
    model, vocab = model_config_from_hf(hf)
    tokenizer_json = os.path.join(os.path.abspath(hf_dir), "tokenizer.json")
    if not tokenizer:
        tokenizer = "hf" if os.path.exists(tokenizer_json) else ""
    if not tokenizer:
        raise ConversionError(
            f"--hf_dir={hf_dir} has no tokenizer.json: pass --tokenizer=<a ddlm tokenizer with vocab_size "
            f"{vocab + 1}> (e.g. byte for 259 ids)"
        )
    data = cl.data_config(tokenizer=tokenizer, vocab_size=vocab + 1)
    if tokenizer == "hf":
        data.tokenizer_path = tokenizer_json
    seq_len = seq_len or min(_count(hf, "max_position_embeddings", 1024), 1024)
    train = cl.train_config(steps=1, batch_size=8, seq_len=seq_len)
    config = cl.base_config(
        model=model,
        diffusion=cl.diffusion_config("ar"),
        data=data,
        optim=cl.optim_config(lr=1e-5, warmup_steps=0),
        mesh=cl.mesh_config(),
        train=train,
        sampler=cl.sampler_config(name="ar"),
    )
    return config


def convert(
    hf_dir: str,
    workdir: str,
    *,
    tokenizer: str = "",
    seq_len: int = 0,
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
    config = converted_config(hf_dir, tokenizer=tokenizer, seq_len=seq_len)
    workdir, partial = _new_workdir(workdir)
    try:
        tok = tokenizers.get_tokenizer(config.data)
    except ValueError as e:  # the tokenizer's own message names config.data; the user gave --tokenizer
        raise ConversionError(f"--tokenizer={config.data.tokenizer}: {e}") from None
    model = models.get_model(config.model, tok.vocab_size)
    devices = list(jax.devices() if devices is None else devices)
    mesh = sharding.make_mesh(config.mesh, devices)
    t0 = time.time()
    params = load_params(hf_dir, model, mesh, vocab=tok.vocab_size - 1, log_every=log_every)
    jax.block_until_ready(params)
    t1 = time.time()
    step = jax.device_put(np.zeros((), np.int32), sharding.replicated(mesh))
    meta = {
        "format": checkpoints.FORMAT_VERSION,
        "config": json.loads(config.to_json_best_effort()),
        "compatibility": checkpoints.compatibility(config, tok),
        "data": {"corpus": "", "tokenizer_fingerprint": tok.fingerprint},
        "params_only": True,
        "converted_from": os.path.abspath(hf_dir),
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
the LLaMA network, loss 'ar', the checkpoint's tokenizer. Use it with --config=<this file>; override fields on
the command line."""

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
    flags.DEFINE_integer("log_every", 0, "print progress every this many tensors (0 = never)")
    app.run(main, flags_parser=command.parse_flags)
