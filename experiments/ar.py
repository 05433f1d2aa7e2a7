"""Autoregressive baseline: a causal transformer of the 'small' size (12x768, rotary) with next-token
cross-entropy, as MDLM and BD3-LM retrained it. MDLM trained its AR baselines for half the steps of the
diffusion models (the same number of tokens predicted): 500k steps at batch 512. Targets (exact test
perplexity, `--mode=eval`):

    corpus=owt        OpenWebText, GPT-2 tokens, L=1024:  17.54  (MDLM Table 2, "262B tokens" = 500k steps)
    corpus=lm1b       LM1B padded, bert-base-uncased, L=128:  22.32  (MDLM Table 1, 33B tokens = 500k steps)
    corpus=lm1b_wrap  LM1B wrapped, L=128:  22.83  (BD3-LM Table 3, 65B tokens = 1M steps)

It is also the generative-perplexity scorer of the diffusion recipes on the same corpus
(`--config.eval.ar_workdir=runs/ar_owt`; the papers score with GPT-2 Large, which is not loaded here).

    python -m ddlm.main --config=experiments/ar.py --workdir=runs/ar_owt
    python -m ddlm.main --config=experiments/ar.py:corpus=lm1b --workdir=runs/ar_lm1b

Preparing the data: experiments/README.md.
"""

from ddlm.train import config_lib as cl


def get_config(arg=None):
    config, a = cl.openwebtext_config(
        arg, loss="ar", model_name="ar", time_conditioning=False, extra_args={"corpus": "owt"}
    )
    cl.set_corpus(config, a["corpus"])
    config.train.steps = 1_000_000 if a["corpus"] == "lm1b_wrap" else 500_000
    config.sampler.name = "ar"  # left to right with the KV cache (ddlm.sampling.autoregressive)
    return cl.finish(config, a)
