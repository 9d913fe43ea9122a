"""Bad input never passes silently: it stops with the row and column, or is skipped and listed."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..fileio import atomic_open


class DataError(UserError):
    """A bad row or file. The message names the file, the row and the column, and how to fix it."""

    def __init__(
        self,
        reason: str,
        file: str | None = None,
        row: int | None = None,
        column: str | None = None,
        row_label: str = "row",  # "line" for CSV files (the header is line 1), "row" for indices
    ):
        self.reason, self.file, self.row, self.column = reason, file, row, column
        where = ", ".join(
            part
            for part in (
                str(file) if file else "",
                f"{row_label} {row}" if row is not None else "",
                f"column {column!r}" if column else "",
            )
            if part
        )
        super().__init__(f"{where}: {reason}" if where else reason)


@dataclass
class SkippedRow:
    file: str
    row: int | None  # as in the error: the CSV line, or the item index
    column: str | None
    reason: str


class BadRows:
    """Collects rows skipped under ``--skip-bad`` and writes them next to the output.

    With ``skip=False`` every error is raised at once, so nothing bad passes silently.
    """

    def __init__(self, skip: bool):
        self.skip = skip
        self.rows: list[SkippedRow] = []

    def handle(self, error: DataError) -> None:
        if not self.skip:
            raise error
        self.rows.append(SkippedRow(str(error.file or ""), error.row, error.column, error.reason))

    def __len__(self) -> int:
        return len(self.rows)

    def write(self, output: str | os.PathLike) -> Path | None:
        """Write ``<output>.skipped.csv`` if anything was skipped; return its path."""
        if not self.rows:
            return None
        path = Path(str(output) + ".skipped.csv")
        with atomic_open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "row", "column", "reason"])
            for r in self.rows:
                writer.writerow([r.file, "" if r.row is None else r.row, r.column or "", r.reason])
        return path
