"""AR-to-diffusion adaptation, DiffuLLaMA's route (Gong et al. 2025): the quickstart AR model
(experiments/quickstart_ar.py) becomes a bidirectional masked-diffusion model (MDLM loss, time-free network):
its parameters are loaded (config.train.init_from), its attention opens from causal to bidirectional over
config.adapt.anneal_steps steps, and the logit shift keeps its next-token head (position i is predicted by the
output at i - 1). Shakespeare, characters, the quickstart's size, data and eval; ddlm/train/adapt.py.

    python -m ddlm.main --config=experiments/quickstart_ar.py --workdir=runs/quickstart_ar
    python -m ddlm.main --config=experiments/adapt_diffullama.py --workdir=runs/adapt_diffullama
    # the same diffusion model trained from scratch (the comparison of benchmarks/adapt_vs_scratch.py)
    python -m ddlm.main --config=experiments/adapt_diffullama.py:scratch --workdir=runs/diffullama_scratch
    python -m ddlm.main --config=experiments/adapt_diffullama.py --workdir=runs/adapt_diffullama --mode=sample \\
        --config.sampler.prompt="ROMEO:"

From an imported Hugging Face model instead (ddlm.convert), start from its config.py:
    --config=runs/tinyllama/config.py --config.train.init_from=runs/tinyllama --config.model.attention=bidirectional
    --config.model.logit_shift=True --config.diffusion.loss=mdlm --config.adapt.anneal_steps=... (and your data)
"""

from ddlm.train import config_lib as cl


def get_config(arg=None):
    a = cl.parse_arg(arg, size="tiny", scratch=False, init_from="runs/quickstart_ar", anneal_steps=100)
    config = cl.quickstart_config(
        # The quickstart AR network's shape, bidirectional and time-free (DiffuLLaMA adds no time input).
        model=cl.model_config(a["size"], name="dit", dropout=0.0, time_conditioning=False, logit_shift=True),
        diffusion=cl.diffusion_config("mdlm", schedule="loglinear"),
        sampler=cl.sampler_config(name="ancestral", steps=64),
    )
    config.train.eval_every = 50  # the adaptation curve
    config.train.init_from = "" if a["scratch"] else a["init_from"]  # the AR checkpoint that starts the run
    # Causal -> bidirectional over this many steps (from scratch there is nothing causal to keep).
    config.adapt.anneal_steps = 0 if a["scratch"] else a["anneal_steps"]
    return cl.finish(config, a)
