"""Quickstart: a tiny masked diffusion (MDLM) model on Shakespeare, character level; minutes on a laptop CPU.
Reproduces nothing published: it shows the whole loop (train, eval NELBO in bits/char, checkpoints, samples).

    python -m ddlm.main --config=experiments/quickstart.py --workdir=runs/quickstart
"""

from ddlm.train import config_lib as cl


def get_config(arg=None):
    a = cl.parse_arg(arg, size="tiny", smoke=False)
    model = cl.model_config(a["size"], dropout=0.0)
    train = cl.train_config(steps=600, batch_size=32, seq_len=128)
    train.log_every = 50
    train.eval_every = 200
    train.ckpt_every = 200
    train.eval_batches = 8
    train.sample_at_end = True
    optim = cl.optim_config(lr=2e-3, warmup_steps=50, decay="cosine")
    optim.ema_decay = 0.99
    sampler = cl.sampler_config(name="ancestral", steps=64)
    sampler.num_samples = 4
    sampler.batch_size = 4
    config = cl.base_config(
        model=model,
        diffusion=cl.diffusion_config("mdlm", schedule="loglinear"),
        data=cl.data_config(corpus="shakespeare", tokenizer="char"),
        optim=optim,
        mesh=cl.mesh_config(),
        train=train,
        sampler=sampler,
    )
    if a["smoke"]:
        cl.apply_smoke(config)
    return config
