"""Engine configuration: plain frozen dataclasses, importable without torch.

These are the one source of defaults and limits: the server's flags take their
defaults from here (server/config.py), and the engine derives what depends on the
loaded model (the context length) with ``dataclasses.replace``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 512  # tokens per step (prefill chunks + decodes)
    max_num_seqs: int = 64  # requests running at once
    max_num_waiting: int = 256  # requests queued before admission is refused
    max_model_len: int = 2048  # prompt + output tokens of one request
    # Attention scores (query x key x layer x head) the explicit path may compute in one step
    # for prompt rows: a long prompt asking for them is chunked by this, not only by tokens,
    # so its step stays as short (and as small in memory) as any other prefill's.
    max_attention_scores_per_step: int = 1 << 25
    num_attention_heads: int = 1  # the model's; set by the engine

    def __post_init__(self) -> None:
        for name in (
            "max_num_batched_tokens",
            "max_num_seqs",
            "max_num_waiting",
            "max_model_len",
            "max_attention_scores_per_step",
            "num_attention_heads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None = derive from gpu_memory_utilization or the CPU default
    gpu_memory_utilization: float = 0.85  # fraction of free GPU memory after the weights (CUDA only)
    cpu_kv_cache_memory: int = 1 << 30  # default budget on CPU
    enable_prefix_caching: bool = True
    # Where every layer is windowed, give back the blocks that fell out of the window as a request
    # moves on (bounded KV per request); off only to compare.
    release_out_of_window_blocks: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class StreamConfig:
    """Back-pressure: what the engine holds for one reader before it stops computing for it."""

    max_backlog_tokens: int = 256  # tokens produced but not yet taken by the door
    max_backlog_bytes: int = 16 << 20  # attention bytes produced but not yet taken
    stalled_timeout_s: float = 60.0  # a request held back this long is ended (FinishReason.STALLED)

    def __post_init__(self) -> None:
        if self.max_backlog_tokens < 1 or self.max_backlog_bytes < 1 or self.stalled_timeout_s <= 0:
            raise ValueError("stream backlog limits and the stalled-reader timeout must be > 0")


@dataclass(frozen=True)
class EngineConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    max_model_len: int | None = None  # None = the model's context, capped by the cache size
    # Decode steps on static inputs padded to bucket sizes, captured as CUDA graphs.
    # None = on CUDA, off on CPU (where padding buys nothing; tests turn it on to check the path).
    graph_decode: bool | None = None
    # Every reduction in one order per row whatever the batch, chunking or prefix cache (CPU).
    # False takes the faster prefill attention whose result follows the chunk's shape.
    batch_invariant: bool = True
    # The names clients may send as `model`; the first is the one reported. Empty: the model's own
    # name (the file or folder stem) and its aliases.
    served_model_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism: ``tensor_parallel_size`` ranks, one per device, spread evenly over ``nnodes``
    nodes. Node 0's first rank runs the scheduler and the doors; every other rank is a worker."""

    tensor_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"  # where rank 0 listens for the others (the leader pod's address)
    master_port: int | None = None  # None: a free port on one node, 29500 across nodes

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1 or self.nnodes < 1:
            raise ValueError("tensor_parallel_size and nnodes must be >= 1")
        if self.tensor_parallel_size % self.nnodes:
            raise ValueError(
                f"tensor_parallel_size {self.tensor_parallel_size} must be a multiple of nnodes {self.nnodes}"
            )
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, {self.nnodes - 1}], got {self.node_rank}")
        if self.master_port is not None and not 0 < self.master_port <= 65535:
            raise ValueError(f"master_port must be in [1, 65535], got {self.master_port}")

    @property
    def ranks_per_node(self) -> int:
        return self.tensor_parallel_size // self.nnodes
