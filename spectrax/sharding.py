"""Device mesh, partition rules and multi-host start-up: the one place that knows about meshes.

The mesh has two axes:
- ``data``: pure data parallelism (parameters replicated along it);
- ``fsdp``: data parallelism whose members also split parameters and optimiser state (ZeRO-3 /
  FSDP): each large array is sharded along its largest dimension divisible by the axis size.
A batch is always split over both axes together, so the same code path runs on 1 CPU device,
8 simulated CPU devices, a GPU node or a TPU pod.
"""
from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
# Arrays smaller than this stay replicated under FSDP: sharding them saves nothing and costs
# a collective per use.
FSDP_MIN_SIZE = 2**14


def multiprocess_environment() -> bool:
    """True when the environment says this is one of several processes (SLURM, OpenMPI, TPU
    pod, or an explicit JAX coordinator)."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("SPECTRAX_COORDINATOR"):
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed() -> None:
    """Calls ``jax.distributed.initialize()`` when running as one of several processes.

    ``SPECTRAX_COORDINATOR``/``SPECTRAX_NUM_PROCESSES``/``SPECTRAX_PROCESS_ID`` give an explicit
    set-up (used by the local 2-process test); otherwise JAX auto-detects TPU pods, SLURM and
    OpenMPI.
    """
    if not multiprocess_environment() or jax.distributed.is_initialized():
        return
    env = os.environ
    if env.get("SPECTRAX_COORDINATOR"):
        jax.distributed.initialize(
            coordinator_address=env["SPECTRAX_COORDINATOR"],
            num_processes=int(env["SPECTRAX_NUM_PROCESSES"]),
            process_id=int(env["SPECTRAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def make_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
    """A ('data', 'fsdp') mesh over all devices; one size may be −1 (= whatever is left)."""
    n = jax.device_count()
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of data/fsdp may be -1")
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not cover the {n} devices")
    # Auto axes: XLA propagates shardings through the model (sorting medians, gathers) without
    # every op needing an explicit out_sharding, as explicit-sharding mode would demand.
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=auto)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def round_up_batch(batch_size: int, devices: int) -> int:
    """``batch_size`` rounded up to a multiple of ``devices`` (at least one row per device), so
    a batch splits evenly over them; the extra rows of a last batch are padding rows."""
    return devices * max(1, -(-int(batch_size) // devices))


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    """Partition rule for one array: shard its largest dimension divisible by ``fsdp_size``."""
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(tree, mesh: Mesh):
    """NamedShardings for every array leaf of ``tree`` (concrete or abstract) by the FSDP rule.

    The rule depends only on a leaf's shape, so parameters and their optimiser moments (same
    shape) always get the same layout.
    """
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp_size)), tree)
