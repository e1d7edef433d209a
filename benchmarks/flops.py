"""FLOP counting, device peaks and model FLOP utilisation (MFU) for the benchmarks.

* :func:`xla_flops` reads the FLOPs XLA's cost model assigns to a compiled program
  (``compiled.cost_analysis()["flops"]``): 2·M·N·K per matmul, the same for convolutions, plus
  one per elementwise arithmetic op; transcendentals (exp, tanh, erf, ...) are counted apart and
  left out, as they run on other units.
* :func:`torch_flops` counts a PyTorch callable's FLOPs with ``torch.utils.flop_counter`` (matmuls,
  convolutions and attention only), so comparing it with :func:`xla_flops` of the same
  computation checks that two implementations have the same FLOP structure; XLA's figure is a
  little larger because it also counts elementwise ops.
* :data:`PEAK_FLOPS` holds dense bf16 peaks per device kind. MFU = FLOPs per step / step time /
  peak. The models train in float32 by default, so an MFU against the bf16 peak is the fraction of
  what the chip could do with bf16 inputs (the figure papers quote), not of its fp32 peak.
"""
from __future__ import annotations

from typing import Any, Callable

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets (no structured sparsity).
# Matched against jax's ``device_kind`` by case-insensitive substring, first match wins, so the
# more specific names come first ("TPU v5 lite" before "TPU v5").
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),         # same SXM compute die as H100
    ("H100", 989e12),         # H100 SXM
    ("A100", 312e12),
    ("TPU v5 lite", 197e12),  # v5e reports itself as "TPU v5 lite"
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),       # v5p reports itself as "TPU v5"
    ("TPU v4", 275e12),
)


def device_peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device of ``device_kind`` (jax's name for it), or None when
    the kind is not in :data:`PEAK_FLOPS` (CPUs: a peak there depends on the SKU, core count and
    clock, so no MFU is claimed)."""
    kind = device_kind.lower()
    for name, peak in PEAK_FLOPS:
        if name.lower() in kind:
            return peak
    return None


def xla_flops(compiled) -> float | None:
    """FLOPs of one execution of a compiled jax program (per device), or None when the backend
    has no cost analysis. Older jax returned a one-element list of dicts; both are handled."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def mfu(flops_per_step: float | None, step_seconds: float, device_kind: str,
        num_devices: int = 1) -> float | None:
    """Model FLOP utilisation in [0, 1]: ``flops_per_step`` (per device, as XLA reports them) /
    ``step_seconds`` / the device's bf16 peak; None where the peak is unknown (CPU) or the FLOPs
    are. ``num_devices`` is accepted for symmetry: per-device FLOPs over a per-device peak need
    no scaling."""
    del num_devices
    peak = device_peak_flops(device_kind)
    if peak is None or flops_per_step is None or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / peak


def memory_fields(compiled) -> dict[str, Any]:
    """Per-device memory of a compiled program from ``memory_analysis()``, in bytes.

    ``peak_bytes`` = arguments + outputs + temporaries − aliased (donated state counted once):
    everything XLA allocates for one call after its buffer assignment has packed the
    temporaries, the figure the training loop's memory check uses. ``xla_peak_bytes`` is the
    backend's own ``peak_memory_in_bytes`` where it reports one; on CPU it counts almost nothing
    (2.5 MB next to 0.5 GiB of temporaries for SpecPT 'tiny'), so it is not the headline.
    None values where the backend has no analysis.
    """
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        m = None
    if m is None:
        return {"peak_bytes": None, "xla_peak_bytes": None, "argument_bytes": None,
                "output_bytes": None, "temp_bytes": None, "alias_bytes": None}
    total = int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                - m.alias_size_in_bytes)
    return {"peak_bytes": total,
            "xla_peak_bytes": int(getattr(m, "peak_memory_in_bytes", 0) or 0) or None,
            "argument_bytes": int(m.argument_size_in_bytes),
            "output_bytes": int(m.output_size_in_bytes),
            "temp_bytes": int(m.temp_size_in_bytes),
            "alias_bytes": int(m.alias_size_in_bytes)}


def torch_flops(fn: Callable[[], Any]) -> float | None:
    """FLOPs of calling ``fn()`` once in PyTorch (forward and backward if ``fn`` runs both),
    counted by ``torch.utils.flop_counter.FlopCounterMode``; None if counting fails.

    The counter has no formula for the CPU kernel behind ``F.scaled_dot_product_attention``, so
    :mod:`benchmarks.torch_models` attention runs as explicit matmuls + softmax while counting
    (same FLOPs), or attention would be missing from the count."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        from benchmarks.torch_models import explicit_attention
        counter = FlopCounterMode(display=False)
        with counter, explicit_attention():
            fn()
        return float(counter.get_total_flops())
    except Exception:  # an op without a FLOP formula must not stop a benchmark
        return None
