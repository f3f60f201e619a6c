"""The one exception type of the data layer.

Every problem with user input (a file, a record, a field, a tokenizer directory, a mixture file)
is raised as a ``DataError`` whose message names where it happened, e.g.
``data/arc.jsonl:17: field 'answerKey': label 'F' is not one of the choices ['A', 'B', 'C', 'D']``.
``reason`` is a short stable key (``bad_json``, ``missing_field``, ...) used to count skipped
records per file and reason when invalid records are skipped instead of fatal.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data, named by file, line (or record/row) and field."""

    def __init__(self, message: str, *, reason: str = "invalid", field: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.field = field

    def __reduce__(self):
        # Raised inside worker processes and re-raised in the parent: keep the keyword-only
        # attributes through pickling (the default reduce would call __init__(message) only).
        return (_rebuild_data_error, (str(self), self.reason, self.field))


def _rebuild_data_error(message: str, reason: str, field: str | None) -> DataError:
    return DataError(message, reason=reason, field=field)
