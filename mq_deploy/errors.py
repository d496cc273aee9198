"""One exception family: the user's mistake (MQUserError) versus our bug (MQInternalError).

The CLI prints MQUserError as one clear line and exits 2; anything else is a bug and keeps its traceback.
"""


class MQError(Exception):
    """Base of every error mq-deploy raises on purpose."""


class MQUserError(MQError, ValueError):
    """Bad input: a missing or corrupt file, an unsupported config, data out of range, or a library
    call with arguments it cannot take (also a ValueError, so callers that catch those keep working)."""


class MQInternalError(MQError):
    """An invariant of mq-deploy itself failed; please report it."""


def user_check(cond: bool, message: str) -> None:
    if not cond:
        raise MQUserError(message)


def note(message: str) -> None:
    """Something the user should know that is not an error (a default we chose, data we shortened): one
    line on stderr, so stdout stays the command's result."""
    import sys

    print(f"note: {message}", file=sys.stderr)
