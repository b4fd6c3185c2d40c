"""The job store and queue that the API and the worker share: one settings object
(`jobstore.settings`), the database (`jobstore.db`, `jobstore.tables`, migrations in
`migrations/`), the job's state transitions and read shapes (`jobstore.jobs`), the typed errors
(`jobstore.errors`) and the broker queue's names and publishing (`jobstore.queue`).

It imports neither torch nor FastAPI nor Celery's worker side: the library below it is used only
through its torch-free spec (`jumpout.spec`).
"""
