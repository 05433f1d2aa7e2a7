"""Few-step generation (issue 23): two teachers and their distilled students, one recipe family, compared by
benchmarks/few_step.py at 4-32 sampling steps against the teachers' many-step samples.

Every model shares the quickstart's corpus (Shakespeare), tokenizer (characters), sequence length (128), data
order, network (2 x 128 DiT, time-conditioned) and optimizer family (experiments/quickstart.py); the teachers
train for the same budget (2,400 steps of 32 x 128 characters), the students for the same number of
distillation steps (3,000: 5 rounds of 600, the sampler's steps halved each round, 128 -> 4).

    model=mdlm   the masked teacher (MDLM, loss 'mdlm', ancestral sampler)
    model=duo    the uniform-state teacher (DUO, loss 'duo', Gaussian-relaxation curriculum for the first half
                 of its run as DUO's runs do, tau = 1e-3; sampled with the uniform graph's exact reverse rates)
    model=sdtt   SDTT's student of runs/few_step/mdlm (experiments/distill_sdtt.py's method: reverse KL, 2 teacher
                 steps per student step, 128 -> 4 steps in 5 rounds)
    model=dcd    DCD's student of runs/few_step/duo (experiments/distill_dcd.py's method: reverse KL on pairs of one
                 relaxed trajectory, T = 128, dt doubled each round)

    python -m ddlm.main --config=experiments/few_step.py:model=mdlm --workdir=runs/few_step/mdlm
    python -m ddlm.main --config=experiments/few_step.py:model=duo --workdir=runs/few_step/duo
    python -m ddlm.main --config=experiments/few_step.py:model=sdtt --workdir=runs/few_step/sdtt
    python -m ddlm.main --config=experiments/few_step.py:model=dcd --workdir=runs/few_step/dcd
    python benchmarks/few_step.py     # the one-run table and plot (judge: experiments/judge.py's runs/judge)

arg: model=..., teacher=<workdir> (a student's teacher; default runs/few_step/<mdlm|duo>), rounds=N (a
student's rounds, 5), base_steps=N (the first round's teacher steps, 128), divergence=kl_reverse|kl_forward
(a student's, ddlm.losses.DIVERGENCES), steps=N (the run's steps), the common
args. The students' learning rate is the papers' 3e-4 (constant after a short warmup); their EMA horizon is a
fraction of a round, so each round's student is what the EMA holds at its end.
"""

from ddlm.train import config_lib as cl

MODELS = ("mdlm", "duo", "sdtt", "dcd")
TEACHER_STEPS = 2400
STUDENT_STEPS = 3000  # rounds x steps per round


def get_config(arg=None):
    a = cl.parse_arg(arg, size="tiny", model="mdlm", teacher="", rounds=5, base_steps=128, divergence="kl_reverse")
    name = a["model"]
    if name not in MODELS:
        raise ValueError(f"experiments/few_step.py: model={name!r}; expected one of {MODELS}")
    uniform = name in ("duo", "dcd")
    model = cl.model_config(a["size"], dropout=0.0)
    if uniform:
        diffusion = cl.diffusion_config("duo", schedule="loglinear", process="uniform")
        sampler = cl.sampler_config(name="sedd_analytic", steps=128)  # the exact reverse rates (losses.duo_log_ratios)
    else:
        diffusion = cl.diffusion_config("mdlm", schedule="loglinear")
        sampler = cl.sampler_config(name="ancestral", steps=128)
    config = cl.quickstart_config(model=model, diffusion=diffusion, sampler=sampler)
    if name == "duo":  # the curriculum for the first half of the run (DUO: 500k of 1M steps), tau = 1e-3
        config.diffusion.curriculum.end = config.train.steps // 2
    if name in ("mdlm", "duo"):
        if not a["steps"]:
            cl.scale_to_steps(config, TEACHER_STEPS)
        return cl.finish(config, a)
    # A student: its teacher's recipe, distilled.
    config.optim = cl.optim_config(lr=3e-4, warmup_steps=50, decay="constant")
    config.optim.ema_decay = 0.99
    d = config.distill
    d.method = name
    d.teacher = a["teacher"] or f"runs/few_step/{'duo' if uniform else 'mdlm'}"
    d.divergence = a["divergence"]  # both papers: kl_reverse (mode seeking); kl_forward covers the teacher's mass
    d.teacher_steps, d.base_steps, d.rounds = 2, a["base_steps"], a["rounds"]
    if uniform:
        d.gamma_min, d.gamma_max = -4.0, -1.0  # DUO configs/algo/distillation.yaml
    config.sampler.steps = max(1, d.base_steps // 2 ** d.rounds)  # the last round's student
    if not a["steps"]:
        cl.scale_to_steps(config, STUDENT_STEPS)
    cl.finish(config, a)
    d.refresh_every = max(1, config.train.steps // d.rounds)  # the rounds share the run
    config.train.ckpt_every = d.refresh_every  # a checkpoint at each round's end, all kept
    config.train.keep_checkpoints = max(config.train.keep_checkpoints, d.rounds)
    return config
