"""Quickstart AR baseline and generative-perplexity scorer: experiments/quickstart.py's corpus (Shakespeare),
tokenizer (characters), data order, sequence length, network size and optimizer, with a causal transformer and
next-token cross-entropy instead of masked diffusion. Its exact NLL is the number the quickstart MDLM's NELBO is
compared with (`--mode=eval` on both workdirs), and its checkpoint scores the MDLM's samples (generative
perplexity, `config.eval.scorer_workdir`).

    python -m ddlm.main --config=experiments/quickstart_ar.py --workdir=runs/quickstart_ar
    python -m ddlm.main --config=experiments/quickstart.py --workdir=runs/quickstart --mode=eval \
        --config.eval.ar_workdir=runs/quickstart_ar
"""

from ddlm.train import config_lib as cl


def get_config(arg=None):
    a = cl.parse_arg(arg, size="tiny", smoke=False)
    model = cl.model_config(a["size"], dropout=0.0, name="ar", time_conditioning=False)
    train = cl.train_config(steps=600, batch_size=32, seq_len=128)
    train.log_every = 50
    train.eval_every = 200
    train.ckpt_every = 200
    train.eval_batches = 8
    optim = cl.optim_config(lr=2e-3, warmup_steps=50, decay="cosine")
    optim.ema_decay = 0.99
    config = cl.base_config(
        model=model,
        diffusion=cl.diffusion_config("ar", schedule="loglinear"),
        data=cl.data_config(corpus="shakespeare", tokenizer="char"),
        optim=optim,
        mesh=cl.mesh_config(),
        train=train,
        sampler=cl.sampler_config(name="ar"),  # left to right with the KV cache
    )
    if a["smoke"]:
        cl.apply_smoke(config)
    return config
