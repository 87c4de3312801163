"""Small helpers around torch.distributed that work the same with and without a process group."""
import torch
import torch.distributed as dist


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


def all_gather(obj) -> list:
    """Every rank's ``obj`` (any picklable object), in rank order."""
    if get_world_size() == 1:
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def reduce_dict(values: dict, average: bool = True) -> dict:
    """All-reduce a dict of scalar tensors so every rank sees the same (mean) values."""
    world_size = get_world_size()
    if world_size == 1:
        return values
    with torch.no_grad():
        names = sorted(values)
        stacked = torch.stack([values[k] for k in names])
        dist.all_reduce(stacked)
        if average:
            stacked /= world_size
        return dict(zip(names, stacked))
