"""Process-group set-up from torchrun's environment, and the `--gpus` launcher."""

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ldm.train.config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> DistEnv:
    """Read RANK / LOCAL_RANK / WORLD_SIZE (set by torchrun) and join the process group:
    NCCL on CUDA, gloo on the CPU. A plain `python main.py` is a world of one."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"--device {device}: not a device (cpu or cuda)") from None
    if kind == "cuda" and local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {device}: CUDA device {local_rank} is not available "
            f"({torch.cuda.device_count()} visible); use --device cpu"
        )
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    env = DistEnv(rank, local_rank, world_size, torch.device(device))
    if env.is_distributed and not dist.is_initialized():
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        kwargs = {"device_id": env.device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return env


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.is_distributed:
        dist.barrier()


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank if `flag` is true on any rank."""
    if not env.is_distributed:
        return flag
    value = torch.tensor([int(flag)], device=env.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(obj, env: DistEnv) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not env.is_distributed:
        return [obj]
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, env: DistEnv):
    """Rank 0's `obj` on every rank."""
    if not env.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Average a tensor across ranks (for logging)."""
    if not env.is_distributed:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / env.world_size


def launch_per_gpu(gpus: list[int], argv: list[str]) -> int:
    """Re-run this command under torchrun with one process per listed GPU; the exit code."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={len(gpus)}",
        *argv,
    ]
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}
    return subprocess.call(command, env=environment)


def parse_gpus(value: str | None, device: str | None = None) -> list[int]:
    """ "0,1" -> [0, 1]; a trailing comma (Lightning style, "0,") is allowed. The ids must be
    visible CUDA devices, unless `--device cpu` asks for CPU processes (tests, debugging)."""
    if not value:
        return []
    try:
        gpus = [int(g) for g in value.split(",") if g.strip()]
    except ValueError:
        raise ConfigError(
            f"--gpus: expected a comma-separated list of GPU ids, got {value!r}"
        ) from None
    missing = [g for g in gpus if g < 0 or g >= torch.cuda.device_count()]
    if missing and device != "cpu":
        raise ConfigError(
            f"--gpus {value}: no CUDA device {missing[0]} ({torch.cuda.device_count()} visible); "
            "add --device cpu for CPU processes"
        )
    return gpus
