"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class FreelunchError(Exception):
    """A problem the user can act on (bad input, missing file, mismatched work directory).

    The CLI prints ``error: <message>`` and exits with ``exit_code``; no traceback.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch system's time limit, `kill`, `scancel`): stop like Ctrl-C, exit 143."""


def stop_reason(e: KeyboardInterrupt) -> tuple[str, int]:
    """The word and exit code for a stop: SIGTERM ("terminated", 143) or Ctrl-C ("interrupted", 130)."""
    return ("terminated", 143) if isinstance(e, Terminated) else ("interrupted", 130)
