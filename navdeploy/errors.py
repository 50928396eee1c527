"""Errors navdeploy raises for user mistakes. Each message says what was wrong and how to fix it."""


class NavdeployError(Exception):
    """Base class of every error navdeploy raises on purpose."""


class ConfigError(NavdeployError, ValueError):
    """An invalid ``OptimizeConfig`` value or environment setting."""


class CaptureError(NavdeployError):
    """The inputs or outputs of a wrapped module cannot be captured as they are."""


class DataloaderError(NavdeployError, ValueError):
    """The dataloader passed to ``nav.optimize`` is empty or its items are not ``(batch_size, sample)``."""


class WorkspaceError(NavdeployError):
    """The workspace cannot be used (not writable, locked by another run, ...)."""
