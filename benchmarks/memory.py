"""Memory of the compiled train step per preset (XLA's memory_analysis), and the largest batch per device that
fits a memory budget (80 GB: an A100/H100).

    python benchmarks/memory.py                                    # small, medium, 1b at L=1024, bf16, scan
    python benchmarks/memory.py --presets=small --remat=none,full,dots_saveable --mesh=1,1,1
    python benchmarks/memory.py --presets=tiny --seq=64 --batches=4,8       # seconds (the suite's --dry-run)

For each preset and remat policy the train step of experiments/mdlm.py (GPT-2 vocabulary, 50,258 ids) is
compiled for the backend at hand at two per-device batch sizes; arguments (the sharded train state: fp32
params, Adam moments, EMA) and outputs are fixed, temporaries (activations, gradients) grow linearly with the
batch, so the largest batch is floor((budget - fixed) / per-example temp). On CPU the figures are XLA:CPU's
buffer assignment, an estimate of a GPU's (which fuses and schedules differently): measure on the device
for the real figure (benchmarks/device_suite.sh runs this script there). `--mesh=data,fsdp,tensor` compiles
for a mesh of fake devices (set XLA_FLAGS=--xla_force_host_platform_device_count=N on CPU); figures are per
device.
"""

import argparse
import importlib.util
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2_VOCAB = 50_258  # GPT-2's 50,257 ids + the mask


class _Tokenizer:
    def __init__(self, vocab_size):
        self.vocab_size, self.mask_id = vocab_size, vocab_size - 1


def compile_step(
    preset, *, seq, batch_per_device, dtype, remat, scan, mesh, attention_impl="xla", vocab=GPT2_VOCAB,
    experiment="mdlm",
):
    """(compiled train step, setup) of experiments/<experiment>.py:size=preset for a per-device batch."""
    import jax

    from ddlm.data import tokenizers
    from ddlm.train import trainer

    path = os.path.join(ROOT, "experiments", f"{experiment}.py")
    spec = importlib.util.spec_from_file_location(experiment, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(f"size={preset}")
    m = config.model
    m.dtype = dtype
    m.attention_impl = attention_impl
    m.scan_layers = scan
    m.remat = remat != "none"
    if remat != "none":
        m.remat_policy = remat
    if preset == "tiny":
        m.cond_dim = min(m.cond_dim, 64)
    data, fsdp, tensor = mesh
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
    config.data.corpus = "shakespeare"  # unused: nothing is read
    t = config.train
    t.seq_len = seq
    t.batch_size = t.eval_batch_size = batch_per_device * data * fsdp
    tokenizers.get_tokenizer = lambda data_config: _Tokenizer(vocab)
    devices = jax.devices()[: data * fsdp * tensor]
    setup = trainer.build(config, devices)
    return trainer.compile_train_step(setup), setup


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="small,medium,1b")
    p.add_argument("--remat", default="full", help="comma list of none | full | dots_saveable")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batches", default="2,4", help="two per-device batch sizes (the slope's end points)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--no_scan", action="store_true", help="unrolled blocks (slow to compile when deep)")
    p.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor")
    p.add_argument("--budget_gb", type=float, default=80.0)
    args = p.parse_args(argv)
    import jax

    mesh = tuple(int(x) for x in args.mesh.split(","))
    b1, b2 = (int(x) for x in args.batches.split(","))
    budget = args.budget_gb * 1e9
    print(
        f"device {jax.devices()[0].device_kind} ({jax.default_backend()}), L={args.seq}, {args.dtype}, "
        f"mesh data,fsdp,tensor={mesh}, scan={not args.no_scan}; GB = 1e9 bytes, per device"
    )
    print("| preset | remat | params | arguments GB | temp GB at b=%d | temp MB/example | max batch/device in %.0f GB |"
          % (b1, args.budget_gb))  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    rows = []
    for preset in args.presets.split(","):
        for remat in args.remat.split(","):
            mems = []
            t0 = time.time()
            for b in (b1, b2):
                compiled, setup = compile_step(
                    preset, seq=args.seq, batch_per_device=b, dtype=args.dtype, remat=remat,
                    scan=not args.no_scan, mesh=mesh,
                )  # fmt: skip
                mems.append(compiled.memory_analysis())
            from ddlm.train import state as state_lib

            params = state_lib.count_params(jax.eval_shape(setup.init_state).params)
            fixed = (
                mems[0].argument_size_in_bytes + mems[0].output_size_in_bytes - mems[0].alias_size_in_bytes
            )
            per_example = (mems[1].temp_size_in_bytes - mems[0].temp_size_in_bytes) / (b2 - b1)
            base_temp = mems[0].temp_size_in_bytes - b1 * per_example
            max_batch = math.floor((budget - fixed - base_temp) / per_example) if per_example > 0 else -1
            row = (
                preset,
                remat,
                params,
                fixed / 1e9,
                mems[0].temp_size_in_bytes / 1e9,
                per_example / 1e9,
                max_batch,
            )
            rows.append(row)
            print(
                f"| {preset} | {remat} | {params / 1e6:.1f}M | {fixed / 1e9:.2f} | {row[4]:.2f} | {row[5] * 1e3:.1f} | "
                f"{max_batch if max_batch >= 0 else 'n/a: temp not growing with the batch here'} |  "
                f"(compiled in {time.time() - t0:.0f} s)",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
