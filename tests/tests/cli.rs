//! `tessera run` and `tessera host` as a user starts them: app supervision, refusal to start on
//! bad component files, clean stops.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::{free_port, resources, tessera_bin};

/// Runs `tessera <subcommand> --data-dir <dir> <rest...>`.
fn run(args: &[&str], dir: &std::path::Path) -> std::process::Output {
    Command::new(tessera_bin())
        .arg(args[0])
        .arg("--data-dir")
        .arg(dir)
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn run_starts_the_app_with_dapr_env_prefixes_its_output_and_returns_its_code() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let out = run(
        &[
            "run", "--app-id", "envapp", "--dapr-http-port", &port, "--dapr-grpc-port", "50111", "--",
            "sh", "-c",
            "echo \"port=$DAPR_HTTP_PORT grpc=$DAPR_GRPC_PORT id=$APP_ID\"; curl -s -o /dev/null -w 'health=%{http_code}\\n' http://127.0.0.1:$DAPR_HTTP_PORT/v1.0/healthz/outbound; echo oops >&2; exit 7",
        ],
        dir.path(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(7),
        "exit code of the app; stderr:\n{stderr}"
    );
    assert!(
        stdout.contains(&format!("== APP == port={port} grpc=50111 id=envapp")),
        "{stdout}"
    );
    assert!(
        stdout.contains("== APP == health=204"),
        "the sidecar serves before the app starts: {stdout}"
    );
    assert!(stderr.contains("== APP == oops"), "{stderr}");
    assert!(stderr.contains("app exited"), "{stderr}");
}

#[test]
fn run_stops_app_and_sidecar_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let pidfile = dir.path().join("app.pid");
    let mut child = Command::new(tessera_bin())
        .args([
            "run",
            "--app-id",
            "sig",
            "--dapr-http-port",
            &port.to_string(),
            "--data-dir",
        ])
        .arg(dir.path().join("d"))
        .args([
            "--",
            "sh",
            "-c",
            &format!("echo $$ > {}; exec sleep 300", pidfile.display()),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pidfile.exists() || std::fs::read_to_string(&pidfile).unwrap().trim().is_empty() {
        assert!(Instant::now() < deadline, "app never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let app_pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "tessera run did not stop on Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(app_pid), None).is_ok();
    assert!(!alive, "the app was stopped too");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the sidecar port is closed"
    );
}

#[test]
fn host_refuses_to_start_on_bad_component_files() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &[&str])] = &[
        ("broken.yaml", "kind: Component\nmetadata: [\n", &["broken.yaml", "not valid YAML"]),
        ("unknown.yaml", "kind: Component\nmetadata:\n  name: p\nspec:\n  type: pubsub.kafka\n  version: v1\n", &["unknown.yaml", "spec.type", "pubsub.kafka"]),
        ("noversion.yaml", "kind: Component\nmetadata:\n  name: p\nspec:\n  type: state.redis\n", &["noversion.yaml", "spec.version"]),
        ("nohost.yaml", "kind: Component\nmetadata:\n  name: p\nspec:\n  type: state.redis\n  version: v1\n", &["nohost.yaml", "spec.metadata.redisHost", "required"]),
        ("unreachable.yaml", "kind: Component\nmetadata:\n  name: p\nspec:\n  type: state.redis\n  version: v1\n  metadata:\n  - name: redisHost\n    value: 127.0.0.1:1\n", &["unreachable.yaml", "cannot connect"]),
        ("twoactor.yaml", "kind: Component\nmetadata:\n  name: a\nspec:\n  type: state.sled\n  version: v1\n  metadata:\n  - name: actorStateStore\n    value: \"true\"\n---\nkind: Component\nmetadata:\n  name: b\nspec:\n  type: state.sled\n  version: v1\n  metadata:\n  - name: actorStateStore\n    value: \"true\"\n", &["actorStateStore", "a, b"]),
    ];
    for (name, text, expect) in cases {
        let res = resources(dir.path(), &[(name, text)]);
        let port = free_port().to_string();
        let out = run(
            &[
                "host",
                "--app-id",
                "bad",
                "--dapr-http-port",
                &port,
                "--resources-path",
                res.to_str().unwrap(),
            ],
            &dir.path().join("d"),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{name} must stop the host:\n{stderr}"
        );
        for e in *expect {
            assert!(stderr.contains(e), "{name}: expected {e:?} in:\n{stderr}");
        }
    }
    let out = run(
        &[
            "host",
            "--app-id",
            "bad",
            "--resources-path",
            "/does/not/exist",
        ],
        &dir.path().join("d"),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/does/not/exist"));
}

#[test]
fn help_explains_the_flags() {
    let out = Command::new(tessera_bin())
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--app-id",
        "--app-port",
        "--dapr-http-port",
        "--dapr-grpc-port",
        "--resources-path",
        "--components-path",
        "--config",
        "--data-dir",
        "--log-level",
        "DAPR_HTTP_PORT",
    ] {
        assert!(help.contains(flag), "missing {flag} in:\n{help}");
    }
}
