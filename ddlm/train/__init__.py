"""The sharded training system.

    sharding.py    Mesh ('data', 'fsdp', 'tensor'; Auto axes) from config.mesh; the logical-axis rules table
    optim.py       AdamW, linear warmup + cosine/constant, global-norm clipping
    state.py       TrainState (params, opt_state, ema_params, step, rng) and its sharded initialisation
    step.py        train_step(state, batch, rng) (grad accumulation, EMA, non-finite guard) and eval_step
    checkpoint.py  orbax CheckpointManager (async, keep N): state + data iterator; corrupt-latest fallback
    metrics.py     TensorBoard events (tensorboardX) + metrics.jsonl; progress line with MFU and ETA
    trainer.py     train_and_evaluate / evaluate: the loop, read top to bottom
    config_lib.py  the default config sections shared by experiments/*.py
"""
