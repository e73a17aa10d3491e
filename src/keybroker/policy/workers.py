"""Policy evaluation in worker processes, each evaluation bounded in time and memory.

rego-cpp cannot be interrupted, and a policy can ask for any amount of work
(``count(numbers.range(1, 100000000))`` takes minutes and gigabytes). So no policy is ever
evaluated in the server process: a small pool of long-lived worker processes compiles and
evaluates, each keeping its compiled policies by their text (``PolicySpec``). A caller waits
for an answer on one of the pool's threads (never on the event loop); while it waits the
worker's resident memory is polled, and a worker past the deadline or the memory cap is
killed and replaced. A worker rego-cpp crashes fails only the evaluation it was running.

Why the memory is polled rather than capped with ``RLIMIT_AS`` or ``RLIMIT_DATA``: rego-cpp's
allocator (snmalloc) reserves a large address range when it starts and refuses to start under
either limit, however generous.

Workers are ``python -I -m keybroker.policy.workers`` processes, not ``multiprocessing``
ones (its spawn re-runs the server's main module), speaking JSON over two pipes: nothing a
worker sends is unpickled. Their environment is empty, so even a policy that reached
``opa.runtime()`` (refused at compile time, see ``keybroker.policy.prepared``) would find no
secret there.

Does not: remember answers (``PooledPolicy`` does, in the server, so a repeated question
never leaves the process) or know what a policy means.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

from keybroker.errors import PolicyEvaluationError, PolicyLimitError, PolicyParseError
from keybroker.policy.engine import (
    AnswerMemory,
    CompiledPolicy,
    JsonValue,
    PolicySpec,
    PreparedPolicy,
)

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.02
_POLICIES_PER_WORKER = 32  # compiled policies a worker keeps (a policy is ~0.5 MiB)
_MAX_REPLY = 64 << 20
_START_SECONDS = 60.0
_READY = b'{"ready": true}'
_ERRORS: Mapping[str, type[PolicyEvaluationError | PolicyParseError]] = {
    "PolicyParseError": PolicyParseError,
    "PolicyEvaluationError": PolicyEvaluationError,
}


@dataclass(frozen=True)
class PolicyLimits:
    """Bounds of one compilation or evaluation; see docs/configuration.md ``[policy]``."""

    timeout_seconds: float = 2.0
    memory_mib: int = 512
    workers: int = 2


class PooledPolicy:
    """A policy compiled and checked in a worker, evaluated there; answers remembered here.

    Build it with ``PolicyWorkers.compile``.
    """

    def __init__(self, spec: PolicySpec, prepared: PreparedPolicy, workers: PolicyWorkers) -> None:
        self.spec = spec
        self._prepared = prepared
        self._workers = workers
        self._answers = AnswerMemory(spec.remember if prepared.deterministic else 0)

    @property
    def source(self) -> str:
        return self.spec.source

    @property
    def package(self) -> str:
        return self._prepared.package

    @property
    def remembers(self) -> bool:
        return self._answers.size > 0

    def remembered(self) -> int:
        return len(self._answers)

    async def evaluate(
        self, entrypoint: str, input: JsonValue, data: JsonValue | None = None
    ) -> JsonValue | None:
        return (await self.evaluate_many([entrypoint], input, data))[0]

    async def evaluate_many(
        self, entrypoints: Sequence[str], input: JsonValue, data: JsonValue | None = None
    ) -> list[JsonValue | None]:
        """As ``CompiledPolicy.evaluate_many``; a remembered answer never leaves the process."""
        input_json, document = self._prepared.question(entrypoints, input, data)
        key = self._answers.key(entrypoints, input_json, document)
        known = self._answers.get(key)
        if known is not None:
            return known
        # the worker gets the input already trimmed to what the policy reads
        answers: list[JsonValue | None] = await self._workers.call(
            {
                "op": "evaluate",
                "spec": asdict(self.spec),
                "entrypoints": list(entrypoints),
                "input_json": input_json,
                "document": document,
            }
        )
        self._answers.put(key, answers)
        return answers

    async def explain(
        self, input: JsonValue, data: JsonValue | None = None
    ) -> dict[str, JsonValue]:
        request = {"op": "explain", "spec": asdict(self.spec), "input": input, "data": data}
        rules: dict[str, JsonValue] = await self._workers.call(request)
        return rules


class PolicyWorkers:
    """The pool. Calls run on the pool's own threads, one per worker process, so at most
    ``workers`` evaluations run at once; others queue without holding a thread, and the
    event loop's default executor (storage, audit) is never used up by waiting policies."""

    def __init__(self, limits: PolicyLimits | None = None) -> None:
        self.limits = limits or PolicyLimits()
        if self.limits.workers < 1 or self.limits.timeout_seconds <= 0:
            raise ValueError("a policy pool needs at least one worker and a positive timeout")
        self._threads = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="policy")
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._busy = 0
        self._closed = False

    async def compile(self, spec: PolicySpec) -> PooledPolicy:
        """Compile and check ``spec`` in a worker; ``PolicyParseError`` (400) when it does
        not compile, its check passes a limit, or it crashes the worker."""
        try:
            await self.call({"op": "compile", "spec": asdict(spec)})
        except PolicyEvaluationError as e:  # past a limit, or rego-cpp crashed the worker
            raise PolicyParseError(f"policy refused: {e.detail}") from None
        # the same text checks the worker passed; here for the answers remembered in-process
        return PooledPolicy(spec, PreparedPolicy.of(spec), self)

    async def call(self, request: Mapping[str, Any]) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._threads, self._call, request)
        except RuntimeError:  # the pool's threads are shut down
            raise PolicyEvaluationError("the policy workers are shut down") from None

    @property
    def busy(self) -> int:
        """Evaluations running right now."""
        with self._lock:
            return self._busy

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._threads.shutdown(wait=False, cancel_futures=True)
        while True:
            try:
                self._idle.get_nowait().kill()
            except queue.Empty:
                return

    def _call(self, request: Mapping[str, Any]) -> Any:
        """On one of the pool's threads: at most ``workers`` run this at once."""
        with self._lock:
            if self._closed:
                raise PolicyEvaluationError("the policy workers are shut down")
            self._busy += 1
        try:
            reply = self._ask(request)
        finally:
            with self._lock:
                self._busy -= 1
        if "ok" in reply:
            return reply["ok"]
        error = _ERRORS.get(str(reply.get("error")), PolicyEvaluationError)
        raise error(str(reply.get("detail", "the policy worker failed"))[:800])

    def _ask(self, request: Mapping[str, Any]) -> Mapping[str, Any]:
        """A worker process's reply to ``request``: an idle worker's, or a new one's.

        The one step the benchmark's in-process baseline replaces
        (``bench/kbsbench/inprocess_policy.py``), to measure what the process boundary and
        its bounds cost; nothing in the server can select it.
        """
        try:
            worker = self._idle.get_nowait()
        except queue.Empty:
            worker = _Worker.start()
        try:
            reply = worker.ask(request, self.limits)
        except BaseException:
            worker.kill()  # past a limit, dead, or out of step: never reused
            raise
        with self._lock:
            closed = self._closed
        if closed:
            worker.kill()
        else:
            self._idle.put(worker)
        return reply


class _Worker:
    """One worker process, started as ``python -m keybroker.policy.workers`` with an empty
    environment and two pipes; requests and replies are JSON (nothing the worker sends is
    unpickled here)."""

    def __init__(
        self, process: subprocess.Popen[bytes], requests: Connection, replies: Connection
    ) -> None:
        self._process = process
        self._requests = requests
        self._replies = replies

    @classmethod
    def start(cls) -> _Worker:
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        try:
            process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [
                    sys.executable,
                    "-I",
                    "-m",
                    "keybroker.policy.workers",
                    str(request_read),
                    str(reply_write),
                ],
                pass_fds=(request_read, reply_write),
                env={},  # threat: opa.runtime().env; nothing in a worker needs the environment
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # rego-cpp may print; the replies have their own pipe
            )
        except BaseException:
            for fd in (request_write, reply_read):
                os.close(fd)
            raise
        finally:
            os.close(request_read)
            os.close(reply_write)
        worker = cls(
            process,
            Connection(request_write, readable=False),
            Connection(reply_read, writable=False),
        )
        # The deadline of an evaluation must not include the interpreter starting (slow on a
        # loaded machine): wait, with a bound of its own, for the worker to say it is ready.
        try:
            ready = worker._replies.poll(_START_SECONDS) and worker._replies.recv_bytes(64)
        except (EOFError, OSError):
            ready = False
        if ready != _READY:
            worker.kill()
            raise PolicyEvaluationError("a policy worker did not start")
        return worker

    def ask(self, request: Mapping[str, Any], limits: PolicyLimits) -> Mapping[str, Any]:
        """The worker's reply; ``PolicyLimitError`` when it passes a limit (then kill it)."""
        try:
            self._requests.send_bytes(json.dumps(request).encode())
        except (OSError, ValueError):
            raise PolicyEvaluationError("the policy worker is gone") from None
        deadline = time.monotonic() + limits.timeout_seconds
        cap = limits.memory_mib << 20
        while not self._replies.poll(_POLL_SECONDS):
            if _resident_bytes(self._process.pid) > cap:
                log.warning(
                    "policy evaluation passed the memory limit of %d MiB", limits.memory_mib
                )
                raise PolicyLimitError(
                    f"policy evaluation exceeded the memory limit of {limits.memory_mib} MiB "
                    "([policy] memory_mib)"
                )
            if time.monotonic() > deadline:
                log.warning(
                    "policy evaluation passed the time limit of %g s", limits.timeout_seconds
                )
                raise PolicyLimitError(
                    f"policy evaluation exceeded the time limit of {limits.timeout_seconds:g} s "
                    "([policy] timeout_seconds)"
                )
        try:
            reply = json.loads(self._replies.recv_bytes(_MAX_REPLY))
        except (EOFError, OSError, ValueError):
            raise PolicyEvaluationError("the policy worker died while evaluating") from None
        if not isinstance(reply, dict):
            raise PolicyEvaluationError("the policy worker gave a malformed reply")
        return reply

    def kill(self) -> None:
        self._process.kill()
        self._process.wait()
        self._requests.close()
        self._replies.close()


def _resident_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0  # not Linux, or the process is gone: the deadline still applies


class CompiledPolicies:
    """What a worker keeps (its compiled policies, by ``PolicySpec``, at most
    ``_POLICIES_PER_WORKER``) and its reply to one request.

    Runs in each worker process (``_serve``), one request at a time. The benchmark's
    in-process baseline runs it in the server, on the pool's threads, so it is thread-safe:
    the table is locked, a policy is compiled outside the lock (``CompiledPolicy`` locks its
    own evaluations).
    """

    def __init__(self) -> None:
        self._compiled: OrderedDict[PolicySpec, CompiledPolicy] = OrderedDict()
        self._lock = threading.Lock()

    def reply(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """``{"ok": answer}`` or ``{"error": name, "detail": text}``; never raises."""
        try:
            return {"ok": self._answer(request)}
        except (PolicyParseError, PolicyEvaluationError) as e:
            return {"error": type(e).__name__, "detail": e.detail}
        except Exception as e:  # reported to the server, which fails closed
            return {
                "error": "PolicyEvaluationError",
                "detail": f"policy worker failed: {e!r}"[:800],
            }

    def _answer(self, request: Mapping[str, Any]) -> Any:
        fields = request["spec"]
        spec = PolicySpec(
            source=fields["source"],
            entrypoints=tuple(fields["entrypoints"]),
            name=fields["name"],
            helpers=tuple((name, text) for name, text in fields["helpers"]),
            remember=0,  # the server remembers
            request_data=tuple(fields["request_data"]),
            cache_size=fields["cache_size"],
        )
        policy = self._policy(spec)
        operation = request["op"]
        if operation == "compile":
            return None
        if operation == "evaluate":
            return policy.evaluate_question(
                request["entrypoints"], request["input_json"], request["document"]
            )
        if operation == "explain":
            return policy.explain(request["input"], request["data"])
        raise ValueError(f"unknown policy worker operation {operation!r}")

    def _policy(self, spec: PolicySpec) -> CompiledPolicy:
        with self._lock:
            policy = self._compiled.get(spec)
            if policy is not None:
                self._compiled.move_to_end(spec)
                return policy
        policy = CompiledPolicy.from_spec(spec)
        with self._lock:
            policy = self._compiled.setdefault(spec, policy)  # another thread's, if it won
            self._compiled.move_to_end(spec)
            while len(self._compiled) > _POLICIES_PER_WORKER:
                self._compiled.popitem(last=False)
        return policy


def _serve(requests: Connection, replies: Connection) -> None:
    """The worker's loop: one request, one reply, until the pipe closes."""
    policies = CompiledPolicies()
    replies.send_bytes(_READY)  # everything is imported
    while True:
        try:
            request = json.loads(requests.recv_bytes())
        except (EOFError, OSError):
            return
        replies.send_bytes(json.dumps(policies.reply(request)).encode())


if __name__ == "__main__":
    _serve(
        Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False)
    )
