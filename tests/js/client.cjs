// The official Dapr JavaScript SDK (@dapr/dapr, pinned in package.json) against a Tessera
// sidecar: DaprClient's state API and its actor client, over the protocol given as the first
// argument ("http", the SDK's default, or "grpc"). Run by tests/tests/js_sdk.rs with NODE_PATH
// pointing at target/jsenv/node_modules (scripts/js-env.sh).
//
// Env: DAPR_HTTP_PORT, DAPR_GRPC_PORT (the sidecar's), RUN (a prefix that keeps keys and actor
// ids of runs apart). The sidecar's app must host the Counter actor of tests/src/bin/turn_app.rs
// (`inc` answers the new count). Prints one JSON summary line; exits 0 when every check held,
// 1 with a "MISMATCH: ..." line on stderr at the first failed one.
"use strict";
const {
  DaprClient,
  CommunicationProtocolEnum,
  ActorId,
  ActorProxyBuilder,
  LogLevel,
} = require("@dapr/dapr");

// The actor type, as the SDK's proxy names it: by the class's name.
class Counter {}

const STORE = "statestore";

function check(cond, what) {
  if (!cond) {
    console.error(`MISMATCH: ${what}`);
    process.exit(1);
  }
}

const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

async function main() {
  const protocol = process.argv[2] === "grpc" ? "grpc" : "http";
  const run = `${process.env.RUN || "js"}-${protocol}`;
  const client = new DaprClient({
    daprHost: "127.0.0.1",
    daprPort: protocol === "grpc" ? process.env.DAPR_GRPC_PORT : process.env.DAPR_HTTP_PORT,
    communicationProtocol:
      protocol === "grpc" ? CommunicationProtocolEnum.GRPC : CommunicationProtocolEnum.HTTP,
    logger: { level: LogLevel.Error },
  });
  const k = (name) => `${run}-${name}`;
  let checks = 0;

  const cart = { items: ["product-1", "product-2"], total: 42 };
  await client.state.save(STORE, [
    { key: k("cart"), value: cart },
    { key: k("n"), value: 7 },
  ]);
  check(same(await client.state.get(STORE, k("cart")), cart), "get the saved object");
  check(same(await client.state.get(STORE, k("n")), 7), "get the saved number");
  checks += 2;

  const bulk = await client.state.getBulk(STORE, [k("n"), k("cart")]);
  const byKey = Object.fromEntries(bulk.map((i) => [i.key, i.data]));
  check(same(byKey[k("n")], 7) && same(byKey[k("cart")], cart), `bulk get: ${JSON.stringify(bulk)}`);
  checks += 1;

  await client.state.transaction(STORE, [
    { operation: "upsert", request: { key: k("t"), value: "in a transaction" } },
    { operation: "delete", request: { key: k("n") } },
  ]);
  check(same(await client.state.get(STORE, k("t")), "in a transaction"), "transaction upsert");
  const gone = await client.state.get(STORE, k("n"));
  check(gone === "" || gone === undefined || gone === null, `transaction delete: ${JSON.stringify(gone)}`);
  checks += 2;

  await client.state.delete(STORE, k("cart"));
  const deleted = await client.state.get(STORE, k("cart"));
  check(deleted === "" || deleted === undefined || deleted === null, `delete: ${JSON.stringify(deleted)}`);
  checks += 1;

  // Turn-based actor calls through the SDK's actor proxy: each inc answers the count after it.
  const counter = new ActorProxyBuilder(Counter, client).build(new ActorId(`${run}-counter`));
  const counts = [];
  for (let i = 0; i < 3; i++) {
    counts.push(Number(await counter.inc()));
  }
  check(same(counts, [1, 2, 3]), `actor incs: ${JSON.stringify(counts)}`);
  checks += 1;

  console.log(JSON.stringify({ ok: true, protocol, checks }));
  process.exit(0);
}

main().catch((e) => {
  console.error(`MISMATCH: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
