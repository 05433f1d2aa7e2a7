"""SEDD absorb (Lou et al. 2024): score entropy on the absorbing graph with the log-linear schedule, as MDLM
retrained it for its tables: the 'small' DiT with time conditioning, batch 512, 1M steps (the SEDD paper itself
trained 400k: --config.train.steps=400000). Targets (test perplexity bound, `--mode=eval`):

    corpus=owt        OpenWebText, L=1024:  <= 24.10  (MDLM Table 2, SEDD retrained, "262B tokens" = 1M steps)
    corpus=lm1b       LM1B padded, bert-base-uncased, L=128:  <= 32.79  (MDLM Table 1, 33B tokens)
    corpus=lm1b_wrap  LM1B wrapped, L=128:  <= 32.68  (BD3-LM Table 3, 65B tokens = 1M steps)

    python -m ddlm.main --config=experiments/sedd_absorb.py --workdir=runs/sedd_absorb_owt
    python -m ddlm.main --config=experiments/sedd_absorb.py:corpus=lm1b --workdir=runs/sedd_absorb_lm1b

Preparing the data: experiments/README.md.
"""

from ddlm.train import config_lib as cl


def get_config(arg=None):
    config, a = cl.openwebtext_config(arg, loss="sedd_absorb", extra_args={"corpus": "owt"})
    cl.set_corpus(config, a["corpus"])
    config.sampler.name = "sedd_analytic"  # SEDD's own sampler (MDLM's baseline scripts: predictor=analytic)
    return cl.finish(config, a)
