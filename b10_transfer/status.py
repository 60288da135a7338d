"""The status every cache operation returns instead of raising."""

from enum import Enum


class OperationStatus(Enum):
    """Outcome of a load, save or transfer.

    Member names match the `b10-transfer` package so existing `model.py` code that compares against them keeps
    working; the values are strings (not `auto()` integers) so they read well in logs and JSON.
    """

    SUCCESS = "SUCCESS"
    ERROR = "ERROR"
    DOES_NOT_EXIST = "DOES_NOT_EXIST"
    SKIPPED = "SKIPPED"
