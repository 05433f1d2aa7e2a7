"""BD3-LM (Arriola et al. 2025): block diffusion, autoregressive over blocks, masked diffusion within a block.
Reproduces BD3-LM small on OpenWebText with block size 4 or 16 (block-causal 12x768, L=1024).

    python -m ddlm.main --config=experiments/bd3lm.py:block_size=16 --workdir=runs/bd3lm_16
"""

from ddlm.train import config_lib as cl


def get_config(arg=None):
    config, a = cl.openwebtext_config(
        arg, loss="bd3lm", model_name="bd3lm", time_conditioning=False, extra_args={"block_size": 4}
    )
    config.model.block_size = a["block_size"]  # tokens per block: 4 or 16 in the paper
    config.sampler.name = "bd3lm"  # block by block with the exact KV cache (ddlm.sampling.block)
    if a["smoke"]:
        cl.apply_smoke(config)
    return config
