"""`lmlink chat`: stream an answer to the terminal (one prompt, stdin, or interactive)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .common import EXIT_OK, CliError, add_server_flag, at_least, client, number, usage_error


def add_parser(sub: argparse._SubParsersAction) -> None:
    chat = sub.add_parser(
        "chat",
        help="chat with a model, streaming the answer as it is generated",
        description=(
            "Send PROMPT and stream the answer. With no PROMPT: interactive when stdin is a "
            "terminal, otherwise stdin is read as the prompt. Exit 1 (with a line on stderr) "
            "when the server ends the answer early, e.g. when its model is unloaded."
        ),
    )
    chat.add_argument("prompt", nargs="?", help="the message to send")
    add_server_flag(chat)
    chat.add_argument("--model", default="", help="model id or alias (default: server's default)")
    chat.add_argument("--system", default=None, help="system message to start the conversation")
    chat.add_argument("--raw", action="store_true", help="send PROMPT as raw text, no chat template")
    # Ranges mirror the server's own checks, so bad values fail before anything is dialled.
    chat.add_argument("--max-tokens", type=at_least(1), default=None, help="most tokens to generate")
    chat.add_argument("--temperature", type=number(0.0, 100.0), default=None,
                      help="0-100; 0 = greedy (default)")
    chat.add_argument("--top-p", type=number(0.0, 1.0, low_open=True), default=None,
                      help="nucleus sampling, more than 0 and at most 1")
    chat.add_argument("--top-k", type=at_least(0), default=None, help="0 = off")
    chat.add_argument("--seed", type=at_least(0), default=None,
                      help="seed for reproducible sampling")
    chat.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    chat.add_argument("--ignore-eos", action="store_true",
                      help="keep generating past end-of-sequence until --max-tokens (load tests)")
    chat.add_argument("--json", action="store_true",
                      help="print one JSON object per event instead of text")
    chat.add_argument("--stats", action="store_true",
                      help="print token counts and speed to stderr at the end")
    chat.set_defaults(run=run)


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
        "ignore_eos": args.ignore_eos,
    }


def _stream_answer(client: Any, args: argparse.Namespace, history: list[dict[str, str]] | None,
                   prompt: str) -> str:
    """Stream one answer to stdout; returns its text. Ctrl-C cancels it server-side.

    An answer the server cut short (finish_reason "cancelled" without our Ctrl-C: the model
    was unloaded or the server is stopping) is a failure: the text so far stays on stdout.
    """
    from lmlink.client import Completed, TokenDelta
    from lmlink.client._wire import event_to_dict

    if history is None:
        stream = client.stream(prompt=prompt, **_sampling(args))
    else:
        stream = client.stream(messages=history, **_sampling(args))
    text: list[str] = []
    cut = False
    try:
        for event in stream:
            if args.json:
                print(json.dumps(event_to_dict(event)), flush=True)
            elif isinstance(event, TokenDelta):
                sys.stdout.write(event.text)
                sys.stdout.flush()
            if isinstance(event, TokenDelta):
                text.append(event.text)
            if isinstance(event, Completed):
                cut = event.finish_reason == "cancelled"
                if args.stats:
                    u, t = event.usage, event.timings
                    print(
                        f"\n[{event.finish_reason}: {u.prompt_tokens} prompt ({u.cached_tokens} "
                        f"cached) + {u.completion_tokens} tokens, first token "
                        f"{t.time_to_first_token_ms:.0f} ms, {t.tokens_per_second:.1f} tok/s]",
                        file=sys.stderr,
                    )
    except KeyboardInterrupt:
        stream.cancel()
        raise
    if not args.json:
        sys.stdout.write("\n")
        sys.stdout.flush()
    if cut:
        raise CliError("the server ended the answer early (its model was unloaded or the "
                       "server is shutting down); the text above is incomplete")
    return "".join(text)


def run(args: argparse.Namespace) -> int:
    interactive = args.prompt is None and sys.stdin.isatty()
    prompt = args.prompt
    if prompt is not None and not prompt.strip():
        raise usage_error("the prompt is empty")
    if prompt is None and not interactive:
        prompt = sys.stdin.read()
        if not prompt.strip():
            raise usage_error("no prompt given (argument or stdin)")
    with client(args) as c:
        history: list[dict[str, str]] = []
        if args.system:
            history.append({"role": "system", "content": args.system})
        if not interactive:
            if args.raw:
                _stream_answer(c, args, None, prompt)
            else:
                history.append({"role": "user", "content": prompt})
                _stream_answer(c, args, history, prompt)
            return EXIT_OK
        print("lmlink chat: type a message, Ctrl-D to quit, Ctrl-C to stop an answer.",
              file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                print(file=sys.stderr)
                return EXIT_OK
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            try:
                answer = _stream_answer(c, args, history, line)
            except KeyboardInterrupt:
                print("\n[stopped]", file=sys.stderr)
                history.pop()
                continue
            history.append({"role": "assistant", "content": answer})
