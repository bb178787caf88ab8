"""The flags `bimode curate` and `bimode eval` share for running beyond one process (docs/cluster.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from bimode.errors import UsageError


@dataclass
class ClusterConfig:
    """Where the batches run: this process, a Ray cluster, or one shard of K started by a scheduler."""

    ray_address: str | None = field(default=None, metadata={
        "help": "run the batches on Ray actors: `local` starts a Ray cluster on this machine (127.0.0.1), `auto` "
                "joins the one `ray start` runs here, or a cluster address (ray://HOST:PORT); needs bimode[ray]"})
    num_workers: int = field(default=1, metadata={"help": "Ray actors, each with its own model or endpoint client"})
    ray_cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs Ray reserves for each actor"})
    ray_gpus_per_worker: float = field(default=0.0, metadata={
        "help": "GPUs Ray reserves for each actor (1 for a local model or vllm:DIR on a GPU cluster)"})
    num_shards: int = field(default=1, metadata={
        "help": "split the run into K shards started apart (SLURM arrays, indexed jobs); each writes its own --out, "
                "combined by `merge`"})
    shard_index: int = field(default=0, metadata={"help": "which shard this process runs (0 .. num_shards - 1)"})

    def __post_init__(self):
        if self.num_workers < 1:
            raise UsageError(f"num_workers must be at least 1, got {self.num_workers}")
        if self.num_workers > 1 and not self.ray_address:
            raise UsageError(f"num_workers {self.num_workers} needs --ray_address (local, auto or a cluster address)")
        if self.num_shards < 1:
            raise UsageError(f"num_shards must be at least 1, got {self.num_shards}")
        if not 0 <= self.shard_index < self.num_shards:
            raise UsageError(f"shard_index must be in 0 .. {self.num_shards - 1}, got {self.shard_index}")
        if self.ray_cpus_per_worker <= 0 or self.ray_gpus_per_worker < 0:
            raise UsageError("ray_cpus_per_worker must be positive and ray_gpus_per_worker not negative")


def make_pool(worker, cluster: ClusterConfig):
    """Where a command's batches run: Ray actors that each build `worker()` (with --ray_address), else this process,
    where `worker()` is built once here."""
    from bimode.parallel.pool import LocalPool, RayPool

    if cluster.ray_address:
        return RayPool(worker, cluster.ray_address, cluster.num_workers, cluster.ray_cpus_per_worker,
                       cluster.ray_gpus_per_worker)
    return LocalPool(worker())
