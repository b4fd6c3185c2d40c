"""Who may read which job or experiment: the one check every route that reads one goes through.

`Settings.read_scope` (`JUMPOUT_READ_SCOPE`):

- `team` (the default, for one team's box): any caller reads, lists and downloads every job;
- `owner`: a caller that is not an admin reads only the jobs it owns (the anonymous owner's, when
  it is the anonymous caller); any other job is answered `404 job_not_found`, exactly as a job
  that does not exist, so a token learns nothing of others' jobs, and lists hold its own only.

Experiments are their owner's and the admins' in both scopes (`jobstore.experiments.visible_to`,
which the experiment reads apply): an experiment is a person's question, its report their answer.

Under `team` the job checks cost nothing (no query); under `owner` a route that does not read the
job's row anyway pays one primary-key lookup of the owner. tests/api/test_read_scope.py calls
every route of the app that takes a job or experiment id as another token, so a route added
without these checks fails it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, select

from jobstore.errors import JobNotFound
from jobstore.jobs import is_job_id
from jobstore.settings import get_settings
from jobstore.tables import Job

_JOB_OWNER = select(Job.owner_id).where(Job.id == bindparam("job_id"))


def confined(principal: Any) -> bool:
    """True when `principal` may read only its own jobs (`read_scope` "owner", not an admin)."""
    return get_settings().read_scope == "owner" and not principal.is_admin


def may_read_job(principal: Any, owner_id: int | None) -> bool:
    """Whether `principal` may read a job owned by `owner_id` (None: the anonymous owner)."""
    return not confined(principal) or owner_id == principal.id


def check_job_row(principal: Any, row: Any) -> None:
    """`JobNotFound` unless `principal` may read the job `row` (anything with `id`, `owner_id`)."""
    if not may_read_job(principal, row.owner_id):
        raise JobNotFound(row.id)


def check_job(executor: Any, principal: Any, job_id: str) -> None:
    """`JobNotFound` when `principal` may not read job `job_id` (under `owner` scope: when it is
    not the caller's, or does not exist). Under `team` scope nothing is checked here: the route
    still answers 404 for a job that does not exist. `executor`: a Connection or Session."""
    if not confined(principal):
        return
    if not is_job_id(job_id):
        raise JobNotFound(job_id[:64])
    row = executor.execute(_JOB_OWNER, {"job_id": job_id}).first()
    if row is None or row.owner_id != principal.id:
        raise JobNotFound(job_id)


def job_filter(principal: Any) -> Any | None:
    """The WHERE clause a list of jobs needs for `principal` (None: every job)."""
    if not confined(principal):
        return None
    return Job.owner_id.is_(None) if principal.id is None else Job.owner_id == principal.id
