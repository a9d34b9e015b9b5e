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
from attnserve.server.api.records import RequestLimits, SamplingDefaults
from attnserve.server.engine.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig, StreamConfig

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
    http_host: str = "0.0.0.0"
    http_port: int | None = 8080  # the OpenAI-compatible door; None = off
    explorer: bool = True  # the attention explorer page at / on the HTTP port (--no-explorer: off)
    vllm_metric_names: bool = False  # also export the gauges under vLLM's names (inference gateway)
    device: str = "cpu"
    dtype: str | None = None
    shutdown_timeout: float = 30.0
    stall_timeout: float = 30.0
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_token_file: str | None = None
    log_level: str = "INFO"
    limits: RequestLimits = field(default_factory=RequestLimits)
    # Sampling defaults set by flags: they win over the model's generation_config.json.
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    engine: EngineConfig = field(default_factory=EngineConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port", "http_port"):
            if not 0 <= (getattr(self, name) or 0) <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {getattr(self, name)}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.shutdown_timeout < 0 or self.stall_timeout <= 0:
            raise ValueError("shutdown_timeout must be >= 0 and stall_timeout > 0")
        if self.limits.max_request_bytes < 1024:
            raise ValueError("max_message_bytes must be at least 1024")


_SERVER, _LIMITS, _DEFAULTS = ServerConfig(model=""), RequestLimits(), SamplingDefaults()
_SCHED, _CACHE, _STREAM, _PARALLEL = SchedulerConfig(), CacheConfig(), StreamConfig(), ParallelConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m server",
        description="attnserve gRPC inference server",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _process_flags(p.add_argument_group("process"))
    _engine_flags(p.add_argument_group("engine"))
    _parallel_flags(p.add_argument_group("tensor parallelism (one rank per device; across nodes: as torchrun)"))
    _limit_flags(p.add_argument_group("request limits"))
    _sampling_flags(p.add_argument_group("sampling defaults (unset: the model's generation_config.json, else these)"))
    return p


def _process_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--model", default=str(default_model_path()), help="a .gguf file, an HF folder, or dummy:NAME")
    g.add_argument("--host", default=_SERVER.host, help="gRPC bind address")
    g.add_argument("--port", type=int, default=_SERVER.port, help="gRPC port")
    g.add_argument("--metrics-host", default=_SERVER.metrics_host, help="Prometheus /metrics bind address")
    g.add_argument("--metrics-port", type=int, default=_SERVER.metrics_port, help="Prometheus /metrics port")
    g.add_argument("--http-host", default=_SERVER.http_host, help="OpenAI-compatible HTTP bind address")
    g.add_argument("--http-port", type=int, default=_SERVER.http_port, help="OpenAI-compatible HTTP port (0: off)")
    g.add_argument(
        "--no-explorer", action="store_true", help="do not serve the attention explorer page at / on the HTTP port"
    )
    g.add_argument(
        "--vllm-metric-names",
        action="store_true",
        help="also export vllm:num_requests_waiting, vllm:num_requests_running and vllm:kv_cache_usage_perc "
        "(what the Kubernetes inference gateway's endpoint picker reads)",
    )
    g.add_argument("--device", default=_SERVER.device, help="cpu, cuda, cuda:N")
    g.add_argument("--dtype", default=_SERVER.dtype, help="float32 or bfloat16 (default: bf16 where native)")
    g.add_argument("--shutdown-timeout", type=float, default=_SERVER.shutdown_timeout, help="seconds to drain")
    g.add_argument(
        "--stall-timeout",
        type=float,
        default=_SERVER.stall_timeout,
        help="health turns NOT_SERVING if no step completes for this long while requests wait",
    )
    g.add_argument("--tls-cert", default=None, help="PEM certificate chain (enables TLS with --tls-key)")
    g.add_argument("--tls-key", default=None, help="PEM private key")
    g.add_argument("--auth-token-file", default=None, help="file holding the bearer token clients must send")
    g.add_argument("--log-level", default=_SERVER.log_level, choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _engine_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens per request")
    g.add_argument("--max-num-seqs", type=int, default=_SCHED.max_num_seqs, help="requests running at once")
    g.add_argument("--max-num-batched-tokens", type=int, default=_SCHED.max_num_batched_tokens, help="per step")
    g.add_argument("--max-num-waiting", type=int, default=_SCHED.max_num_waiting, help="queued before refusing")
    g.add_argument(
        "--max-attention-scores-per-step",
        type=int,
        default=_SCHED.max_attention_scores_per_step,
        help="query x key x layer x head scores the explicit attention path computes per step",
    )
    g.add_argument("--block-size", type=int, default=_CACHE.block_size, help="tokens per KV cache block")
    g.add_argument(
        "--kv-cache-memory",
        type=parse_bytes,
        default=None,
        help=f"KV cache size (e.g. 1GiB); default {_CACHE.cpu_kv_cache_memory >> 30}GiB on CPU, "
        "--gpu-memory-utilization on CUDA",
    )
    g.add_argument(
        "--gpu-memory-utilization", type=float, default=_CACHE.gpu_memory_utilization, help="of free GPU memory"
    )
    g.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    g.add_argument(
        "--graph-decode",
        choices=["auto", "on", "off"],
        default="auto",
        help="decode steps on static bucketed inputs, captured as CUDA graphs (auto: on CUDA only)",
    )
    g.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="the name(s) clients send as `model` (the first is reported); default: the model file's or "
        "folder's stem, and a GGUF's general.name as an alias",
    )
    g.add_argument(
        "--batch-invariant",
        choices=["on", "off"],
        default="on",
        help="on: a request's tokens never depend on its batch, chunking or the prefix cache (CPU); "
        "off: faster prefill attention whose sums follow each chunk's shape",
    )
    g.add_argument(
        "--max-stream-backlog-tokens",
        type=int,
        default=_STREAM.max_backlog_tokens,
        help="tokens a slow reader may fall behind before its request pauses",
    )
    g.add_argument(
        "--max-stream-backlog-bytes",
        type=parse_bytes,
        default=_STREAM.max_backlog_bytes,
        help="attention bytes a slow reader may fall behind before its request pauses",
    )
    g.add_argument(
        "--stalled-reader-timeout",
        type=float,
        default=_STREAM.stalled_timeout_s,
        help="seconds a paused request waits for its reader before it is ended",
    )


def _parallel_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=_PARALLEL.tensor_parallel_size,
        help="split the model across this many ranks (devices): NCCL on CUDA, gloo on CPU (for tests)",
    )
    g.add_argument("--nnodes", type=int, default=_PARALLEL.nnodes, help="nodes the ranks are spread over")
    g.add_argument(
        "--node-rank", type=int, default=_PARALLEL.node_rank, help="this node's index (0: the one that serves)"
    )
    g.add_argument("--master-addr", default=_PARALLEL.master_addr, help="node 0's address, where ranks meet")
    g.add_argument(
        "--master-port", type=int, default=None, help="node 0's rendezvous port (default: free on one node, else 29500)"
    )


def _limit_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--max-message-bytes", type=parse_bytes, default=_LIMITS.max_request_bytes, help="largest request message"
    )
    g.add_argument(
        "--max-response-bytes", type=parse_bytes, default=_LIMITS.max_response_bytes, help="largest response message"
    )
    g.add_argument("--max-stop-strings", type=int, default=_LIMITS.max_stop_strings, help="stop strings per request")
    g.add_argument("--max-stop-string-chars", type=int, default=_LIMITS.max_stop_string_chars, help="per stop string")
    g.add_argument("--max-logprobs", type=int, default=_LIMITS.max_logprobs, help="top logprobs per token")
    g.add_argument("--max-n", type=int, default=_LIMITS.max_n, help="completions per request")
    g.add_argument(
        "--default-max-tokens",
        type=int,
        default=_LIMITS.default_max_tokens,
        help="max_tokens of a request that sets none (capped by the context)",
    )
    g.add_argument(
        "--max-attention-bytes-per-request",
        type=parse_bytes,
        default=_LIMITS.max_attention_bytes_per_request,
        help="attention weights one request may ask for",
    )
    g.add_argument(
        "--attention-memory-budget",
        type=parse_bytes,
        default=_LIMITS.attention_memory_budget,
        help="attention weights all requests together may hold",
    )


def _sampling_flags(g: argparse._ArgumentGroup) -> None:
    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        g.add_argument(
            f"--default-{name.replace('_', '-')}", type=float, default=None, help=f"({getattr(_DEFAULTS, name)})"
        )
    g.add_argument("--default-top-k", type=int, default=None, help=f"({_DEFAULTS.top_k})")


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
        elif action.nargs == "+":  # a list flag: comma-separated in the environment
            action.default = [part.strip() for part in raw.split(",") if part.strip()]
        else:
            try:
                action.default = action.type(raw) if action.type else raw
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"{env}={raw!r}: {exc}")


def _engine_config(a: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        scheduler=SchedulerConfig(
            max_num_batched_tokens=a.max_num_batched_tokens,
            max_num_seqs=a.max_num_seqs,
            max_num_waiting=a.max_num_waiting,
            max_attention_scores_per_step=a.max_attention_scores_per_step,
        ),
        cache=CacheConfig(
            block_size=a.block_size,
            kv_cache_memory=a.kv_cache_memory,
            gpu_memory_utilization=a.gpu_memory_utilization,
            enable_prefix_caching=not a.no_prefix_caching,
        ),
        stream=StreamConfig(
            max_backlog_tokens=a.max_stream_backlog_tokens,
            max_backlog_bytes=a.max_stream_backlog_bytes,
            stalled_timeout_s=a.stalled_reader_timeout,
        ),
        max_model_len=a.max_model_len,
        graph_decode={"auto": None, "on": True, "off": False}[a.graph_decode],
        batch_invariant=a.batch_invariant == "on",
        served_model_names=tuple(a.served_model_name or ()),
    )


def _request_limits(a: argparse.Namespace) -> RequestLimits:
    return RequestLimits(
        max_stop_strings=a.max_stop_strings,
        max_stop_string_chars=a.max_stop_string_chars,
        max_logprobs=a.max_logprobs,
        default_max_tokens=a.default_max_tokens,
        max_n=a.max_n,
        max_attention_bytes_per_request=a.max_attention_bytes_per_request,
        attention_memory_budget=a.attention_memory_budget,
        max_request_bytes=a.max_message_bytes,
        max_response_bytes=a.max_response_bytes,
    )


def parse_config(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> ServerConfig:
    parser = build_parser()
    _env_defaults(parser, dict(os.environ if environ is None else environ))
    a = parser.parse_args(argv)
    try:
        defaults = {
            name: value
            for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
            if (value := getattr(a, f"default_{name}")) is not None
        }
        return ServerConfig(
            model=a.model,
            host=a.host,
            port=a.port,
            metrics_host=a.metrics_host,
            metrics_port=a.metrics_port,
            http_host=a.http_host,
            http_port=a.http_port or None,
            explorer=not a.no_explorer,
            vllm_metric_names=a.vllm_metric_names,
            device=a.device,
            dtype=a.dtype,
            shutdown_timeout=a.shutdown_timeout,
            stall_timeout=a.stall_timeout,
            tls_cert=a.tls_cert,
            tls_key=a.tls_key,
            auth_token_file=a.auth_token_file,
            log_level=a.log_level,
            limits=_request_limits(a),
            sampling_defaults=defaults,
            engine=_engine_config(a),
            parallel=ParallelConfig(
                tensor_parallel_size=a.tensor_parallel_size,
                nnodes=a.nnodes,
                node_rank=a.node_rank,
                master_addr=a.master_addr,
                master_port=a.master_port,
            ),
        )
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
