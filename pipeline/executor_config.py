"""The `executor:` section of a recipe (where a run's shards run) and the executor it names.

Apart from `pipeline/executor.py` because it names every executor, Ray's included, while each executor needs the
seam's types: one module for both would import itself through `pipeline.ray_executor`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config_base import RecipeError, Strict
from pipeline.executor import Executor, LocalExecutor, Shard


class ExecutorConfig(Strict):
    """Where a run's shards run; saved in the run's recipe.yaml (without `shard`), so verify runs the same way."""

    type: Literal["local", "ray"] = Field("local", description="local: this process; ray: Ray actors")
    shards: int | None = Field(
        None, ge=1, description="problems split into this many shards by id hash; default 1 (ray: 4 per worker)"
    )
    shard: int | None = Field(
        None, ge=0, description="do only this shard (a scheduler array task: shard=I/N sets shard and shards)"
    )
    workers: int = Field(1, ge=1, description="ray: actors, each with its own engine")
    address: str | None = Field(None, description="ray: address of an existing cluster; default: start a local one")
    cpus_per_worker: float = Field(1, gt=0, description="ray: CPUs each actor reserves")
    gpus_per_worker: float | None = Field(
        None, ge=0, description="ray: GPUs per actor; default: teacher.tensor_parallel_size on a GPU, else 0"
    )
    max_restarts: int = Field(3, ge=0, description="ray: restarts of a dead actor, which resumes its shard")

    @model_validator(mode="after")
    def _shard_in_range(self) -> ExecutorConfig:
        if self.shards is None:  # several shards a worker, so a fast worker takes more of them
            self.shards = 4 * self.workers if self.type == "ray" else 1
        if self.shard is not None and self.shard >= self.shards:
            raise ValueError(f"shard {self.shard} of {self.shards}: need 0 <= shard < shards")
        if self.type == "ray" and self.shard is not None:
            raise ValueError("executor.shard is one scheduler array task (type local); ray runs every shard")
        return self

    def shard_list(self) -> list[Shard]:
        """The shards this process is to run: the one `shard`, or all of them."""
        if self.shard is not None:
            return [Shard(self.shard, self.shards)]
        return [Shard(i, self.shards) for i in range(self.shards)]


def parse_shard_override(value: str) -> list[str]:
    """`shard=I/N` on the command line (Slurm: shard=$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT) as the two
    recipe overrides it stands for."""
    index, sep, count = value.partition("/")
    if not (sep and index.strip().isdigit() and count.strip().isdigit()):
        raise RecipeError(f"shard={value}: expected shard=I/N with 0 <= I < N, e.g. shard=0/4")
    if not int(index) < int(count):
        raise RecipeError(f"shard={value}: need 0 <= I < N")
    return [f"executor.shard={int(index)}", f"executor.shards={int(count)}"]


def make_executor(cfg: ExecutorConfig, gpus_per_worker: float = 0) -> Executor:
    """The executor a recipe's `executor:` section names; `gpus_per_worker`: the default when it names none."""
    if cfg.type == "ray":
        from pipeline.ray_executor import RayExecutor

        gpus = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else gpus_per_worker
        return RayExecutor(
            cfg.shard_list(),
            workers=cfg.workers,
            address=cfg.address,
            cpus_per_worker=cfg.cpus_per_worker,
            gpus_per_worker=gpus,
            max_restarts=cfg.max_restarts,
        )
    return LocalExecutor(cfg.shard_list())
