"""The error types that the command-line entry points report as one line (no traceback)."""


class ConfigError(ValueError):
    """A bad configuration value or input file; the message names the key or file and what was expected."""


class RunStopped(RuntimeError):
    """A run stopped on a fault it detected (pre-emption, a non-finite loss, a full disk); the message is one line
    naming what happened and which checkpoint is intact, and `exit_code` is the command line's exit status."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
