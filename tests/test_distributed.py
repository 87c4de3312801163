"""DDP equivalence (2 gloo processes == 1 process on the union batch) and launcher detection in util.dist."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import main
from models import build_model
from models.criterion import weighted
import run_setup
from util import dist as udist
from util.misc import nested_tensor_from_tensor_list

WORLD = 2
PER_RANK = 2  # images per process; the single process sees WORLD * PER_RANK
IMAGE = 64
LR = 0.05
TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "48",
        "--enc_layers", "1", "--dec_layers", "2", "--nheads", "4", "--num_queries", "6", "--num_classes", "5",
        "--dropout", "0", "--device", "cpu", "--dynamic_scale", "type2", "--query_mixture"]


def _args():
    args = main.get_args_parser().parse_args(TINY)
    run_setup.resolve_args(args)
    return args


def _batch():
    """WORLD * PER_RANK equal-size images with 1-3 boxes each (fixed seed)."""
    g = torch.Generator().manual_seed(7)
    images, targets = [], []
    for i in range(WORLD * PER_RANK):
        images.append(torch.randn(3, IMAGE, IMAGE, generator=g))
        n = 1 + i % 3
        centers = 0.25 + 0.5 * torch.rand(n, 2, generator=g)
        sizes = 0.1 + 0.2 * torch.rand(n, 2, generator=g)
        targets.append({"boxes": torch.cat([centers, sizes], 1),
                        "labels": torch.randint(1, 5, (n,), generator=g)})
    return images, targets


def _model(args):
    torch.manual_seed(0)  # same initial weights in every process
    model, criterion, _ = build_model(args)
    return model, criterion


def _step(model, criterion, images, targets):
    """One plain SGD step on the weighted DETR loss (no clipping)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    outputs = model(nested_tensor_from_tensor_list(images))
    loss_dict = criterion(outputs, targets)
    loss = sum(weighted(loss_dict, criterion.weight_dict).values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _worker(rank, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    args = _args()
    udist.init_distributed_mode(args)
    try:
        assert args.distributed and args.world_size == WORLD and args.rank == rank
        model, criterion = _model(args)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        images, targets = _batch()
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        _step(ddp, criterion, images[mine], targets[mine])
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        udist.cleanup()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_step_equals_single_process_on_union_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    args = _args()
    model, criterion = _model(args)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    images, targets = _batch()
    _step(model, criterion, images, targets)
    reference = model.state_dict()

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    changed = [k for k in reference if not torch.equal(reference[k], initial[k])]
    assert len(changed) > 0.5 * len(reference), "the step should move most parameters"
    # the comparison can tell batches apart: a step on rank 0's half alone lands elsewhere
    half, _ = _model(args)
    _step(half, criterion, images[:PER_RANK], targets[:PER_RANK])
    assert any(not torch.allclose(half.state_dict()[k], reference[k], atol=1e-4) for k in changed)
    for name, value in reference.items():
        for r in range(WORLD):
            torch.testing.assert_close(ranks[r][name], value, atol=1e-5, rtol=1e-4, msg=f"rank {r}: {name}")


# ---------------------------------------------------------------------------- launcher detection

@pytest.mark.quick
def test_torchrun_variables_win_over_slurm_step():
    # one srun task running torchrun: the step has 1 task, torchrun says 2 processes
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29400",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_ID": "0",
           "SLURM_LOCALID": "0", "SLURM_JOB_ID": "42"}
    got = udist._launcher_env(env)
    assert (got["rank"], got["world_size"], got["local_rank"]) == (1, 2, 1)
    assert (got["master_addr"], got["master_port"], got["init_method"]) == ("10.0.0.5", 29400, "env://")


def _slurm_step(procid, ntasks, job_id, array_job=None, array_task=None):
    env = {"SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks), "SLURM_STEP_NUM_TASKS": str(ntasks),
           "SLURM_STEP_ID": "0", "SLURM_LOCALID": str(procid % 4), "SLURM_JOB_ID": str(job_id),
           "SLURM_LAUNCH_NODE_IPADDR": "10.9.8.7"}
    if array_job is not None:
        env.update(SLURM_ARRAY_JOB_ID=str(array_job), SLURM_ARRAY_TASK_ID=str(array_task))
    return env


@pytest.mark.quick
def test_slurm_multi_task_step():
    got = udist._launcher_env(_slurm_step(procid=5, ntasks=8, job_id=1234))
    assert (got["rank"], got["world_size"], got["local_rank"]) == (5, 8, 1)
    expected_port = 20000 + (1234 * 131) % 20000
    assert got["master_port"] == expected_port
    # no node list in the environment: the launch node's address
    assert got["init_method"] == f"tcp://10.9.8.7:{expected_port}"


def test_slurm_array_tasks_on_one_node_get_different_ports():
    # array tasks share SLURM_ARRAY_JOB_ID; their own job ids differ
    ports = {udist._launcher_env(_slurm_step(0, 4, job_id=900 + t, array_job=900, array_task=t))["master_port"]
             for t in range(50)}
    assert len(ports) == 50
    assert all(20000 <= p < 40000 for p in ports)
    # the same array task (e.g. after a requeue) keeps its port
    a = udist._launcher_env(_slurm_step(0, 4, job_id=903, array_job=900, array_task=3))["master_port"]
    assert a == udist._launcher_env(_slurm_step(1, 4, job_id=903, array_job=900, array_task=3))["master_port"]


def test_master_port_env_overrides_derived_port():
    env = dict(_slurm_step(0, 2, job_id=77), MASTER_PORT="31337")
    assert udist._launcher_env(env)["master_port"] == 31337


@pytest.mark.parametrize("env", [
    {},  # plain python
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "5", "SLURM_LOCALID": "0"},  # sbatch script, no srun
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_ID": "0",
     "SLURM_JOB_ID": "5"},  # srun -n 1
], ids=["no-launcher", "sbatch-batch-script", "srun-single-task"])
def test_single_process_is_not_distributed(env, monkeypatch):
    for key in list(os.environ):
        if key.startswith("SLURM_") or key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = _args()
    udist.init_distributed_mode(args)
    assert (args.distributed, args.world_size, args.rank, args.gpu) == (False, 1, 0, 0)
    assert not udist.is_dist_avail_and_initialized()
