"""Data-parallel helpers (torch only): the module inside a wrapper, a flag agreed by every rank."""
import torch
import torch.distributed as dist
from torch import nn

__all__ = ["unwrap_model", "any_rank"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper."""
    return model.module if hasattr(model, "module") and isinstance(
        model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def any_rank(flag: bool) -> bool:
    """True if ``flag`` is set on any rank (one all-reduce; every rank must call it)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
