"""RADD (Ou et al. 2025): a time-free network predicting clean-data conditionals; lambda-DCE loss.
Reproduces RADD-small on OpenWebText (12x768 DiT without time conditioning, L=1024, 400k steps).

    python -m ddlm.main --config=experiments/radd.py --workdir=runs/radd
"""

from ddlm.train import config_lib as cl


def get_config(arg=None):
    config, a = cl.openwebtext_config(arg, loss="radd", time_conditioning=False, steps=400_000)
    return cl.finish(config, a)
