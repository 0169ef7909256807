"""Errors a user can cause: the CLI prints their message on one line and exits with code 2."""


class UsageError(Exception):
    """Bad input (unknown name, wrong path, corrupt file, wrong model family, empty prompt): the message says
    what is wrong and what to do."""
