r"""Per-device memory of the SpecPT ``paper`` autoencoder (1,120,475,621 parameters) trained
with FSDP over 8 devices, bf16 compute and AdamW, measured WITHOUT allocating it.

    python -m benchmarks.paper_memory [--fsdp=8] [--batch_size=128] [--dtype=bfloat16]

The train step of :class:`spectrax.train.Trainer` (the one ``spectrax.train`` runs) is lowered
from abstract arguments (``jax.ShapeDtypeStruct`` with the FSDP shardings: nothing is
initialised or allocated) and compiled ahead of time for 8 simulated CPU devices
(``--xla_force_host_platform_device_count``, set here before JAX starts); XLA's
``compiled.memory_analysis()`` then gives the per-device bytes of arguments, outputs and
temporaries. Parameter and optimiser bytes per device are also computed exactly from the
shardings, independently of XLA. Prints a table and appends one JSON line to
``benchmarks/results.jsonl``.

Caveat: the figures come from the CPU backend's compiler. A GPU/TPU compile of the same
program fuses and schedules differently (its temporaries differ, typically by tens of per cent),
but the arguments (parameters, optimiser state, batch) are the same bytes on any backend.
"""
from __future__ import annotations

import os
import sys

N_SIM = 8
if "jax" not in sys.modules:  # simulated devices must be requested before JAX starts
    flags_env = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags_env:
        os.environ["XLA_FLAGS"] = (flags_env + f" --xla_force_host_platform_device_count={N_SIM}"
                                   ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from spectrax import runtime

FLAGS = flags.FLAGS
flags.DEFINE_integer("fsdp", 8, "FSDP axis size (the mesh is data=devices/fsdp x fsdp).")
flags.DEFINE_integer("batch_size", 0, "Global batch; 0 = the paper config's (128).")
flags.DEFINE_string("dtype", "bfloat16", "Compute dtype (parameters stay float32).")
flags.DEFINE_string("variant", "paper", "SpecPT autoencoder variant.")
flags.DEFINE_float("device_gb", 80.0, "Device memory to compare against, in GB (1e9 bytes).")
flags.DEFINE_string("out", "benchmarks/results.jsonl", "Where the JSON line is appended.")

GB = 1e9
GIB = 2**30


def build_config(variant: str, fsdp: int, dtype: str, batch_size: int):
    from spectrax.config_lib import load

    c = load("configs/specpt_bgs.py", f"variant={variant}")
    c.unlock()
    c.mesh.data, c.mesh.fsdp = jax.device_count() // fsdp, fsdp
    c.model.dtype = dtype
    if batch_size:
        c.batch_size = batch_size
    c.optim.name = "adamw"
    return c.lock()


def abstract_batch(batch: int, length: int, sharding):
    """A SpectrumBatch of ShapeDtypeStructs, batch axis sharded like the real pipeline's."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from spectrax.spectra import SpectrumBatch

    def sds(shape, dtype):
        spec = P(sharding.spec[0], *([None] * (len(shape) - 1)))
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(sharding.mesh, spec))

    return SpectrumBatch(flux=sds((batch, length), jnp.float32),
                         ivar=sds((batch, length), jnp.float32),
                         wavelength=sds((batch, length), jnp.float32),
                         mask=sds((batch, length), jnp.bool_),
                         labels=sds((batch, 0), jnp.float32),
                         label_mask=sds((batch, 0), jnp.bool_),
                         valid=sds((batch,), jnp.bool_), ids=None)


def sharded_bytes(abstract_state, shardings) -> dict[str, dict[str, int]]:
    """Exact bytes per device and in total of each top-level part of the state, from the
    shardings (shard shape x itemsize), with the largest array's layout."""
    out = {}
    for part in abstract_state:
        leaves = jax.tree.leaves(abstract_state[part])
        shs = jax.tree.leaves(shardings[part])
        per_dev = total = 0
        for a, s in zip(leaves, shs):
            item = np.dtype(a.dtype).itemsize
            per_dev += int(np.prod(s.shard_shape(a.shape), dtype=np.int64)) * item
            total += int(np.prod(a.shape, dtype=np.int64)) * item
        out[part] = {"per_device": per_dev, "total": total}
    return out


def measure(variant="paper", fsdp=8, dtype="bfloat16", batch_size=0, device_gb=80.0) -> dict:
    from spectrax import train
    from spectrax.checkpoint import path_str
    from spectrax.models import specpt
    from spectrax.sharding import make_mesh

    config = build_config(variant, fsdp, dtype, batch_size)
    t0 = time.perf_counter()
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
    trainer = train.Trainer(config, mesh, config.num_steps)
    trainer.task.bind_labels(())
    setup_s = time.perf_counter() - t0
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
        trainer.abstract_state["params"]))
    batch = abstract_batch(config.batch_size, specpt.specpt_config(variant).input_length,
                           trainer.batch_sharding)
    compiled, compile_s, text = trainer.compile(batch)
    m = compiled.memory_analysis()
    parts = sharded_bytes(trainer.abstract_state, trainer.state_shardings)
    required = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                - m.alias_size_in_bytes)
    # Largest parameter and its layout (the decoder's 124,672 x 7,781 linear2).
    leaves = jax.tree_util.tree_flatten_with_path(trainer.abstract_state["params"])[0]
    shard_leaves = jax.tree.leaves(trainer.state_shardings["params"])
    (path, big), big_s = max(zip(leaves, shard_leaves), key=lambda t: np.prod(t[0][1].shape))
    dev = jax.devices()[0]
    return {
        "benchmark": "paper_memory", "model": f"specpt_autoencoder:{variant}",
        "parameters": n_params, "batch_size": config.batch_size,
        "per_device_batch": config.batch_size // jax.device_count(),
        "mesh": {"data": config.mesh.data, "fsdp": config.mesh.fsdp}, "compute_dtype": dtype,
        "optimizer": config.optim.name,
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes),
        "generated_code_bytes": int(m.generated_code_size_in_bytes),
        "required_bytes": int(required),
        "params_bytes_per_device": parts["params"]["per_device"],
        "opt_bytes_per_device": parts["opt"]["per_device"],
        "other_bytes_per_device": parts["other"]["per_device"],
        "state_bytes_total": sum(p["total"] for p in parts.values()),
        "largest_param": {"path": path_str(path), "shape": list(big.shape),
                          "spec": str(big_s.spec), "shard": list(big_s.shard_shape(big.shape))},
        "device_gb": device_gb, "fits": bool(required <= device_gb * GB),
        "fits_default_prealloc_75pct": bool(required <= 0.75 * device_gb * GB),
        "compile_s": round(compile_s, 1), "setup_s": round(setup_s, 1),
        "host_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB,
                                  2),
        "backend": f"{dev.platform} x{jax.device_count()} (simulated)",
        "host": platform.node(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "date": datetime.date.today().isoformat(), "memory_text": text,
    }


def table(r: dict) -> str:
    rows = [
        ("model", f"{r['model']} ({r['parameters']:,} parameters)"),
        ("mesh / batch", f"data={r['mesh']['data']} x fsdp={r['mesh']['fsdp']}, global batch "
                         f"{r['batch_size']} ({r['per_device_batch']} per device), "
                         f"{r['compute_dtype']} compute, fp32 params, {r['optimizer']}"),
        ("largest parameter", f"{r['largest_param']['path']} {r['largest_param']['shape']} -> "
                              f"{r['largest_param']['spec']}, {r['largest_param']['shard']} "
                              "per device"),
        ("params / device (exact)", f"{r['params_bytes_per_device'] / GB:.3f} GB"),
        ("AdamW state / device (exact)", f"{r['opt_bytes_per_device'] / GB:.3f} GB"),
        ("BatchNorm stats / device", f"{r['other_bytes_per_device'] / GB:.6f} GB"),
        ("XLA arguments / device", f"{r['argument_bytes'] / GB:.3f} GB"),
        ("XLA outputs / device", f"{r['output_bytes'] / GB:.3f} GB"),
        ("XLA temporaries / device", f"{r['temp_bytes'] / GB:.3f} GB"),
        ("XLA aliased (donated state)", f"{r['alias_bytes'] / GB:.3f} GB"),
        ("required = args+outs+temps-aliased", f"{r['required_bytes'] / GB:.3f} GB "
                                               f"({r['required_bytes'] / GIB:.3f} GiB)"),
        (f"fits {r['device_gb']:g} GB", f"{'YES' if r['fits'] else 'NO'} "
                                        f"({100 * r['required_bytes'] / (r['device_gb'] * GB):.1f} %"
                                        "; JAX's default 75 % GPU preallocation: "
                                        f"{'fits' if r['fits_default_prealloc_75pct'] else 'does not fit'})"),
        ("compile (CPU, abstract)", f"{r['compile_s']} s; host peak RSS {r['host_peak_rss_gb']} "
                                    f"GB; load {r['loadavg_1min']}"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main(argv):
    del argv
    if jax.device_count() < FLAGS.fsdp:
        raise SystemExit(f"{jax.device_count()} devices < fsdp={FLAGS.fsdp}; set XLA_FLAGS="
                         f"--xla_force_host_platform_device_count={FLAGS.fsdp}")
    r = measure(FLAGS.variant, FLAGS.fsdp, FLAGS.dtype, FLAGS.batch_size, FLAGS.device_gb)
    print(table(r))
    with open(Path(FLAGS.out), "a") as f:
        f.write(json.dumps(r) + "\n")
    print(f"appended to {FLAGS.out}")


if __name__ == "__main__":
    runtime.configure()  # XLA:CPU flag and log levels, before any computation
    app.run(main)
