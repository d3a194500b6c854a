"""Errors a user can act on.

Every failure tilec reports on purpose is a `TilecError`. The message names the thing at fault (the op, the node,
the file, the key, the shape) and what would be accepted instead, so nobody has to read a traceback from deep inside
torch to find out what to change.
"""

from __future__ import annotations


class TilecError(Exception):
    """Base class of every error tilec raises on purpose."""


class ConfigError(TilecError):
    """A model configuration tilec cannot build (unsupported value, inconsistent sizes)."""


class ShapeError(TilecError):
    """A tensor whose shape or dtype does not fit the op or the model."""


class QuantizationError(TilecError):
    """A tensor that cannot be quantised as asked (NaN or Inf values, an unknown scale rule or dtype)."""


class CheckpointError(TilecError):
    """A checkpoint that is missing tensors, has misshapen ones, or is not a MiMo checkpoint."""


class UnsupportedError(TilecError):
    """An op, module or construct in a user's model that tilec cannot capture."""


class TargetError(TilecError):
    """A compile target that is unknown, not built yet, or cannot run on this machine."""


class VerifyError(TilecError):
    """A graph that broke an invariant after a pass (a bug in tilec, reported with the stage and node)."""


class ArtifactError(TilecError):
    """An output directory that cannot be written, or an input directory that is not a tilec artifact."""
