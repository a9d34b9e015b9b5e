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

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_num_waiting", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None = derive from gpu_memory_utilization or the CPU default
    gpu_memory_utilization: float = 0.85  # fraction of free GPU memory after the weights (CUDA only)
    cpu_kv_cache_memory: int = 1 << 30  # default budget on CPU
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class EngineConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    max_model_len: int | None = None  # None = the model's context, capped by the cache size
