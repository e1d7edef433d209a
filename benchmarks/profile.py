r"""Where a training step's time goes: a ``jax.profiler`` trace of the compiled step, its ops
summed by name and by kind, and the share of forward, backward and optimiser.

    python -m benchmarks.profile --configs=specpt_small[,spectrafm_small,...] [--steps=5]
                                 [--batch=N] [--top=15] [--out=profile.json]

Per config (names of :data:`benchmarks.run.CONFIGS`) the step is built and compiled exactly as
``benchmarks.run`` builds it (same data, same ``Trainer.compile``), run twice to warm up, then
``--steps`` steps are traced. On XLA:CPU every thunk of the executable (a fusion, a dot, a
convolution, a copy, ...) is one trace event named after its HLO instruction, so summing the
events' durations by name gives each instruction's time; the optimised HLO
(``compiled.as_text()``) then says what each is:

* **kind**: the instruction's opcode, or for a fusion its fusion kind plus the most telling ops
  inside it (``dot``, ``exp``, ``reduce``, ``transpose``, ...), e.g. ``fusion(exp,reduce)``;
* **part**: forward, backward or optimiser, read from the jax name stack in the instruction's
  ``op_name`` metadata (``transpose(jvp(...))`` = backward; the optimiser's ops sit under the
  ``optimizer_step`` named scope of :func:`spectrax.optim.apply_step`);
* **shape** of its output.

With ``--bandwidth`` (default) the machine's memory bandwidth is measured
(:func:`memory_bandwidth`) and the optimiser's ops are set against the time reading and writing
parameters, gradients and both moments once would take at it (:func:`optimizer_bound`).

Shares are robust to the load of a shared machine (other jobs stretch every op alike); absolute
times are not. Thunks can run concurrently on XLA:CPU's thread pool, so the op total may exceed
the wall time of the step. Nothing is written to the repository: ``--out`` (a JSON file) is
opt-in and traces go to a temporary directory.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import Any

import jax

# Runtime events of the trace that are not ops of the executable.
_RUNTIME = re.compile(r"^(\$|end: |ThunkExecutor|PjitFunction|CommonPjRt|Allocate|Handle |"
                      r"Parse|PythonRef|Wait for|ThreadpoolListener|SlinkyThreadPool|"
                      r"TfrtCpu|ExecuteHelper|XlaModule|BufferFromHostBuffer|tsl::)")
# Instructions whose trace event encloses the events of the instructions they run.
_CONTROL_FLOW = ("conditional", "while", "call")
# Ops named inside a fusion that tell what it does, most telling first.
_TELLING = ("dot", "convolution", "exponential", "log", "tanh", "erf", "reduce", "reduce-window",
            "transpose", "select-and-scatter", "scatter", "gather", "sort", "dynamic-slice",
            "dynamic-update-slice", "concatenate", "pad", "rsqrt", "sqrt", "divide", "power",
            "compare", "select", "convert", "copy")


def parse_hlo(text: str) -> dict[str, dict[str, Any]]:
    """Instructions of an optimised HLO module text -> {name: {opcode, shape, op_name, inner}}.

    ``inner`` is the set of opcodes inside a fusion's computation (for ``kind``)."""
    computations: dict[str, set[str]] = {}
    current = None
    instr: dict[str, dict[str, Any]] = {}
    # name = shape opcode(operands...): the first " word(" after the "=" is the opcode (shapes
    # hold no parentheses after a word; long tuple shapes do hold "/*index=5*/" comments).
    line_re = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\(")
    for line in text.splitlines():
        head = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and "=" not in line.split("{")[0]:
            current = head.group(1)
            computations[current] = set()
            continue
        m = line_re.match(line)
        if not m:
            continue
        name, shape, opcode = m.groups()
        if current is not None:
            computations[current].add(opcode)
        op_name = re.search(r'op_name="([^"]*)"', line)
        calls = re.search(r"calls=%?([\w.\-]+)", line)
        kind = re.search(r"kind=(\w+)", line)
        instr[name] = {"opcode": opcode, "shape": shape.split("{")[0],
                       "op_name": op_name.group(1) if op_name else "",
                       "calls": calls.group(1) if calls else None,
                       "fusion_kind": kind.group(1) if kind else None}
    for info in instr.values():
        info["inner"] = computations.get(info["calls"], set()) if info["calls"] else set()
    return instr


def op_kind(info: dict[str, Any] | None) -> str:
    """'dot', 'copy', 'fusion(exp,reduce)', ... (see the module docstring)."""
    if info is None:
        return "?"
    if info["opcode"] != "fusion":
        return info["opcode"]
    inner = [t for t in _TELLING if t in info["inner"]][:3]
    return "fusion(" + ",".join(inner) + ")" if inner else "fusion"


def op_part(info: dict[str, Any] | None) -> str:
    """'forward', 'backward', 'optimizer' or 'other' from the instruction's jax name stack."""
    if info is None:
        return "other"
    name = info["op_name"]
    if "optimizer_step" in name:
        return "optimizer"
    if "transpose(" in name:
        return "backward"
    if "jvp(" in name or name:
        return "forward"
    return "other"


def trace_events(trace_dir: str) -> list[dict]:
    """Complete ('X') events of the newest perfetto trace under ``trace_dir``."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                             recursive=True))
    if not paths:
        raise FileNotFoundError(f"no perfetto trace under {trace_dir}")
    with gzip.open(paths[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def summarise(events: list[dict], hlo: dict[str, dict[str, Any]], steps: int,
              top: int = 15) -> dict[str, Any]:
    """Per-step milliseconds by instruction, kind and part, from trace ``events``."""
    by_name: collections.Counter = collections.Counter()
    op_events = []
    for e in events:
        info = hlo.get(e["name"])
        # A control-flow thunk's event spans the events of the ops it runs: counting both would
        # count those ops twice.
        if _RUNTIME.match(e["name"]) or (info and info["opcode"] in _CONTROL_FLOW):
            continue
        by_name[e["name"]] += e["dur"] / 1e3 / steps     # µs -> ms per step
        if info is not None:
            op_events.append(e)
    total = sum(by_name.values())
    by_kind: collections.Counter = collections.Counter()
    by_part: collections.Counter = collections.Counter()
    for name, ms in by_name.items():
        info = hlo.get(name)
        by_kind[op_kind(info)] += ms
        by_part[op_part(info)] += ms
    rows = []
    for name, ms in by_name.most_common(top):
        info = hlo.get(name)
        rows.append({"op": name, "ms": round(ms, 2), "share": round(ms / total, 4),
                     "kind": op_kind(info), "part": op_part(info),
                     "shape": info["shape"] if info else "?",
                     "source": (info["op_name"][-90:] if info else "")})
    return {"ops_ms": round(total, 1), **untraced(op_events, hlo, steps),
            "by_part": {k: round(v, 1) for k, v in by_part.most_common()},
            "by_kind": {k: round(v, 1) for k, v in by_kind.most_common(top)},
            "top_ops": rows}


def untraced(op_events: list[dict], hlo: dict[str, dict[str, Any]], steps: int,
             top: int = 5) -> dict[str, Any]:
    """Time per step inside the traced span during which no op's event is open, and the longest
    such gaps (ms per step, between the same two ops) with the ops either side.

    XLA:CPU runs large dots and convolutions on Eigen's thread pool and their trace event ends
    before the work does: a jitted 32 × 7792 · 32 × 7781 weight-gradient dot followed by a
    reduction showed a 74 ms dot event, then 74 ms with no event, then the reduction (2-core
    VM, 2026-12-06). So the op sums undercount dots and convolutions; the gaps hold the rest
    (plus true idling, e.g. waiting for the host). An op after a long gap is usually waiting for
    a dot or convolution that precedes it."""
    if not op_events:
        return {"untraced_ms": 0.0, "longest_gaps": []}
    spans = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in op_events)
    busy_end, last_name, gaps = spans[0][1], spans[0][2], []
    for start, end, name in spans[1:]:
        if start > busy_end:
            gaps.append((start - busy_end, last_name, name))
        if end >= busy_end:
            busy_end, last_name = end, name
    by_place: collections.Counter = collections.Counter()   # the same gap recurs every step
    for g, a, b in gaps:
        by_place[a, b] += g / 1e3 / steps
    longest = [{"ms": round(ms, 2), "after": a, "after_kind": op_kind(hlo.get(a)),
                "before": b, "before_kind": op_kind(hlo.get(b))}
               for (a, b), ms in by_place.most_common(top)]
    return {"untraced_ms": round(sum(g for g, _, _ in gaps) / 1e3 / steps, 1),
            "longest_gaps": longest}


def memory_bandwidth(megabytes: int = 256, reps: int = 7) -> dict[str, float]:
    """The machine's memory bandwidth, bytes/s, best of ``reps``: ``numpy_copy`` (np.copyto of a
    ``megabytes`` float32 array: read + write) and ``jax_update`` (a jitted, donated in-place
    ``x * a + b`` on the default device: read + write, what an optimiser pass does)."""
    import numpy as np
    import jax.numpy as jnp

    n = megabytes * 2**20 // 4
    src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    out = {"numpy_copy": 2 * 4 * n / best}
    update = jax.jit(lambda x: x * 0.999 + 1e-3, donate_argnums=0)
    x = jax.block_until_ready(update(jnp.ones(n, jnp.float32)))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x = jax.block_until_ready(update(x))
        best = min(best, time.perf_counter() - t0)
    out["jax_update"] = 2 * 4 * n / best
    return out


def optimizer_bound(trainer, bandwidth: float) -> dict[str, Any]:
    """The memory-bandwidth bound of the optimiser step: the gradient norm reads every gradient
    once; the update reads parameters, gradients and both moments of the trained parameters and
    writes parameters and moments once (4-byte floats). Milliseconds at ``bandwidth`` bytes/s."""
    import numpy as np

    params = trainer.abstract_state["params"]
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(params)]
    frozen = trainer.optimizer.frozen
    trained = ([lab == "train" for lab in jax.tree.leaves(frozen)] if frozen is not None
               else [True] * len(sizes))
    n_all, n_trained = sum(sizes), sum(s for s, t in zip(sizes, trained) if t)
    norm_bytes, update_bytes = 4 * n_all, 7 * 4 * n_trained
    return {"parameters": n_all, "trained": n_trained,
            "bytes": norm_bytes + update_bytes,
            "bound_ms": round((norm_bytes + update_bytes) / bandwidth * 1e3, 1)}


def profile_config(name: str, *, steps: int = 5, batch: int = 0, n_train: int = 512,
                   cache_dir: str = "data", top: int = 15, bandwidth: bool = True,
                   log=print) -> dict[str, Any]:
    """Traces ``steps`` training steps of benchmark config ``name``; returns the summary of
    :func:`summarise` plus the wall time per step during the trace and the load average."""
    from benchmarks import run
    from spectrax.data import pipeline

    config, data_dir, _, trainer, idx = run.prepare(name, batch=batch, n_train=n_train,
                                                    cache_dir=cache_dir)
    host = run.fixed_batches(config, data_dir, idx)
    dev = [pipeline.to_global(b, trainer.batch_sharding) for b in host]
    step, compile_s, _ = trainer.compile(dev[0])
    hlo = parse_hlo(step.as_text())
    state = trainer.init_state()
    for i in range(2):
        state, _ = step(state, dev[i % len(dev)])
    jax.block_until_ready(state)
    load = run.loadavg()
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        t0 = time.perf_counter()
        for i in range(steps):
            state, _ = step(state, dev[i % len(dev)])
        jax.block_until_ready(state)
        wall = (time.perf_counter() - t0) / steps
        jax.profiler.stop_trace()
        events = trace_events(tmp)
    out = {"config": name, "batch": config.batch_size, "steps": steps,
           "step_ms_traced": round(wall * 1e3, 1), "compile_s": round(compile_s, 1),
           "loadavg": load, **summarise(events, hlo, steps, top)}
    if bandwidth:
        bw = max(memory_bandwidth().values())
        out["optimizer_bound"] = {**optimizer_bound(trainer, bw),
                                  "bandwidth_gb_s": round(bw / 1e9, 1),
                                  "measured_ms": out["by_part"].get("optimizer")}
    log(format_summary(out))
    return out


def format_summary(s: dict[str, Any]) -> str:
    """A plain-text table of one :func:`profile_config` result."""
    lines = [f"== {s['config']} (batch {s['batch']}): step {s['step_ms_traced']} ms wall while "
             f"traced, ops {s['ops_ms']} ms, no op traced {s['untraced_ms']} ms (async dots and "
             f"convolutions: see untraced()), load {s['loadavg']}",
             *([f"optimizer: {s['optimizer_bound']['measured_ms']} ms of ops; bandwidth bound "
                f"{s['optimizer_bound']['bound_ms']} ms ({s['optimizer_bound']['bytes'] / 1e9:.2f}"
                f" GB at {s['optimizer_bound']['bandwidth_gb_s']} GB/s, "
                f"{s['optimizer_bound']['trained']:,} trained of "
                f"{s['optimizer_bound']['parameters']:,} parameters)"]
               if s.get("optimizer_bound") else []),
             "parts: " + ", ".join(f"{k} {v} ms" for k, v in s["by_part"].items()),
             "kinds: " + ", ".join(f"{k} {v}" for k, v in s["by_kind"].items()),
             f"{'op':<34}{'ms':>8}{'share':>7}  {'part':<9} {'kind':<28} shape / source"]
    for r in s["top_ops"]:
        lines.append(f"{r['op'][:33]:<34}{r['ms']:>8.1f}{100 * r['share']:>6.1f}%  "
                     f"{r['part']:<9} {r['kind'][:28]:<28} {r['shape']}  {r['source']}")
    lines += [f"gap {g['ms']:>7.1f} ms after {g['after']} ({g['after_kind']}) before "
              f"{g['before']} ({g['before_kind']})" for g in s["longest_gaps"]]
    return "\n".join(lines)


def main(argv):
    del argv
    from spectrax import runtime
    runtime.configure()  # XLA:CPU flag and log levels, before any computation
    from absl import flags
    f = flags.FLAGS
    results = [profile_config(c, steps=f.steps, batch=f.batch, n_train=f.n_train,
                              cache_dir=f.cache_dir, top=f.top, bandwidth=f.bandwidth)
               for c in f.configs]
    if f.out:
        with open(f.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_list("configs", ["specpt_small"], "Benchmark configs (benchmarks.run.CONFIGS).")
    flags.DEFINE_integer("steps", 5, "Traced steps.")
    flags.DEFINE_integer("batch", 0, "Global batch size; 0 = the config's own.")
    flags.DEFINE_integer("top", 15, "Ops listed.")
    flags.DEFINE_integer("n_train", 512, "Simulated training spectra.")
    flags.DEFINE_string("cache_dir", "data", "Where simulated data are cached.")
    flags.DEFINE_string("out", "", "Write the summaries here as JSON ('' = print only).")
    flags.DEFINE_bool("bandwidth", True, "Measure memory bandwidth and the optimiser's bound.")
    app.run(main)
