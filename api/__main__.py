"""`python -m api ...`: the service's command line (see `api.cli`)."""

from api.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
