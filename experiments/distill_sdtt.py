"""SDTT (Deschenaux & Gulcehre 2025, "Beyond Autoregression: Discrete Diffusion for Long-Context Text",
arXiv 2410.21035): self-distillation through time of a masked (MDLM) model, ddlm/train/distill.py. The student
(the teacher's network, started from its EMA parameters) learns to predict in one step what the teacher's
several-step ancestral sampler predicts (`losses.sdtt_target`, `losses.sdtt_loss`); each round halves the
number of sampling steps, and the next round's teacher is the current student.

The paper's run (jdeschena/sdtt README "Distill the pre-trained MDLM", `configs/config.yaml`,
`configs/parameterization/multi-round-sdtt.yaml`): teacher MDLM small on OpenWebText (kuleshov-group/mdlm-owt,
time-free, L = 1024); reverse KL ('kl-bwd') on the masked tokens; 2 teacher steps per student step from a
1024-step sampler (dt = (1 - eps) 2^r / 1024 in round r); a round every 10k steps with the teacher replaced by
the student (use_ema_on_growth off); 80k steps (rounds 1-7 released, 1024 -> 8 steps); batch 128, AdamW 3e-4,
2.5k warmup then constant, grad clip 1, EMA 0.9999, bf16. This recipe applies those settings to the quickstart
model (experiments/quickstart.py, its network, data and tokenizer), 7 rounds of 10k steps:

    nice -n 19 python -m ddlm.main --config=experiments/quickstart.py --workdir=runs/quickstart
    nice -n 19 python -m ddlm.main --config=experiments/distill_sdtt.py:local --workdir=runs/distill_sdtt_local
    python -m ddlm.main --config=experiments/distill_sdtt.py --workdir=runs/distill_sdtt   # 70k steps

`local` (this CPU, minutes): 4 rounds from the quickstart's 128-step sampler (128 -> 64 -> 32 -> 16 -> 8 steps) in
2,500 steps of batch 32. The student starts from the teacher; --config.train.init_from=<workdir> starts it
elsewhere (a network of the teacher's shape). Sample the student with its last round's steps
(config.sampler.steps, 8).
"""


from ddlm.train import config_lib as cl


def get_config(arg=None):
    a = cl.parse_arg(arg, size="tiny")
    config = cl.recipe("quickstart", __file__).get_config(f"size={a['size']}")  # the teacher's network, data, tokenizer
    t = config.train
    t.steps, t.batch_size, t.eval_batch_size = 70_000, 128, 128
    t.log_every, t.eval_every, t.ckpt_every = 100, 5_000, 5_000
    config.optim = cl.optim_config(lr=3e-4, warmup_steps=2500, decay="constant")
    config.optim.ema_decay = 0.9999
    d = config.distill
    d.method, d.teacher, d.divergence = "sdtt", "runs/quickstart", "kl_reverse"
    d.teacher_steps, d.base_steps, d.rounds = 2, 1024, 7
    if a["local"]:
        d.base_steps, d.rounds = 128, 4  # the quickstart's sampler, 128 -> 8 steps
    if a["smoke"]:
        d.rounds = 2  # a refresh within the 2 steps
    config.sampler.steps = d.base_steps // d.teacher_steps**d.rounds  # the last round's student
    cl.finish(config, a)
    d.refresh_every = max(1, config.train.steps // d.rounds)  # the rounds share the run
    return config
