"""Devices: the host CPU device plan, the 1-D 'data' mesh, and sharding batches onto it."""

import os

import jax
import numpy as np

BATCH_KEYS = ("frames", "mask", "plasma_times", "plasma", "whole_blood", "valid")


def host_device_plan(cpu_devices: int, batch_size: int, cores: int) -> int:
    """How many single-threaded CPU devices `config.train.cpu_devices` asks for (0: none).

    -1 (auto) gives one device per core when 2 ≤ cores ≤ batch and the cores divide the batch
    (2 cores: XLA's threaded convolutions use ≈ 1.6 of them, two single-threaded data-parallel
    devices ≈ 2: 0.60 vs 0.70 s per demo step); otherwise XLA's default.
    """
    if cpu_devices == -1:
        return cores if 2 <= cores <= batch_size and batch_size % cores == 0 else 0
    if cpu_devices < 0:
        raise ValueError(f"train.cpu_devices must be -1 (auto), 0 or a count, got {cpu_devices}.")
    return cpu_devices


def configure_host_devices(config) -> int:
    """Apply `config.train.cpu_devices` before JAX initialises its backends; returns the count.

    Sets `jax_num_cpu_devices` and turns off XLA:CPU's intra-op threads (each device then runs
    on its own thread, as many threads as cores). Does nothing when the user already chose a
    device count in XLA_FLAGS, or in multi-process runs. Raises if the backends already exist.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = host_device_plan(int(config.train.cpu_devices), config.data.batch_size, cores)
    if n == 0 or "xla_force_host_platform_device_count" in flags or config.train.multiprocess:
        return 0
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as err:
        raise RuntimeError(
            "train.cpu_devices must be applied before JAX starts its backends (before the "
            "first array or jax.devices() call)."
        ) from err
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
    return n


def make_mesh():
    """1-D mesh over every device, axis 'data' (Auto axis type: XLA propagates shardings)."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def shard_batch(batch, sharding):
    """Process-local numpy batch -> global arrays sharded over the 'data' axis."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
        for k in BATCH_KEYS
    }


def local_copy(tree):
    """Host (NumPy) copy of a pytree of fully replicated, possibly multi-process, arrays."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)
