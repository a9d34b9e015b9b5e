"""`python -m model generate "prompt"`: generate straight on the model, no server.

Also `python -m model info` to print the loaded configuration.
"""

from __future__ import annotations

import argparse
import sys
import time

from attnserve.model.detokenizer import IncrementalDetokenizer
from attnserve.model.errors import ModelLoadError
from attnserve.model.fetch import default_model_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model",
        default=str(default_model_path()),
        help="a .gguf file, a Hugging Face folder, or dummy:NAME (default: %(default)s)",
    )
    common.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 where the CPU has it)")
    common.add_argument("--device", default="cpu")
    gen = sub.add_parser("generate", parents=[common], help="generate a reply to a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    sub.add_parser("info", parents=[common], help="print the model's configuration")
    args = parser.parse_args(argv)

    try:
        import torch

        from attnserve.model.generate import generate_tokens
        from attnserve.model.loader import load_model, parse_dtype

        start = time.perf_counter()
        loaded = load_model(args.model, device=args.device, dtype=parse_dtype(args.dtype) if args.dtype else None)
        load_s = time.perf_counter() - start
    except (ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.command == "info":
        print(loaded.config)
        print(f"dtype={loaded.model.dtype} device={loaded.model.device} load_s={load_s:.2f}")
        return 0

    tok = loaded.tokenizer
    text = args.prompt if args.raw else tok.apply_chat_template([{"role": "user", "content": args.prompt}])
    prompt_ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, prompt_ids)
    start, count = time.perf_counter(), 0
    with torch.inference_mode():
        for token in generate_tokens(
            loaded.model,
            prompt_ids,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop_token_ids=tok.eos_token_ids,
        ):
            count += 1
            if token in tok.eos_token_ids:
                break
            print(detok.push(token), end="", flush=True)
    print(detok.flush())
    elapsed = time.perf_counter() - start
    print(f"[{count} tokens in {elapsed:.2f}s, {count / elapsed:.1f} tok/s; load {load_s:.2f}s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
