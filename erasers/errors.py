"""Errors a user can cause: the CLI prints their message on one line and exits with code 2."""


class UsageError(Exception):
    """Bad input (unknown name, wrong path, corrupt file, wrong model family, empty prompt): the message says
    what is wrong and what to do."""


def first_line(error: BaseException) -> str:
    """The error's type and the first line of its message, for a one-line UsageError about a file or model that
    could not be read."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


class FailedEdit(UsageError):
    """An edit that makes no usable images (non-finite weights, or images that are non-finite or one flat colour): a
    failed erase, which every scorer reports as failed and never scores as an erasure (a classifier reads a black
    image as the concept gone)."""
