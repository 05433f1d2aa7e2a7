"""The judge: a larger autoregressive model of the quickstart corpus, trained longer, used ONLY to score samples
(generative perplexity, and MAUVE's features) -- never sampled from, never a side of a speed comparison.
Shared by issue 27 (benchmarks/speed_quality.py: diffusion vs AR at matched quality) and issue 23 (few-step
generation): both score with the checkpoint in runs/judge, so their figures are on one scale.

Same corpus (Shakespeare), tokenizer (characters), sequence length (128) and data as the quickstart models
(experiments/quickstart.py, quickstart_ar.py, speed_quality.py), so it scores their text without re-tokenising;
4 layers x 192 wide (4 heads of 48), MLP 768, 1.8M parameters (the 2 x 128 models have 0.4M),
2,000 steps of 32 x 128 characters (1.7x the tokens of the speed_quality models' 1,200 steps), AdamW 1.5e-3 with
40 warmup steps and cosine decay, EMA 0.9875. Its exact validation NLL must be below every model it judges (`--mode=eval`; benchmarks/RESULTS.md,
"Faster than autoregression?", has it, and how long the run took at what load).

    python -m ddlm.main --config=experiments/judge.py --workdir=runs/judge
    # scoring with it: config.eval.ar_workdir=runs/judge (ddlm.eval.cli / frontier), or
    # ddlm.loading.load_for_inference('runs/judge') -> ddlm.eval.cli.make_scorer / ddlm.eval.mauve.Judge
"""

from ddlm.train import config_lib as cl


def get_config(arg=None):
    a = cl.parse_arg(arg, size="tiny")
    model = cl.model_config(a["size"], dropout=0.0, name="ar", time_conditioning=False)
    model.num_layers, model.d_model, model.num_heads, model.mlp_dim = 4, 192, 4, 768
    config = cl.quickstart_config(
        model=model,
        diffusion=cl.diffusion_config("ar", schedule="loglinear"),
        sampler=cl.sampler_config(name="ar"),
    )
    config.optim.lr = 1.5e-3
    if not a["steps"]:
        cl.scale_to_steps(config, 2000)  # warmup 40, EMA 0.98, eval and checkpoint every 500
    return cl.finish(config, a)
