"""Whether two run directories of the same recipe hold the same run: every ledger table but what a clock
measured, summary.json but its seconds, best.yaml and the exported weights. For a change that must not
change behaviour (run the recipe before and after it, then compare).

    python benchmarks/compare_runs.py RUN_DIR_BEFORE RUN_DIR_AFTER

One line per table, meta key and summary field ('same' or 'DIFFERS'); exit status 1 if anything differs.
Lineage stamps (file modification times) and the summary's renamed `genome` (now `search_space`) are
compared as what they mean.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

TIMINGS = {"merge_seconds", "eval_seconds", "created", "seconds", "ended"}


def ledger_tables(run_dir: Path) -> dict[str, list[tuple]]:
    db = sqlite3.connect(run_dir / "ledger.sqlite")
    try:
        names = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        tables = {}
        for name in names:
            columns = [row[1] for row in db.execute(f"PRAGMA table_info({name})") if row[1] not in TIMINGS]
            tables[name] = db.execute(f"SELECT {', '.join(columns)} FROM {name} ORDER BY {', '.join(columns)}").fetchall()
        return tables
    finally:
        db.close()


def meta_values(rows: list[tuple]) -> dict[str, Any]:
    values = {key: json.loads(value) for key, value in rows}
    if "lineage" in values:  # a stamp is when the files were written, not what they hold
        values["lineage"] = {name: {k: v for k, v in entry.items() if k != "stamp"} for name, entry in values["lineage"].items()}
    return values


def without_seconds(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_seconds(v) for v in value]
    return value


def summary(run_dir: Path) -> dict[str, Any]:
    data = without_seconds(json.loads((run_dir / "summary.json").read_text()))
    if "genome" in data:
        data["search_space"] = data.pop("genome")
    return data


def compare(before: Path, after: Path) -> list[tuple[str, bool]]:
    lines: list[tuple[str, bool]] = []
    tables = ledger_tables(before), ledger_tables(after)
    for name in sorted(set(tables[0]) | set(tables[1])):
        if name == "meta":
            metas = meta_values(tables[0].get(name, [])), meta_values(tables[1].get(name, []))
            for key in sorted(set(metas[0]) & set(metas[1])):
                lines.append((f"meta {key}", metas[0][key] == metas[1][key]))
            lines += [(f"meta {key} (after only: a new record)", True) for key in sorted(set(metas[1]) - set(metas[0]))]
        elif name in tables[0] and name in tables[1]:
            rows = tables[0][name], tables[1][name]
            lines.append((f"table {name} ({len(rows[0])} rows)", rows[0] == rows[1]))
        else:
            lines.append((f"table {name} (after only: a new table)", name in tables[1]))
    summaries = summary(before), summary(after)
    for key in sorted(set(summaries[0]) | set(summaries[1])):
        lines.append((f"summary {key}", summaries[0].get(key) == summaries[1].get(key)))
    for name in ("best.yaml", "final/model.safetensors"):
        lines.append((name, (before / name).read_bytes() == (after / name).read_bytes()))
    return lines


def main() -> None:
    before, after = (Path(arg) for arg in sys.argv[1:3])
    lines = compare(before, after)
    for what, same in lines:
        print(f"{what}: {'same' if same else 'DIFFERS'}")
    sys.exit(0 if all(same for _, same in lines) else 1)


if __name__ == "__main__":
    main()
