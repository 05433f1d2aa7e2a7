"""ddlm: discrete diffusion language models in JAX/Flax."""

from ddlm import host as _host

# Before JAX starts its CPU threads: freed XLA buffers stay in the heap (see ddlm/host.py).
_host.configure_malloc()

__version__ = "0.1.0"
