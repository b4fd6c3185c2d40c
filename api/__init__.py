"""The HTTP API of the jumpout service (FastAPI): routes, request and response bodies, tokens,
and the fast read paths. The app is `api.main:app`; `python -m api` migrates and manages tokens.

It stands on `jobstore` (settings, database, job state, the broker queue) and on the library's
torch-free `jumpout.spec`; it never imports torch, `worker` or `launcher`.
"""
