"""One error type for everything a user can fix: bad input, bad config, missing files."""


class FcotError(Exception):
    """A problem with the user's input, stated so that it names the file, record and key.

    The CLI prints these as one line (no traceback); everything else is a bug and keeps its traceback.
    """


def where(path=None, record=None, key=None) -> str:
    """Format a location like `data.jsonl, record 12, key 'question'` for error messages."""
    parts = []
    if path is not None:
        parts.append(str(path))
    if record is not None:
        parts.append(f"record {record}")
    if key is not None:
        parts.append(f"key {key!r}")
    return ", ".join(parts)
