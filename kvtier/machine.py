"""What this machine has free right now: RAM, GPU memory, disk space at a path.

Probes only; never allocates (the store probe makes and removes one empty directory).
`load_config` resolves percentages and checks budgets with them and `kvtier info` reports them,
so both see the same numbers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def free_host_bytes() -> int:
    """RAM available to new allocations now (psutil's `available`)."""
    import psutil

    return int(psutil.virtual_memory().available)


def free_gpu_bytes() -> int:
    """Free memory of GPU 0; with no GPU at all, free host RAM, since the GPU tier is then RAM."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(0)[0])
    # NVML numbers devices physically, ignoring CUDA_VISIBLE_DEVICES; only used without CUDA torch.
    nvml_free = _nvml_free_bytes()
    return free_host_bytes() if nvml_free is None else nvml_free


IO_THREADS_MAX = 12  # I/O threads of a mover at most


def default_io_threads() -> int:
    """I/O threads for serialized-store reads and writes: one per core, 4 to IO_THREADS_MAX
    (file I/O and the checks release the GIL; a prefix load reads one block per thread)."""
    return min(IO_THREADS_MAX, max(4, os.cpu_count() or 4))


HASH_THREADS_MAX = 8  # a remote tier's hash threads at most


def default_hash_threads() -> int:
    """Threads that hash one block's layers side by side: one per core, 2 to HASH_THREADS_MAX
    (hashlib and xxhash release the GIL; the socket, the server and the other writers need
    cores too, and a block of 8 layers has no work for more)."""
    return min(HASH_THREADS_MAX, max(2, os.cpu_count() or 2))


def device_name(device) -> str:
    """A torch device as measured speeds are filed under it: the GPU's name, or "cpu"."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def free_device_bytes(name: str) -> int | None:
    """Free memory of the device `name` ("cuda:1"; "cpu" or "cpu:N": available RAM), or None
    when this machine has no such device."""
    import torch

    device = torch.device(name)
    if device.type == "cpu":
        return free_host_bytes()
    if not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count():
        return None
    return int(torch.cuda.mem_get_info(device.index or 0)[0])


def free_disk_bytes(path: str | os.PathLike[str]) -> int:
    """Free space on the file system that holds `path` (or its nearest existing ancestor)."""
    return int(shutil.disk_usage(nearest_existing(path)).free)


def nearest_existing(path: str | os.PathLike[str]) -> Path:
    """`path` (absolute, ~ expanded) if it exists, else its closest existing ancestor."""
    current = Path(path).expanduser().absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def store_problem(path: str | os.PathLike[str]) -> str | None:
    """Why no directory can be made or written at `path`, or None if one can.

    Probed, not guessed (os.access says yes to root on /proc): an empty directory is created in
    `path`'s nearest existing ancestor and removed at once.
    """
    try:
        existing = nearest_existing(path)
        if not existing.is_dir():
            return f"{existing} is a file"
        probe = tempfile.mkdtemp(prefix=".kvtier-probe-", dir=existing)
    except OSError as exc:
        where = f"in {existing}" if "existing" in locals() else f"at {path}"
        return f"cannot create a directory {where} ({exc.strerror or exc})"
    os.rmdir(probe)
    return None


def gpu_lines() -> list[str]:
    """One line per GPU NVML sees (name, total, free), or one line saying why there are none."""
    from kvtier.sizes import format_size

    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # no library, no driver, no permission: a CPU machine, not a bug
        return [f"GPUs: none ({' '.join(str(exc).split()) or type(exc).__name__})"]
    try:
        count = pynvml.nvmlDeviceGetCount()
        lines = [f"GPUs: {count}" if count else "GPUs: none"]
        for index in range(count):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            total, free = format_size(memory.total), format_size(memory.free)
            lines.append(f"  GPU {index}: {name}, {total} total, {free} free")
        return lines
    except Exception as exc:  # a half-working driver should not hide the rest of the report
        return [f"GPUs: none (NVML query failed: {' '.join(str(exc).split())})"]
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _nvml_free_bytes() -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no library, no driver, no permission: there is no GPU to measure
        return None
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            return None
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).free)
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()
