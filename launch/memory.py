"""Memory per device of a config's train step on a given mesh, from XLA's memory_analysis of the compiled
step (compiled only, nothing run): what to check before renting a cluster.

    python launch/memory.py --devices=8 experiments/mdlm.py:size=small experiments/mdlm.py:size=1b \
        --mesh=data=-1,fsdp=1 --mesh=data=-1,fsdp=8 [--batch_size=512] [--seq_len=1024]

On a CPU machine the devices are fake (XLA_FLAGS); the arguments (parameters, optimizer state, EMA,
batch) are exact for any backend; the temporaries (activations, gradients) are the CPU compiler's and
only indicative for GPU/TPU (run the script on the target for its own). Prints a Markdown table.
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
    args = parser.parse_args()
    if "jax" not in sys.modules and not os.environ.get("JAX_PLATFORMS"):
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import importlib.util

    import jax

    from ddlm.train import state as state_lib
    from ddlm.train import trainer

    devices = jax.devices()[: args.devices]
    print("| config | mesh | parameters | batch x seq | arguments GiB/device | temporaries GiB/device |")
    print("|---|---|---|---|---|---|")
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
            mem = trainer.compile_train_step(setup).memory_analysis()
            params = state_lib.count_params(setup.abstract_state().params)
            gib = lambda b: f"{b / 2**30:.2f}"
            print(
                f"| {spec} | {dict(setup.mesh.shape)} | {params / 1e6:.0f}M | "
                f"{config.train.batch_size} x {config.train.seq_len} | {gib(mem.argument_size_in_bytes)} | "
                f"{gib(mem.temp_size_in_bytes)} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
