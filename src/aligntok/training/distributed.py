"""One code path for one process and for ``torchrun --nproc_per_node=N``.

:func:`init_distributed` reads the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and
starts a process group (NCCL on CUDA, Gloo on CPU); without those variables it is a no-op describing a
single process. Every helper here degrades to the identity when no process group is running, so callers
never branch on the world size.
"""

from __future__ import annotations

import dataclasses
import gc
import os
from collections.abc import Iterable
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

T = TypeVar("T")

# Gradients are all-reduced in flat buckets of at most this many bytes: one collective for a small
# model, bounded extra memory for a large one.
GRAD_BUCKET_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        barrier()


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def _default_device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed() -> DistInfo:
    """Join the torchrun job described by the environment, or describe a single process.

    Safe to call more than once: an already running process group is reused.
    """
    if torch_dist.is_available() and torch_dist.is_initialized():
        local_rank = _env_int("LOCAL_RANK") or 0
        return DistInfo(
            torch_dist.get_rank(), torch_dist.get_world_size(), local_rank, _default_device(local_rank)
        )
    world_size = _env_int("WORLD_SIZE") or 1
    rank, local_rank = _env_int("RANK") or 0, _env_int("LOCAL_RANK") or 0
    device = _default_device(local_rank)
    if world_size == 1:
        return DistInfo(0, 1, 0, device)
    if not torch_dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world_size} but this PyTorch build has no torch.distributed")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch_dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        device_id=device if device.type == "cuda" else None,
    )
    return DistInfo(rank, world_size, local_rank, device)


def destroy_distributed() -> None:
    """Tear down the process group if one is running (end of a script).

    Models sharded with FSDP2 hold the group through their device mesh, often in reference cycles; collected
    here, the group's last reference goes while the interpreter is alive. Left to interpreter shutdown,
    Gloo's worker threads were torn down out of order now and then ("terminate called without an active
    exception", SIGABRT after a finished run).
    """
    if torch_dist.is_available() and torch_dist.is_initialized():
        gc.collect()
        torch_dist.barrier()  # no rank tears down its connections while another still uses them
        torch_dist.destroy_process_group()
        gc.collect()


def get_rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes shared files."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        torch_dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place; returns it."""
    if is_distributed():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over ranks, in place; returns it. (Gloo has no AVG, so sum and divide.)"""
    if is_distributed():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        tensor.div_(torch_dist.get_world_size())
    return tensor


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (a small picklable value: a path, a dict of numbers)."""
    if not is_distributed():
        return obj
    holder = [obj]
    torch_dist.broadcast_object_list(holder, src=src)
    return holder[0]


def gather_objects(obj: T, dst: int = 0) -> list[T] | None:
    """Every rank's ``obj`` as a list on rank ``dst`` (``None`` elsewhere)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] | None = [None] * torch_dist.get_world_size() if get_rank() == dst else None
    torch_dist.gather_object(obj, gathered, dst=dst)
    return gathered


def broadcast_module_state(module: nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer with rank ``src``'s values, so replicas start identical."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            torch_dist.broadcast(tensor.data, src=src)


def _buckets(tensors: list[torch.Tensor]) -> Iterable[list[torch.Tensor]]:
    """Consecutive groups of one dtype and device, each at most GRAD_BUCKET_BYTES (or one tensor)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        same_kind = not bucket or (bucket[0].dtype, bucket[0].device) == (tensor.dtype, tensor.device)
        if bucket and (not same_kind or size + nbytes > GRAD_BUCKET_BYTES):
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += nbytes
    if bucket:
        yield bucket


def all_reduce_gradients(params: list[nn.Parameter], has_grad_anywhere: list[bool]) -> None:
    """Average the gradients of ``params`` over ranks with coalesced (flattened) all-reduces.

    ``has_grad_anywhere[i]`` says whether any rank holds a gradient for ``params[i]``: those that some
    rank lacks are taken as zeros there so that every rank joins the same collective; those no rank has
    stay ``None`` (so the optimizer skips them exactly as it would in a single process).
    """
    if not is_distributed():
        return
    grads: list[torch.Tensor] = []
    for param, needed in zip(params, has_grad_anywhere, strict=True):
        if not needed:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grads.append(param.grad)
    world_size = torch_dist.get_world_size()
    for bucket in _buckets(grads):
        flat = torch._utils._flatten_dense_tensors(bucket)
        torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
        flat.div_(world_size)
        for grad, synced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket), strict=True):
            grad.copy_(synced)


def fsdp_shard(module: nn.Module) -> None:
    """FSDP2 on the blocks of every outermost ModuleList (transformer blocks), then on the module."""
    from torch.distributed.fsdp import fully_shard

    taken: list[str] = []
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and not any(name.startswith(t + ".") for t in taken):
            taken.append(name)
            for block in child:
                if any(True for _ in block.parameters()):
                    fully_shard(block)
    fully_shard(module)


# ----------------------------------------------------------------------------------------------
# Full (gathered) state dicts; identical to plain state dicts unless modules are FSDP-sharded.
# ----------------------------------------------------------------------------------------------


def full_cpu_state(value: Any) -> Any:
    """A state value with every DTensor gathered (a collective) and tensors moved to the CPU."""
    if isinstance(value, DTensor):
        return value.full_tensor().cpu()
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: full_cpu_state(v) for k, v in value.items()}
    if isinstance(value, list):
        return [full_cpu_state(v) for v in value]
    return value


def _placed_like(value: Tensor, reference: Tensor) -> Tensor:
    """``value`` (a full tensor) placed like ``reference`` (sharded as it is when it is a DTensor)."""
    if isinstance(reference, DTensor) and value.shape == reference.shape:
        return distribute_tensor(
            value.to(reference.device_mesh.device_type), reference.device_mesh, reference.placements
        )
    return value


def load_module_state(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a full state dict into ``module``, each tensor sharded like the module's own where it is a DTensor."""
    current = module.state_dict()
    module.load_state_dict({k: _placed_like(v, current[k]) if k in current else v for k, v in state.items()})


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full optimizer state dict, each per-parameter tensor sharded like its parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {
        index: {
            k: _placed_like(v, params[index]) if isinstance(v, Tensor) and v.dim() else v for k, v in values.items()
        }
        for index, values in state["state"].items()
    }
    optimizer.load_state_dict({**state, "state": sharded})
