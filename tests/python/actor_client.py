"""Client side of the Python SDK interop tests: calls the actors of actor_app.py through the
official SDK's ActorProxy (HTTP, sidecar on DAPR_HTTP_PORT) and checks every answer.

Usage: actor_client.py [counter|reminder|chain] [--id ID]
  counter   (default) Increment/Get on a fresh Counter, 20 concurrent Increments (turn-based
            concurrency: no lost update), a second Counter is independent, StartTimer(100)
            and Ticks() growing over time.
  reminder  SetReminder on a fresh Counter (one-shot and periodic), Reminded() until both fired.
  chain     Chain A.Call([B, A]): A -> B -> A through the sidecar; needs the app started with
            REENTRANCY=all or REENTRANCY=chain, else the call deadlocks and times out.

Prints one JSON summary line on stdout; exits 0 when every check passed, 1 with a
"MISMATCH: ..." line on stderr at the first failed check, 2 when the sidecar cannot be used.
Env: DAPR_HTTP_PORT (required), CLIENT_TIMEOUT_S (per call, default 10), READY_TIMEOUT_S
(how long the first call may be retried while the actor runtime comes up, default 15).
"""

import asyncio
import json
import os
import sys
import time
import uuid
from typing import Any

from dapr.actor import ActorId, ActorInterface, ActorProxy, ActorProxyFactory, actormethod
from dapr.clients.exceptions import DaprInternalError


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


class ChainInterface(ActorInterface):
    @actormethod(name='Call')
    async def call(self, hops: list) -> list: ...


class Mismatch(Exception):
    pass


summary: dict = {'ok': False}


def check(cond: bool, what: str) -> None:
    if not cond:
        raise Mismatch(what)


def factory() -> ActorProxyFactory:
    return ActorProxyFactory(http_timeout_seconds=int(os.environ.get('CLIENT_TIMEOUT_S', '10')))


def describe(e: BaseException) -> str:
    if isinstance(e, DaprInternalError):
        return f'{type(e).__name__}: {e.as_dict()}'
    if isinstance(e, asyncio.TimeoutError):
        return f'no answer within CLIENT_TIMEOUT_S={os.environ.get("CLIENT_TIMEOUT_S", "10")} s'
    return f'{type(e).__name__}: {e}'


async def first_call(what: str, call) -> Any:
    """The first call may be retried while the actor runtime starts (placement, /dapr/config);
    the summary reports how many attempts failed and their distinct errors."""
    deadline = time.monotonic() + float(os.environ.get('READY_TIMEOUT_S', '15'))
    failed = 0
    errors: list = []
    while True:
        try:
            result = await call()
            summary['first_call'] = {'call': what, 'failed_attempts': failed, 'errors': errors}
            return result
        except Exception as e:  # noqa: BLE001 - reported below
            failed += 1
            if describe(e) not in errors:
                errors.append(describe(e))
            if time.monotonic() > deadline:
                summary['first_call'] = {'call': what, 'failed_attempts': failed, 'errors': errors}
                raise Mismatch(f'{what} failed {failed} times in '
                               f'{os.environ.get("READY_TIMEOUT_S", "15")} s; last error: '
                               f'{describe(e)}') from e
            await asyncio.sleep(0.5)


async def counter(actor_id: str) -> None:
    f = factory()
    c = ActorProxy.create('Counter', ActorId(actor_id), CounterInterface, f)
    got = await first_call(f'Counter/{actor_id}.Get()', c.Get)
    check(got == 0, f'Get() on a fresh Counter/{actor_id} returned {got!r}, expected 0')
    v = await c.Increment(1)
    check(v == 1, f'Increment(1) returned {v!r}, expected 1')
    v = await c.Increment(5)
    check(v == 6, f'Increment(5) returned {v!r}, expected 6')
    v = await c.Get()
    check(v == 6, f'Get() returned {v!r}, expected 6')
    summary['sequential'] = v

    # Turn-based concurrency: the SDK does not serialize calls, the sidecar must. 20 concurrent
    # Increment(1) must return each of 7..26 exactly once and leave 26.
    results = await asyncio.gather(*(c.Increment(1) for _ in range(20)))
    check(
        sorted(results) == list(range(7, 27)),
        f'20 concurrent Increment(1) returned {sorted(results)}, expected 7..26 once each '
        '(lost update: calls to one actor were not serialized)',
    )
    v = await c.Get()
    check(v == 26, f'Get() after the concurrent increments returned {v!r}, expected 26')
    summary['concurrent'] = v

    other = ActorProxy.create('Counter', ActorId(actor_id + '-other'), CounterInterface, f)
    v = await other.Get()
    check(v == 0, f'Get() on another Counter returned {v!r}, expected 0 (state leaks across ids)')
    v = await other.Increment(100)
    check(v == 100, f'Increment(100) on another Counter returned {v!r}, expected 100')
    v = await c.Get()
    check(v == 26, f'Get() returned {v!r} after another Counter changed, expected 26')

    # Timer every 100 ms (due after 100 ms) incrementing state `ticks`.
    t0 = await c.Ticks()
    check(t0 == 0, f'Ticks() before StartTimer returned {t0!r}, expected 0')
    await c.StartTimer(100)
    deadline = time.monotonic() + 10
    t1 = 0
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        t1 = await c.Ticks()
        if t1 >= 3:
            break
    check(t1 >= 3, f'Ticks() was {t1!r} 10 s after StartTimer(100), expected >= 3')
    await asyncio.sleep(1.0)
    t2 = await c.Ticks()
    check(t2 > t1, f'Ticks() stayed at {t2!r} over 1 s (was {t1!r}): the timer stopped')
    check(t2 - t1 <= 30, f'Ticks() grew by {t2 - t1} in 1 s with a 100 ms period: too many fires')
    v = await c.Get()
    check(v == 26, f'Get() returned {v!r} while the timer ran, expected 26 (timer touched count)')
    summary['ticks'] = [t1, t2]


async def reminder(actor_id: str) -> None:
    f = factory()
    c = ActorProxy.create('Counter', ActorId(actor_id), CounterInterface, f)
    got = await first_call(f'Counter/{actor_id}.Reminded()', c.Reminded)
    check(got == [], f'Reminded() on a fresh Counter returned {got!r}, expected []')
    await c.SetReminder('once')
    await c.SetReminder({'name': 'every', 'due_ms': 100, 'period_ms': 300, 'data': 'payload'})
    deadline = time.monotonic() + 15
    seen: list = []
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        seen = await c.Reminded()
        names = [r.get('name') for r in seen]
        if names.count('once') >= 1 and names.count('every') >= 3:
            break
    names = [r.get('name') for r in seen]
    check(names.count('once') == 1, f'reminder "once" fired {names.count("once")} times: {seen}')
    check(names.count('every') >= 3, f'periodic reminder "every" fired {names.count("every")} times in 15 s: {seen}')
    data = {r['name']: r['data'] for r in seen}
    check(data.get('once') == 'once', f'reminder "once" got data {data.get("once")!r}, expected "once"')
    check(data.get('every') == 'payload', f'reminder "every" got data {data.get("every")!r}, expected "payload"')
    summary['reminded'] = {'once': names.count('once'), 'every': names.count('every')}


async def chain(actor_id: str) -> None:
    a, b = actor_id + '-A', actor_id + '-B'
    f = factory()
    p = ActorProxy.create('Chain', ActorId(a), ChainInterface, f)
    try:
        hops = await first_call(f'Chain/{a}.Call([{b}, {a}])', lambda: p.Call([b, a]))
    except Mismatch as e:
        raise Mismatch(f'{e} (A -> B -> A needs reentrancy: is the app running with '
                       'REENTRANCY=all or REENTRANCY=chain, and does the sidecar admit the '
                       'Dapr-Reentrancy-Id?)') from e
    ids = [h.get('id') for h in hops]
    check(ids == [a, b, a], f'A -> B -> A visited {ids}, expected {[a, b, a]}')
    rids = {h.get('reentrancyId') for h in hops}
    check(
        len(rids) == 1 and None not in rids,
        f'the hops saw reentrancy ids {[h.get("reentrancyId") for h in hops]}, expected one shared id',
    )
    summary['chain'] = hops


async def main() -> int:
    args = sys.argv[1:]
    mode = 'counter'
    actor_id = uuid.uuid4().hex[:12]
    while args:
        a = args.pop(0)
        if a == '--id':
            actor_id = args.pop(0)
        elif a in ('counter', 'reminder', 'chain'):
            mode = a
        else:
            print(f'usage: actor_client.py [counter|reminder|chain] [--id ID] (got {a!r})', file=sys.stderr)
            return 2
    if not os.environ.get('DAPR_HTTP_PORT'):
        print('actor_client.py: DAPR_HTTP_PORT is not set', file=sys.stderr)
        return 2
    summary.update({'mode': mode, 'actor_id': actor_id, 'dapr_http_port': os.environ['DAPR_HTTP_PORT']})
    started = time.monotonic()
    code = 0
    try:
        await {'counter': counter, 'reminder': reminder, 'chain': chain}[mode](actor_id)
        summary['ok'] = True
    except Mismatch as e:
        summary['error'] = str(e)
        print(f'MISMATCH: {e}', file=sys.stderr)
        code = 1
    except Exception as e:  # noqa: BLE001 - any SDK/transport error is a failure of the check
        summary['error'] = describe(e)
        print(f'MISMATCH: unexpected error: {describe(e)}', file=sys.stderr)
        code = 1
    summary['elapsed_s'] = round(time.monotonic() - started, 3)
    print(json.dumps(summary, default=str), flush=True)
    return code


if __name__ == '__main__':
    sys.exit(asyncio.run(main()))
