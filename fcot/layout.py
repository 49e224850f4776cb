"""Where a run keeps everything: one home for the paths of a run directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """RUN_DIR/{config,summary}.json, report.md and its plots, stages/ (markers), teacher/, curated/METHOD,
    students/METHOD (model/ is the student; an on-policy method's: round_R/model), rollouts/METHOD/round_R,
    eval/METHOD."""

    root: Path

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    def curated(self, method: str) -> Path:
        return self.root / "curated" / method

    def student(self, method: str) -> Path:
        return self.root / "students" / method

    def model(self, method: str) -> Path:
        return self.student(method) / "model"

    def round_student(self, method: str, round_: int) -> Path:
        """An on-policy method's student after round `round_` (model/ is the student)."""
        return self.student(method) / f"round_{round_}"

    def rollout(self, method: str, round_: int) -> Path:
        """An on-policy round's samples, grades and training rows (fcot.rollout)."""
        return self.root / "rollouts" / method / f"round_{round_}"

    def eval(self, method: str) -> Path:
        return self.root / "eval" / method

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    def marker(self, stage: str) -> Path:
        return self.stages / f"{stage}.json"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"
