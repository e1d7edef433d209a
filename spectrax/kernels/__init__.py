"""CPU kernels that XLA does not generate well, as XLA FFI custom calls built on first use.

Each kernel is one C++ file in this package, compiled against the FFI headers jaxlib ships
(``jax.ffi.include_dir()``) by the system C++ compiler into a per-user cache, and registered
with ``jax.ffi.register_ffi_target`` for the CPU platform. Everything a kernel does has a
pure-JAX reference in the module that calls it; the kernel is only used where :func:`load`
succeeds, so a machine without a compiler (or a user with ``SPECTRAX_CPU_KERNELS=0``) runs the
same computation in XLA, slower. The tests compare the two.

Kernels:

* ``adamw.cc``: clipped AdamW over every trained float32 parameter in one pass
  (:func:`spectrax.optim.apply_step`; why, with measurements, in :mod:`spectrax.optim`).

The cache (``$SPECTRAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/spectrax``, else
``~/.cache/spectrax``) holds one shared library per source, jaxlib version, compiler and CPU
(the build uses ``-march=native``), named by a hash of the four, so an upgrade or another
machine sharing the home directory builds its own. Builds are atomic (compile to a temporary
file, then rename): concurrent processes at worst compile twice.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import metadata, resources

import jax

log = logging.getLogger(__name__)

ENV_SWITCH = "SPECTRAX_CPU_KERNELS"
# IEEE arithmetic, each operation rounded once as the source reads (no FMA contraction; XLA:CPU
# does contract, so the two agree to an ulp, not bit for bit); -fno-math-errno only lets sqrt
# vectorise (no errno is read).
CXXFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=c++17",
            "-shared", "-fPIC", "-w")


class KernelUnavailable(RuntimeError):
    """A kernel could not be built or loaded (the message says why)."""


def cache_dir() -> str:
    """Where built kernels are kept (see the module docstring)."""
    if os.environ.get("SPECTRAX_CACHE_DIR"):
        return os.path.join(os.environ["SPECTRAX_CACHE_DIR"], "kernels")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "spectrax", "kernels")


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise KernelUnavailable("no C++ compiler (g++ / c++ / $CXX) on PATH")
    return cxx


def _cpu_signature() -> str:
    """The CPU's model and flags (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def build(name: str) -> str:
    """Path of the shared library of kernel ``name`` (``<name>.cc`` in this package), compiled
    if not cached; raises :class:`KernelUnavailable` saying why it cannot be."""
    source = resources.files(__package__).joinpath(f"{name}.cc").read_bytes()
    cxx = _compiler()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"{cxx} --version failed: {e}") from e
    key = hashlib.sha256(b"\0".join([
        source, metadata.version("jaxlib").encode(), repr(version).encode(),
        " ".join(CXXFLAGS).encode(), _cpu_signature().encode()])).hexdigest()[:16]
    out_dir = cache_dir()
    target = os.path.join(out_dir, f"{name}-{key}.so")
    if os.path.exists(target):
        return target
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        src = os.path.join(tmp, f"{name}.cc")
        with open(src, "wb") as f:
            f.write(source)
        built = os.path.join(tmp, f"{name}.so")
        cmd = [cxx, *CXXFLAGS, "-I", jax.ffi.include_dir(), src, "-o", built]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:
            raise KernelUnavailable(f"compiling {name}.cc failed: {e}") from e
        if result.returncode != 0:
            raise KernelUnavailable(f"compiling {name}.cc failed ({' '.join(cmd)}):\n"
                                    f"{result.stderr[-2000:]}")
        os.replace(built, target)
    return target


def load(name: str, symbols: tuple[str, ...]) -> bool:
    """Builds (if needed), loads and registers kernel ``name``'s FFI handlers ``symbols``
    (each registered, for the CPU platform, as the FFI target of its own name). True when they
    are ready; False when ``SPECTRAX_CPU_KERNELS=0`` (read on every call: it turns every kernel
    off for the computations traced after it is set) or when they cannot be built (one warning
    naming the reason). The caller then uses its pure-JAX path."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    return _load(name, symbols)


@functools.cache
def _load(name: str, symbols: tuple[str, ...]) -> bool:
    try:
        lib = ctypes.cdll.LoadLibrary(build(name))
        for symbol in symbols:
            handler = jax.ffi.pycapsule(getattr(lib, symbol))
            jax.ffi.register_ffi_target(symbol, handler, platform="cpu")
    except (KernelUnavailable, OSError, AttributeError) as e:
        log.warning("spectrax CPU kernel %r unavailable, using the XLA path instead: %s", name, e)
        return False
    return True

