"""The `erasure` command: the top of the layers (apps -> benchmarks -> vlm -> erasers). It composes the commands each
package offers (erasers.commands, vlm.commands, benchmarks.commands, and the app here) and is the one place where
expected failures become the one-line error `erasure: error: ...` with exit code 2."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from importlib.metadata import version

from benchmarks import commands as benchmark_commands  # importing benchmarks registers "toy" and its VLM world
from erasers import commands as eraser_commands
from erasers.core import describe_cost
from erasers.errors import UsageError
from erasers.inputs import PORT, check_listen_address, existing_dir, host
from vlm import commands as vlm_commands


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one line `erasure: error: ...` and exit code 2 (argparse's own
    errors print the usage first)."""

    def error(self, message: str):
        print(f"erasure: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def cmd_app(args) -> None:
    from erasers.models import resolve_source
    from erasers.outputs import claim_output_dir

    resolve_source(args.model)  # a bad --model leaves no --output folder behind
    check_listen_address(args.host, args.port)  # before the models load, not after with gradio's message
    output = claim_output_dir(args.output, APP_MANIFEST, "--output").resolve()
    confine_app_writes(output)
    from apps.app import launch  # gradio, and what the model load brings, read their folders only now

    launch(args.model, args.edits, str(output), args.host, args.port, args.allow_other_base)


APP_MANIFEST = "erasure-app"
# Where the app's libraries write unless told otherwise, found by running a session with an empty HOME and TMPDIR:
# gradio's image cache and its own folders; tempfile and onnxruntime's session file (TMPDIR); onnxruntime's
# telemetry database (XDG_CACHE_HOME; diffusers loads onnxruntime); matplotlib's font cache (gradio imports it);
# torch's compile cache, which an inherited TORCHINDUCTOR_CACHE_DIR would put anywhere.
APP_FOLDERS = {"GRADIO_TEMP_DIR": "cache", "TMPDIR": "libraries/tmp", "XDG_CACHE_HOME": "libraries/cache",
               "XDG_CONFIG_HOME": "libraries/config", "MPLCONFIGDIR": "libraries/matplotlib",
               "TORCHINDUCTOR_CACHE_DIR": "libraries/torchinductor"}


def confine_app_writes(output) -> None:
    """Point every folder the app's libraries write to under `output`; each library reads its variable when it is
    imported or first writes, so this runs before gradio (or anything the model load imports) is."""
    import tempfile
    from pathlib import Path

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    # The model caches stay where the user keeps them: moving XDG_CACHE_HOME must not make a hub id download again.
    os.environ.setdefault("HF_HOME", str(cache / "huggingface"))
    os.environ.setdefault("TORCH_HOME", str(cache / "torch"))
    for variable, folder in APP_FOLDERS.items():
        (Path(output) / folder).mkdir(parents=True, exist_ok=True)
        os.environ[variable] = str(Path(output) / folder)
    tempfile.tempdir = None  # gettempdir() may have cached the old TMPDIR: read it again


def make_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="erasure", description="Concept erasure for diffusion models and VLMs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('erasure-suite')}")
    commands = parser.add_subparsers(dest="command", required=True)
    eraser_commands.add_commands(commands)
    vlm_subcommands = vlm_commands.add_commands(commands)
    benchmark_commands.add_commands(commands)
    benchmark_commands.add_vlm_commands(vlm_subcommands)

    app = commands.add_parser("app", help="the Gradio app: base and edits side by side",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    app.add_argument("--model", default="toy", help="the base model: 'toy', a local diffusers pipeline directory, "
                     "or a hub id")
    app.add_argument("--edits", default="runs", type=existing_dir("edits folder", "pass the folder holding the "
                     "edit directories of `erasure erase`", missing_ok=True),
                     help="folder whose subfolders are edits (erasure.json); none are offered while it is missing")
    app.add_argument("--output", default="app-output", help="the only folder the app writes to (new, or one an "
                     "earlier `erasure app` made): its image cache, temporary files and its libraries' caches")
    app.add_argument("--host", default="127.0.0.1", type=host, help="address to serve on: 127.0.0.1 for this "
                     "machine only, 0.0.0.0 for every network")
    app.add_argument("--port", type=PORT, default=7860, help="port to serve on, 1 to 65535")
    app.add_argument("--allow-other-base", action="store_true", help="offer edits made for another base model "
                     "too, for a deliberate transfer (left out otherwise)")
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
    started = time.time()
    try:
        args.run(args)
        if getattr(args, "reports_cost", False):
            print(describe_cost(time.time() - started))
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
    check = "the path, its permissions and the free disk space" if error.errno in (errno.ENOSPC, errno.EDQUOT) \
        else "the path and its permissions"
    return f"cannot use{where}: {reason}; check {check} (set ERASURE_TRACEBACK=1 for details)"


if __name__ == "__main__":
    sys.exit(main())
