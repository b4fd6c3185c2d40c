"""The service's command line: `python -m api migrate | token create|revoke|list`."""

from __future__ import annotations

import argparse
import sys

from jobstore.errors import TokenError


def _migrate(_args) -> int:
    from jobstore.db import migrate
    from jobstore.settings import get_settings

    migrate()
    url = get_settings().database_url
    print(f"database is at the newest revision ({url.split('@')[-1]})")
    return 0


def _token_create(args) -> int:
    from api.auth import create_token
    from jobstore.db import session_scope

    with session_scope() as session:
        row, token = create_token(session, name=args.name, is_admin=args.admin, scope=args.scope)
    print(token)
    kind = "admin token" if row.is_admin else "token"
    kind = "metrics-only token" if row.scope == "metrics" else kind
    print(f"created {kind} {row.name!r} (id {row.id}); it is shown only this once", file=sys.stderr)
    return 0


def _token_revoke(args) -> int:
    from api.auth import revoke_token
    from jobstore.db import session_scope

    with session_scope() as session:
        row = revoke_token(session, name_or_id=args.name_or_id)
    print(f"revoked token {row.name!r} (id {row.id})")
    return 0


def _token_list(_args) -> int:
    from api.auth import list_tokens
    from jobstore.db import session_scope

    with session_scope() as session:
        rows = list_tokens(session)
    print(f"{'id':>4}  {'name':<24} {'admin':<5}  {'scope':<7}  {'created':<25} revoked")
    for row in rows:
        revoked = row.revoked_at.isoformat(timespec="seconds") if row.revoked_at else "-"
        print(
            f"{row.id:>4}  {row.name:<24} {'yes' if row.is_admin else 'no':<5}  {row.scope:<7}  "
            f"{row.created_at.isoformat(timespec='seconds'):<25} {revoked}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m api", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="upgrade the database to the newest schema").set_defaults(
        run=_migrate
    )
    token = commands.add_parser("token", help="manage API tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    create = token_commands.add_parser("create", help="create a token and print it once")
    create.add_argument("--name", required=True, help="a unique name (who or what uses it)")
    create.add_argument("--admin", action="store_true", help="may cancel anyone's jobs")
    create.add_argument(
        "--scope",
        choices=("full", "metrics"),
        default="full",
        help="full: every route (default); metrics: GET /metrics only (a scraper's token)",
    )
    create.set_defaults(run=_token_create)
    revoke = token_commands.add_parser("revoke", help="revoke a token by name or id")
    revoke.add_argument("name_or_id")
    revoke.set_defaults(run=_token_revoke)
    token_commands.add_parser("list", help="list tokens (never the secrets)").set_defaults(
        run=_token_list
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except TokenError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
