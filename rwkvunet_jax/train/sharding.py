"""Device meshes, sharding rules and the multi-host runtime (``jax.jit`` with shardings, no pmap).

One :class:`jax.sharding.Mesh` spans every device of every host, with two axes:

* ``data``: pure data parallelism (parameters replicated along it);
* ``fsdp``: data parallelism that also splits parameters and optimizer state (ZeRO-3 / FSDP style).

The batch is split over both axes, so ``make_mesh(data=-1)`` is plain data parallelism and
``make_mesh(data=1, fsdp=-1)`` shards the whole training state over all devices. Which arrays are
split is decided by :func:`state_shardings`: regex rules first, then a size rule (arrays with at least
``min_size`` elements are split along their largest dimension the ``fsdp`` axis divides).

Typical use (what ``rwkvunet_jax.train.step.build_steps`` does; fine-tuning uses the local devices only)::

    mesh = make_mesh()                                         # all devices, data parallel
    shardings = state_shardings(state, mesh, fsdp=False)
    state = place(state, shardings)                            # works on one host or many
    batch = host_local_batch_to_global(local_numpy_batch, mesh)
    step = jax.jit(train_step, in_shardings=(shardings, data_sharding(mesh)), out_shardings=...)
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
# Arrays smaller than this stay replicated under FSDP: splitting them saves little memory and
# costs one all-gather each.
DEFAULT_FSDP_MIN_SIZE = 2**14

Rule = tuple[str, "str | P"]


# ----------------------------------------------------------------------------- meshes


def make_mesh(data: int = -1, fsdp: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: all devices of all processes).

    One of ``data``/``fsdp`` may be -1 to take the remaining devices. Raises ValueError when the
    sizes do not multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("at most one of data and fsdp may be -1")
    if data == -1:
        if fsdp <= 0 or n % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    elif fsdp == -1:
        if data <= 0 or n % data:
            raise ValueError(f"data={data} does not divide the {n} devices")
        fsdp = n // data
    if data <= 0 or fsdp <= 0 or data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not match the {n} available devices")
    # Auto axes: GSPMD propagates shardings through the model, which needs no sharding annotations.
    axis_types = (jax.sharding.AxisType.Auto,) * 2
    if devices == list(jax.devices()):
        return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=axis_types)
    return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES, axis_types=axis_types)


def local_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
    """A mesh over this process's devices only (single-host data parallelism, e.g. fine-tuning)."""
    return make_mesh(data, fsdp, devices=jax.local_devices())


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device of ``mesh``; other dimensions whole."""
    return NamedSharding(mesh, P(_batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full copy on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
    """How many ways the batch is split: global batches must be a multiple of this."""
    return int(np.prod([mesh.shape[a] for a in _batch_axes(mesh)]))


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in mesh.axis_names if a in BATCH_AXES) or tuple(mesh.axis_names)


# ----------------------------------------------------------------------------- sharding rules


def path_name(path: Sequence[Any]) -> str:
    """A key path as ``a/b/0/c`` (what sharding rules match against)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def fsdp_spec(shape: Sequence[int], axis_size: int, *, min_size: int = DEFAULT_FSDP_MIN_SIZE,
              axis: str = FSDP_AXIS) -> P:
    """Split the largest dimension of ``shape`` that ``axis_size`` divides; replicate small arrays."""
    if axis_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % axis_size == 0:
            spec = [None] * len(shape)
            spec[dim] = axis
            return P(*spec)
    return P()


def state_shardings(
    tree: Any,
    mesh: Mesh,
    *,
    fsdp: bool = False,
    min_size: int = DEFAULT_FSDP_MIN_SIZE,
    rules: Iterable[Rule] = (),
) -> Any:
    """A tree of ``NamedSharding`` for ``tree`` (arrays or ShapeDtypeStructs).

    ``rules`` are ``(regex, what)`` pairs tried in order on each leaf's path (see :func:`path_name`);
    ``what`` is ``"replicate"``, ``"fsdp"`` or an explicit ``PartitionSpec``. Leaves no rule matches
    are FSDP-split by size when ``fsdp`` is true and replicated otherwise. Optimizer moments have the
    parameter's path as a suffix, so ``.*kernel$``-style rules cover them too.
    """
    compiled = [(re.compile(pattern), what) for pattern, what in rules]
    axis_size = mesh.shape.get(FSDP_AXIS, 1)

    def choose(path, leaf) -> NamedSharding:
        shape = tuple(getattr(leaf, "shape", ()))
        name = path_name(path)
        for pattern, what in compiled:
            if pattern.search(name):
                if isinstance(what, P):
                    return NamedSharding(mesh, what)
                if what == "replicate":
                    return NamedSharding(mesh, P())
                if what == "fsdp":
                    return NamedSharding(mesh, fsdp_spec(shape, axis_size, min_size=0))
                raise ValueError(f"unknown sharding rule target {what!r} for pattern {pattern.pattern!r}")
        if fsdp:
            return NamedSharding(mesh, fsdp_spec(shape, axis_size, min_size=min_size))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(choose, tree)


def place(tree: Any, shardings: Any) -> Any:
    """Puts host values (numpy, or arrays every process holds in full) onto global ``shardings``.

    Each process supplies only the pieces its own devices hold, so this works across hosts as long as
    every process passes the same values (e.g. a model initialised from the same seed).
    """

    def put(value, sharding: NamedSharding):
        if isinstance(value, jax.Array) and value.sharding == sharding:
            return value
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def host_local_batch_to_global(batch: Mapping[str, np.ndarray] | np.ndarray, mesh: Mesh) -> Any:
    """Joins each process's share of a batch into global arrays split over the mesh's batch axes.

    Every process passes arrays with the same per-process batch size; the global batch is their
    concatenation in process order.
    """
    sharding = data_sharding(mesh)
    divisor = batch_divisor(mesh) // jax.process_count()

    def to_global(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % max(divisor, 1):
            raise ValueError(
                f"per-process batch of shape {x.shape} must have a leading size divisible by this "
                f"process's {divisor} share of the mesh {dict(mesh.shape)}")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(to_global, batch)


def to_host(tree: Any) -> Any:
    """Numpy copies of (replicated or sharded) global arrays, on every process."""
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)


# ----------------------------------------------------------------------------- multi-host runtime


def initialize_distributed(
    mode: str = "auto",
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    cpu_collectives: str = "gloo",
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Joins the JAX multi-host runtime when the job has several processes; returns whether it did.

    ``mode``: ``"off"`` (single process), ``"on"`` (always call ``jax.distributed.initialize``) or
    ``"auto"``: explicit arguments, else ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` +
    ``JAX_PROCESS_ID`` (what ``launch/local_multiprocess.sh`` sets), else a detected cluster
    (SLURM with more than one task, Open MPI, a multi-host TPU slice), else single process.
    Must run before anything touches a JAX device. CPU processes exchange data through
    ``cpu_collectives`` (gloo).
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed mode must be 'auto', 'on' or 'off', got {mode!r}")
    env = os.environ if environ is None else environ
    if mode == "off" or jax.distributed.is_initialized():
        return jax.distributed.is_initialized()
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    explicit = coordinator_address is not None and num_processes is not None and process_id is not None
    if mode == "auto" and not explicit and not _in_multiprocess_cluster(env):
        return False
    if cpu_collectives:
        # Only the CPU backend reads this option, so setting it on GPU/TPU hosts is harmless.
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs: dict[str, Any] = {}
    if explicit:
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kwargs)
    log.info("joined the JAX runtime as process %d of %d (%d local / %d global devices)",
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def _in_multiprocess_cluster(env: Mapping[str, str]) -> bool:
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def is_primary() -> bool:
    """True on the process that writes logs and exports (process 0)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Barrier across processes (a no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
