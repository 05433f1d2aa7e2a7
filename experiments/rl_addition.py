"""RL with verifiable rewards on 2-digit addition (ddlm/train/rl.py): GRPO with the NELBO likelihood
estimate (shared noise with the reference) from the SFT warm start of experiments/sft_addition.py; rollouts by
the parallel sampler with Fast-dLLM's dual KV cache; held-out accuracy with its standard error at each eval.

    nice -n 19 python -m ddlm.main --config=experiments/sft_addition.py --workdir=runs/sft_addition
    nice -n 19 python -m ddlm.main --config=experiments/rl_addition.py --workdir=runs/rl_addition \\
        --config.train.init_from=runs/sft_addition

arg: estimator=nelbo|mean_field, objective=grpo|wd1, lora=R (adapters of rank R on the frozen SFT model;
0 = full fine-tuning), digits=N, the common args (smoke, local, steps=N). Other fields as usual, e.g.
--config.rl.beta=0.04 (KL to the reference), --config.sampler.cache=none (uncached rollouts).
"""


from ddlm.train import config_lib as cl
from ddlm.train import lora, rl


def get_config(arg=None):
    a = cl.parse_arg(arg, size="tiny", digits=2, estimator="nelbo", objective="grpo", lora=0)
    sft = cl.recipe("sft_addition", __file__)
    config = sft.get_config(f"size={a['size']},digits={a['digits']}")
    t = config.train
    # 32 prompts x 8 completions per step: with 8 prompts (64 rows) the updates' noise outweighed their
    # signal on this task and accuracy fell at any learning rate that moved it (benchmarks/RESULTS.md).
    t.steps, t.batch_size, t.eval_batch_size = 800, 256, 256
    t.log_every, t.eval_every, t.ckpt_every = 20, 100, 100
    t.init_from = "runs/sft_addition"  # the SFT warm start (and the frozen reference)
    config.optim = cl.optim_config(lr=1e-4, warmup_steps=10, decay="constant")
    config.optim.ema_decay = 0.9
    config.rl = rl.default_config()
    config.rl.digits = a["digits"]
    config.rl.estimator, config.rl.objective = a["estimator"], a["objective"]
    config.rl.group_size = 8
    config.rl.eval_problems = 1024
    if a["lora"]:
        config.lora = lora.default_config()
        config.lora.rank = a["lora"]
        config.optim.lr = 2e-3  # adapters take a larger step
    cl.finish(config, a)
    config.train.seq_len = config.sampler.steps = 4 * a["digits"] + 4
    if a["smoke"]:
        t = config.train
        t.batch_size = t.eval_batch_size = 8
        config.rl.group_size, config.rl.eval_problems = 4, 8
    return config
