"""The Python SDK's DaprClient (gRPC, sidecar on DAPR_GRPC_PORT; it first waits for
DAPR_HTTP_PORT's health endpoint) against the state API: save, get, bulk, ETags, transactions,
deletes. Checks every answer; prints one JSON summary line on stdout and exits 0 when all held,
1 with a "MISMATCH: ..." line on stderr at the first failed check.
"""

import json
import sys
import uuid

import grpc
from dapr.clients import DaprClient
from dapr.clients.exceptions import DaprGrpcError
from dapr.clients.grpc._request import TransactionalStateOperation, TransactionOperationType
from dapr.clients.grpc._state import Concurrency, StateItem, StateOptions

STORE = 'statestore'


def check(cond, what):
    if not cond:
        print(f'MISMATCH: {what}', file=sys.stderr)
        sys.exit(1)


def main():
    run = uuid.uuid4().hex[:8]
    k = lambda name: f'py-{run}-{name}'  # noqa: E731
    checks = 0
    with DaprClient() as d:
        d.save_state(STORE, k('a'), 'hello')
        got = d.get_state(STORE, k('a'))
        check(got.data == b'hello', f'get after save: {got.data!r}')
        check(got.etag != '', 'an etag comes back')
        checks += 2

        # A first-write save with a stale ETag fails with ABORTED and changes nothing.
        first_write = StateOptions(concurrency=Concurrency.first_write)
        try:
            d.save_state(STORE, k('a'), 'stale', etag='999999', options=first_write)
            check(False, 'a stale etag was accepted')
        except DaprGrpcError as e:
            check(e.code() == grpc.StatusCode.ABORTED, f'stale etag code {e.code()}')
        check(d.get_state(STORE, k('a')).data == b'hello', 'a refused save changed the value')
        d.save_state(STORE, k('a'), 'hi', etag=got.etag, options=first_write)
        check(d.get_state(STORE, k('a')).data == b'hi', 'the right etag saves')
        checks += 3

        d.save_bulk_state(STORE, [StateItem(k('b'), 'two'), StateItem(k('c'), 'three')])
        items = d.get_bulk_state(STORE, [k('c'), k('missing'), k('b')]).items
        seen = [(i.key, i.data) for i in items]
        want = [(k('c'), b'three'), (k('missing'), b''), (k('b'), b'two')]
        check(seen == want, f'bulk get: {seen!r}')
        checks += 1

        d.execute_state_transaction(
            STORE,
            [
                TransactionalStateOperation(k('d'), 'four'),
                TransactionalStateOperation(
                    k('b'), operation_type=TransactionOperationType.delete
                ),
            ],
        )
        check(d.get_state(STORE, k('d')).data == b'four', 'transaction upsert')
        check(d.get_state(STORE, k('b')).data == b'', 'transaction delete')
        checks += 2

        d.delete_state(STORE, k('a'))
        check(d.get_state(STORE, k('a')).data == b'', 'delete')
        try:
            d.get_state('nostore', k('a'))
            check(False, 'an unknown store answered')
        except DaprGrpcError as e:
            check(e.code() == grpc.StatusCode.INVALID_ARGUMENT, f'unknown store code {e.code()}')
        checks += 2
    print(json.dumps({'ok': True, 'checks': checks}))


if __name__ == '__main__':
    main()
