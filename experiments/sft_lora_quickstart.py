"""LoRA / QLoRA SFT of the quickstart model (ddlm/train/lora.py, adapters through qwix): the SFT quickstart's
Shakespeare replies (experiments/sft_quickstart.py) fine-tuned from the pretrained quickstart checkpoint
(experiments/quickstart.py, the same 2 x 128 time-conditioned DiT), with rank-R adapters on every block's
attention and MLP projections and the base frozen (optionally int8/int4); lora=0 is the full fine-tune it is
compared with (benchmarks/RESULTS.md, "LoRA and QLoRA").

    nice -n 19 python -m ddlm.main --config=experiments/quickstart.py --workdir=runs/quickstart
    nice -n 19 python -m ddlm.main --config=experiments/sft_lora_quickstart.py --workdir=runs/sft_lora \\
        --config.train.init_from=runs/quickstart
    nice -n 19 python -m ddlm.main --config=experiments/sft_lora_quickstart.py:quantize=int8 --workdir=runs/sft_qlora
    nice -n 19 python -m ddlm.main --config=experiments/sft_lora_quickstart.py:lora=0 --workdir=runs/sft_full

arg: lora=R (rank; 0 = full fine-tuning), quantize=none|int8|int4, the common args (smoke, local, steps=N).
The checkpoints of a LoRA run hold the adapter only; ddlm.train.lora.merge folds it into the base.
"""


from ddlm.train import config_lib as cl
from ddlm.train import lora


def get_config(arg=None):
    a = cl.parse_arg(arg, size="tiny", lora=16, quantize="none")
    config = cl.recipe("sft_quickstart", __file__).get_config(f"size={a['size']}")
    config.model = cl.model_config(a["size"], dropout=0.0)  # the quickstart's network (time-conditioned)
    config.train.steps = 300
    config.train.eval_every = config.train.ckpt_every = 100
    config.train.sample_at_end = False  # a LoRA checkpoint holds the adapter only: sample from lora.merge
    config.train.init_from = "runs/quickstart"
    config.optim = cl.optim_config(lr=5e-4, warmup_steps=20, decay="cosine")
    config.optim.ema_decay = 0.99
    config.lora = lora.default_config()
    config.lora.rank, config.lora.quantize = a["lora"], a["quantize"]
    # The pretrained network never predicted eos, which pads every SFT response: its output layer trains too.
    config.lora.train_also = "output_(kernel|bias)"
    if a["lora"]:
        config.optim.lr = 2e-3  # adapters (B starts at zero) take larger steps
    cl.finish(config, a)
    config.train.sample_at_end = False
    if a["smoke"]:
        config.train.seq_len = 128  # a templated pair of the built-in set takes up to 118 tokens
    return config
