"""The sampler fields of an experiment config (config.sampler); experiments copy `default_config()`.

Override any field on the command line, e.g.
    python -m ddlm.main --mode=sample --config=experiments/mdlm.py --workdir=runs/mdlm \
        --config.sampler.name=first_hitting --config.sampler.prompt="ROMEO:" --config.sampler.visualize=True
"""

from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "ancestral"  # ancestral | cached | first_hitting | remdm | sedd_euler | sedd_analytic
    c.steps = 128  # reverse steps (ignored by first_hitting: one network call per masked token)
    c.grid = ""  # schedule whose alpha(t) spaces the steps: loglinear | linear | cosine | ...; '' = config.diffusion.schedule
    c.t_min = 0.0  # the grid runs from t = 1 down to t_min
    c.temperature = 1.0  # softmax temperature of p_theta(x_0 | x_t)
    c.top_k = 0  # keep the k most likely tokens (0 = off)
    c.top_p = 1.0  # nucleus sampling mass (1 = off)
    c.noise_removal = (
        True  # final greedy step for tokens still masked at t_min (SEDD: greedy Tweedie denoise)
    )
    c.precision = (
        "float64"  # Gumbel noise: float64 (53-bit, untruncated tail) | float32_64bit | float32 (biased)
    )
    c.remasking = "rescale"  # ReMDM strategy for name=remdm: cap | rescale | confidence
    c.eta = 0.02  # ReMDM remasking strength (eta_cap or eta_rescale); 0 = plain ancestral
    c.guidance_scale = (
        0.0  # classifier-free guidance w (LLaDA form, prompt masked as unconditional input); 0 = off
    )
    c.prompt = ""  # text the samples start with (prefix conditioning)
    c.infill = ""  # infilling template, e.g. 'The [MASK:20] sat on the mat.' ('' = none)
    c.constraints = ""  # hard token constraints 'pos:id,pos:id' ('' = none)
    c.end = 0  # length control: eos at this position, padding after (0 = use the whole sequence)
    c.truncate_at_eos = True  # in the outputs, everything after the first eos becomes padding
    c.num_samples = 8  # sequences to generate
    c.batch_size = 8  # sequences per sampling call (sharded over the mesh's data axis)
    c.seq_len = 0  # generated length; 0 = config.train.seq_len
    c.seed = 0  # sampling randomness
    c.use_ema = True  # sample with the EMA parameters
    c.progress = True  # per-step progress bar (a host callback from the jitted loop after every step)
    c.visualize = False  # write the denoising trajectory: terminal animation + HTML (one row per step)
    c.output_dir = ""  # where samples go; '' = <workdir>/samples
    # name=ar (causal networks) and name=bd3lm (block-causal): decoding with the network's KV cache
    c.kv_cache = True  # reuse the keys/values of finished tokens (False: full forward per call; same tokens)
    c.greedy = False  # ar: argmax decoding (else temperature / top_k / top_p, float64 Gumbel noise)
    c.stop_at_eos = False  # stop once every sequence has generated eos (variable length); pad after it
    c.block_sampler = "first_hitting"  # bd3lm, inside each block: first_hitting | ancestral | cached | remdm
    c.window = 0  # bd3lm: clean tokens kept in the cache; 0 = all (train.seq_len - block past the context)
    return c
