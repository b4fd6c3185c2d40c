"""The Alembic migrations build exactly the models' schema, and go down and up again."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from jobstore import db
from jobstore.tables import Base


def test_migrated_schema_matches_the_models(settings):
    with db.get_engine().connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        assert context.get_current_revision() == "0004"


def test_downgrade_to_base_and_upgrade_again(settings):
    config = db.alembic_config()
    command.downgrade(config, "base")
    db.dispose_engines()
    assert set(inspect(db.get_engine()).get_table_names()) <= {"alembic_version"}
    db.dispose_engines()
    db.migrate()
    names = set(inspect(db.get_engine()).get_table_names())
    tables = {"jobs", "epoch_metrics", "checkpoints", "api_tokens", "experiments"}
    assert tables | {"idempotency_keys"} <= names


def test_going_back_from_token_scopes_keeps_every_jobs_owner(settings, session, make_job):
    # 0004's downgrade on SQLite: a rebuild of api_tokens (DROP TABLE under foreign_keys=ON)
    # would have set every job's owner to NULL through ON DELETE SET NULL.
    from api import auth

    row, _ = auth.create_token(session, name="alice")
    job_id = make_job(owner_id=row.id)
    session.close()
    db.dispose_engines()
    command.downgrade(db.alembic_config(), "0003")
    db.dispose_engines()
    with db.get_engine().connect() as connection:
        columns = {c["name"] for c in inspect(connection).get_columns("api_tokens")}
        owner = connection.exec_driver_sql(
            "SELECT owner_id FROM jobs WHERE id = ?"
            if settings.database_url.startswith("sqlite")
            else "SELECT owner_id FROM jobs WHERE id = %s",
            (job_id,),
        ).scalar()
    assert "scope" not in columns and owner == row.id
    db.dispose_engines()
    db.migrate()


def test_going_back_to_the_first_schema_keeps_every_metric_and_checkpoint(
    settings, session, make_job
):
    # 0002's downgrade rebuilds `jobs` on SQLite: its DROP TABLE, under foreign_keys=ON, deleted
    # every epoch and checkpoint row (ON DELETE CASCADE) before they were kept aside.
    from jobstore import jobs

    job_id = make_job()
    assert jobs.claim_job(session, job_id, worker="w") is not None
    jobs.record_epochs(session, job_id, [{"epoch": n, "test_accuracy": 0.5} for n in (1, 2)])
    jobs.record_checkpoint(
        session, job_id, path="/x/checkpoint-epoch0002.pt", epoch=2, is_best=False,
        size_bytes=1, sha256="0" * 64,
    )  # fmt: skip
    session.close()
    db.dispose_engines()
    command.downgrade(db.alembic_config(), "0001")
    db.dispose_engines()
    with db.get_engine().connect() as connection:
        count = connection.exec_driver_sql
        assert count("SELECT COUNT(*) FROM epoch_metrics").scalar() == 2
        assert count("SELECT COUNT(*) FROM checkpoints").scalar() == 1
        assert count("SELECT COUNT(*) FROM jobs").scalar() == 1
    db.dispose_engines()
    db.migrate()


def test_sqlite_connections_use_wal_and_foreign_keys(settings):
    if not settings.database_url.startswith("sqlite"):
        return
    with db.get_engine().connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
