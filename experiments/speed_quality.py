"""Faster than autoregression at matched quality (issue 27): one recipe family, every model on the same corpus
(Shakespeare), tokenizer (characters, 70 ids), sequence length (128), data order, optimizer (the quickstart's:
AdamW 2e-3 with cosine decay) and budget (1,200 steps of 32 x 128 characters: warmup 24 steps, EMA 0.979, an eval
every 300; the quickstart's 2,500 did not fit the loaded 2-core machine for six models) and network size (2 layers
x 128, 4 heads) -- except the
draft, which is smaller on purpose, and the judge (experiments/judge.py), which is larger and trained longer and
is used only to score. benchmarks/speed_quality.py compares them; benchmarks/RESULTS.md, "Faster than
autoregression?", has the figures and how long each run took at what load.

    model=ar           the AR baseline (causal, next-token loss)
    model=draft        the speculative-decoding draft: 1 layer x 64 wide causal network
    model=mdlm         MDLM (the quickstart's recipe: time-conditioned bidirectional DiT)
    model=bd3lm        BD3-LM from scratch (block-causal, time-free), block_size=4 by default
    model=fastdllm_v2  Fast-dLLM v2's route (experiments/adapt_fastdllm_v2.py): the AR baseline's parameters
                       (init_from, default runs/sq_ar) become a block-diffusion model with the logit shift,
                       block_size=16 by default

    python -m ddlm.main --config=experiments/judge.py --workdir=runs/judge
    python -m ddlm.main --config=experiments/speed_quality.py:model=ar --workdir=runs/sq_ar
    python -m ddlm.main --config=experiments/speed_quality.py:model=draft --workdir=runs/sq_draft
    python -m ddlm.main --config=experiments/speed_quality.py:model=mdlm --workdir=runs/sq_mdlm
    python -m ddlm.main --config=experiments/speed_quality.py:model=bd3lm,block_size=4 --workdir=runs/sq_bd3lm4
    python -m ddlm.main --config=experiments/speed_quality.py:model=fastdllm_v2,block_size=16 \\
        --workdir=runs/sq_fdv2_16          # after runs/sq_ar
    python benchmarks/speed_quality.py      # the one-run table and plot

`steps=N` sets another budget (the schedule scales with it, config_lib.scale_to_steps).
"""

from ddlm.train import config_lib as cl

MODELS = ("ar", "draft", "mdlm", "bd3lm", "fastdllm_v2")
STEPS = 1200


def get_config(arg=None):
    a = cl.parse_arg(arg, size="tiny", model="ar", block_size=0, init_from="runs/sq_ar")
    name = a["model"]
    if name not in MODELS:
        raise ValueError(f"experiments/speed_quality.py: model={name!r}; expected one of {MODELS} (judge: judge.py)")
    if name in ("ar", "draft"):
        model = cl.model_config(a["size"], dropout=0.0, name="ar", time_conditioning=False)
        if name == "draft":  # small enough that its call costs a fraction of the target's on a GPU
            model.num_layers, model.d_model, model.num_heads, model.mlp_dim = 1, 64, 2, 256
        diffusion, sampler = cl.diffusion_config("ar", schedule="loglinear"), cl.sampler_config(name="ar")
    elif name == "mdlm":
        model = cl.model_config(a["size"], dropout=0.0)
        diffusion = cl.diffusion_config("mdlm", schedule="loglinear")
        sampler = cl.sampler_config(name="ancestral", steps=128)
    else:
        shift = name == "fastdllm_v2"  # the AR network's head, reused: position i predicted from i - 1
        model = cl.model_config(
            a["size"], name="bd3lm", dropout=0.0, time_conditioning=False, logit_shift=shift
        )
        model.block_size = a["block_size"] or (16 if shift else 4)
        diffusion = cl.diffusion_config("bd3lm", schedule="loglinear")
        sampler = cl.sampler_config(name="bd3lm", steps=16)
    config = cl.quickstart_config(model=model, diffusion=diffusion, sampler=sampler)
    if name == "fastdllm_v2":
        config.train.init_from = a["init_from"]
    if not a["steps"]:
        cl.scale_to_steps(config, STEPS)
    return cl.finish(config, a)
