"""Native CPU kernels (cpu_native.cpp), compiled once per machine and loaded as torch ops.

- ``row_attention``: attention of every query row over the positions it sees, read from the paged
  cache in place, one thread per (token, head) row, fixed-order sums: the batch-invariant path's
  attention in one op instead of ~20 per layer (model/kernels/cpu_sparse.py is the same contract
  in ATen primitives, kept as the fallback).
- ``rope_write_kv``: RoPE on q and k in place and k, v into their cache slots, one op instead of ~11.

At batch 1 a decode step dispatches a few hundred small ops per token; these two are most of them.
The build (``torch.utils.cpp_extension``, ~30-60 s) runs ahead of serving: at ``make install``
(``python -m attnserve.model.kernels.cpu_native``) or, failing that, at the first model load, under
a file lock, into ``$ATTNSERVE_KERNEL_CACHE`` (default ``~/.cache/attnserve/kernels``), keyed by
the source and the instruction set. Without a C++ compiler (or with ``ATTNSERVE_NATIVE_KERNELS=0``)
the ATen fallback runs: the same results within float32 rounding, slower.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_suffix(".cpp")
ENV_SWITCH = "ATTNSERVE_NATIVE_KERNELS"
ENV_CACHE = "ATTNSERVE_KERNEL_CACHE"


def _isa_flags() -> tuple[str, list[str]]:
    """The widest vector ISA this CPU has that the compiler may target (named for the build's cache key).

    A hold on torch's own kernels (``ATEN_CPU_CAPABILITY=avx2``, as on a CPU without AVX512) holds these too.
    """
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    held = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if held in ("avx2", "default"):
        flags.discard("avx512f")
    if held == "default":
        flags.discard("avx2")
    if {"avx512f", "avx512bw", "avx512vl", "fma"} <= flags:
        return "avx512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"]
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2", ["-mavx2", "-mfma", "-mf16c"]
    return "base", []


@functools.cache
def load() -> bool:
    """Build (first time) and load the kernels; False where they cannot run here (then the fallback runs)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    if hasattr(torch.ops.attnserve, "row_attention"):
        return True
    try:
        from torch.utils import cpp_extension

        isa, flags = _isa_flags()
        cache = Path(os.environ.get(ENV_CACHE, Path.home() / ".cache" / "attnserve" / "kernels"))
        # The source's hash in the folder's name: checkouts with other sources (worktrees on one
        # machine) would otherwise rebuild over each other in one folder, each load waiting 20 s.
        digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
        build_dir = cache / f"torch{torch.__version__.split('+')[0]}-{isa}-{digest}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name=f"attnserve_cpu_native_{isa}",
            sources=[str(SOURCE)],
            # -fopenmp: at::parallel_for is inline and splits work only where OpenMP is compiled in.
            extra_cflags=["-O3", "-fno-math-errno", "-fopenmp", *flags],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # no compiler, no headers: serve on the fallback, and say so once
        log.warning("native CPU kernels unavailable (%s); using the ATen fallback (slower)", exc)
        return False
    return hasattr(torch.ops.attnserve, "row_attention")


_switched_off = False


def available() -> bool:
    return not _switched_off and load()


def switch(on: bool) -> None:
    """Turn the kernels off (or back on) in this process; models prepared afterwards follow (benchmarks)."""
    global _switched_off
    _switched_off = not on


if __name__ == "__main__":  # make install: build ahead of the first server start
    logging.basicConfig(level=logging.INFO)
    ok = load()
    print("native CPU kernels:", "built" if ok else "unavailable (the ATen fallback will run)")
    sys.exit(0)
