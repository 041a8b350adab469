"""Pass reports: data first (rows of plain values), rendered second (tabulate for people, JSON for machines).

Memory columns count parameters only: the weight in its original dtype before; after the rewrite the int8
weight, its fp32 scales, the FP outlier columns W_o, the outlier indices (int64) and the fp32 outlier
scales S_o. Biases are unchanged and not counted; activations are not counted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tabulate import tabulate

COLUMNS = ("node", "module", "in_features", "out_features", "outliers", "outlier_ratio", "max_mean_ratio",
           "bytes_before", "bytes_after", "bytes_saved", "status")


def quaff_bytes(in_features: int, out_features: int, n_outliers: int, dtype_bytes: int) -> int:
    """Bytes QuaffLinear keeps for one layer (bias excluded): int8 W, scales, W_o, indices, S_o."""
    return in_features * out_features + 4 * out_features + n_outliers * (out_features * dtype_bytes + 8 + 4)


@dataclass
class PassReport:
    """What one pass did: one row per node it looked at, plus notes."""

    pass_name: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    @property
    def transformed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("status") in ("annotated", "rewritten", "fused")]

    def totals(self) -> dict[str, Any]:
        done = self.transformed
        before = sum(r.get("bytes_before", 0) for r in done)
        after = sum(r.get("bytes_after", 0) for r in done)
        return {"nodes": len(self.rows), "transformed": len(done), "skipped": len(self.rows) - len(done),
                "outliers": sum(r.get("outliers", 0) for r in done),
                "bytes_before": before, "bytes_after": after, "bytes_saved": before - after,
                "outlier_bytes": sum(r.get("outlier_bytes", 0) for r in done),
                "int8_weight_bytes": sum(r.get("in_features", 0) * r.get("out_features", 0)
                                         for r in done if "bytes_after" in r)}

    def without_timings(self) -> "PassReport":
        """The report less its per-row seconds (columns ending in ``_s``): what an artifact records, so that the
        same inputs give byte-identical files however fast the machine was."""
        rows = [{k: v for k, v in row.items() if not k.endswith("_s")} for row in self.rows]
        return PassReport(self.pass_name, rows, list(self.notes))

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.pass_name, "rows": self.rows, "totals": self.totals(), "notes": self.notes}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def to_table(self, max_rows: int | None = None) -> str:
        cols = [c for c in COLUMNS if any(c in r for r in self.rows)]
        cols += sorted({k for r in self.rows for k in r} - set(cols) - {"outlier_channels", "outlier_bytes"})
        rows = self.rows if max_rows is None else self.rows[:max_rows]
        body = tabulate([[_fmt(r.get(c, "")) for c in cols] for r in rows], headers=cols, tablefmt="simple")
        t = self.totals()
        lines = [f"== {self.pass_name}: {t['transformed']} of {t['nodes']} nodes transformed", body]
        if max_rows is not None and len(self.rows) > max_rows:
            lines.append(f"... {len(self.rows) - max_rows} more rows (--all-rows prints them all)")
        lines.append(f"total: {t['outliers']} outlier channels; weights {human_bytes(t['bytes_before'])} -> "
                     f"{human_bytes(t['bytes_after'])} (saved {human_bytes(t['bytes_saved'])}); "
                     f"FP outlier columns {human_bytes(t['outlier_bytes'])}"
                     + (f" ({100 * t['outlier_bytes'] / t['int8_weight_bytes']:.1f}% of the int8 weights)"
                        if t["int8_weight_bytes"] else ""))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
