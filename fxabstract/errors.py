"""Errors a user can cause. Each message says what was wrong and what to do about it."""


class FxAbstractError(Exception):
    """Base class of every error fxabstract raises for a user's mistake."""


class CaptureError(FxAbstractError):
    """The model could not be captured as a graph."""


class NoSiteError(FxAbstractError):
    """The graph has no site whose units can be replaced."""


class CalibrationError(FxAbstractError):
    """The calibration data is empty, malformed or not finite."""


class ConfigError(FxAbstractError):
    """An argument (keep, score, replacement, ...) is out of range or unknown."""


class ExportError(FxAbstractError):
    """Export to ONNX failed or does not match the module."""


class OutputError(FxAbstractError):
    """An output file cannot be written, or exists and overwriting was not asked for."""


class FxAbstractWarning(UserWarning):
    """Something the user should know that does not stop compilation (e.g. a tiny calibration set)."""

class DependencyError(FxAbstractError):
    """An optional package that a feature needs is not installed."""
