"""The one error type for user mistakes.

Anything the user can fix (a missing file, a model the tool cannot handle, a
bad option) raises :class:`DwdError` or a subclass, with a message that names
the file, node or option, says what was wrong and what is allowed. The CLI
prints the message and exits with status 1, without a traceback. Anything else
that escapes is a bug in onnx-dwd.
"""


class DwdError(Exception):
    """A problem the user can fix; the message says what and how."""


class ModelError(DwdError):
    """The input model cannot be loaded, checked or handled."""


class OptionError(DwdError):
    """An option value is invalid or does not fit the model."""


class OutputError(DwdError):
    """The output cannot be written where asked (or would overwrite the input)."""
