"""The benchmark's in-process baseline for the policy pool: what policy isolation costs.

Keybroker never evaluates a policy in the server process (``keybroker.policy.workers``: each
evaluation runs in a worker process, bounded in time and memory). Issue 23 asks what that
costs against in-process evaluation, so the benchmark needs the in-process case, and only
the benchmark: this module lives in ``bench/``, no config key or flag selects it, and only
the launcher ``kbsbench.inprocess_kbs`` puts it in a server.

``InProcessPolicyWorkers`` is ``PolicyWorkers`` with one step replaced: a request is answered
by ``CompiledPolicies`` (the very code each worker process runs) in the server, instead of
being sent to a worker process as JSON over a pipe and waited for while its deadline and
memory are polled. Everything else is the pool's own: ``compile`` and its checks, the
``PooledPolicy`` it returns with its answer memory (a remembered answer never reaches either),
and the pool's threads, ``[policy] workers`` of them, on which the caller waits.

Evaluations run on those threads, not on the event loop: that is how the isolated pool waits
too, so the thread hop is in both and the measured difference is the process boundary and
its bounds alone; and rego-cpp, called through ``ctypes``, releases the GIL, so the event loop
keeps serving while a policy evaluates (on the loop, every evaluation would stall every
connection of the worker, a cost isolation does not have). Nothing here bounds an
evaluation: a runaway policy would hold a thread, and memory, for as long as it runs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from keybroker.policy.workers import CompiledPolicies, PolicyLimits, PolicyWorkers

log = logging.getLogger(__name__)

MARKER = "BENCHMARK ONLY: policies evaluated in the server process, unbounded"


class InProcessPolicyWorkers(PolicyWorkers):
    """``PolicyWorkers`` whose requests are answered in this process (see the module)."""

    def __init__(self, limits: PolicyLimits | None = None) -> None:
        super().__init__(limits)
        self._policies = CompiledPolicies()
        # one line per server process that uses it: the benchmark counts them in the log
        log.warning("%s (pid %d)", MARKER, os.getpid())

    def _ask(self, request: Mapping[str, Any]) -> Mapping[str, Any]:
        return self._policies.reply(request)
