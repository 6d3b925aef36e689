"""Figures and rows: ratios measured side by side, targets, sanity checks, the report."""

import sys
import time
from dataclasses import dataclass, field

import spri_hf  # noqa: F401  (registers model_type "spri")


# ---------------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class Row:
    """One comparison. `ratio` is `ratio_def` (e.g. "spri/native") so that `target` reads on it directly."""

    setting: str
    metric: str
    unit: str
    spri_name: str
    spri: float | None
    reference_name: str
    reference: float | None
    ratio: float | None
    ratio_def: str
    target: str | None  # ">= 0.95", "<= 3", or None (informational)
    met: bool | None
    note: str


@dataclass
class Figure:
    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    sanity: dict = field(default_factory=dict)  # check -> {"passed": bool, details...}
    skipped: list[dict] = field(default_factory=list)  # {"setting": ..., "reason": ...}
    details: dict = field(default_factory=dict)
    wall_s: float | None = None

    def add(self, setting, metric, unit, spri, reference, *, per="spri/reference", target=None, note=""):
        """Add a row. `spri` and `reference` are `(name, value)`; the ratio is spri/reference, or reference/spri with
        `per="reference/spri"` (a speed-up from two times); `target` is e.g. `(">=", 0.95)`."""
        (spri_name, spri_value), (reference_name, reference_value) = spri, reference
        ratio = None
        if spri_value and reference_value and spri_value > 0 and reference_value > 0:
            ratio = spri_value / reference_value if per == "spri/reference" else reference_value / spri_value
        met = None
        if target is not None and ratio is not None:
            met = ratio >= target[1] if target[0] == ">=" else ratio <= target[1]
        ratio_def = f"{spri_name}/{reference_name}" if per == "spri/reference" else f"{reference_name}/{spri_name}"
        target_text = None if target is None else f"{target[0]} {target[1]:g}"
        self.rows.append(Row(setting, metric, unit, spri_name, spri_value, reference_name, reference_value, ratio,
                             ratio_def, target_text, met, note))

    def check(self, name: str, passed, **details):
        self.sanity[name] = dict(details, passed=bool(passed))
        if not passed:
            log(f"  SANITY CHECK FAILED: {name}: {details}")


def log(message: str):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3g}"
    return f"{value:,.4g}"


def print_figure(figure: Figure):
    print(f"\n{figure.title}" + (f"  [{figure.wall_s:.0f} s]" if figure.wall_s is not None else ""))
    header = ("setting", "metric", "spri", "reference", "ratio", "target", "met?")
    lines = [
        (
            row.setting,
            f"{row.metric} ({row.unit})" if row.unit else row.metric,
            f"{row.spri_name} {_fmt(row.spri)}",
            f"{row.reference_name} {_fmt(row.reference)}",
            f"{_fmt(row.ratio)} {row.ratio_def}" if row.ratio is not None else "-",
            row.target or "info",
            {True: "yes", False: "NO", None: "-"}[row.met],
        )
        for row in figure.rows
    ]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    for line in [header, *lines]:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    for skip in figure.skipped:
        print(f"  skipped {skip['setting']}: {skip['reason']}")
    failed = [name for name, check in figure.sanity.items() if not check["passed"]]
    passed = len(figure.sanity) - len(failed)
    print(f"  sanity checks: {passed}/{len(figure.sanity)} passed" + (f"; FAILED: {failed}" if failed else ""))
    for row in figure.rows:
        if row.note:
            print(f"  note ({row.setting}; {row.metric}): {row.note}")
