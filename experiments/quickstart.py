"""Quickstart: a tiny masked diffusion (MDLM) model on Shakespeare, character level; minutes on a laptop CPU.
Reproduces nothing published: it shows the whole loop (train, eval NELBO in bits/char, checkpoints, samples).

    python -m ddlm.main --config=experiments/quickstart.py --workdir=runs/quickstart
"""

from ddlm.train import config_lib as cl


def get_config(arg=None):
    a = cl.parse_arg(arg, size="tiny")
    sampler = cl.sampler_config(name="ancestral", steps=128)  # one step per position of the 128-token window
    config = cl.quickstart_config(
        model=cl.model_config(a["size"], dropout=0.0),
        diffusion=cl.diffusion_config("mdlm", schedule="loglinear"),
        sampler=sampler,
    )
    config.train.sample_at_end = True
    return cl.finish(config, a)
