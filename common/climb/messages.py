"""Helpers for building the one-line error messages of the media loaders."""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """Return ``exc``'s message collapsed onto one line (its type name if empty).

    Parameters
    ----------
    exc : BaseException
        Any exception, typically raised by a third-party decoder.

    Returns
    -------
    str
        The message with every run of whitespace (newlines included) replaced by one space.
    """
    return " ".join(str(exc).split()) or type(exc).__name__
