"""Errors raised by memkit. All derive from :class:`MemkitError`.

Each also derives from the closest built-in (ValueError, TypeError, ...), so
code that already catches those keeps working.
"""


class MemkitError(Exception):
    """Base class of every error memkit raises on purpose."""


class ShapeError(MemkitError, ValueError):
    """A tensor has the wrong rank or shape."""


class DTypeError(MemkitError, TypeError):
    """Tensors that must share a dtype do not, or a dtype is unsupported."""


class DeviceError(MemkitError, ValueError):
    """Tensors that must share a device do not."""


class NonFiniteError(MemkitError, ValueError):
    """An input holds NaN or Inf."""


class ConfigError(MemkitError, ValueError):
    """A configuration value is invalid."""


class UnknownMemoryError(ConfigError, KeyError):
    """A memory variant name is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class StateMismatchError(MemkitError, ValueError):
    """A state belongs to another memory config, batch size or layer count."""


class StateFormatError(MemkitError, ValueError):
    """A saved file is truncated, foreign, or of an unknown schema version."""


class BackendUnavailableError(MemkitError, ImportError):
    """A requested kernel backend is not installed or cannot run here."""


class CheckpointError(MemkitError, ValueError):
    """A model checkpoint or memory-weights file does not fit the model it is loaded into."""


class AdapterError(MemkitError, RuntimeError):
    """A model cannot be injected, is not injected, or an adapter handle was used after removal."""


class DataError(MemkitError, ValueError):
    """A training sample or data file cannot be used (unreadable, too short, wrong shape or channels)."""
