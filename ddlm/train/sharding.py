"""The mesh and the logical-axis rules live in ddlm/sharding.py (the checkpoint loader that sampling/ and
eval/ use builds meshes too, and those layers must not import train/); these names stay importable here."""

from ddlm.sharding import (  # noqa: F401
    LOGICAL_AXIS_RULES,
    MESH_AXES,
    ConfigError,
    batch_sharding,
    data_parallel_size,
    fit_to_shape,
    logical_to_sharding,
    make_mesh,
    mesh_context,
    mesh_shape,
    replicated,
)
