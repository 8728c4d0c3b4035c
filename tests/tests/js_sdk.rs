//! The official Dapr JavaScript SDK (`@dapr/dapr`, pinned in `tests/js/package.json`) against
//! Tessera, unchanged: `tests/js/client.cjs` drives `DaprClient`'s state API and the SDK's actor
//! proxy over HTTP (the SDK's default) and over gRPC, against a host whose app is
//! `tests/src/bin/turn_app.rs`, and checks every answer.
//!
//! The SDK is installed into `target/jsenv` by `scripts/js-env.sh`; `scripts/test` runs it and
//! sets `TESSERA_JS_MODULES` to its `node_modules`. Missing is a failure, never a skip.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use e2e::ActorHost;

fn node_modules() -> PathBuf {
    let Some(p) = std::env::var_os("TESSERA_JS_MODULES").filter(|p| !p.is_empty()) else {
        panic!(
            "TESSERA_JS_MODULES is not set. Run `bash scripts/js-env.sh` (it installs the pinned \
             Dapr JS SDK into target/jsenv) and `export TESSERA_JS_MODULES=$PWD/target/jsenv/node_modules`; \
             `bash scripts/test` does both."
        );
    };
    let p = PathBuf::from(p);
    let p = if p.is_relative() {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
    } else {
        p
    };
    assert!(
        p.join("@dapr/dapr").exists(),
        "{} has no @dapr/dapr: run `bash scripts/js-env.sh`",
        p.display()
    );
    p
}

#[tokio::test]
async fn js_sdk_state_and_actors_over_http_and_grpc() {
    let modules = node_modules();
    let dir = tempfile::tempdir().unwrap();
    let app = Path::new(env!("CARGO_BIN_EXE_turn_app"));
    let h = ActorHost::start(app, dir.path(), "host", "jsapp", &[], &[]).await;
    h.wait_hosting().await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("js/client.cjs");
    for protocol in ["http", "grpc"] {
        let mut cmd = tokio::process::Command::new("node");
        cmd.arg(&script)
            .arg(protocol)
            .env("NODE_PATH", &modules)
            .env("DAPR_HTTP_PORT", h.http_port.to_string())
            .env("DAPR_GRPC_PORT", h.sidecar().grpc_port.to_string())
            .env("RUN", e2e::unique())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("client.cjs {protocol} did not finish in 120 s"))
            .expect("run node (Node.js >= 18 must be installed)");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success(),
            "client.cjs {protocol} failed ({}):\n--- stderr:\n{stderr}\n--- stdout:\n{stdout}\n--- sidecar log:\n{}",
            out.status,
            h.sidecar().logs()
        );
        let summary: serde_json::Value =
            serde_json::from_str(stdout.lines().last().unwrap_or_default())
                .unwrap_or_else(|e| panic!("summary is not JSON ({e}):\n{stdout}"));
        assert_eq!(summary["ok"], true, "{summary}");
        assert_eq!(summary["protocol"], protocol, "{summary}");
        assert_eq!(summary["checks"], 7, "{summary}");
    }
}
