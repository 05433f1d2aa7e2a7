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
    a = cl.parse_arg(arg, size="tiny")
    config = cl.quickstart_config(
        model=cl.model_config(a["size"], dropout=0.0, name="ar", time_conditioning=False),
        diffusion=cl.diffusion_config("ar", schedule="loglinear"),
        sampler=cl.sampler_config(name="ar"),  # left to right with the KV cache
    )
    return cl.finish(config, a)
