"""The embedded stack behind ``make run``: one command that migrates the database and starts and
watches Redis, a Celery worker, the reaper and the API on this machine (see ``launcher.stack``).
It only starts processes; it imports neither the API's app nor the worker's code."""
