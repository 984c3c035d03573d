"""What a benchmark ends with: each check as PASS or FAIL, and a non-zero exit when one failed.

A benchmark that prints a ratio it has no right to (recall below the target, another
metric, other vectors) is worse than none: the checks are its preconditions and targets,
and `make bench-smoke` fails when any benchmark's exit status is non-zero.
"""

from __future__ import annotations


class Checks:
    """Collects PASS/FAIL lines as a benchmark runs; `exit_code` is what `main` returns."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, ok: bool, text: str) -> bool:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
        if not ok:
            self.failed.append(text)
        return ok

    def exit_code(self) -> int:
        if self.failed:
            print(f"\n{len(self.failed)} check(s) FAILED: " + "; ".join(self.failed))
            return 1
        print("\nevery check passed")
        return 0
