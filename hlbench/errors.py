"""The error types that the command-line entry points report as one line (no traceback)."""


class ConfigError(Exception):
    """Bad input: a configuration value, or a data, split-list or weights file it names; the message names the key
    or file and what was expected. Not a ValueError, so that an internal fault is never taken for a typo."""


class MissingInputError(ConfigError, FileNotFoundError):
    """A file or folder the input names does not exist (a data root, a weights file, a checkpoint)."""


class BadFileError(ConfigError):
    """An input file that exists but cannot be used (unreadable, another layout, tensors that do not fit the model)."""


def exit_status(command) -> int:
    """The exit status of a command-line entry point: 0 after `command()`, 2 with one line on stderr where it raised
    ConfigError (bad input). Any other exception is a fault of ours and keeps its traceback."""
    import sys

    try:
        command()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


class RunStopped(RuntimeError):
    """A run stopped on a fault it detected (pre-emption, a non-finite loss, a full disk); the message is one line
    naming what happened and which checkpoint is intact, and `exit_code` is the command line's exit status."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
