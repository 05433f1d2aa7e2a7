"""AR-to-diffusion adaptation, Fast-dLLM v2's route (Wu et al. 2025): the quickstart AR model
(experiments/quickstart_ar.py) becomes a block-diffusion (BD3-LM) model: block-causal attention at once, the
BD3-LM loss over blocks of config.model.block_size tokens, and the logit shift (inside a block, position i is
predicted by the output at i - 1; a block's first token by the clean token before it, as the AR network did).
Sampling decodes block by block with the exact KV cache (sampler 'bd3lm'). ddlm/train/adapt.py.

    python -m ddlm.main --config=experiments/quickstart_ar.py --workdir=runs/quickstart_ar
    python -m ddlm.main --config=experiments/adapt_fastdllm_v2.py --workdir=runs/adapt_fastdllm_v2
    python -m ddlm.main --config=experiments/adapt_fastdllm_v2.py:scratch --workdir=runs/fastdllm_v2_scratch
    python -m ddlm.main --config=experiments/adapt_fastdllm_v2.py --workdir=runs/adapt_fastdllm_v2 --mode=sample \\
        --config.sampler.prompt="ROMEO:" --config.sampler.stop_at_eos=True
"""

from ddlm.train import config_lib as cl


def get_config(arg=None):
    a = cl.parse_arg(arg, size="tiny", scratch=False, init_from="runs/quickstart_ar", block_size=16)
    model = cl.model_config(a["size"], name="bd3lm", dropout=0.0, time_conditioning=False, logit_shift=True)
    model.block_size = a["block_size"]  # Fast-dLLM v2 uses 32-token blocks on 2k contexts; 16 of 128 here
    config = cl.quickstart_config(
        model=model,
        diffusion=cl.diffusion_config("bd3lm", schedule="loglinear"),
        sampler=cl.sampler_config(name="bd3lm", steps=16),
    )
    config.train.eval_every = 50  # the adaptation curve
    config.train.init_from = "" if a["scratch"] else a["init_from"]
    return cl.finish(config, a)
