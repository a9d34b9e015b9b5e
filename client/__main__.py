"""attnserve command line client.

python -m client generate "What is the capital of France?" --chat --stream
python -m client chat
python -m client info
python -m client generate "Hello" --http http://localhost:8080 --stream   # the OpenAI-compatible door
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from attnserve.client.client import DEFAULT_TARGET, AttnserveError, Client
from attnserve.client.inspection import Ablate, Steer
from attnserve.client.openai_http import cli_generate, cli_info, http_url
from attnserve.v1 import generate_pb2 as pb

_HTTP_HELP = "call the OpenAI-compatible HTTP door at this base URL, e.g. http://localhost:8080"


def _client(args: argparse.Namespace) -> Client:
    token = args.token
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    root = Path(args.ca).read_bytes() if args.ca else None
    return Client(args.target, token=token, tls=args.tls, root_certificates=root, timeout=args.timeout)


def _sampling(args: argparse.Namespace) -> dict:
    return dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop or (),
        ignore_eos=args.ignore_eos,
        **({"n": args.n} if getattr(args, "n", None) else {}),
    )


def finish_name(reason: int) -> str:
    """FINISH_REASON_STOP -> 'stop'."""
    return pb.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


def _summary(usage: pb.Usage, timings: pb.Timings, finishes: list[int]) -> str:
    ttft = f"{timings.time_to_first_token_seconds:.3f}s" if timings.HasField("time_to_first_token_seconds") else "-"
    names = ", ".join(finish_name(f) for f in finishes)
    return (
        f"[{usage.completion_tokens} tokens, finish {names}, ttft {ttft}, total {timings.total_seconds:.3f}s, "
        f"{usage.prompt_tokens} prompt tokens ({usage.cached_tokens} cached)]"
    )


def _head(text: str) -> str | int:
    from attnserve.client.heatmap import parse_head

    try:
        return parse_head(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _reduction(args: argparse.Namespace) -> str:
    """The lightest ask that draws the heatmap: the server reduces the heads unless each one is drawn."""
    return "none" if args.attention_grid or isinstance(args.attention_head, int) else args.attention_head


def _layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give layer indices separated by commas, e.g. 0,12,-1") from None


def _ablation(text: str) -> Ablate:
    """'LAYER:H1,H2[:SCALE]' -> Ablate."""
    parts = text.split(":")
    try:
        scale = float(parts[2]) if len(parts) > 2 else 0.0
        return Ablate(int(parts[0]), [int(h) for h in parts[1].split(",")], scale)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"{text!r}: use LAYER:HEAD,HEAD[:SCALE], e.g. 3:0,5") from None


def _steering(text: str) -> Steer:
    """'LAYER:SCALE:FILE[:POINT[:POSITIONS]]' -> Steer; FILE holds hidden_size numbers (text, or .npy)."""
    parts = text.split(":")
    try:
        layer, scale, path = int(parts[0]), float(parts[1]), Path(parts[2])
        if path.suffix == ".npy":
            import numpy as np

            vector = [float(v) for v in np.load(path).reshape(-1)]
        else:
            vector = [float(v) for v in path.read_text().replace(",", " ").split()]
        return Steer(layer, vector, scale, *(parts[3:5]))
    except (ValueError, IndexError, OSError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: use LAYER:SCALE:FILE[:POINT[:POSITIONS]] ({exc})") from None


def _print_lens(rows: list[pb.LensRow], labels: list[str]) -> None:
    """The logit lens as a table: one line per generated token, its top token at each asked layer."""
    layers = sorted({r.layer for r in rows})
    by_cell = {(r.position, r.layer): r for r in rows}
    positions = sorted({r.position for r in rows})
    print("logit lens (top token, probability) per layer:", file=sys.stderr)
    print("token".ljust(14) + "".join(f"L{layer}".ljust(18) for layer in layers), file=sys.stderr)
    for k, position in enumerate(positions):
        label = repr(labels[k]) if k < len(labels) else str(position)
        cells = []
        for layer in layers:
            row = by_cell.get((position, layer))
            cells.append(f"{row.token_ids[0]} {row.probs[0]:.2f}".ljust(18) if row else "".ljust(18))
        print(label[:13].ljust(14) + "".join(cells), file=sys.stderr)


def _constraint(args: argparse.Namespace) -> dict:
    """The gRPC constraint flags as build_request keywords (@FILE reads a file)."""

    def text(value: str) -> str:
        return Path(value[1:]).read_text() if value.startswith("@") else value

    out: dict = {}
    if args.json_schema is not None:
        out["json_schema"] = text(args.json_schema)
    if args.json_object:
        out["json_object"] = True
    if args.regex is not None:
        out["regex"] = args.regex
    if args.choice:
        out["choice"] = args.choice
    if args.grammar is not None:
        out["grammar"] = text(args.grammar)
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    kwargs = _sampling(args)
    constraint = _constraint(args)
    if url := http_url(args):
        if constraint:
            print("constraint flags are sent over gRPC only; drop --http", file=sys.stderr)
            return 2
        return cli_generate(args, url, kwargs)
    if args.logit_lens:
        kwargs.update(logit_lens_layers=args.logit_lens, logit_lens_top_k=1)
    if args.steer or args.ablate:
        kwargs.update(steering=args.steer or (), ablations=args.ablate or ())
    kwargs.update(constraint)
    if args.attention_png:
        kwargs.update(attention_layers=[args.attention_layer], head_reduction=_reduction(args), include_prompt=True)
    with _client(args) as client:
        labels: list[str] = []
        if args.attention_png:
            tokenized = client.tokenize(messages=[("user", args.prompt)]) if args.chat else client.tokenize(args.prompt)
            labels = list(tokenized.tokens)
        rows: list[pb.AttentionRow] = []
        lens: list[pb.LensRow] = []
        texts: list[str] = []
        if args.stream or args.attention_png:
            finishes, last = [], pb.GenerateStreamResponse()
            for chunk in client.generate_stream(args.prompt, chat=args.chat, **kwargs):
                print(chunk.text, end="", flush=True)
                rows.extend(chunk.attention)
                lens.extend(chunk.logit_lens)
                texts.extend([chunk.text] if len(chunk.token_ids) == 1 else [""] * len(chunk.token_ids))
                # One label per generated token: the message's text when it carries exactly one token.
                labels.extend([chunk.text] if len(chunk.token_ids) == 1 else [""] * len(chunk.token_ids))
                finishes += [chunk.finish_reason] if chunk.finish_reason else []
                last = chunk
            print()
            summary = _summary(last.usage, last.timings, finishes)
        else:
            reply = client.generate(args.prompt, chat=args.chat, **kwargs)
            for completion in reply.completions:
                print(("" if len(reply.completions) == 1 else f"[{completion.index}] ") + completion.text)
            lens.extend(reply.completions[0].logit_lens)
            summary = _summary(reply.usage, reply.timings, [c.finish_reason for c in reply.completions])
        if args.verbose:
            print(summary, file=sys.stderr)
        if lens:
            _print_lens(lens, texts)
        if args.attention_png:
            from attnserve.client.heatmap import render_png

            info = client.model_info()
            layer = args.attention_layer % info.num_layers
            try:
                render_png(
                    args.attention_png,
                    rows,
                    labels,
                    layer=layer,
                    head=args.attention_head,
                    hide_sink=args.attention_hide_sink,
                    log_scale=args.attention_log,
                    grid=args.attention_grid,
                )
            except ValueError as exc:  # a head index past the model's heads
                raise SystemExit(f"--attention-head: {exc}") from None
            print(f"attention heatmap written to {args.attention_png}", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    history: list[tuple[str, str]] = []
    with _client(args) as client:
        print("chat with the model; an empty line or Ctrl-D ends", file=sys.stderr)
        while True:
            try:
                line = input("you> ")
            except EOFError:
                break
            if not line.strip():
                break
            history.append(("user", line))
            print("model> ", end="", flush=True)
            reply = []
            for chunk in client.generate_stream(messages=history, **_sampling(args)):
                print(chunk.text, end="", flush=True)
                reply.append(chunk.text)
            print()
            history.append(("assistant", "".join(reply)))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    if url := http_url(args):
        return cli_info(args, url)
    with _client(args) as client:
        info = client.model_info()
        print(f"health: {client.health()}")
        for field in info.DESCRIPTOR.fields:
            print(f"{field.name}: {getattr(info, field.name)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client", description="attnserve client")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default=os.environ.get("ATTNSERVE_TARGET", DEFAULT_TARGET), help="host:port")
    common.add_argument("--token", default=os.environ.get("ATTNSERVE_TOKEN"), help="bearer token")
    common.add_argument("--token-file", default=None, help="file holding the bearer token")
    common.add_argument("--tls", action="store_true", help="use TLS (system roots unless --ca)")
    common.add_argument("--ca", default=None, help="PEM root certificate for TLS")
    common.add_argument("--timeout", type=float, default=None, help="deadline per call, seconds")
    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--max-tokens", type=int, default=None)
    sampling.add_argument("--temperature", type=float, default=None)
    sampling.add_argument("--top-k", type=int, default=None)
    sampling.add_argument("--top-p", type=float, default=None)
    sampling.add_argument("--min-p", type=float, default=None)
    sampling.add_argument("--repetition-penalty", type=float, default=None)
    sampling.add_argument("--seed", type=int, default=None)
    sampling.add_argument("--stop", action="append", help="stop string (repeatable)")
    sampling.add_argument("--ignore-eos", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", parents=[common, sampling], help="generate from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    gen.add_argument("--attention-png", default=None, help="write a heatmap of attention to this PNG")
    gen.add_argument("--attention-layer", type=int, default=-1, help="layer for --attention-png (default last)")
    gen.add_argument(
        "--attention-head", type=_head, default="mean", help="for --attention-png: mean, max or a head index"
    )
    gen.add_argument(
        "--attention-grid", action="store_true", help="for --attention-png: a small map of every head of the layer"
    )
    gen.add_argument(
        "--attention-hide-sink",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="for --attention-png: draw the first token's column (the attention sink) grey, out of the colour "
        "scale, as the explorer does (default; --no-attention-hide-sink puts it back on the scale)",
    )
    gen.add_argument(
        "--attention-log", action="store_true", help="for --attention-png: log colour scale (3 decades below the max)"
    )
    gen.add_argument(
        "--logit-lens",
        type=_layers,
        default=None,
        metavar="LAYERS",
        help="print each token's logit lens at these layers",
    )
    gen.add_argument(
        "--steer",
        type=_steering,
        action="append",
        metavar="LAYER:SCALE:FILE[:POINT[:POSITIONS]]",
        help="add SCALE x the vector in FILE (hidden_size numbers, text or .npy) to the residual stream (repeatable)",
    )
    gen.add_argument(
        "--ablate",
        type=_ablation,
        action="append",
        metavar="LAYER:HEADS[:SCALE]",
        help="remove (or scale) these heads' outputs at LAYER, e.g. 3:0,5 (repeatable)",
    )
    gen.add_argument("-n", type=int, default=None, help="completions to generate (printed one per line)")
    shape = gen.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", default=None, help="constrain to this JSON schema (JSON text, or @FILE)")
    shape.add_argument("--json-object", action="store_true", help="constrain to any JSON object")
    shape.add_argument("--regex", default=None, help="constrain the whole output to this regex")
    shape.add_argument("--choice", action="append", default=None, help="constrain to one of these (repeatable)")
    shape.add_argument("--grammar", default=None, help="constrain to this Lark grammar (text, or @FILE)")
    gen.add_argument("-v", "--verbose", action="store_true", help="print usage and timings to stderr")
    sub.add_parser("chat", parents=[common, sampling], help="interactive streaming chat")
    info = sub.add_parser("info", parents=[common], help="model and server information")
    for door in (gen, info):  # the OpenAI-compatible door instead of gRPC (or a --target http://...)
        door.add_argument("--http", default=os.environ.get("ATTNSERVE_HTTP_URL"), metavar="URL", help=_HTTP_HELP)
    args = parser.parse_args(argv)
    try:
        return {"generate": cmd_generate, "chat": cmd_chat, "info": cmd_info}[args.command](args)
    except AttnserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
