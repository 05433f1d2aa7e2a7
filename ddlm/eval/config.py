"""The evaluation fields of an experiment config (config.eval), read by `--mode=eval` (ddlm.eval.cli).

    python -m ddlm.main --mode=eval --config=experiments/quickstart.py --workdir=runs/quickstart \
        --config.eval.ar_workdir=runs/quickstart_ar
"""

from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.split = "validation"  # split evaluated: 'validation' (config.data.eval_split) | 'train'
    c.num_batches = 0  # batches of the split; 0 = the whole split, one pass (a last partial batch is dropped)
    c.batch_size = 0  # sequences per batch; 0 = config.train.eval_batch_size
    c.time_samples = 4  # Monte-Carlo samples (times or mask counts) per sequence; the 'ar' NLL is exact: 1
    c.count_sampling = True  # masked losses: draw the number of masked tokens, not t (bounded weights)
    c.discrete_steps = -1  # also the T-step discrete-time bound: T = this; -1 = config.sampler.steps; 0 = off
    c.seed = 0  # times and masks of the Monte-Carlo estimate
    c.use_ema = True  # evaluate the EMA parameters
    c.ar_workdir = (
        ""  # an AR checkpoint: its exact NLL on the same split, and the generative-perplexity scorer
    )
    # The AR checkpoint's network is rebuilt from the config stored in its checkpoint; ar_config (an experiment
    # file such as experiments/quickstart_ar.py) overrides it, checked for compatibility with the checkpoint.
    c.ar_config = ""
    c.num_samples = 0  # samples drawn with config.sampler and scored (gen. perplexity, entropy); 0 = none
    # MAUVE of those samples against as many validation rows, on features of the scorer's network (the AR
    # checkpoint, ddlm.eval.mauve), repeated over this many k-means seeds (its error bar); 0 = off
    c.mauve_seeds = 0
    c.output_dir = ""  # where report.json goes; '' = <workdir>/eval
    return c
