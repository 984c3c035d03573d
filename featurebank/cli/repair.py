"""`featurebank store verify` and `featurebank store repair`: find damage, then mend it.

`verify` exits 0 when the bank is intact, 1 when only derived files (indexes, heads)
are damaged, 2 when the store itself is; `--json` prints the same for monitoring.
`repair` exits with the severity of what is left, and 2 when a salvage of the store
could not recover every item (the lines starting LOST say which).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from featurebank.cli import Commands


def register(commands: Commands) -> None:
    p = commands.subcommand(
        "store", "verify", "check the store and every published generation; one line per damage",
        _verify,
    )  # fmt: skip
    p.add_argument("--bank", required=True, type=Path, help="bank directory")
    p.add_argument("--quick", action="store_true", help="check sizes only, not content hashes")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")

    p = commands.subcommand(
        "store", "repair",
        "rebuild damaged indexes and heads from the store; mend CURRENT pointers; salvage a "
        "damaged store into a fresh environment",
        _repair,
    )  # fmt: skip
    p.add_argument("--bank", required=True, type=Path, help="bank directory")
    p.add_argument("--json", action="store_true", help="print what was done as JSON")


def _verify(args: argparse.Namespace) -> int:
    from featurebank.classify.repair import print_lines
    from featurebank.store.verify import SEVERITY, verify

    _require_bank(args.bank)
    report = verify(args.bank, deep=not args.quick)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print("\n".join(print_lines(report)))
    return SEVERITY[report.severity]


def _repair(args: argparse.Namespace) -> int:
    from featurebank.classify.repair import repair
    from featurebank.store.verify import SEVERITY

    _require_bank(args.bank)
    out = repair(args.bank)
    if args.json:
        print(json.dumps(out, indent=2))
        return SEVERITY[out["severity"]]
    for line in out["actions"]:
        print(f"repaired  {line}")
    for line in out["lost"]:
        print(f"LOST  {line}")
    for line in out["left"]:
        print(f"NOT REPAIRED  {line}")
    if not out["found"]:
        print(f"{out['bank']}: nothing to repair")
    else:
        before, after = (("unreadable" if n is None else n) for n in (out["items_before"], out["items_after"]))
        items = f"items readable: {before} before, {after} after"
        print(f"{out['bank']}: {len(out['actions'])} repairs, {len(out['left'])} left; {items}")
    return SEVERITY[out["severity"]]


def _require_bank(bank: Path) -> None:
    from featurebank.core.errors import NotFound

    if not (bank / "store").is_dir():
        raise NotFound(f"{bank} is not a bank (no store/ folder)")
