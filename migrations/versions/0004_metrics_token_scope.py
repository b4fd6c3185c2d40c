"""Token scopes: a token that may read only GET /metrics.

- `api_tokens.scope`: "full" (every route, what every existing token keeps) or "metrics" (a
  scraper's token: `GET /metrics` only, 403 on every other route; `api.auth`), so that the token
  in Prometheus' configuration cannot submit, cancel or read jobs.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "api_tokens",
        sa.Column("scope", sa.String(length=16), nullable=False, server_default="full"),
    )


def downgrade() -> None:
    # recreate="never": SQLite (3.35+) drops the column in place. A batch rebuild would DROP the
    # table under the engine's foreign_keys=ON, whose implicit DELETE sets every job's and
    # experiment's owner_id to NULL (ON DELETE SET NULL).
    with op.batch_alter_table("api_tokens", recreate="never") as batch:
        batch.drop_column("scope")
