"""Errors raised while reading CLIMB data.

Every message is one line that a hospital IT person can act on: what is wrong, with
the offending value, and (where there is one) what would fix it.
"""


class RecordError(ValueError):
    """A record (one JSONL line) is malformed or inconsistent."""


class MediaError(RecordError):
    """A media file a record points to cannot be read or decoded."""
