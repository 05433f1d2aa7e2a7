"""SEDD absorb (Lou et al. 2024): score entropy on the absorbing graph with the log-linear schedule.
Reproduces SEDD-small absorb on OpenWebText (12x768 DiT, L=1024, batch 512, 400k steps).

    python -m ddlm.main --config=experiments/sedd_absorb.py --workdir=runs/sedd_absorb
"""

from ddlm.train import config_lib as cl


def get_config(arg=None):
    config, a = cl.openwebtext_config(arg, loss="sedd_absorb", steps=400_000)
    if a["smoke"]:
        cl.apply_smoke(config)
    return config
