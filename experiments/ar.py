"""Autoregressive baseline: a causal transformer of the same size trained with next-token cross-entropy.
Reproduces the AR rows of MDLM/SEDD's OpenWebText tables (12x768, L=1024, batch 512, 1M steps).

    python -m ddlm.main --config=experiments/ar.py --workdir=runs/ar
"""

from ddlm.train import config_lib as cl


def get_config(arg=None):
    config, a = cl.openwebtext_config(arg, loss="ar", model_name="ar", time_conditioning=False)
    config.sampler.name = "ar"  # left to right with the KV cache (ddlm.sampling.autoregressive)
    if a["smoke"]:
        cl.apply_smoke(config)
    return config
