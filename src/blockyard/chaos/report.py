"""What a chaos run found: per fault, per check, and the summary table and JSON report."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from typing import Final

#: The checks of docs/reliability.md. 6 is a measurement, never a violation.
CHECKS: Final = {
    1: "acknowledged-durable writes lost",
    2: "torn, misplaced or invented data",
    3: "blocks going back in time (quiet reads)",
    4: "two primaries in one epoch / epoch going down",
    5: "volumes not healed within the bound",
    6: "I/O unavailability per fault (measured)",
    7: "replica copies differing from the primary",
}


@dataclass
class FaultResult:
    number: int
    kind: str
    target: str  # what was hit, e.g. "primary of chaos0"
    server: str  # server id, or "master"
    at_s: float  # since the workload started
    hold_s: float
    heal_s: float | None  # from the end of the fault to every volume healed; None: never
    unavailable_s: float  # longest stretch without a completed I/O, over all volumes


@dataclass
class ChaosReport:
    seed: int
    duration_s: float
    network: str
    volumes: list[str]
    faults_requested: list[str]
    masters: str = "1 on SQLite"
    faults_not_run: dict[str, str] = field(default_factory=dict)
    sabotage: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    results: list[FaultResult] = field(default_factory=list)
    checks: dict[int, int] = field(default_factory=lambda: dict.fromkeys(CHECKS, 0))
    violations: list[dict[str, object]] = field(default_factory=list)
    ops: int = 0
    ops_by_kind: dict[str, int] = field(default_factory=dict)
    io_errors: int = 0
    durable_writes: int = 0
    sectors_checked: int = 0
    harness_errors: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return not self.harness_errors and not any(self.checks.values())

    def add_violation(self, check: int, volume: str, message: str, at_s: float) -> None:
        self.checks[check] = self.checks.get(check, 0) + 1
        if len(self.violations) < 200:
            self.violations.append(
                {"check": check, "volume": volume, "message": message, "at_s": round(at_s, 3)}
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def table(self) -> str:
        lines = [
            f"seed {self.seed}: {self.elapsed_s:.0f} s, network: {self.network}, "
            f"masters: {self.masters}, volumes: {', '.join(self.volumes)}",
            *(
                [f"deliberate defects (self-test): {', '.join(self.sabotage)}"]
                if self.sabotage
                else []
            ),
            "",
            f"{'fault':<17} {'count':>5} {'unavailable median/max':>24} {'healed median/max':>20}",
        ]
        for kind in self.faults_requested:
            done = [r for r in self.results if r.kind == kind]
            if kind in self.faults_not_run:
                lines.append(f"{kind:<17} {'-':>5}   not run: {self.faults_not_run[kind]}")
                continue
            if not done:
                lines.append(f"{kind:<17} {0:>5}")
                continue
            heals = [r.heal_s for r in done if r.heal_s is not None]
            lines.append(
                f"{kind:<17} {len(done):>5} {_spread([r.unavailable_s for r in done]):>24} "
                f"{_spread(heals) if heals else 'never':>20}"
            )
        lines += [
            "",
            f"I/O: {self.ops} operations completed ({_kinds(self.ops_by_kind)}), "
            f"{self.io_errors} returned an error (their outcome is unknown, not a violation)",
            f"checked: {self.durable_writes} writes acknowledged durable, "
            f"{self.sectors_checked} blocks read back and checked",
            "",
        ]
        for n, name in CHECKS.items():
            verdict = "measured" if n == 6 else ("ok" if not self.checks.get(n) else "FAILED")
            count = "" if n == 6 else str(self.checks.get(n, 0))
            lines.append(f"  {n}. {name:<48} {count:>4}  {verdict}")
        for e in self.harness_errors:
            lines.append(f"harness error: {e}")
        for v in self.violations[:20]:
            lines.append(f"  violation (check {v['check']}, {v['volume']}): {v['message']}")
        lines.append("")
        lines.append(
            f"{'PASS' if self.ok() else 'FAIL'}: seed {self.seed} (re-run with --seed "
            f"{self.seed}: the same faults and the same workload choices; the timing of real "
            "processes varies)"
        )
        return "\n".join(lines)


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} / {max(values):.2f} s"


def _kinds(by_kind: dict[str, int]) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items()))
