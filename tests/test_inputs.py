"""erasers.inputs, the validation layer of command-line options, used directly as the library and the app use it:
paths named by what they are, numbers by the same limits as the CLI's."""

import argparse
import os
import socket

import pytest

from erasers.edits import read_edit
from erasers.errors import UsageError
from erasers.inputs import GUIDANCE, IMAGE_SIDE, STEPS, check_listen_address, existing_dir, path_problem


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    return tmp_path


@pytest.mark.parametrize("name, want_dir, problem", [
    ("file", False, None),
    ("dir", True, None),
    ("dir", False, "is a directory, not a file"),
    ("file", True, "is a file, not a directory"),
    ("fifo", False, "is a named pipe (FIFO), not a file"),
    ("loop", True, "is a symbolic link loop"),
    ("dangling", False, "which does not exist"),
    ("missing", False, "does not exist"),
    ("file/below", False, "a part of the path is a file"),
])
def test_a_path_is_named_by_what_it_is(paths, name, want_dir, problem):
    found = path_problem(paths / name, want_dir)
    assert found == problem if problem is None else problem in found


def test_a_device_is_not_a_file():
    assert path_problem("/dev/zero", want_dir=False) == "is a character device, not a file"


def test_the_library_names_a_file_given_as_an_edit(paths):
    with pytest.raises(UsageError, match="edit .*file is a file, not a directory; pass the --out directory"):
        read_edit(paths / "file")


def test_a_folder_read_only_when_present_may_be_missing_but_not_a_file(paths):
    folder = existing_dir("edits folder", missing_ok=True)
    assert folder(str(paths / "missing")) == str(paths / "missing")
    with pytest.raises(argparse.ArgumentTypeError, match="is a file, not a directory"):
        folder(str(paths / "file"))


def test_numbers_given_through_the_api_meet_the_cli_limits():
    assert STEPS.check(50, "steps") == 50 and GUIDANCE.check(7, "guidance") == 7
    with pytest.raises(UsageError, match="steps 0 is out of range: it must be at least 1 and at most 1000"):
        STEPS.check(0, "steps")
    with pytest.raises(UsageError, match="guidance inf is not a finite number"):
        GUIDANCE.check(float("inf"), "guidance")
    with pytest.raises(UsageError, match="steps wants an integer, got True"):
        STEPS.check(True, "steps")
    with pytest.raises(UsageError, match="a multiple of 16"):
        IMAGE_SIDE.check(520, "--resolution")


def test_a_port_in_use_is_named_before_anything_loads():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(UsageError, match=f"--port {port} is in use"):
            check_listen_address("127.0.0.1", port)
    check_listen_address("127.0.0.1", port)  # free again: no error
