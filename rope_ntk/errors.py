"""Exceptions with messages that name the argument, the value and what is valid."""


class RopeNtkError(Exception):
    """Base class of every error rope_ntk raises on purpose."""


class InvalidParameterError(RopeNtkError, ValueError):
    """A method name, a parameter or a command-line value is not valid."""


class UnsupportedModelError(RopeNtkError, TypeError):
    """The model has no rotary embedding that rope_ntk knows how to patch."""


class ModelLoadError(RopeNtkError, OSError):
    """A model could not be loaded from the given path or hub id."""


class CorpusError(RopeNtkError, OSError):
    """A corpus could not be read, or is too short for the request."""


class RopeMismatchError(RopeNtkError):
    """A rotary module does not run the RoPE its config records (see ``rope_ntk.verify``)."""
