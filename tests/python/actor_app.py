"""Actor host for the Python SDK interop tests: the official Dapr Python SDK's actor runtime
(dapr-ext-fastapi `DaprActor`) behind uvicorn, as a user would write it.

Actor types:
  Counter  Increment(n) -> int, Get() -> int, StartTimer(period_ms), Ticks() -> int,
           SetReminder(name | {"name", "due_ms", "period_ms", "data"}), Reminded() -> list
  Chain    Call([id, ...]) -> list: appends a hop record, then calls Chain/<first id>.Call(rest)
           through ActorProxy (so the client can build A -> B -> A to test reentrancy).

Port: argv[1], else env APP_PORT, else 3000. Env REENTRANCY: `off` (default), `all` (root-level
`reentrancy` in /dapr/config) or `chain` (an `entitiesConfig` entry for Chain only).
The sidecar is found through DAPR_HTTP_PORT, as the SDK does.
"""

import asyncio
import logging
import os
import sys
import threading
import time
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any, Optional

import uvicorn
from dapr.actor import Actor, ActorId, ActorInterface, ActorProxy, Remindable, actormethod
from dapr.actor.runtime.config import ActorReentrancyConfig, ActorRuntimeConfig, ActorTypeConfig
from dapr.actor.runtime.runtime import ActorRuntime
from dapr.common.reentrancy_context import reentrancy_ctx
from dapr.ext.fastapi import DaprActor
from fastapi import FastAPI

log = logging.getLogger('actor_app')


class CounterInterface(ActorInterface):
    @actormethod(name='Increment')
    async def increment(self, n: int) -> int: ...

    @actormethod(name='Get')
    async def get(self) -> int: ...

    @actormethod(name='StartTimer')
    async def start_timer(self, period_ms: int) -> None: ...

    @actormethod(name='Ticks')
    async def ticks(self) -> int: ...

    @actormethod(name='SetReminder')
    async def set_reminder(self, spec: Any) -> None: ...

    @actormethod(name='Reminded')
    async def reminded(self) -> list: ...


class Counter(Actor, CounterInterface, Remindable):
    def __init__(self, ctx, actor_id):
        super().__init__(ctx, actor_id)

    async def increment(self, n: int) -> int:
        _, count = await self._state_manager.try_get_state('count')
        # Yield between the read and the write: the SDK does not serialize calls to one actor
        # (the sidecar must), and its state cache would otherwise hide overlapping calls.
        await asyncio.sleep(0.005)
        count = (count or 0) + int(n)
        await self._state_manager.set_state('count', count)
        # Saved by the SDK after the method returns; saving here makes the write happen inside
        # the turn explicitly (one transaction PUT either way).
        await self._state_manager.save_state()
        return count

    async def get(self) -> int:
        _, count = await self._state_manager.try_get_state('count')
        return count or 0

    async def start_timer(self, period_ms: int) -> None:
        period = timedelta(milliseconds=int(period_ms))
        await self.register_timer('ticker', self.on_tick, None, period, period)

    async def on_tick(self, _state: Any) -> None:
        # Timer callback (named in the timer's `callback` field).
        _, ticks = await self._state_manager.try_get_state('ticks')
        await self._state_manager.set_state('ticks', (ticks or 0) + 1)

    async def ticks(self) -> int:
        _, ticks = await self._state_manager.try_get_state('ticks')
        return ticks or 0

    async def set_reminder(self, spec: Any) -> None:
        if isinstance(spec, str):
            spec = {'name': spec}
        name = spec['name']
        due = timedelta(milliseconds=int(spec.get('due_ms', 200)))
        period_ms = spec.get('period_ms')
        period = timedelta(milliseconds=int(period_ms)) if period_ms is not None else None
        data = spec.get('data', name)
        await self.register_reminder(name, data.encode('utf-8'), due, period)

    async def receive_reminder(
        self,
        name: str,
        state: bytes,
        due_time: timedelta,
        period: timedelta,
        ttl: Optional[timedelta] = None,
    ) -> None:
        _, seen = await self._state_manager.try_get_state('reminded')
        seen = list(seen or [])
        # A JSON-safe record: the SDK hands durations over as timedelta when the sidecar echoes a
        # Go duration, or as the raw string otherwise.
        seen.append(
            {
                'name': name,
                'data': state.decode('utf-8', 'replace'),
                'dueTime': str(due_time),
                'period': str(period),
                'at': time.time(),
            }
        )
        await self._state_manager.set_state('reminded', seen)

    async def reminded(self) -> list:
        _, seen = await self._state_manager.try_get_state('reminded')
        return list(seen or [])


class ChainInterface(ActorInterface):
    @actormethod(name='Call')
    async def call(self, hops: list) -> list: ...


class Chain(Actor, ChainInterface):
    def __init__(self, ctx, actor_id):
        super().__init__(ctx, actor_id)

    async def call(self, hops: list) -> list:
        here = {'id': self.id.id, 'reentrancyId': reentrancy_ctx.get(None)}
        _, visits = await self._state_manager.try_get_state('visits')
        await self._state_manager.set_state('visits', (visits or 0) + 1)
        if not hops:
            return [here]
        proxy = ActorProxy.create('Chain', ActorId(str(hops[0])), ChainInterface)
        rest = await proxy.Call(list(hops[1:]))
        return [here] + list(rest)


def runtime_config() -> ActorRuntimeConfig:
    mode = os.environ.get('REENTRANCY', 'off').strip().lower()
    if mode in ('', 'off', '0', 'false'):
        return ActorRuntimeConfig()
    if mode in ('all', 'on', '1', 'true'):
        return ActorRuntimeConfig(reentrancy=ActorReentrancyConfig(enabled=True))
    if mode == 'chain':
        return ActorRuntimeConfig(
            actor_type_configs=[
                ActorTypeConfig('Chain', reentrancy=ActorReentrancyConfig(enabled=True))
            ]
        )
    raise SystemExit(f'REENTRANCY={mode!r}: use off, all or chain')


@asynccontextmanager
async def lifespan(app: FastAPI):
    # register_actor first waits (blocking) for GET /v1.0/healthz/outbound on the sidecar.
    await actor.register_actor(Counter)
    await actor.register_actor(Chain)
    log.warning('actor types registered: %s', ActorRuntime.get_registered_actor_types())
    yield


ActorRuntime.set_actor_config(runtime_config())
app = FastAPI(title='tessera-python-actors', lifespan=lifespan)
actor = DaprActor(app)


def exit_with_parent() -> None:
    """Stops the app if the process that started it (tessera run) goes away, even by kill -9, so
    a crashed test never leaves an orphan listening on its port."""
    parent = os.getppid()

    def watch():
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ.get('APP_PORT', '3000'))
    logging.basicConfig(level=logging.INFO, format='%(name)s %(levelname)s %(message)s')
    if os.environ.get('ACTOR_APP_EXIT_WITH_PARENT', '1') != '0':
        exit_with_parent()
    uvicorn.run(app, host='127.0.0.1', port=port, log_level='info')


if __name__ == '__main__':
    main()
