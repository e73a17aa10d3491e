"""``kbs`` with ``kbsbench.inprocess_policy`` in place of the policy pool: the benchmark's
in-process baseline (issue 23). Not a way to run Keybroker.

python -m kbsbench.inprocess_kbs -c kbs-config.toml     # PYTHONPATH=bench; the flags of kbs

The replacement is made when this module is imported, in ``keybroker.kbs.services``, where
``build_services`` looks ``PolicyWorkers`` up on each call. With ``worker_count > 1`` the
server's uvicorn workers are ``multiprocessing`` processes started with ``spawn``
(``keybroker.kbs.server``), and a spawned process first imports the parent's main module,
under the name ``__mp_main__``: so this module runs again in every worker, before the worker
builds its app, and the replacement is made there too. The benchmark checks that it was
(``kbsbench.isolation``): one marker line per server process in the log, and no
``keybroker.policy.workers`` process under the server.
"""

from __future__ import annotations

from kbsbench.inprocess_policy import InProcessPolicyWorkers
from keybroker.kbs import services

services.PolicyWorkers = InProcessPolicyWorkers  # type: ignore[attr-defined]

if __name__ == "__main__":
    from keybroker.cli.kbs import main

    main()
