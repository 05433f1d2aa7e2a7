"""DUO (Sahoo et al. 2025, "The Diffusion Duality"): uniform-state diffusion with the mean parameterisation
(`ddlm.losses.duo_loss`) trained with the Gaussian-relaxation curriculum (`ddlm.losses.DuoCurriculum`).
The paper's OpenWebText run (s-sahoo/duo `scripts/train_owt_duo.sh`, `configs/algo/duo.yaml`): DiT small
(12 x 768, dropout 0.1), L = 1024, GPT-2 tokenizer, batch 512, AdamW 3e-4 with 2.5k warmup and a constant rate,
EMA 0.9999, 1M steps, log-linear schedule (eps = 1e-3, antithetic times); the curriculum for the first 500k
steps at tau = 10^-3 throughout over the relaxation's gamma in [-3.55, -1.85]; then the plain NELBO. (LM1B:
L = 128, gamma in [-3.5, -1.75]; arg corpus=lm1b.) Samples come from the exact reverse rates of the uniform
graph (`losses.duo_log_ratios`) through the SEDD samplers.

    python -m ddlm.main --config=experiments/duo.py --workdir=runs/duo
    python -m ddlm.main --config=experiments/duo.py:local --workdir=runs/duo_local   # this CPU, minutes

`local` (the quickstart's scale: Shakespeare characters, the tiny network, 2,500 steps) keeps the curriculum for
the first half of the run, as the paper does; `steps=N` moves its end to N/2 with the rest.
"""

from ddlm.train import config_lib as cl


def get_config(arg=None):
    config, a = cl.openwebtext_config(
        arg,
        loss="duo",
        schedule="loglinear",
        schedule_kwargs={"eps": 1e-3},
        process="uniform",
        steps=1_000_000,
        extra_args={"corpus": "owt", "curriculum": True},
    )
    cl.set_corpus(config, a["corpus"])
    c = config.diffusion.curriculum
    c.end = 500_000 if a["curriculum"] else 0
    c.tau_log10_start = c.tau_log10_end = -3.0
    c.gamma_min, c.gamma_max = (-3.55, -1.85) if a["corpus"] == "owt" else (-3.5, -1.75)
    config.sampler.name = "sedd_analytic"  # the masked samplers need the absorbing graph
    return cl.finish(config, a)  # steps=N, local and smoke keep the curriculum's share of the run (half)
