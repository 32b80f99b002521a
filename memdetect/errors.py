"""Exception types. The CLI maps each to one readable line and exit code 2 (see ``memdetect.cli``)."""

from __future__ import annotations


class MemdetectError(Exception):
    """Base class: an error a user can act on. Its message is one sentence, shown without a traceback."""


class UsageError(MemdetectError, ValueError):
    """A bad option value or combination."""


class ModelNotFoundError(MemdetectError, OSError):
    """The model could not be found or loaded (not cached, offline, no access, bad folder)."""


class UnsupportedModelError(MemdetectError, ValueError):
    """The model exists but no adapter handles its family."""


class LayerError(MemdetectError, KeyError):
    """A layer spec does not resolve, or its call index never fired."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnsafeCheckpointError(MemdetectError):
    """A checkpoint asked for something the restricted loader refuses to do."""


class InputError(MemdetectError):
    """No usable input (for example: no image files under the given paths)."""


class PrunedModuleError(UsageError):
    """A module the detector dropped (it never runs before the early exit) was called: load with ``prune=False``."""
