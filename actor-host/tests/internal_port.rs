//! The internal port as another host sees it: a real host (standalone, no app), raw TCP, the
//! framing of `proto/proto/internal.proto`.

use std::time::Duration;

use actor_host::{Host, HostConfig};
use prost::Message;
use proto::internal::actor_reply::Reply;
use proto::internal::{ActorCall, ActorReply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn host(dir: &std::path::Path) -> Host {
    let host = Host::start(HostConfig::new("internal", dir)).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !host.shared().actors.placement_connected() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    host
}

fn frame(call: &ActorCall) -> Vec<u8> {
    let mut out = (call.encoded_len() as u32).to_be_bytes().to_vec();
    call.encode(&mut out).unwrap();
    out
}

async fn read_reply(s: &mut TcpStream) -> ActorReply {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).await.unwrap();
    ActorReply::decode(&body[..]).unwrap()
}

/// Whether the host closes the connection within a few seconds (reads hit the end).
async fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

fn call(id: u64) -> ActorCall {
    ActorCall {
        actor_type: "NoSuchType".into(),
        actor_id: format!("a{id}"),
        path: "method/m".into(),
        call_id: id,
        timeout_ms: 2000,
        ..Default::default()
    }
}

#[tokio::test]
async fn calls_are_answered_by_call_id_and_bad_input_closes_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path()).await;
    let addr = host.shared().actors.host_address().to_string();

    // Two calls pipelined in one write: each answer names its call.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let mut bytes = b"TSRLANE1".to_vec();
    bytes.extend(frame(&call(41)));
    bytes.extend(frame(&call(42)));
    s.write_all(&bytes).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let reply = read_reply(&mut s).await;
        match reply.reply {
            Some(Reply::Error(e)) => {
                // This host has no app, so it runs no actor type.
                assert_eq!(e.status, 400, "{e:?}");
                assert_eq!(e.error_code, "ERR_ACTOR_NO_APP_CHANNEL", "{e:?}");
            }
            other => panic!("expected an error for a type nobody hosts, got {other:?}"),
        }
        ids.push(reply.call_id);
    }
    ids.sort();
    assert_eq!(ids, vec![41, 42]);

    // A frame over the limit: the host closes the connection rather than allocate it.
    s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    assert!(
        closed(&mut s).await,
        "an oversized frame must close the connection"
    );

    // Not the host preface (an HTTP client that found the port): closed, nothing answered.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(
        closed(&mut s).await,
        "a wrong preface must close the connection"
    );

    // A frame that is not a message: closed.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let mut bytes = b"TSRLANE1".to_vec();
    bytes.extend(3u32.to_be_bytes());
    bytes.extend([0xff, 0xff, 0xff]);
    s.write_all(&bytes).await.unwrap();
    assert!(closed(&mut s).await, "garbage must close the connection");

    // The port still serves new connections after all that.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let mut bytes = b"TSRLANE1".to_vec();
    bytes.extend(frame(&call(7)));
    s.write_all(&bytes).await.unwrap();
    assert_eq!(read_reply(&mut s).await.call_id, 7);
    host.stop().await;
}
