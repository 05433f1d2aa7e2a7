"""Character-level masked diffusion in the text8 style (MDLM/SEDD text8 setup: 12x768 DiT, L=256, char vocab),
on Shakespeare's plays instead of text8 (which needs a download); reports bits per character.

    python -m ddlm.main --config=experiments/char_shakespeare.py --workdir=runs/char_shakespeare
"""

from ddlm.train import config_lib as cl


def get_config(arg=None):
    a = cl.parse_arg(arg, size="small", loss="mdlm")
    config = cl.base_config(
        model=cl.model_config(a["size"]),
        diffusion=cl.diffusion_config(a["loss"], schedule="loglinear"),
        data=cl.data_config(corpus="shakespeare", tokenizer="char"),
        optim=cl.optim_config(lr=3e-4, warmup_steps=2000, decay="cosine"),
        mesh=cl.mesh_config(),
        train=cl.train_config(steps=200_000, batch_size=256, seq_len=256),
        sampler=cl.sampler_config(steps=256),
    )
    config.train.eval_every = 2000
    return cl.finish(config, a)
