"""The error type for bad input that the command-line entry points report as one line (no traceback)."""


class ConfigError(ValueError):
    """A bad configuration value or input file; the message names the key or file and what was expected."""
