"""`bitfold generate` and `bitfold chat`. Engine flags come from EngineConfig's fields.

Bad input (missing model, invalid values...) prints one `bitfold: error: ...` line to stderr
and exits with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time

from bitfold.config import EngineConfig, add_dataclass_args, dataclass_from_args
from bitfold.errors import BitfoldError, InvalidRequestError

EXIT_BAD_INPUT = 2
SUBCOMMAND_MODULES = ("bitfold.server.cli", "bitfold.eval.cli", "bitfold.quantize")


class _Help(argparse.HelpFormatter):
    """Help that shows each flag's default, unless it has none (None, False) or already says."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
                and "default" not in text and not isinstance(action, argparse.BooleanOptionalAction)):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are bad input too: one `bitfold: error: ...` line and status 2, not
    argparse's usage block (`--help` still shows it). Every subcommand's parser is one too
    (argparse builds them with the parent's class), so all show their defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"bitfold: error: {message} (see '{self.prog} --help')\n")


def _sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate")
    g.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: keep the most likely tokens whose probabilities sum to p (1 = all)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    g.add_argument("--seed", dest="sample_seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _params(args):
    from bitfold.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, seed=args.sample_seed, stop=args.stop)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bitfold", description="Memory-bound-first LLM inference.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details (KV capacity, ...)")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete a prompt and stream the text to stdout")
    gen.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _sampling_args(gen, temperature=0.0)
    add_dataclass_args(gen, EngineConfig)

    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat using the model's chat template")
    chat.add_argument("--system", default=None, help="system message")
    _sampling_args(chat, temperature=0.7)
    add_dataclass_args(chat, EngineConfig)
    chat.set_defaults(func=cmd_chat)

    # Larger commands live beside their package: each module's `register(subparsers)` adds
    # its parsers with `set_defaults(func=handler)`; handlers raise BitfoldError on bad input.
    for module in SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is None or not module.startswith(e.name):  # a missing dependency inside it: a real error
                raise
            continue  # that package is not part of this build
        mod.register(sub)
    _verbose_everywhere(parser)
    return parser


def _verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """`-v` after the subcommand too (`bitfold generate "hi" -v`, `bitfold eval ppl -v`). SUPPRESS
    leaves the top-level value alone when a subcommand's parser does not see the flag."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if "-v" not in sub._option_string_actions:
                    sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                     help="log engine details (KV capacity, ...)")
                _verbose_everywhere(sub)


def _load(args):
    """The LLM and its status line, printed by the caller once the input is known to be good
    (bad input is one stderr line and nothing else)."""
    from bitfold.llm import LLM

    cfg = dataclass_from_args(EngineConfig, args)
    t0 = time.perf_counter()
    llm = LLM(**vars(cfg))
    status = (f"[bitfold] {llm.engine.model_path} on {llm.engine.device} ({str(llm.engine.dtype)[6:]}), "
              f"loaded in {time.perf_counter() - t0:.1f}s")
    return llm, status


def _utf8(text: str, what: str) -> str:
    """`text` as Python read it from argv or stdin, where bytes that are not UTF-8 become lone
    surrogates (`surrogateescape`); a BitfoldError naming the first bad byte if there is one.
    Such text is refused rather than decoded with replacement characters: the model would
    silently see different text than the user meant (see the README)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the bytes as they came
    except UnicodeEncodeError:  # a surrogate no decoder made (only possible in-process)
        raw = text.encode("utf-8", "surrogatepass")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"{what} is not valid UTF-8: byte 0x{raw[e.start]:02X} at byte {e.start} "
                                  f"({e.reason}); convert it first, e.g. iconv -f latin1 -t utf-8") from None


def _read_stdin() -> str:
    buffer = getattr(sys.stdin, "buffer", None)
    return buffer.read().decode("utf-8", "surrogateescape") if buffer is not None else sys.stdin.read()


def cmd_generate(args) -> None:
    params = _params(args)
    prompt = _utf8(_read_stdin() if args.prompt == "-" else args.prompt, "the prompt")
    llm, status = _load(args)
    t0 = time.perf_counter()
    if args.chat:
        stream = llm.chat_stream([{"role": "user", "content": prompt}], params)
    else:
        stream = llm.stream(prompt, params)
    first = next(stream, "")  # validates the request (prompt length...) before anything is printed
    print(status, file=sys.stderr)
    sys.stdout.write(first if args.chat else prompt + first)
    sys.stdout.flush()
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    out = llm.last_output
    print(f"[bitfold] {len(out.token_ids)} tokens in {dt:.2f}s ({len(out.token_ids) / dt:.1f} tokens/s, "
          f"finish: {out.finish_reason})", file=sys.stderr)


def cmd_chat(args) -> None:
    params = _params(args)
    llm, status = _load(args)
    llm.tokenizer.apply_chat_template([{"role": "user", "content": "x"}])  # fail now if there is no template
    print(status, file=sys.stderr)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("[bitfold] chat: type a message; /reset clears the history, /exit or Ctrl-D quits", file=sys.stderr)
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 is then one bad turn, not a traceback
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        try:
            line = _utf8(line, "the message")
        except InvalidRequestError as e:
            sys.stdout.flush()
            print(f"bitfold: error: {e}", file=sys.stderr)
            continue
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = []
        try:
            for piece in llm.chat_stream(history, params):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:  # stop this reply, keep the session
            sys.stdout.write(" [interrupted]")
        except InvalidRequestError as e:  # e.g. the conversation outgrew the context: drop this turn
            history.pop()
            sys.stdout.flush()
            print(f"bitfold: error: {e} (/reset clears the history)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="[bitfold] %(message)s")
    try:
        args.func(args)
    except BitfoldError as e:
        print(f"bitfold: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("\n[bitfold] interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
