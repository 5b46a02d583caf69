"""Errors a user can fix. The CLI prints their message as one line on stderr and exits with status 2."""


class UserError(Exception):
    """Base class of the errors caused by input: configuration, data, checkpoints."""


class ConfigError(UserError, ValueError):
    """A bad configuration value."""


class DataError(UserError):
    """Data missing or unreadable."""


class CheckpointError(UserError):
    """A checkpoint missing, corrupt, or written by another model."""
