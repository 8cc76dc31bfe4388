"""One engine's process group, made without torch.distributed's process-wide default group.

``dist.init_process_group`` can run once per process, and rank 0 of every engine lives in the user's
process: a second engine in the same notebook could not make its own.  So each engine makes a
``ProcessGroup`` object of its own, the way ``init_process_group`` does inside, and passes it to every
collective explicitly:

- rendezvous: rank 0 opens a ``TCPStore`` on 127.0.0.1, port 0 (the OS picks a free port, so no fixed
  port, and no file or shared-memory name to collide on or leave behind); the workers connect to it;
- the backend: NCCL for CUDA tensors (rank r on GPU r), gloo for CPU tensors, talking over loopback;
- a name, random per engine, under which the group is registered so that ``torch.compile`` can trace
  collectives on it (functional collectives look groups up by name).

``ProcessGroup._register_backend`` and the name registry are torch internals that ``init_process_group``
itself uses; they are confined to this file.
"""

from __future__ import annotations

import datetime
import uuid

import torch
import torch.distributed as dist

LOOPBACK = "127.0.0.1"


def new_group_name() -> str:
    return f"nanovllm-tp-{uuid.uuid4().hex[:12]}"


def open_store(timeout_s: float) -> dist.TCPStore:
    """Rank 0's rendezvous server, on a free port chosen by the OS (``store.port`` says which)."""
    return dist.TCPStore(LOOPBACK, 0, None, True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def connect_store(port: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(LOOPBACK, port, None, False, timeout=datetime.timedelta(seconds=timeout_s))


def make_group(store: dist.Store, rank: int, size: int, device: torch.device, name: str,
               timeout_s: float = 1800.0):
    """A process group of ``size`` ranks for tensors on ``device`` (NCCL on CUDA, gloo on CPU).  Every rank
    calls this with the same ``name``; gloo returns once all have connected, NCCL connects lazily."""
    from torch._C._distributed_c10d import _register_process_group

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.PrefixStore(f"{name}/", store)
    if device.type == "cuda":
        if not dist.is_nccl_available():
            raise RuntimeError("tensor parallelism on CUDA needs torch.distributed with NCCL")
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = False
        options._timeout = timeout
        options.group_name = name
        backend = dist.ProcessGroupNCCL(store, rank, size, options)
        backend_type = dist.ProcessGroup.BackendType.NCCL
    else:
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=LOOPBACK)]
        options._timeout = timeout
        backend = dist.ProcessGroupGloo(store, rank, size, options)
        backend_type = dist.ProcessGroup.BackendType.GLOO
    backend._set_sequence_number_for_group()
    group = dist.ProcessGroup(store, rank, size)
    group._register_backend(torch.device(device.type), backend_type, backend)
    group._set_default_backend(backend_type)
    group._set_group_name(name)
    _register_process_group(name, group)
    return group


def destroy_group(group) -> None:
    """Release the group's connections and its name, waiting for nothing (a peer may be gone, or stuck in
    a collective).  With NCCL it also makes collectives pending in other threads give up."""
    from torch._C._distributed_c10d import _unregister_process_group

    try:
        group.abort()
    except Exception:  # already shut down, or a backend without abort: dropping it closes its sockets
        pass
    try:
        _unregister_process_group(group.group_name)
    except Exception:
        pass
