"""Bounds on the native per-shape caches behind the CPU linears (oneDNN through ideep).

Every linear call with a new batch size M builds a oneDNN primitive (JIT-compiled GEMM kernels,
0.5-1 MB each for this project's models). Two caches keep it alive: oneDNN's primitive cache
(``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) and ideep's own LRU cache (``LRU_CACHE_CAPACITY``), both
1,024 entries by default. Under mixed prompt lengths a server meets hundreds of distinct M, so
its RSS climbs by ~0.5 GB before both fill. Capping one of them frees nothing (the other still
holds the primitive); capping both bounds that memory at about capacity x 1 MB, at the price of
rebuilding a primitive when an evicted M comes back (measured in bench/memory_rise.py).

Both libraries read their variable once, when they first build a primitive: this must run
before the process's first oneDNN call (loading a model packs weights with one). Setting
the variables after ``import torch`` still works; setting them after the first linear does not.
"""

from __future__ import annotations

import os

# Room for a dense model's step (q/k/v, o, gate/up, down, the head: 5 shapes at one M) many times
# over, so same-sized steps always hit; a mixture-of-experts layer runs each expert at its own M
# (not measured: raise the variables if its steps rebuild primitives). Bound: ~64 x 0.5-1 MB.
DEFAULT_CAPACITY = 64
CAPACITY_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def cap_primitive_caches(capacity: int = DEFAULT_CAPACITY) -> dict[str, str]:
    """Set both capacities unless the environment already sets them (an operator's choice wins).

    Returns the values in effect. A no-op if called after the process's first oneDNN primitive.
    """
    if capacity < 1:  # ideep's cache at 0 crashes the process at its first linear (seen: SIGSEGV)
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    for name in CAPACITY_VARIABLES:
        os.environ.setdefault(name, str(capacity))
    return {name: os.environ[name] for name in CAPACITY_VARIABLES}
