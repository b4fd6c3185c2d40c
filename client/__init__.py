"""``jumpout-client``: the service's command-line client (submit, list, show, watch, logs,
cancel, download, experiments) over HTTP.

It needs only httpx and rich (the ``client`` extra) and the torch-free `jumpout.spec`, which
builds ``submit``'s options and checks their values as the library's command line does. It never
imports torch or the service's packages (`api`, `jobstore`, `worker`).
"""
