"""MDLM (Sahoo et al. 2024): masked diffusion, SUBS parameterisation, continuous-time NELBO (MDLM eq. 10).
The 'small' model (12x768 DiT, batch 512, AdamW 3e-4, 2.5k warmup, constant rate, EMA 0.9999, dropout 0.1,
log-linear schedule, 1M steps) on the papers' corpora; size=medium|1b scales it. Targets (test perplexity
bound of the EMA parameters, `--mode=eval`):

    corpus=owt        OpenWebText, GPT-2 tokens, L=1024:  <= 23.21  (MDLM Table 2, "262B tokens" = 1M steps;
                      BD3-LM Table 4 lists the same recipe at <= 22.98)
    corpus=lm1b       LM1B padded, bert-base-uncased, L=128:  <= 27.04  (MDLM Table 1, "33B tokens" = 1M steps;
                      10M steps: <= 23.00)
    corpus=lm1b_wrap  LM1B wrapped, L=128:  <= 31.78  (BD3-LM Table 3, 65B tokens = 1M steps)

    python -m ddlm.main --config=experiments/mdlm.py --workdir=runs/mdlm_owt
    python -m ddlm.main --config=experiments/mdlm.py:corpus=lm1b --workdir=runs/mdlm_lm1b
    python -m ddlm.main --config=experiments/mdlm.py:corpus=lm1b --workdir=runs/mdlm_lm1b --mode=eval

Preparing the data: experiments/README.md.
"""

from ddlm.train import config_lib as cl


def get_config(arg=None):
    config, a = cl.openwebtext_config(arg, loss="mdlm", extra_args={"corpus": "owt"})
    cl.set_corpus(config, a["corpus"])
    return cl.finish(config, a)
