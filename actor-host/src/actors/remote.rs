//! Host to host: actor calls forwarded to the owner over the internal gRPC service
//! (`tessera.internal.v1.ActorHost`), each carrying the caller's table version.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use bytes::Bytes;
use proto::internal::actor_host_client::ActorHostClient;
use proto::internal::actor_host_server::{ActorHost, ActorHostServer};
use proto::internal::actor_reply::Reply;
use proto::internal::{ActorCall, ActorReply, AppReply, CallError as WireError, Header};
use tokio::time::Instant;
use tonic::transport::Channel;

use super::activation::ActorKey;
use super::app_channel::{forwardable, AppResponse};
use super::{ActorRuntime, CallError, Local};

/// Connections to other hosts, one lazily dialed channel per host.
pub struct Peers {
    dial: placement::network::Dial,
    clients: Mutex<HashMap<String, ActorHostClient<Channel>>>,
}

fn to_wire(headers: &HeaderMap) -> Vec<Header> {
    headers
        .iter()
        .filter(|(n, _)| forwardable(n.as_str()))
        .map(|(n, v)| Header {
            name: n.as_str().to_string(),
            value: v.as_bytes().to_vec(),
        })
        .collect()
}

fn from_wire(headers: Vec<Header>) -> HeaderMap {
    let mut out = HeaderMap::new();
    for h in headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(&h.value),
        ) {
            out.append(n, v);
        }
    }
    out
}

impl Peers {
    pub fn new(dial: placement::network::Dial) -> Self {
        Peers {
            dial,
            clients: Mutex::new(HashMap::new()),
        }
    }

    fn client(&self, addr: &str) -> Result<ActorHostClient<Channel>, String> {
        let mut clients = self.clients.lock().expect("lock");
        if let Some(c) = clients.get(addr) {
            return Ok(c.clone());
        }
        let channel = (self.dial)(addr).map_err(|e| e.to_string())?;
        let c = ActorHostClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        clients.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    fn forget(&self, addr: &str) {
        self.clients.lock().expect("lock").remove(addr);
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn call(
        &self,
        addr: &str,
        key: &ActorKey,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
        version: u64,
        deadline: Instant,
    ) -> Local {
        let mut client = match self.client(addr) {
            Ok(c) => c,
            Err(e) => {
                return Local::Done(Err(CallError::invoke(format!(
                    "cannot reach host {addr} for actor {key}: {e}"
                ))))
            }
        };
        let mut req = tonic::Request::new(ActorCall {
            actor_type: key.actor_type.clone(),
            actor_id: key.actor_id.clone(),
            path: path.to_string(),
            body: body.to_vec(),
            headers: to_wire(headers),
            table_version: version,
        });
        let left = deadline.saturating_duration_since(Instant::now());
        req.set_timeout(left);
        match client.call_actor(req).await {
            Ok(reply) => match reply.into_inner().reply {
                Some(Reply::App(a)) => Local::Done(Ok(AppResponse {
                    status: StatusCode::from_u16(a.status as u16)
                        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    headers: from_wire(a.headers),
                    body: Bytes::from(a.body),
                })),
                Some(Reply::WrongOwner(v)) => Local::Retry(v),
                Some(Reply::Error(e)) => Local::Done(Err(CallError {
                    status: StatusCode::from_u16(e.status as u16)
                        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    code: known_code(&e.error_code),
                    message: e.message,
                })),
                None => Local::Done(Err(CallError::invoke(format!(
                    "host {addr} sent an empty answer for actor {key}"
                )))),
            },
            // Nothing was sent: the owner is down or not listening. Placement will move its
            // actors once its lease lapses; route again until then (bounded by the deadline).
            Err(s) if s.code() == tonic::Code::Unavailable && !sent(&s) => {
                self.forget(addr);
                Local::Retry(version + 1)
            }
            Err(s) => {
                // A call that timed out or broke in transport may have left the connection dead
                // (a partition can black-hole a TCP connection, and nothing on it would ever
                // answer again): dial afresh for the next call.
                if matches!(
                    s.code(),
                    tonic::Code::DeadlineExceeded
                        | tonic::Code::Cancelled
                        | tonic::Code::Unavailable
                        | tonic::Code::Unknown
                        | tonic::Code::Internal
                ) {
                    self.forget(addr);
                }
                Local::Done(Err(CallError::invoke(format!(
                    "error invoking actor {key} on host {addr}: {}",
                    s.message()
                ))))
            }
        }
    }
}

/// Whether a transport error may have happened after the request reached the other host
/// (then retrying could run the call twice, so the caller gets the error instead).
fn sent(s: &tonic::Status) -> bool {
    let text = format!("{s:?}").to_ascii_lowercase();
    !(text.contains("connect") || text.contains("refused") || text.contains("dns"))
}

/// Error codes cross the wire as text; map them back to the static set we answer with.
fn known_code(code: &str) -> &'static str {
    const CODES: &[&str] = &[
        "ERR_ACTOR_INVOKE_METHOD",
        "ERR_ACTOR_STACK_DEPTH",
        "ERR_ACTOR_NO_APP_CHANNEL",
        "ERR_ACTOR_NO_ADDRESS",
        "ERR_ACTOR_NO_PLACEMENT",
        "ERR_ACTOR_RUNTIME_NOT_FOUND",
    ];
    CODES
        .iter()
        .find(|c| **c == code)
        .copied()
        .unwrap_or("ERR_ACTOR_INVOKE_METHOD")
}

/// The internal service: runs calls for actors this host owns.
pub struct Service {
    pub runtime: Arc<ActorRuntime>,
}

#[tonic::async_trait]
impl ActorHost for Service {
    async fn call_actor(
        &self,
        req: tonic::Request<ActorCall>,
    ) -> Result<tonic::Response<ActorReply>, tonic::Status> {
        let timeout = req
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .unwrap_or(self.runtime.cfg.call_timeout);
        let call = req.into_inner();
        let key = ActorKey::new(call.actor_type, call.actor_id);
        let deadline = Instant::now() + timeout;
        let outcome = self
            .runtime
            .call_local(
                &key,
                &call.path,
                &from_wire(call.headers),
                Bytes::from(call.body),
                call.table_version,
                None,
                deadline,
            )
            .await;
        let reply = match outcome {
            Local::Retry(v) => Reply::WrongOwner(v.max(self.runtime.table_version())),
            Local::Done(Ok(r)) => Reply::App(AppReply {
                status: r.status.as_u16() as u32,
                headers: to_wire(&r.headers),
                body: r.body.to_vec(),
            }),
            Local::Done(Err(e)) => Reply::Error(WireError {
                status: e.status.as_u16() as u32,
                error_code: e.code.to_string(),
                message: e.message,
            }),
        };
        Ok(tonic::Response::new(ActorReply { reply: Some(reply) }))
    }
}

/// gRPC's `grpc-timeout` header: an integer and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(s: &str) -> Option<std::time::Duration> {
    let (num, unit) = s.split_at(s.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    use std::time::Duration;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The tonic service to mount on the internal port.
pub fn service(runtime: Arc<ActorRuntime>) -> ActorHostServer<Service> {
    ActorHostServer::new(Service { runtime })
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(
            parse_grpc_timeout("150m"),
            Some(std::time::Duration::from_millis(150))
        );
        assert_eq!(
            parse_grpc_timeout("2S"),
            Some(std::time::Duration::from_secs(2))
        );
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }

    #[test]
    fn headers_round_trip_without_hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("connection", HeaderValue::from_static("close"));
        h.append("x-multi", HeaderValue::from_static("a"));
        h.append("x-multi", HeaderValue::from_static("b"));
        let back = from_wire(to_wire(&h));
        assert_eq!(back.get("content-type").unwrap(), "application/json");
        assert!(back.get("connection").is_none());
        assert_eq!(back.get_all("x-multi").iter().count(), 2);
    }
}
