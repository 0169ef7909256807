"""The `erasure` command: the top of the layers (apps -> benchmarks -> vlm -> erasers). It composes the commands each
package offers (erasers.commands, vlm.commands, benchmarks.commands, and the app here) and is the one place where
expected failures become the one-line error `erasure: error: ...` with exit code 2."""

from __future__ import annotations

import argparse
import os
import sys

import benchmarks  # noqa: F401  (registers the toy model and the toy VLM world)
from benchmarks import commands as benchmark_commands
from erasers import commands as eraser_commands
from erasers.errors import UsageError
from vlm import commands as vlm_commands


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one line `erasure: error: ...` and exit code 2 (argparse's own
    errors print the usage first)."""

    def error(self, message: str):
        print(f"erasure: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def cmd_app(args) -> None:
    from erasers.files import check_output_path

    check_output_path(args.output, "--output")  # before gradio and the model load
    from apps.app import launch

    launch(args.model, args.edits, args.output, args.host, args.port)


def make_parser() -> argparse.ArgumentParser:
    from erasers.commands import port

    parser = ArgumentParser(prog="erasure", description="Concept erasure for diffusion models and VLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    eraser_commands.add_commands(commands)
    vlm_commands.add_commands(commands)
    benchmark_commands.add_commands(commands)

    app = commands.add_parser("app", help="the Gradio app: base and edits side by side")
    app.add_argument("--model", default="toy")
    app.add_argument("--edits", default="runs", help="folder whose subfolders are edits (erasure.json)")
    app.add_argument("--output", default="app-output", help="the only folder the app writes to")
    app.add_argument("--host", default="127.0.0.1")
    app.add_argument("--port", type=port, default=7860)
    app.set_defaults(run=cmd_app)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command. The one place where expected failures become the one-line error: UsageErrors (bad input,
    config validation, unreadable files), and OSErrors of files the user named (an unwritable or full --out).
    ERASURE_TRACEBACK=1 shows the traceback of an OSError instead."""
    try:
        args = make_parser().parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        args.run(args)
    except UsageError as error:
        return usage_error(str(error))
    except OSError as error:
        if os.environ.get("ERASURE_TRACEBACK"):
            raise
        return usage_error(describe_os_error(error))
    except KeyboardInterrupt:
        print("erasure: interrupted; no output was written (a training run resumes from OUT.partial/ when run again)",
              file=sys.stderr)
        return 130
    return 0


def usage_error(message: str) -> int:
    print(f"erasure: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def describe_os_error(error: OSError) -> str:
    where = f" {error.filename}" if error.filename else ""
    reason = error.strerror or str(error) or type(error).__name__
    return (f"cannot use{where}: {reason}; check the path, its permissions and the free disk space (set "
            "ERASURE_TRACEBACK=1 for details)")


if __name__ == "__main__":
    sys.exit(main())
