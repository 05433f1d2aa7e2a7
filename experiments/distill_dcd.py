"""DCD: DUO's discrete consistency distillation (Sahoo et al. 2025, "The Diffusion Duality", sec. 5; s-sahoo/duo
`algo.py` Distillation), ddlm/train/distill.py. The student (the DUO teacher's network, started from its EMA
parameters) at x_t' learns the teacher's prediction at x_s, s = t' - dt, where (x_t', x_s) lie on one
deterministic trajectory of the Gaussian relaxation (`losses.dcd_pair`); dt doubles every round, and the next
round's teacher is the current student.

The paper's run (s-sahoo/duo `scripts/distil_owt.sh`, `configs/algo/distillation.yaml`): teacher the DUO small
model of experiments/duo.py on OpenWebText (L = 1024, GPT-2 tokens); reverse KL ('kl-bwd'); T = 512 (dt =
2^r / 512 in round r); the teacher replaced by the student every 10k steps (teacher_ema off); the relaxation's
gamma in [-4, -1]; 80k steps; batch 128, AdamW 6e-5, 500 warmup steps then constant, EMA 0.999, bf16; the
released duo-distilled samples in 8 steps or fewer. (Its posterior_loss_weight = 0.5 term is not implemented
here.) This recipe: those settings from the run of experiments/duo.py, 8 rounds of 10k steps:

    python -m ddlm.main --config=experiments/duo.py --workdir=runs/duo
    python -m ddlm.main --config=experiments/distill_dcd.py --workdir=runs/distill_dcd

    nice -n 19 python -m ddlm.main --config=experiments/duo.py:local --workdir=runs/duo_local
    nice -n 19 python -m ddlm.main --config=experiments/distill_dcd.py:local --workdir=runs/distill_dcd_local

`local` (this CPU, minutes; teacher runs/duo_local): 4 rounds from T = 128 in 2,500 steps of batch 32. arg:
size=..., corpus=owt|lm1b (the teacher's: experiments/duo.py), the common args. The student is sampled with
config.sampler.steps = 8 (duo.py's sampler, the uniform graph's exact reverse rates).
"""


from ddlm.train import config_lib as cl


def get_config(arg=None):
    a = cl.parse_arg(arg, size="small", corpus="owt")
    # The teacher run's network, data and schedule; no curriculum (DCD draws its own relaxed pairs).
    config = cl.recipe("duo", __file__).get_config(f"size={a['size']},corpus={a['corpus']},curriculum=False")
    t = config.train
    t.steps, t.batch_size, t.eval_batch_size = 80_000, 128, 128
    t.log_every, t.eval_every, t.ckpt_every = 100, 1_000, 10_000
    config.optim = cl.optim_config(lr=6e-5, warmup_steps=500, decay="constant")
    config.optim.ema_decay = 0.999
    d = config.distill
    d.method, d.teacher, d.divergence = "dcd", "runs/duo", "kl_reverse"
    d.base_steps, d.rounds = 512, 8
    d.gamma_min, d.gamma_max = -4.0, -1.0
    if a["local"]:
        d.teacher, d.base_steps, d.rounds = "runs/duo_local", 128, 4
    if a["smoke"]:
        d.rounds = 2  # a refresh within the 2 steps
    config.sampler.steps = 8
    cl.finish(config, a)
    d.refresh_every = max(1, config.train.steps // d.rounds)  # the rounds share the run
    return config
