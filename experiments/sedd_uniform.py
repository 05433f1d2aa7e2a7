"""SEDD uniform (Lou et al. 2024): score entropy on the uniform graph with the geometric noise schedule.
Reproduces SEDD-small uniform on OpenWebText (12x768 DiT, L=1024, sigma in [1e-4, 20], 400k steps).

    python -m ddlm.main --config=experiments/sedd_uniform.py --workdir=runs/sedd_uniform
"""

from ddlm.train import config_lib as cl


def get_config(arg=None):
    config, a = cl.openwebtext_config(
        arg,
        loss="sedd_uniform",
        schedule="geometric",
        schedule_kwargs={"sigma_min": 1e-4, "sigma_max": 20.0},
        process="uniform",
        steps=400_000,
    )
    config.sampler.name = "sedd_analytic"  # the masked samplers need the absorbing graph
    return cl.finish(config, a)
