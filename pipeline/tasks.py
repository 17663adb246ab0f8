"""What the pipeline's two tasks differ in, in one place: which data sources feed them, which
validation metric picks the best checkpoint and a sweep's best trial, and what a finished run reports.

Everything else (stages, resume, DDP, SLURM, MLflow conventions, Ray Tune, the report's statistics)
is the same code for both: the task of a run is its model's (``sasa.models.model_task``), and its data
source must feed that task (``pipeline.config`` checks it up front).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    sources: tuple[str, ...]  # the data.source values that feed it
    # what a finished run reports (``val_X`` of its last epoch, as ``X``) -> how tables name it; the first is its score
    columns: dict[str, str]
    sweep_metrics: tuple[str, ...]  # what validation logs that a sweep may compare trials by

    @property
    def results(self) -> tuple[str, ...]:
        return tuple(self.columns)

    @property
    def score(self) -> str:
        return self.results[0]

    @property
    def label(self) -> str:
        return self.columns[self.score]

    @property
    def monitor(self) -> str:
        """The validation metric (higher is better) that picks the best checkpoint and trial."""
        return f"val_{self.score}"


TASKS = {
    "classification": Task(
        "classification",
        ("mnist5k", "imagefolder", "cifar10"),
        {"top1": "top-1 %", "top5": "top-5 %"},
        ("val_top1", "val_loss"),
    ),
    "detection": Task(
        "detection",
        ("digit_canvases", "coco"),
        {
            "map": "mAP %",
            "map_50": "mAP@50 %",
            "map_75": "mAP@75 %",
            "map_small": "mAP small %",
            "map_medium": "mAP medium %",
            "map_large": "mAP large %",
        },
        ("val_map",),  # a detector's validation pass returns detections, not losses
    ),
}
SOURCES = tuple(source for task in TASKS.values() for source in task.sources)


def task_of_source(source: str) -> Task:
    return next(task for task in TASKS.values() if source in task.sources)
