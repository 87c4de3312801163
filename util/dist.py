"""Small helpers around torch.distributed that work the same with and without a process group."""
import builtins
import datetime
import os
import subprocess

import torch
import torch.distributed as dist


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def default_device() -> str:
    """--device when left out: cuda when available, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


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


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (any picklable object); ``obj`` itself without a process group."""
    if get_world_size() == 1:
        return obj
    objects = [obj]
    dist.broadcast_object_list(objects, src=src)
    return objects[0]


def any_rank(flag: bool, device) -> bool:
    """True on every rank when ``flag`` is true on any rank (an all-reduce; ``device`` suits the backend)."""
    if get_world_size() == 1:
        return bool(flag)
    value = torch.tensor([int(bool(flag))], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


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


# ----------------------------------------------------------------------------- process group setup
# (launchers: torchrun / torch.distributed.launch --use_env, srun, submitit; docs/slurm.md)

# what init_distributed_mode sets on args besides the flags: this process's place in the job, not a setting
RUNTIME_KEYS = ("rank", "gpu", "distributed", "dist_backend")


def init_distributed_mode(args) -> None:
    """Join the process group the launcher describes; sets args.rank, world_size, gpu, distributed.

    Order: torchrun's RANK/WORLD_SIZE/LOCAL_RANK (also when torchrun runs inside a Slurm step, where
    it must win over the step's single task), then a multi-task srun step (SLURM_PROCID/SLURM_NTASKS),
    else one process without a process group. A plain sbatch script is not a step: it has
    SLURM_NTASKS of the whole allocation but no SLURM_STEP_ID, and runs as one process.
    """
    launch = _launcher_env(os.environ, args.dist_url)
    args.rank, args.world_size, args.gpu = launch["rank"], launch["world_size"], launch["local_rank"]
    args.distributed = args.world_size > 1
    if not args.distributed:
        return
    cuda = str(args.device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(args.gpu)
    args.dist_backend = "nccl" if cuda else "gloo"
    os.environ.update(MASTER_ADDR=launch["master_addr"], MASTER_PORT=str(launch["master_port"]))
    print(f"| distributed init (rank {args.rank}/{args.world_size}, local {args.gpu}, {args.dist_backend}): "
          f"{launch['init_method']}", flush=True)
    # Generous timeout: rank 0 may spend minutes building the synthetic set before the first collective.
    dist.init_process_group(backend=args.dist_backend, init_method=launch["init_method"],
                            world_size=args.world_size, rank=args.rank,
                            timeout=datetime.timedelta(minutes=30))
    if cuda:
        dist.barrier(device_ids=[args.gpu])
    else:
        dist.barrier()
    _setup_for_distributed(args.rank == 0)


def cleanup() -> None:
    """Leave the process group (no-op without one)."""
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def slurm_master_port(job_id: str, array_task_id: str | None, array_job_id: str | None = None) -> int:
    """A rendezvous port in [20000, 40000) that differs between the tasks of one array on one node.

    key = array_job_id * 131 + task_id for array tasks (all tasks of an array share SLURM_ARRAY_JOB_ID,
    the task id tells them apart), job_id * 131 otherwise. 131 is coprime with 20000, so consecutive job
    ids and the tasks of one array (< 20000 of them) never collide; unrelated jobs that share a node
    could, rarely: set MASTER_PORT to choose the port yourself.
    """
    base = int(array_job_id or job_id)
    return 20000 + (base * 131 + int(array_task_id or 0)) % 20000


def _launcher_env(env, dist_url: str = "env://") -> dict:
    """Rank, world size, local rank and rendezvous from the environment, without side effects."""
    if "RANK" in env and "WORLD_SIZE" in env:
        # torchrun / torch.distributed.launch --use_env / submitit (slurm/submit.py sets these)
        return dict(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                    local_rank=int(env.get("LOCAL_RANK", 0)),
                    master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=int(env.get("MASTER_PORT", 29500)),
                    init_method=dist_url or "env://")
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", 1)))
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and ntasks > 1:
        addr = env.get("MASTER_ADDR") or _slurm_first_host(env)
        port = int(env.get("MASTER_PORT") or slurm_master_port(env["SLURM_JOB_ID"], env.get("SLURM_ARRAY_TASK_ID"),
                                                              env.get("SLURM_ARRAY_JOB_ID")))
        init_method = dist_url if dist_url not in ("", "env://") else f"tcp://{addr}:{port}"
        return dict(rank=int(env["SLURM_PROCID"]), world_size=ntasks, local_rank=int(env.get("SLURM_LOCALID", 0)),
                    master_addr=addr, master_port=port, init_method=init_method)
    return dict(rank=0, world_size=1, local_rank=0, master_addr="", master_port=0, init_method="")


def _slurm_first_host(env) -> str:
    """First host of the step (rank 0 runs there): `scontrol show hostnames` expands 'node[1-4]'."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if nodelist:
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")


def _setup_for_distributed(is_master: bool) -> None:
    """Silence print() on ranks other than 0 (pass force=True to print anyway), as DETR does."""
    builtin_print = builtins.print

    def rank_print(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    builtins.print = rank_print
