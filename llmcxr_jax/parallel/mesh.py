"""Mesh flags -> `jax.sharding.Mesh`, with start-up checks that name the numbers involved.

`--mesh=4x4` means data=4 x fsdp=4; `--mesh=2x4x2` adds tensor=2; the named form
`--mesh=data:2,fsdp:4,tensor:2` is accepted too. One axis may be -1: it takes whatever the device
count leaves. Axes not named have size 1, so every mesh has the axes `data`, `fsdp`, `tensor`.
"""

from __future__ import annotations

import math
import os
import sys
import traceback
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from llmcxr_jax.parallel.rules import MESH_AXES


class MeshError(ValueError):
    """A mesh flag that cannot be laid out on the devices at hand."""


def parse_mesh(text: str, n_devices: int) -> dict[str, int]:
    """Axis sizes for a `--mesh` flag on `n_devices` devices (see module docstring)."""
    text = text.strip()
    if not text:
        raise MeshError("--mesh is empty; use e.g. --mesh=4x4 or --mesh=data:2,fsdp:4")
    if ":" in text:
        sizes: dict[str, int] = {}
        for part in text.split(","):
            name, _, value = part.partition(":")
            name = name.strip()
            if name not in MESH_AXES:
                raise MeshError(f"--mesh={text}: unknown axis {name!r}; axes are {MESH_AXES}")
            if name in sizes:
                raise MeshError(f"--mesh={text}: axis {name!r} given twice")
            sizes[name] = _parse_size(value, text)
    else:
        parts = text.lower().split("x")
        if len(parts) > len(MESH_AXES):
            raise MeshError(f"--mesh={text}: at most {len(MESH_AXES)} axes {MESH_AXES}")
        if len(parts) == 1:  # a single number is pure FSDP
            sizes = {"fsdp": _parse_size(parts[0], text)}
        else:
            sizes = {name: _parse_size(p, text) for name, p in zip(MESH_AXES, parts)}
    sizes = {name: sizes.get(name, 1) for name in MESH_AXES}

    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise MeshError(f"--mesh={text}: only one axis may be -1, got {free}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if n_devices % known:
            raise MeshError(f"--mesh={text}: {n_devices} devices are not divisible by the "
                            f"{known} the other axes take")
        sizes[free[0]] = n_devices // known
    total = math.prod(sizes.values())
    if total != n_devices:
        raise MeshError(f"--mesh={text} needs {total} devices but {n_devices} are available")
    return sizes


def _parse_size(value: str, text: str) -> int:
    try:
        size = int(value)
    except ValueError:
        raise MeshError(f"--mesh={text}: {value!r} is not an integer") from None
    if size == 0 or size < -1:
        raise MeshError(f"--mesh={text}: axis sizes must be positive or -1, got {size}")
    return size


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor), all `AxisType.Auto`.

    Auto axes matter: `jax.make_mesh` defaults to Explicit axes in JAX 0.10, under which a plain
    embedding gather fails with a sharding type error.
    """
    shape = tuple(sizes.get(name, 1) for name in MESH_AXES)
    devices = list(devices if devices is not None else jax.devices())
    if math.prod(shape) != len(devices):
        raise MeshError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices "
                        f"but {len(devices)} were given")
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(shape))


def mesh_from_flag(text: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """`make_mesh(parse_mesh(text, len(devices)))` for all (or the given) devices."""
    devices = list(devices if devices is not None else jax.devices())
    return make_mesh(parse_mesh(text, len(devices)), devices)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split: the product of the `data` and `fsdp` axes."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_global_batch(global_batch: int, mesh: Mesh, flag: str | None = None) -> None:
    """Raise naming both numbers when the batch does not split over the batch axes; `flag` (e.g.
    "--set train.global_batch") adds a value of it that would."""
    ways = data_parallel_size(mesh)
    if global_batch % ways:
        hint = ""
        if flag:
            hint = (f": {flag}={-(-global_batch // ways) * ways} works on this mesh, or a --mesh "
                    f"whose data x fsdp divides {global_batch} (the rest on tensor)")
        raise MeshError(f"global batch {global_batch} is not divisible by the {ways} data-parallel "
                        f"ways of the mesh (data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})"
                        f"{hint}")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS",
                    "TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")
# Set by `launch/multiprocess.py` (or by hand) for processes that JAX cannot detect on its own:
# with JAX_COORDINATOR_ADDRESS they name the process count and this process's index.
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
# Seconds without a heartbeat after which the coordination service declares a process dead and
# the others stop with an error instead of waiting in a collective (JAX's default: 100).
HEARTBEAT_TIMEOUT_ENV = "LLMCXR_HEARTBEAT_TIMEOUT_S"


def distributed_args(environ: Mapping[str, str] = os.environ) -> dict[str, object] | None:
    """`jax.distributed.initialize` keyword arguments the environment asks for, or None for a
    single-process run. Explicit processes (JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES +
    JAX_PROCESS_ID) are passed as given; otherwise JAX detects the cluster (TPU pod, SLURM, MPI)."""
    def number(name: str) -> int | None:
        raw = environ.get(name, "")
        if not raw:
            return None
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r}: expected an integer") from None

    args: dict[str, object] = {}
    heartbeat = number(HEARTBEAT_TIMEOUT_ENV)
    if heartbeat is not None:
        args["heartbeat_timeout_seconds"] = heartbeat
    n, index = number(NUM_PROCESSES_ENV), number(PROCESS_ID_ENV)
    if n is not None or index is not None:
        if n is None or index is None or not environ.get("JAX_COORDINATOR_ADDRESS"):
            raise ValueError(f"{NUM_PROCESSES_ENV}, {PROCESS_ID_ENV} and JAX_COORDINATOR_ADDRESS "
                             f"go together (e.g. launch/multiprocess.py sets all three)")
        if not 0 <= index < n:
            raise ValueError(f"{PROCESS_ID_ENV}={index} is not in [0, {NUM_PROCESSES_ENV}={n})")
        return {"coordinator_address": environ["JAX_COORDINATOR_ADDRESS"], "num_processes": n,
                "process_id": index, **args}
    wanted = any(environ.get(k) for k in _DISTRIBUTED_ENV)
    hostnames = environ.get("TPU_WORKER_HOSTNAMES", "")
    if "TPU_WORKER_HOSTNAMES" in environ and "," not in hostnames:
        wanted = any(environ.get(k) for k in _DISTRIBUTED_ENV if k != "TPU_WORKER_HOSTNAMES")
    return args if wanted else None


def maybe_initialize_distributed() -> bool:
    """`jax.distributed.initialize()` on a multi-host TPU slice or when the environment says so
    (`distributed_args`); CPU collectives go over gloo, so local processes on one machine
    (`launch/multiprocess.py`) take the same code path as the hosts of a pod.

    Must run before any other JAX call. Returns whether it initialised. A single-process run
    does nothing.
    """
    args = distributed_args()
    if args is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU backend only
    jax.distributed.initialize(**args)
    sys.excepthook = _exit_without_shutdown_barrier
    return True


def _exit_without_shutdown_barrier(kind: type, value: BaseException, tb: Any) -> None:
    """A process that crashes leaves at once: `jax.distributed.shutdown` at exit would wait for
    the others, which wait in a collective for it; gone, the coordination service declares it
    dead within the heartbeat timeout and stops the others with an error."""
    traceback.print_exception(kind, value, tb)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


def is_main_process() -> bool:
    """Only process 0 writes logs, metrics and config files."""
    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """Every process waits here until all have arrived (a no-op with one process): e.g. the
    others wait while process 0 writes files they read next."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
