"""An embedded PanDA-compatible development server.

Developers and site admins try the pilot without external services
(``twistd -n panda-dev``), and the pilot's integration tests and benchmarks run
against it (``pilot.devserver.server.start_dev_server``).  It speaks both PanDA
pilot APIs (legacy ``/server/panda`` and ``/api/v1``) the way the real server does,
strictness included, over HTTPS with a generated grid-style PKI.

Modules: ``pki`` (test CA, host/user certificates, RFC 3820 proxy), ``protocol``
(wire formats), ``signatures`` (method signatures and parameter checks), ``auth``
(TLS and identities), ``jobdef`` (job definitions), ``store`` (SQLite), ``dispatcher``
(job logic), ``updates`` (``updateJobStatus`` decisions), ``columns`` (column
widths and how the database refuses a wider value), ``adder`` (the Adder daemon),
``events``/``eventreports`` (event-service ranges and their reports), ``handlers`` and
``event_api`` (the API methods), ``queues`` (queuedata), ``web`` (HTTP), ``server``
(start/stop), ``tap`` (twistd).
"""
