"""SFT quickstart: LLaDA-style supervised fine-tuning of a tiny masked diffusion model on Shakespeare replies
(the last line of one speech -> the first line of the next speaker's; built from the corpus on first use),
character level, in the chat template; minutes on a laptop CPU. Reproduces nothing published: it shows the
SFT loop (prompt never masked, eos padding learned, per-example normalisation) and sampling from the result.

    python -m ddlm.main --config=experiments/sft_quickstart.py --workdir=runs/sft
    python -m ddlm.main --config=experiments/sft_quickstart.py --workdir=runs/sft --mode=sample \\
        --config.sampler.prompt="What say you, my lord?"

To fine-tune on your own records: --config.data.sft_data=/path/to/records.jsonl (lines of
{"prompt": ..., "response": ...}); the tokenizer stays that of config.data.corpus.
"""

from ddlm.train import config_lib as cl


def get_config(arg=None):
    a = cl.parse_arg(arg, size="tiny")
    # LLaDA's network is time-free; its SFT masks the response at rate t ~ U[0, 1] with weight 1/t, which is
    # the linear schedule's masked-diffusion weight.
    model = cl.model_config(a["size"], dropout=0.0, time_conditioning=False)
    train = cl.train_config(steps=600, batch_size=32, seq_len=128)
    train.log_every = 50
    train.eval_every = 200
    train.ckpt_every = 200
    train.eval_batches = 8
    train.sample_at_end = True
    optim = cl.optim_config(lr=2e-3, warmup_steps=50, decay="cosine")
    optim.ema_decay = 0.99
    sampler = cl.sampler_config(name="ancestral", steps=64)
    sampler.num_samples = 4
    sampler.batch_size = 4
    sampler.prompt = "What say you, my lord?"  # the user turn; the model writes the reply and then eos
    config = cl.base_config(
        model=model,
        diffusion=cl.diffusion_config("sft", schedule="linear", eps=0.0),
        data=cl.data_config(
            corpus="shakespeare", tokenizer="char", sft_data="shakespeare_replies", sft_template="chat"
        ),
        optim=optim,
        mesh=cl.mesh_config(),
        train=train,
        sampler=sampler,
    )
    cl.finish(config, a)
    if a["smoke"]:
        config.train.seq_len = 128  # a templated pair of the built-in set takes up to 118 tokens
    return config
