"""Process-wide settings, applied by the command-line entry points (never on import).

``python -m spectrax.train`` / ``predict`` / ``prepare`` / ``attention_maps`` /
``baselines.template_fit`` and the benchmarks call :func:`configure` first thing. Library users
who want the same settings call it themselves, before their first JAX computation::

    import spectrax.runtime
    spectrax.runtime.configure()
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
from importlib import metadata

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def configure(*, keep_freed_memory: bool = True) -> None:
    """XLA:CPU tuning (:func:`tune_xla_cpu`), the allocator setting of
    :func:`retain_freed_memory` (unless ``keep_freed_memory=False``: ``prepare``, whose workers
    stream in bounded memory, gives memory back) and quiet library loggers (absl warnings and up:
    Orbax logs every save at INFO; Apache Beam's runner and workers log at INFO; XLA's C++
    INFO lines off unless ``TF_CPP_MIN_LOG_LEVEL`` is set)."""
    tune_xla_cpu()
    if keep_freed_memory:
        retain_freed_memory()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("absl", "apache_beam"):
        logging.getLogger(name).setLevel(logging.WARNING)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def retain_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory for reuse instead of returning it to the system;
    True if it was set (Linux with glibc, and ``SPECTRAX_SYSTEM_MALLOC`` not ``1``).

    XLA:CPU allocates a step's temporaries and gradients afresh on every call. glibc serves
    large blocks with ``mmap`` and unmaps them on ``free``, so every step faults the same
    memory in again, one 4 KiB page at a time: SpecPT 'small' took ~87,000 minor page faults
    per training step (its 242 MB gradient kernel among them), SpectraFM 'small' ~130,000.
    ``M_MMAP_MAX=0`` alone left SpectraFM at ~146,000 (presumably, not verified: the blocks
    come from threads whose own arenas, heaps of at most 64 MiB, map large blocks regardless).
    With one arena (``M_ARENA_MAX=1``), no ``mmap`` for large blocks (``M_MMAP_MAX=0``; glibc
    still maps when the heap cannot grow) and no trimming (``M_TRIM_THRESHOLD=-1``), freed
    blocks are reused: 0-7,000 faults per step on SpecPT 'small', SpectraFM 'small' and ViT
    tiny, and steps of SpecPT 'small' 361 → 277-282 ms, SpectraFM 'small' 562 → 514 ms; ViT
    tiny unchanged within the noise (2-core x86 VM, 2026-12-06, alternating runs). Trimming
    was first only raised to 2 GiB, mallopt's largest positive value; the 1D transformer
    'small''s heap then crossed it every 6-12 steps, glibc gave 2.35 GB back in one ``brk``
    (strace) and the next step faulted ~370,000 pages in again (~+450 ms). Off entirely, its
    steps are 1,499 / 1,762 → 1,391 / 1,382 ms (~40,000 faults, from the heap growing to its
    plateau: resident memory 2.2-3.0 GB cycling → 3.0-4.2 GB held); tokenizer and SpectraFM
    'small' unchanged (alternating runs, same day). PyTorch's CPU tensors come from the same
    malloc and gain as much (SpecPT 'small' eager 517 -> 330 ms a step): the benchmarks run
    both in one process, with this setting, so their ratios compare like with like.

    The cost: the process's resident memory stays at its peak, fragmentation included (as a GPU
    runtime's preallocated pool does). Must run before the threads that allocate start (JAX's,
    Grain's): call it first thing, as :func:`configure` does.
    """
    if os.environ.get("SPECTRAX_SYSTEM_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version       # glibc only: other C libraries take other parameters
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, 1) & libc.mallopt(_M_MMAP_MAX, 0)
                & libc.mallopt(_M_TRIM_THRESHOLD, -1))


def tune_xla_cpu() -> None:
    """Turns off XLA:CPU's YNNPACK library fusions unless the user's ``XLA_FLAGS`` chose.

    In jaxlib 0.10 they route large reductions through a slow kernel: the gradient-norm reduction
    of SpecPT 'small' (a 7792 × 7781 kernel, for clipping) alone took ~1.0 s of a 1.7 s training
    step; with the fusions off the step takes 0.66 s, and the tokenizer and SpectraFM steps
    are 7-17 % faster too (2-core x86 machine, 2026-11-23, jax.profiler traces of the step
    with the flag on and off). The flag only concerns the CPU backend and is read when jax
    starts its backends, so it must be set before the first computation. Only set for jaxlib
    0.10.x (XLA refuses unknown flags; re-measure before extending). Opt out with
    ``SPECTRAX_KEEP_XLA_FLAGS=1``.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("SPECTRAX_KEEP_XLA_FLAGS") == "1" or YNN_FLAG in flags:
        return
    try:  # XLA aborts on a flag it does not know: only set it for the jaxlib it was tested with
        if not metadata.version("jaxlib").startswith("0.10."):
            return
    except metadata.PackageNotFoundError:
        return
    os.environ["XLA_FLAGS"] = (flags + " " + YNN_FLAG + "=").strip()
