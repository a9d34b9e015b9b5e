"""Server configuration: command-line flags with ATTNSERVE_* environment fallbacks.

Read once at start-up into frozen dataclasses. Every flag ``--some-flag`` can also be
set as ``ATTNSERVE_SOME_FLAG``; the command line wins. Flags take their defaults from
the dataclasses (one source for defaults and limits). Nothing here imports torch, so
``python -m server --help`` is quick.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from attnserve.model.fetch import default_model_path
from attnserve.server.api.validation import RequestLimits
from attnserve.server.engine.config import CacheConfig, EngineConfig, SchedulerConfig

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "KI": 1024,
    "KIB": 1024,
    "M": 1000**2,
    "MB": 1000**2,
    "MI": 1024**2,
    "MIB": 1024**2,
    "G": 1000**3,
    "GB": 1000**3,
    "GI": 1024**3,
    "GIB": 1024**3,
    "T": 1000**4,
    "TB": 1000**4,
    "TI": 1024**4,
    "TIB": 1024**4,
}


def parse_bytes(text: str) -> int:
    """'1073741824', '1GiB', '512MiB', '2G' -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1GiB or 512MiB)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").upper()])


@dataclass(frozen=True)
class ServerConfig:
    model: str
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 8000
    device: str = "cpu"
    dtype: str | None = None
    shutdown_timeout: float = 30.0
    stall_timeout: float = 30.0
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_token_file: str | None = None
    max_message_bytes: int = 4 << 20
    log_level: str = "INFO"
    limits: RequestLimits = field(default_factory=RequestLimits)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {getattr(self, name)}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.shutdown_timeout < 0 or self.stall_timeout <= 0:
            raise ValueError("shutdown_timeout must be >= 0 and stall_timeout > 0")
        if self.max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be at least 1024")


_SERVER, _LIMITS = ServerConfig(model=""), RequestLimits()
_SCHED, _CACHE = SchedulerConfig(), CacheConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m server",
        description="attnserve gRPC inference server",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=str(default_model_path()), help="a .gguf file, an HF folder, or dummy:NAME")
    p.add_argument("--host", default=_SERVER.host, help="gRPC bind address")
    p.add_argument("--port", type=int, default=_SERVER.port, help="gRPC port")
    p.add_argument("--metrics-host", default=_SERVER.metrics_host, help="Prometheus /metrics bind address")
    p.add_argument("--metrics-port", type=int, default=_SERVER.metrics_port, help="Prometheus /metrics port")
    p.add_argument("--device", default=_SERVER.device, help="cpu, cuda, cuda:N")
    p.add_argument(
        "--dtype", default=_SERVER.dtype, help="float32 or bfloat16 (default: bf16 where the hardware has it)"
    )
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens per request")
    p.add_argument("--max-num-seqs", type=int, default=_SCHED.max_num_seqs, help="requests running at once")
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=_SCHED.max_num_batched_tokens, help="tokens per engine step"
    )
    p.add_argument(
        "--max-num-waiting", type=int, default=_SCHED.max_num_waiting, help="queued requests before RESOURCE_EXHAUSTED"
    )
    p.add_argument("--block-size", type=int, default=_CACHE.block_size, help="tokens per KV cache block")
    p.add_argument(
        "--kv-cache-memory",
        type=parse_bytes,
        default=None,
        help=f"KV cache size (e.g. 1GiB); default {_CACHE.cpu_kv_cache_memory >> 30}GiB on CPU, "
        "--gpu-memory-utilization on CUDA",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=_CACHE.gpu_memory_utilization,
        help="fraction of free GPU memory for KV",
    )
    p.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=_SERVER.shutdown_timeout,
        help="seconds in-flight requests get on SIGTERM",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=_SERVER.stall_timeout,
        help="health turns NOT_SERVING if no step completes for this long while requests wait",
    )
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain (enables TLS with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key")
    p.add_argument("--auth-token-file", default=None, help="file holding the bearer token clients must send")
    p.add_argument(
        "--max-message-bytes", type=parse_bytes, default=_SERVER.max_message_bytes, help="largest request message"
    )
    p.add_argument("--max-stop-strings", type=int, default=_LIMITS.max_stop_strings, help="stop strings per request")
    p.add_argument(
        "--max-stop-string-chars", type=int, default=_LIMITS.max_stop_string_chars, help="characters per stop string"
    )
    p.add_argument("--max-logprobs", type=int, default=_LIMITS.max_logprobs, help="top logprobs per token")
    p.add_argument(
        "--default-max-tokens",
        type=int,
        default=_LIMITS.default_max_tokens,
        help="max_tokens of a request that sets none (capped by the context)",
    )
    p.add_argument("--log-level", default=_SERVER.log_level, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def env_name(dest: str) -> str:
    return "ATTNSERVE_" + dest.upper()


def flag_env_names() -> set[str]:
    """Every ATTNSERVE_* variable the server reads (one per flag)."""
    return {env_name(a.dest) for a in build_parser()._actions if a.option_strings and a.dest != "help"}


def _env_defaults(parser: argparse.ArgumentParser, environ: dict[str, str]) -> None:
    """Let ATTNSERVE_<FLAG> set a flag's default (so the command line still wins)."""
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        env = env_name(action.dest)
        if env not in environ:
            continue
        raw = environ[env]
        if isinstance(action, argparse._StoreTrueAction):
            action.default = raw.strip().lower() in ("1", "true", "yes", "on")
        else:
            try:
                action.default = action.type(raw) if action.type else raw
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"{env}={raw!r}: {exc}")


def parse_config(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> ServerConfig:
    parser = build_parser()
    _env_defaults(parser, dict(os.environ if environ is None else environ))
    a = parser.parse_args(argv)
    try:
        engine = EngineConfig(
            scheduler=SchedulerConfig(
                max_num_batched_tokens=a.max_num_batched_tokens,
                max_num_seqs=a.max_num_seqs,
                max_num_waiting=a.max_num_waiting,
            ),
            cache=CacheConfig(
                block_size=a.block_size,
                kv_cache_memory=a.kv_cache_memory,
                gpu_memory_utilization=a.gpu_memory_utilization,
                enable_prefix_caching=not a.no_prefix_caching,
            ),
            max_model_len=a.max_model_len,
        )
        limits = RequestLimits(
            max_stop_strings=a.max_stop_strings,
            max_stop_string_chars=a.max_stop_string_chars,
            max_logprobs=a.max_logprobs,
            default_max_tokens=a.default_max_tokens,
        )
        return ServerConfig(
            model=a.model,
            host=a.host,
            port=a.port,
            metrics_host=a.metrics_host,
            metrics_port=a.metrics_port,
            device=a.device,
            dtype=a.dtype,
            shutdown_timeout=a.shutdown_timeout,
            stall_timeout=a.stall_timeout,
            tls_cert=a.tls_cert,
            tls_key=a.tls_key,
            auth_token_file=a.auth_token_file,
            max_message_bytes=a.max_message_bytes,
            log_level=a.log_level,
            limits=limits,
            engine=engine,
        )
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
