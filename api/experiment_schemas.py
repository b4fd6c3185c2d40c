"""Request and response bodies of `/v1/experiments`: `ExperimentCreate`, `ExperimentRead`,
`ExperimentSummary`, `ExperimentsPage`, `ExperimentReport`.

`ExperimentCreate` types only the request's outline (which parts exist and their JSON types,
bounded as `jumpout.experiment` bounds them); what is inside `base`, `grid` and `rows` is a job
spec's fields, checked whole by `jumpout.experiment.plan_experiment` with the spec's own
messages (a 422 names the row and the field). The read bodies are built as dicts by
`jobstore.experiments` and `jumpout.report`; these models document them in the OpenAPI schema
(tests/api/test_experiments.py checks the bodies against them).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from jobstore.tables import JobStatus
from jumpout.experiment import MAX_LABEL_LENGTH, MAX_NAME_LENGTH, MAX_ROWS, MAX_SEEDS, PRESETS
from jumpout.spec import FIELDS

SEED_LOW, SEED_HIGH = int(FIELDS["seed"].low), int(FIELDS["seed"].high)
Seed = Annotated[int, Field(ge=SEED_LOW, le=SEED_HIGH)]
PRIORITY_BOUND = 100


class ExperimentCreate(BaseModel):
    """An experiment: a base job spec, its rows (exactly one of `grid`, `rows`, `preset`) and
    the seeds every row runs with; one job per (row, seed)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    name: str | None = Field(None, max_length=MAX_NAME_LENGTH, description="a name to find it by")
    base: dict[str, Any] = Field(
        description="a job spec without the seed: dataset, architecture and any overrides "
        "(the fields of POST /v1/jobs)"
    )
    grid: dict[str, list[Any]] | None = Field(
        None,
        description="field -> list of values; the rows are every combination, labelled like "
        "`sigma=0.1,p_max=0.6`",
    )
    rows: list[dict[str, Any]] | None = Field(
        None,
        max_length=MAX_ROWS,
        description="one object of overrides per row, each with an optional `label`",
    )
    preset: Literal[PRESETS] | None = Field(
        None,
        description="the rows of the paper's Table 1 (eight ablations) or Table 2 (dropout, "
        "jumpout)",
    )
    seeds: (
        Annotated[int, Field(ge=1, le=MAX_SEEDS)]
        | Annotated[list[Seed], Field(min_length=1, max_length=MAX_SEEDS)]
    ) = Field(description="a count n (seeds 0 .. n-1) or a list of distinct seeds")
    baseline: str | None = Field(
        None,
        max_length=MAX_LABEL_LENGTH,
        description="the row the others are compared with, paired by seed; omitted: the plain "
        "dropout row if there is one; null: none",
    )
    priority: int = Field(
        0,
        ge=-PRIORITY_BOUND,
        le=PRIORITY_BOUND,
        description="every job's priority among its owner's queued jobs (higher first)",
    )

    @field_validator("seeds", mode="before")
    @classmethod
    def _one_seeds_message(cls, value: Any) -> Any:
        # One message for the union (pydantic would report each branch's failure as a field of
        # its own, "seeds.constrained-int" and "seeds.list[constrained-int]").
        if _is_int(value) and 1 <= value <= MAX_SEEDS:
            return value
        if (
            isinstance(value, list)
            and 1 <= len(value) <= MAX_SEEDS
            and all(_is_int(seed) and SEED_LOW <= seed <= SEED_HIGH for seed in value)
        ):
            return value
        raise ValueError(
            f"must be a count n in [1, {MAX_SEEDS}] (seeds 0 .. n-1) or a list of 1 to "
            f"{MAX_SEEDS} distinct integers in [{SEED_LOW}, {SEED_HIGH}]"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


EXPERIMENT_FIELDS = tuple(ExperimentCreate.model_fields)
"""The fields of an experiment request, for the unknown-field message."""


class StatusCounts(BaseModel):
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int


class ExperimentProgress(BaseModel):
    """`fraction`: finished jobs / all jobs. `epoch_fraction`: epochs done / all epochs (a
    finished job counts all of its epochs). `eta_seconds`: epochs left x the mean epoch time
    over the experiment's jobs / the number of its jobs running now (at least 1); null until an
    epoch has been timed, 0 once every job has finished."""

    finished: int
    total: int
    fraction: float
    epochs_done: int
    epochs_total: int
    epoch_fraction: float
    eta_seconds: float | None
    running: int


class ExperimentSummary(BaseModel):
    """An experiment at a glance (the list's items)."""

    id: str
    name: str | None
    owner: str | None
    created_at: datetime
    preset: str | None
    baseline: str | None
    job_count: int
    cancel_requested: bool
    counts: StatusCounts
    progress: ExperimentProgress


class ExperimentRow(BaseModel):
    label: str
    params: dict[str, Any]


class ExperimentJob(BaseModel):
    """One job of the experiment (GET /v1/jobs/{id} has the rest)."""

    id: str
    row_label: str | None
    seed: int | None
    status: JobStatus
    epoch: int
    epochs: int
    final_accuracy: float | None


class ExperimentRead(ExperimentSummary):
    """An experiment: its summary, its plan and its jobs in plan order (row, then seed)."""

    metric: str
    base: dict[str, Any]
    rows: list[ExperimentRow]
    seeds: list[int]
    priority: int
    jobs: list[ExperimentJob]


class ExperimentsPage(BaseModel):
    items: list[ExperimentSummary]
    next_cursor: str | None


class ReportFormat(StrEnum):
    JSON = "json"
    CSV = "csv"
    MARKDOWN = "markdown"


class Comparison(BaseModel):
    """A row against the baseline, paired by seed: mean difference (percentage points), its
    bootstrap 95% CI, paired t-test and Wilcoxon p-values, wins/ties/losses over the pairs."""

    diff: float | None
    ci95: list[float] | None
    p_t: float | None
    p_wilcoxon: float | None
    wins: int
    ties: int
    losses: int
    pairs: int


class ReportLayer(BaseModel):
    """One dropout slot: each statistic averaged over the row's counted runs and epochs."""

    model_config = ConfigDict(extra="allow")

    name: str
    active_fraction: float | None = None
    rate: float | None = None
    capped_fraction: float | None = None


class ReportRow(BaseModel):
    label: str
    params: dict[str, Any]
    n: int
    mean: float | None
    std: float | None
    ci95: list[float] | None
    vs_baseline: Comparison | None
    paper: float | None
    layers: list[ReportLayer]


class ExcludedRun(BaseModel):
    """A run left out of the statistics: it failed, was cancelled or has not finished."""

    label: str
    seed: int
    job_id: str | None
    status: str


class ReportBootstrap(BaseModel):
    method: str
    n_resamples: int
    confidence: float
    seed: int


class ExperimentReport(BaseModel):
    """Final test accuracy (percent) per row: n, mean, std, 95% CI; against the baseline, paired
    by seed; the paper's figure where the row is one of its tables' (`jumpout.report`)."""

    metric: str
    unit: str
    dataset: str
    architecture: str
    baseline: str | None
    n_jobs: int
    excluded: list[ExcludedRun]
    rows: list[ReportRow]
    bootstrap: ReportBootstrap | None = None
