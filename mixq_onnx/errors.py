"""The error hierarchy.

Every error raised on purpose by mixq-onnx derives from :class:`MixqError`.
Each message is one line that says what went wrong, where (file, tensor or
node) and how to fix it, so the CLI can print it as is.
"""

from __future__ import annotations


class MixqError(Exception):
    """Base class of every error mixq-onnx raises on purpose."""

    exit_code = 1


class ConfigError(MixqError, ValueError):
    """An option or combination of options is invalid."""

    exit_code = 2


class ModelError(MixqError):
    """The input model cannot be read or cannot be quantized as asked."""

    exit_code = 3


class BudgetError(ConfigError):
    """A size or bit budget cannot be met by any choice of bit-widths."""

    def __init__(self, message: str, smallest_reachable: float) -> None:
        super().__init__(message)
        self.smallest_reachable = smallest_reachable


class OutputError(MixqError):
    """The output cannot be written where asked."""

    exit_code = 4


class VerificationError(MixqError):
    """ONNX Runtime could not run the quantized model."""

    exit_code = 5


class VerdictError(MixqError):
    """The verification's verdict is below what ``--require`` asked for; nothing was written.

    ``result`` is the quantization result (its report holds the verification), so the caller can show why.
    """

    exit_code = 6

    def __init__(self, message: str, result: object) -> None:
        super().__init__(message)
        self.result = result
