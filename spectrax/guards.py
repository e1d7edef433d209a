"""What keeps a training run safe, around the loop of :mod:`spectrax.train`.

- :class:`Preemption`: SIGTERM becomes save-and-exit, agreed by every process;
- :class:`GradNormMonitor`: warns on gradient-norm spikes from values already on the host;
- :func:`check_memory`: refuses a compiled step that cannot fit, before the first step;
- :func:`check_finite` / :func:`refuse_nonfinite_parameters`: no NaN reaches a checkpoint.
"""
from __future__ import annotations

import collections
import signal

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils


class Preemption:
    """Turns SIGTERM (what schedulers send before preempting) into a clean save-and-exit.

    Installed at the very start of :func:`train`, so a SIGTERM that arrives while the data are
    prepared or the step compiles is not fatal: the loop sees the flag after its next step,
    saves and exits 0. :meth:`restore` puts the previous handler back (train() may run inside a
    longer-lived process such as a test runner or a notebook).
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread (e.g. inside a test runner thread)
            pass

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, steps_this_run: int, boundary: bool) -> bool:
        """Whether to save and exit after this step; with several processes, every process
        gets the same answer at the same step (one saving while another steps would hang).

        Once ``jax.distributed`` is initialised, SIGTERM reaches JAX's preemption notifier
        instead of :meth:`_handle`; its sync protocol picks a step every process reaches, so
        it is asked at every step, with a counter that starts at 1 in every run (a notice that
        arrives before the first step sets the sync point to 1). The flag :meth:`_handle` sets
        (SIGTERM before initialisation, or the preemption service turned off) is OR-reduced
        over processes at ``boundary`` steps (log steps, which every process reaches).
        """
        if jax.process_count() == 1:
            return self.requested
        try:
            if multihost_utils.reached_preemption_sync_point(steps_this_run):
                return True
        except RuntimeError:  # jax_enable_preemption_service is off
            pass
        return boundary and bool(np.any(multihost_utils.process_allgather(
            np.int32(self.requested))))

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


# A logged gradient norm this many times the running median of earlier ones is reported.
GRAD_SPIKE_FACTOR = 10.0


class GradNormMonitor:
    """Spots exploding gradient norms from values the log step has already fetched.

    Keeps the last ``window`` logged per-step norms; a new norm above ``factor`` × their median
    (once ``min_history`` are known) yields a warning naming the step. Host-side and only fed on
    log steps, so it costs nothing on the device.
    """

    def __init__(self, factor: float = GRAD_SPIKE_FACTOR, window: int = 200,
                 min_history: int = 4):
        self.factor, self.min_history = factor, min_history
        self.history: collections.deque = collections.deque(maxlen=window)

    def update(self, steps: list[int], norms: list[float]) -> list[str]:
        """Feeds one log window (step numbers, 1-based, and their norms); returns warnings."""
        warnings = []
        for step, norm in zip(steps, norms):
            if not np.isfinite(norm):
                continue  # non-finite steps are the job of the bad_step guard
            if len(self.history) >= self.min_history:
                med = float(np.median(self.history))
                if med > 0 and norm > self.factor * med:
                    warnings.append(f"warning: exploding gradient norm {norm:.4g} at step {step} "
                                    f"({norm / med:.1f}x the running median {med:.4g} of "
                                    "logged norms)")
            self.history.append(norm)
        return warnings


# -- memory: refuse a config that cannot fit before the first step ---------------------------
def required_bytes(compiled) -> int | None:
    """Per-device bytes the compiled step needs (arguments + outputs + temporaries − aliased:
    donated state is counted once), or None when the backend has no memory analysis."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def available_bytes(config) -> tuple[int | None, str]:
    """(per-device bytes available, where that figure comes from).

    ``config.memory_limit_gb`` > 0 wins; else the accelerator's ``bytes_limit``; else (CPU)
    the host's available RAM shared by the local devices.
    """
    limit_gb = float(config.get("memory_limit_gb", 0) or 0)
    if limit_gb > 0:
        return int(limit_gb * 2**30), f"config.memory_limit_gb={limit_gb:g}"
    dev = jax.local_devices()[0]
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # CPU devices may not report memory statistics
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{dev.device_kind} bytes_limit"
    try:
        import psutil  # optional: only for the CPU fallback
    except ImportError:
        return None, "unknown (no psutil)"
    return (int(psutil.virtual_memory().available // max(jax.local_device_count(), 1)),
            "host RAM available / local devices")


def check_memory(compiled, config) -> None:
    """Raises MemoryError, quoting the compiled memory analysis, when the step cannot fit."""
    need = required_bytes(compiled)
    have, source = available_bytes(config)
    if need is None or have is None or need <= have:
        return
    raise MemoryError(
        f"this config needs {need / 2**30:.3f} GiB per device but {have / 2**30:.3f} GiB are "
        f"available ({source}); {memory_text(compiled)}. Lower config.batch_size, use a "
        "smaller model variant or shard parameters over more devices (config.mesh.fsdp)")


def memory_text(compiled) -> str:
    """One line of the compiled step's per-device memory analysis (GiB)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return "memory analysis unavailable on this backend"
    if m is None:
        return "memory analysis unavailable on this backend"
    gib = 1 / 2**30
    return (f"per-device memory: arguments {m.argument_size_in_bytes * gib:.3f} GiB, outputs "
            f"{m.output_size_in_bytes * gib:.3f} GiB, temporaries {m.temp_size_in_bytes * gib:.3f} "
            f"GiB, aliased {m.alias_size_in_bytes * gib:.3f} GiB")


def check_finite(state, config, recent_ids) -> None:
    """After a log step: raises FloatingPointError (``config.on_nonfinite == "stop"``) or warns
    when the step guard skipped an update (``state["bad_step"]`` ≥ 0), naming the step and the
    ids of its batch (``recent_ids``: (step, ids) pairs of the last steps)."""
    bad = int(state["bad_step"])
    if bad < 0:
        return
    ids = [i.tolist() for s, i in recent_ids if s == bad]
    msg = (f"non-finite loss or gradient at step {bad} (batch ids {ids[0][:16] if ids else '?'}"
           f"{' ...' if ids and len(ids[0]) > 16 else ''}); that update was skipped, so "
           "parameters and checkpoints hold no NaN")
    if config.on_nonfinite == "stop":
        raise FloatingPointError(msg + ". Set config.on_nonfinite='skip' to carry on.")
    print("warning: " + msg, flush=True)


@jax.jit
def parameters_finite(params):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))


def refuse_nonfinite_parameters(state, step: int) -> None:
    """Checkpoints never hold NaN: non-finite data are skipped by the step's guard, and this
    catches the one way left, an update that overflowed from finite gradients (an absurd
    learning rate, with ``optim.guard_update`` off)."""
    if not bool(parameters_finite(state["params"])):
        raise FloatingPointError(
            f"parameters are non-finite at step {step}: an update overflowed although the "
            "gradients were finite (learning rate too large?); the checkpoint was not written. "
            "Lower config.optim.lr, or set config.optim.guard_update=True to skip such updates.")
