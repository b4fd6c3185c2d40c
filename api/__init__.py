"""The jumpout training service: settings, store, service functions and the HTTP API.

Importing this package is cheap on purpose: the worker imports `api.settings`, `api.db` and
`api.jobs` without pulling in FastAPI, and the app itself lives in `api.main`.
"""
