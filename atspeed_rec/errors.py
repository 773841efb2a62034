"""Errors a user can fix. The command line prints their message, never a stack trace."""


class AtSpeedError(Exception):
    """Base class: the message names the problem and the fix."""


class UnknownModelError(AtSpeedError):
    pass


class DatasetNotFoundError(AtSpeedError):
    pass


class ConfigError(AtSpeedError):
    """Inconsistent or invalid hyper-parameters."""
