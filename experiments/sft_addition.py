"""SFT warm start for RL: a tiny time-free masked diffusion model learns 2-digit addition ('12 34:' ->
'46', ddlm/data/tasks.py) through the SFT path (LLaDA's SFT loss, prompt never masked, eos padding learned);
experiments/rl_addition.py then improves it with RL. The records are generated locally on first use (20k
problems of the task's train split; the held-out test split is never trained on).

    nice -n 19 python -m ddlm.main --config=experiments/sft_addition.py --workdir=runs/sft_addition

arg: digits=N (operand digits, default 2), the common args (smoke, local, steps=N).
"""

from ddlm.data import tasks
from ddlm.train import config_lib as cl



def get_config(arg=None):
    a = cl.parse_arg(arg, size="tiny", digits=2)
    model = cl.model_config(a["size"], dropout=0.0, time_conditioning=False)
    train = cl.train_config(steps=3000, batch_size=64, seq_len=4 * a["digits"] + 4)
    train.log_every, train.eval_every, train.ckpt_every, train.eval_batches = 100, 1000, 1000, 4
    optim = cl.optim_config(lr=2e-3, warmup_steps=50, decay="cosine")
    optim.ema_decay = 0.99
    data = cl.data_config(corpus="shakespeare", tokenizer="char", sft_template="none")
    data.sft_data = tasks.sft_records(tasks.get_task("addition", digits=a["digits"]), data, n=20000)
    config = cl.base_config(
        model=model,
        diffusion=cl.diffusion_config("sft", schedule="linear", eps=0.0),
        data=data,
        optim=optim,
        mesh=cl.mesh_config(),
        train=train,
        sampler=rollout_sampler(),
    )
    cl.finish(config, a)
    config.train.seq_len = 4 * a["digits"] + 4  # smoke / local keep the task's row length
    config.sampler.steps = config.train.seq_len  # one position a step: seq_len / 4 blocks of 4 steps
    return config


def rollout_sampler():
    """The sampler of the addition recipes (rollouts and evals): LLaDA's semi-AR low-confidence decoding in
    blocks of 4 with Fast-dLLM's dual KV cache, temperature 1 (RL needs diverse completions)."""
    sampler = cl.sampler_config(name="parallel", steps=16)  # get_config sets steps = seq_len
    sampler.rule, sampler.block_length, sampler.cache, sampler.temperature = "low_confidence", 4, "dual", 1.0
    sampler.num_samples = sampler.batch_size = 4
    sampler.prompt = "12 34:"
    return sampler


