"""The sharded training system.

    sharding.py    re-exports ddlm/sharding.py: the mesh and the logical-axis rules (sampling uses them too)
    optim.py       AdamW, linear warmup + cosine/constant, global-norm clipping
    state.py       TrainState (params, opt_state, ema_params, step, rng) and its sharded initialisation
    step.py        train_step(state, batch, rng) (grad accumulation, EMA, non-finite guard) and eval_step
    checkpoint.py  re-exports ddlm/checkpoints.py: orbax checkpoints with the config and checksums, checked restore
    metrics.py     TensorBoard events (tensorboardX) + metrics.jsonl; progress line with MFU and ETA
    trainer.py     train_and_evaluate / evaluate: the loop, read top to bottom
    validation.py  validate_config: every config field checked before any work, one ConfigError line each
    config_lib.py  the default config sections shared by experiments/*.py
"""
