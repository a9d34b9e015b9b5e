"""Attention kernels over the paged KV cache.

- ``triton_decode``: decode (one query per sequence) on CUDA, GQA-aware, split along the context.
- ``triton_prefill``: every prefill chunk of a step in one launch on CUDA (variable lengths, causal).
- ``cpu_sparse``: any query row on CPU through sparse primitives that read cache rows by index,
  each row reduced over its own entries in a fixed order (batch-invariant).

Nothing here imports Triton at package import: it is only needed (and only installed with
the CUDA build of torch, or the ``test`` extra) where CUDA runs.
"""
