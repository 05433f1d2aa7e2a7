"""LLaDA-style masked diffusion with the LLaMA-family network (Nie et al. 2025, "Large Language Diffusion
Models"): a bidirectional, time-free LLaMA network (RMSNorm, SwiGLU, rotary; ddlm/models/llama.py), masked at
rate t ~ U[0, 1] with weight 1/t (the MDLM loss with the linear schedule). Sizes (ddlm.models.llama_config):

  tiny      Shakespeare, characters, the quickstart's data and budget: minutes on a CPU.
  1b        the TinyLlama-1.1B shape, bidirectional, on OpenWebText with its tokenizer.json (a cluster run).
  llada_8b  LLaDA-8B's shape (8.02B parameters; 4096 tokens, batch 1280, lr 4e-4 as the paper's pre-training)
            with LLaDA's tokenizer.json at data/llada/tokenizer.json (a cluster run).

    python -m ddlm.main --config=experiments/llada.py --workdir=runs/llada_tiny
    python -m ddlm.main --config=experiments/llada.py --workdir=runs/llada_tiny --mode=sample --config.sampler.prompt="ROMEO:"
"""

from ddlm import models
from ddlm.train import config_lib as cl


def get_config(arg=None):
    a = cl.parse_arg(arg, size="tiny")
    model, vocab = models.llama_config(a["size"])
    model.attention = "bidirectional"
    sampler = cl.sampler_config(name="parallel", steps=64)  # LLaDA's low-confidence remasking
    diffusion = cl.diffusion_config("mdlm", schedule="linear", eps=0.0)  # t ~ U[0, 1], weight 1/t
    if a["size"] == "tiny":
        config = cl.quickstart_config(model=model, diffusion=diffusion, sampler=sampler)
    else:
        tokenizer_json = (
            "data/llada/tokenizer.json" if a["size"] == "llada_8b" else "data/tinyllama/tokenizer.json"
        )
        seq_len, batch = (4096, 1280) if a["size"] == "llada_8b" else (2048, 512)
        optim = cl.optim_config(lr=4e-4, warmup_steps=2000, decay="cosine")
        optim.weight_decay = 0.1
        model.dtype, model.remat = "bfloat16", True
        config = cl.base_config(
            model=model,
            diffusion=diffusion,
            data=cl.data_config(
                corpus="local:data/openwebtext",
                tokenizer="hf",
                tokenizer_path=tokenizer_json,
                vocab_size=vocab,
            ),
            optim=optim,
            mesh=cl.mesh_config(fsdp=8),
            train=cl.train_config(steps=100_000, batch_size=batch, seq_len=seq_len),
            sampler=sampler,
        )
    return cl.finish(config, a)
