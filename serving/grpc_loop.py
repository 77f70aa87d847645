"""A grpc.aio server on an event loop of its own, with grpc.Server's blocking methods (ModelServer uses either).

grpc.aio runs coroutine handlers on the loop and plain ones on a thread pool
(its `migration_thread_pool`), so one server carries both: Predict is a
coroutine that can wait for a batch without a thread, the other methods keep
their blocking bodies.  The loop runs on the thread "grpc-loop" from
construction until `stop` has drained the server.

    server = GrpcLoopServer(executor, options)
    server.add_generic_rpc_handlers([...])         # or add_XServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    server.stop(grace).wait()
"""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures
from typing import Optional, Sequence, Tuple

import grpc


class GrpcLoopServer:
    """grpc.aio.Server driven from other threads; `executor` runs the non-coroutine handlers."""

    def __init__(self, executor: futures.ThreadPoolExecutor, options: Sequence[Tuple[str, object]] = ()):
        self.executor = executor
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="grpc-loop", daemon=True)
        self._thread.start()
        self._server: grpc.aio.Server = self._on_loop(self._create(list(options)))
        self._stopped: Optional[threading.Event] = None

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()
        self._loop.close()

    def _on_loop(self, coroutine):
        """Runs a coroutine on the server's loop and returns its result (or raises its error)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _create(self, options) -> grpc.aio.Server:
        return grpc.aio.server(migration_thread_pool=self.executor, options=options)

    def add_generic_rpc_handlers(self, handlers) -> None:
        """As grpc.Server's, before `start`."""
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers) -> None:
        """As grpc.Server's, before `start` (the generated add_XServicer_to_server functions call it)."""
        self._server.add_registered_method_handlers(service_name, method_handlers)

    def add_insecure_port(self, address: str) -> int:
        """Binds `address`; returns the port (RuntimeError when it cannot be bound)."""

        async def add() -> int:
            return self._server.add_insecure_port(address)

        return self._on_loop(add())

    def start(self) -> None:
        """Starts taking requests."""
        self._on_loop(self._server.start())

    def stop(self, grace: Optional[float]) -> threading.Event:
        """Stops taking requests and lets those in flight finish for up to `grace` seconds (as grpc.Server.stop);
        returns an Event set once the server has stopped and its loop has ended."""
        if self._stopped is not None:
            return self._stopped
        self._stopped = threading.Event()
        stopping = asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop)

        def stopped(_) -> None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self.executor.shutdown(wait=False)
            self._stopped.set()

        stopping.add_done_callback(lambda future: threading.Thread(target=stopped, args=(future,),
                                                                   name="grpc-stop", daemon=True).start())
        return self._stopped
