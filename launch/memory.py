"""Memory per device of a config's train state on a given mesh, and (--compile) of its compiled train step
from XLA's memory_analysis (compiled only, nothing run): what to check before renting a cluster.

    python launch/memory.py --devices=8 experiments/mdlm.py:size=small experiments/mdlm.py:size=1b \
        --mesh=data=-1,fsdp=1 --mesh=data=-1,fsdp=8 [--batch_size=512] [--seq_len=1024] [--compile]

The state (parameters, Adam moments, EMA: the train state's shards on one device, from jax.eval_shape and
the sharding rules) is exact for any backend. --compile adds XLA's arguments (state + batch) and
temporaries (activations, gradients, the update); on a CPU machine (fake devices, XLA_FLAGS) those are
the CPU compiler's and only indicative for GPU/TPU: run the script on the target for its own.
Prints a Markdown table.
"""

import argparse
import os
import sys


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("configs", nargs="+", help="experiments/<name>.py[:arg]")
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices when no accelerator")
    parser.add_argument("--mesh", action="append", default=[], help="data=..,fsdp=..,tensor=.. (repeatable)")
    parser.add_argument("--batch_size", type=int, default=0, help="global batch (0: the config's)")
    parser.add_argument("--seq_len", type=int, default=0, help="sequence length (0: the config's)")
    parser.add_argument("--compile", action="store_true", help="also compile: XLA's memory_analysis")
    args = parser.parse_args()
    if "jax" not in sys.modules and not os.environ.get("JAX_PLATFORMS"):
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import importlib.util

    import jax
    import numpy as np

    from ddlm.train import state as state_lib
    from ddlm.train import trainer

    devices = jax.devices()[: args.devices]
    extra = " XLA arguments GiB/device | XLA temporaries GiB/device |" if args.compile else ""
    print(f"| config | mesh | parameters | batch x seq | state GiB/device |{extra}")
    print("|---|---|---|---|---|" + ("---|---|" if args.compile else ""))
    for spec in args.configs:
        path, _, arg = spec.partition(":")
        module_spec = importlib.util.spec_from_file_location("experiment", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        for mesh in args.mesh or [""]:
            config = module.get_config(arg or None)
            config.data.corpus = "shakespeare"  # build() reads no data; a local corpus need not exist here
            if mesh:
                config.mesh.update({k: int(v) for k, v in (kv.split("=") for kv in mesh.split(","))})
            if args.batch_size:
                config.train.batch_size = args.batch_size
            if args.seq_len:
                config.train.seq_len = args.seq_len
            setup = trainer.build(config, devices)
            abstract = setup.abstract_state()
            state_bytes = sum(
                int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                for x in jax.tree.leaves(abstract)
            )
            params = state_lib.count_params(abstract.params)
            gib = lambda b: f"{b / 2**30:.2f}"
            row = (
                f"| {spec} | {dict(setup.mesh.shape)} | {params / 1e6:.0f}M | "
                f"{config.train.batch_size} x {config.train.seq_len} | {gib(state_bytes)} |"
            )
            if args.compile:
                mem = trainer.compile_train_step(setup).memory_analysis()
                row += f" {gib(mem.argument_size_in_bytes)} | {gib(mem.temp_size_in_bytes)} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
