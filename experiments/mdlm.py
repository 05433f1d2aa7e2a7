"""MDLM (Sahoo et al. 2024): masked diffusion, SUBS parameterisation, continuous-time NELBO (MDLM eq. 10).
Reproduces the 'small' OpenWebText model (12x768 DiT, L=1024, 1M steps); size=medium|1b scales it.

    python -m ddlm.main --config=experiments/mdlm.py --workdir=runs/mdlm
    python -m ddlm.main --config=experiments/mdlm.py:size=medium --workdir=runs/mdlm_medium
"""

from ddlm.train import config_lib as cl


def get_config(arg=None):
    config, a = cl.openwebtext_config(arg, loss="mdlm")
    if a["smoke"]:
        cl.apply_smoke(config)
    return config
