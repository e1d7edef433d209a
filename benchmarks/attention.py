r"""Forward + backward time of one attention call per implementation, over sequence length ×
head dimension and at the models' own shapes: the measurement behind
:func:`spectrax.nn.attention.choose_implementation`.

    python -m benchmarks.attention [--implementations=deferred,blocked,xla] [--reps=5]
                                   [--lengths=128,256,512,1024,2048] [--head_dims=16,32,64]
                                   [--tokens=16384] [--out=benchmarks/results.jsonl]

Each case is ``jax.value_and_grad`` of ``sum(attend(q, k, v, mask) * c)`` (a fixed random
cotangent), jitted once per implementation; the implementations are timed in interleaved
blocks (one call of each, ``--reps`` times) so a change in the machine's load hits them alike,
and the median per implementation is reported with its ratio to the first implementation. The
grid keeps B·T (the tokens of a batch, ``--tokens``) fixed, so the work per token grows with T
as attention's does. Key masks: 10 % of the keys of every sample masked (key padding, as the
models use them).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The attention shapes of the models' benchmark configs: (B, T, S, N, H) of their costliest call.
MODEL_SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "spectrafm_small encoder/0": (32, 512, 513, 4, 16),
    "spectrafm_small encoder/1": (32, 512, 513, 2, 32),
    "transformer1d_small": (32, 580, 580, 4, 32),
    "tokenizer_small": (32, 244, 244, 4, 32),
    "vit_tiny": (16, 197, 197, 3, 64),
}


def _case(shape, dtype=jnp.float32, seed: int = 0):
    b, t, s, n, h = shape
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(b, t, n, h)), dtype)
    k = jnp.asarray(r.normal(size=(b, s, n, h)), dtype)
    v = jnp.asarray(r.normal(size=(b, s, n, h)), dtype)
    mask = r.random((b, 1, 1, s)) > 0.1
    mask[..., 0] = True
    cot = jnp.asarray(r.normal(size=(b, t, n, h)), jnp.float32)
    return (q, k, v), jnp.asarray(mask), cot


def _grad_fn(implementation: str, mask, cot):
    from spectrax.nn.attention import attend

    def loss(q, k, v):
        return jnp.sum(attend(q, k, v, mask, implementation=implementation)
                       .astype(jnp.float32) * cot)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def time_case(shape, implementations, reps: int = 5, dtype=jnp.float32) -> dict[str, Any]:
    """Median seconds of forward + backward per implementation at ``shape`` (B, T, S, N, H),
    interleaved; the maximum gradient difference to the first implementation checks that all
    compute the same thing."""
    args, mask, cot = _case(shape, dtype)
    fns = {impl: _grad_fn(impl, mask, cot) for impl in implementations}
    outs = {impl: jax.block_until_ready(fn(*args)) for impl, fn in fns.items()}  # compile
    times: dict[str, list[float]] = {impl: [] for impl in implementations}
    for _ in range(reps):
        for impl, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[impl].append(time.perf_counter() - t0)
    first = implementations[0]
    ref = jax.tree.leaves(outs[first])
    row: dict[str, Any] = {"shape": list(shape), "dtype": jnp.dtype(dtype).name,
                           "score_mib": shape[0] * shape[1] * shape[2] * shape[3] * 4 / 2**20}
    for impl in implementations:
        row[f"{impl}_ms"] = round(statistics.median(times[impl]) * 1e3, 2)
        row[f"{impl}_max_grad_diff"] = float(max(
            jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
            for a, b in zip(jax.tree.leaves(outs[impl]), ref)))
    return row


def run(implementations=("deferred", "blocked", "xla"), lengths=(128, 256, 512, 1024, 2048),
        head_dims=(16, 32, 64), tokens: int = 16384, model_dim: int = 128, reps: int = 5,
        log=print) -> list[dict[str, Any]]:
    """The grid (B = tokens / T, N = model_dim / H, T = S) and :data:`MODEL_SHAPES`."""
    rows = []
    cases = [(f"T={t} H={h}", (max(1, tokens // t), t, t, max(1, model_dim // h), h))
             for t in lengths for h in head_dims]
    cases += list(MODEL_SHAPES.items())
    for name, shape in cases:
        row = {"case": name, **time_case(shape, tuple(implementations), reps)}
        rows.append(row)
        log(f"{name:28s} {str(tuple(shape)):26s} " + "  ".join(
            f"{impl} {row[f'{impl}_ms']:8.1f} ms" for impl in implementations)
            + f"   load {os.getloadavg()[0]:.1f}")
    return rows


def markdown(rows: list[dict], implementations, command: str) -> str:
    first = implementations[0]
    head = ("| case | B, T, S, N, H | scores MiB | "
            + " | ".join(f"{i} ms" for i in implementations) + " | "
            + " | ".join(f"{first} ÷ {i}" for i in implementations[1:]) + " |")
    lines = [f"### {datetime.date.today()} — `{command}`", "",
             f"{platform.node()}: {os.cpu_count()} CPU cores, jax {jax.__version__}, "
             f"{jax.devices()[0].device_kind}; load average {os.getloadavg()[0]:.1f} at the end. "
             "Forward + backward of one attention call, float32, 10 % of keys masked; "
             "median of interleaved repetitions. A ratio > 1: that implementation is faster "
             f"than {first}.", "", head,
             "|" + "---|" * (3 + 2 * len(implementations) - 1)]
    for r in rows:
        ratios = " | ".join(f"{r[f'{first}_ms'] / r[f'{i}_ms']:.2f}" for i in implementations[1:])
        lines.append(f"| {r['case']} | {', '.join(map(str, r['shape']))} | "
                     f"{r['score_mib']:,.0f} | "
                     + " | ".join(f"{r[f'{i}_ms']:,.1f}" for i in implementations)
                     + f" | {ratios} |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    from spectrax import runtime
    runtime.configure()  # XLA:CPU flag and log levels, before any computation
    from absl import flags
    f = flags.FLAGS
    impls = tuple(f.implementations)
    rows = run(impls, tuple(int(x) for x in f.lengths), tuple(int(x) for x in f.head_dims),
               f.tokens, f.model_dim, f.reps)
    command = "python -m benchmarks.attention " + " ".join(sys.argv[1:])
    print("\n" + markdown(rows, impls, command.strip()))
    if f.out:
        stamp = {"benchmark": "attention", "host": platform.node(), "jax": jax.__version__,
                 "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "loadavg": [round(x, 2) for x in os.getloadavg()]}
        with open(f.out, "a") as fh:
            for r in rows:
                fh.write(json.dumps({**stamp, **r}) + "\n")


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_list("implementations", ["deferred", "blocked", "xla"],
                      "Implementations of spectrax.nn.attend; ratios are to the first.")
    flags.DEFINE_list("lengths", ["128", "256", "512", "1024", "2048"], "T = S of the grid.")
    flags.DEFINE_list("head_dims", ["16", "32", "64"], "Head dimensions H of the grid.")
    flags.DEFINE_integer("tokens", 16384, "B·T of every grid case.")
    flags.DEFINE_integer("model_dim", 128, "N·H of every grid case.")
    flags.DEFINE_integer("reps", 5, "Interleaved repetitions.")
    flags.DEFINE_string("out", "", "Append JSON rows here ('' = print only).")
    app.run(main)
