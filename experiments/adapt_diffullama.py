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

From an imported Hugging Face model instead (ddlm.models.convert), start from its config.py:
    --config=runs/tinyllama/config.py --config.train.init_from=runs/tinyllama --config.model.attention=bidirectional
    --config.model.logit_shift=True --config.diffusion.loss=mdlm --config.adapt.anneal_steps=... (and your data)
"""

from ddlm.train import config_lib as cl


def get_config(arg=None):
    a = cl.parse_arg(
        arg, size="tiny", smoke=False, scratch=False, init_from="runs/quickstart_ar", anneal_steps=100
    )
    # The quickstart AR network's shape, bidirectional and time-free (DiffuLLaMA adds no time input).
    model = cl.model_config(a["size"], name="dit", dropout=0.0, time_conditioning=False, logit_shift=True)
    train = cl.train_config(steps=600, batch_size=32, seq_len=128)
    train.log_every = 50
    train.eval_every = 50
    train.ckpt_every = 200
    train.eval_batches = 8
    train.init_from = (
        "" if a["scratch"] else a["init_from"]
    )  # the AR checkpoint whose parameters start the run
    optim = cl.optim_config(lr=2e-3, warmup_steps=50, decay="cosine")
    optim.ema_decay = 0.99
    sampler = cl.sampler_config(name="ancestral", steps=64)
    sampler.num_samples = 4
    sampler.batch_size = 4
    config = cl.base_config(
        model=model,
        diffusion=cl.diffusion_config("mdlm", schedule="loglinear"),
        data=cl.data_config(corpus="shakespeare", tokenizer="char"),
        optim=optim,
        mesh=cl.mesh_config(),
        train=train,
        sampler=sampler,
    )
    # Causal -> bidirectional over this many steps (0 = bidirectional at once; from scratch there is nothing
    # causal to keep).
    config.adapt.anneal_steps = 0 if a["scratch"] else a["anneal_steps"]
    if a["smoke"]:
        cl.apply_smoke(config)
    return config
