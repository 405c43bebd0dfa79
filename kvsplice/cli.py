"""`kvsplice <verb>`: thin. Each verb lives in its own module exposing

    add_parser(subparsers) -> argparse.ArgumentParser   (sets `func` via set_defaults)

and is listed in COMMANDS below; parsing here, work in the modules.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

# module path for each verb (imported lazily so `kvsplice --help` stays fast)
COMMANDS: list[str] = [
    "kvsplice.commands.validate",
    "kvsplice.commands.calibrate",
    "kvsplice.commands.train",
    "kvsplice.commands.ablate_train",
    "kvsplice.commands.longctx",
    "kvsplice.commands.eval", "kvsplice.commands.ablate", "kvsplice.commands.generate", "kvsplice.commands.demo", "kvsplice.commands.frontier",
    "kvsplice.commands.pack",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvsplice", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for mod in COMMANDS:
        importlib.import_module(mod).add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from kvsplice.errors import KVSpliceError, KVSpliceWarning

    def show(message, category, filename, lineno, file=None, line=None):  # one line per warning, no source
        print(f"kvsplice {args.command}: warning: {_one_line(message)}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            warnings.simplefilter("always", KVSpliceWarning)  # every run says it, not once per process
            return int(args.func(args) or 0)
    except KVSpliceError as e:
        print(f"kvsplice {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # rows finished so far are already on disk (commands write each row as it completes)
        print(f"kvsplice {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    """The message on one line (a wrapped library error may carry newlines)."""
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
