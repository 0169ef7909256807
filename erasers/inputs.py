"""The one validation layer for command-line options: argparse types (`type=...`) that parse a value and check its
type, range and finiteness where it enters, and paths whose kind (missing, a directory, a FIFO, a device, a link
loop...) is named before anything reads them. Every package's commands and the app take their limits from here,
and each type is also a check for the same value given through the Python API (`STEPS.check(steps, "steps")`),
so the CLI, the app and the library refuse the same values with the same words.

    generate.add_argument("--steps", type=STEPS)                  # "argument --steps: 0 is out of range: ..."
    ask.add_argument("--image", type=existing_file("image"))      # "... is a directory, not a file; pass ..."
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import socket
import stat
from pathlib import Path

from .errors import UsageError
from .files import broken_link
from .validation import MAX_SEED, describe


class Number:
    """An argparse type for one kind of number: an int or a float, finite, within [low, high] (either end open
    with `low_open`/`high_open`), optionally a multiple of `multiple`. `rule` replaces the generated "it must be
    ..." text; `hint` says what is usual."""

    def __init__(self, kind: type = int, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, multiple: int | None = None, rule: str = "",
                 hint: str = ""):
        self.kind, self.limits, self.multiple = kind, (low, high, low_open, high_open), multiple
        self.rule, self.hint = rule, hint
        self.noun = "an integer" if kind is int else "a number"

    @property
    def low(self):
        return self.limits[0]

    @property
    def high(self):
        return self.limits[1]

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {self.noun}") from None
        problem = self.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{text} {problem}")
        return value

    def problem(self, value) -> str | None:
        """What is wrong with `value` ("is out of range: it must be at least 1"), or None."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"is not a finite number; {self.describe()}"
        low, high, low_open, high_open = self.limits
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high or (self.multiple and value % self.multiple):
            return f"is out of range: {self.describe()}"
        return None

    def describe(self) -> str:
        if self.rule:
            return self.rule
        text = "it must be " + describe(self.limits)
        if self.multiple:
            text += f", a multiple of {self.multiple}"
        return text + (f" ({self.hint})" if self.hint else "")

    def rules(self) -> dict:
        """The same limits as dataclass-field metadata (erasers.validation), for values read from files."""
        low, high, low_open, high_open = self.limits
        rules = {"min": low, "max": high, "min_exclusive": low_open, "max_exclusive": high_open,
                 "multiple": self.multiple}
        return {key: value for key, value in rules.items() if value is not None and value is not False}

    def check(self, value, name: str):
        """`value`, given as `name` through the Python API or the app, checked by the same rules; returns it."""
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int):
            raise UsageError(f"{name} wants {self.noun}, got {value!r}")
        problem = self.problem(value)
        if problem:
            raise UsageError(f"{name} {value} {problem}")
        return value


# The limits of the options, one set for the CLI, the app and the library.
SEED = Number(int, 0, MAX_SEED, rule=f"seeds are integers from 0 to 2**63 - 1 ({MAX_SEED})")
POSITIVE = Number(int, 1)
PORT = Number(int, 1, 65535)
STEPS = Number(int, 1, 1000)
GUIDANCE = Number(float, 0, 100, hint="7.5 is usual")
SCALE = Number(int, 1, 64)
SCORE_THRESHOLD = Number(float, 0, 1, low_open=True, hint="a detection score; the papers use 0.6")
# Image sides in pixels: latents are 1/8 of the image and Flux packs 2 x 2 of them, hence multiples of 16; the
# upper end is far above any published model's native size (Flux: 2048).
IMAGE_SIDE = Number(int, 16, 4096, multiple=16)
ATTACKED_PROMPTS = Number(int, 1, 10_000)


# ----------------------------------------------------------------------------------------------------------------
# Paths given as inputs

_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def path_problem(path: str | Path, want_dir: bool) -> str | None:
    """How `path` is not an existing, readable regular file (or directory, with `want_dir`): "does not exist",
    "is a directory, not a file", "is a named pipe (FIFO), not a file", "is a symbolic link loop", ...; or None."""
    path = Path(path)
    wanted = "a directory" if want_dir else "a file"
    broken = broken_link(path)
    if broken:
        return f"is {broken}"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except NotADirectoryError:
        return "does not exist (a part of the path is a file)"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "is a symbolic link loop"
        return f"cannot be read ({error.strerror})"
    if stat.S_ISDIR(mode):
        found = "a directory"
    elif stat.S_ISREG(mode):
        found = "a file"
    else:
        found = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    if found != wanted:
        return f"is {found}, not {wanted}"
    needed = os.R_OK | (os.X_OK if want_dir else 0)
    if not os.access(path, needed):
        return "is not readable (permission denied); check its permissions"
    return None


def check_input(path: str | Path, what: str, remedy: str, want_dir: bool = False) -> Path:
    """`path` as an existing, readable file (a directory with `want_dir`), else a UsageError such as "edit X is a
    file, not a directory; pass the --out directory of `erasure erase`"."""
    problem = path_problem(path, want_dir)
    if problem:
        raise UsageError(f"{what} {path} {problem}; {remedy}")
    return Path(path)


def existing_file(what: str, remedy: str = ""):
    """An argparse type: an existing, readable regular file (`what` names it in the error); returns the text."""
    return _existing(what, remedy or f"pass a {what}", want_dir=False)


def existing_dir(what: str, remedy: str = "", missing_ok: bool = False):
    """An argparse type: an existing, readable directory; `missing_ok` also takes a path that does not exist yet
    (a folder read only when it is there), but never one of another kind."""
    return _existing(what, remedy or f"pass a {what}", want_dir=True, missing_ok=missing_ok)


def _existing(what: str, remedy: str, want_dir: bool, missing_ok: bool = False):
    def parse(text: str) -> str:
        if missing_ok and not os.path.lexists(text):
            return text
        problem = path_problem(text, want_dir)
        if problem:
            raise argparse.ArgumentTypeError(f"{what} {text} {problem}; {remedy}")
        return text

    parse.__name__ = what
    parse.reads_path = True  # a documentation check parses commands whose example paths do not exist
    return parse


def edit_dir(what: str, remedy: str):
    """An argparse type for an edit: an existing directory, or, where nothing of that name exists here, the Hub id
    OWNER/NAME[@REVISION] of an edit (`erasure push`), downloaded into huggingface_hub's cache (erasers.hub);
    returns the directory. A local path always wins over a Hub id of the same spelling."""
    local = existing_dir(what, remedy)

    def parse(text: str) -> str:
        from . import hub

        if os.path.lexists(text) or hub.hub_id(text) is None:
            kind = None if os.path.lexists(text) else hub.other_repo_type(text)
            if kind is not None:
                raise argparse.ArgumentTypeError(f"{what} {text} is no directory here, and on the Hub it would be "
                                                 f"{kind} repo, not an edit (a model repo); {remedy}")
            return local(text)
        try:
            return str(hub.download_edit(text, what, remedy))
        except UsageError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        except OSError as error:  # writing the cache; argparse reports only ArgumentTypeError/TypeError/ValueError
            raise argparse.ArgumentTypeError(f"{what} {text} could not be written to huggingface_hub's cache "
                                             f"({error.strerror or error}); check HF_HOME/HF_HUB_CACHE, their "
                                             "permissions and the free disk space") from None

    parse.__name__ = what
    parse.reads_path = parse.takes_hub_ids = True
    return parse


# The paths more than one command takes.
_FROM_HUB = "or the Hub id OWNER/NAME[@REVISION] of an edit from `erasure push`"
EDIT_DIR = edit_dir("edit", f"pass the --out directory of `erasure erase` {_FROM_HUB}")
VLM_EDIT_DIR = edit_dir("edit", f"pass the --out directory of `erasure vlm erase` {_FROM_HUB}")
PROMPT_FILE = existing_file("prompt file", "pass a text file with one prompt per line")
CONCEPTS_FILE = existing_file("concepts file", "pass a text file with one concept per line")
MLLMU_DATA_DIR = existing_dir("data directory", "pass a directory in the MLLMU-Bench layout")


# ----------------------------------------------------------------------------------------------------------------
# The app's address

def host(text: str) -> str:
    """An argparse type: a host name or IP address that resolves (binding it is checked with the port)."""
    try:
        socket.getaddrinfo(text, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a host name or IP address that resolves; use an address "
                                         "of this machine such as 127.0.0.1 (this machine only) or 0.0.0.0 (every "
                                         "network)") from None
    return text


def check_listen_address(host_name: str, port_number: int) -> None:
    """Bind (`host_name`, `port_number`) once and let it go, so a server that cannot listen there fails in one
    line before any model loads, and not after with a message about the wrong thing."""
    try:
        infos = socket.getaddrinfo(host_name, port_number, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise UsageError(f"--host {host_name} does not resolve; use an address of this machine such as "
                         "127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself binds
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise UsageError(f"--port {port_number} is in use on {host_name}; stop what listens there or pass "
                                 "another --port") from None
            if error.errno in (errno.EACCES, errno.EPERM):
                raise UsageError(f"--port {port_number} needs privileges on this machine; pass a --port above "
                                 "1023") from None
            raise UsageError(f"--host {host_name} is not an address of this machine ({error.strerror}); use "
                             "127.0.0.1 (this machine only) or 0.0.0.0 (every network)") from None
