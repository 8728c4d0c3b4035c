//! Host to host: actor calls forwarded to the owner, each carrying the caller's table version.
//!
//! One long-lived connection per pair of hosts carries every call between them, many at a time
//! (the framing is in `proto/proto/internal.proto`): a caller's frame goes to the connection's
//! writer task, which writes whatever has queued up in one system call (under load it first
//! yields, so that the whole scheduler tick's frames queue), and the connection's
//! reader task hands each answer to its caller by `call_id`. On the owner, a reader task spawns
//! a task per call and a writer task batches the answers the same way. Under load a write and a
//! read carry many calls; a lone call costs one write and one read each way.
//!
//! A connection is dialed on first use and forgotten when it breaks or a call on it times out
//! (a partition can black-hole it); calls still waiting on it keep it open until they end.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use proto::internal::actor_reply::Reply;
use proto::internal::{ActorCall, ActorReply, AppReply, CallError as WireError, Header};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, OnceCell};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::activation::ActorKey;
use super::app_channel::{forwardable, AppResponse};
use super::{ActorRuntime, CallError, Local};

/// What a connection between hosts is: a TCP stream here, a simulated one in `sims/`.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// Opens a connection to another host's internal port (`host:port`).
pub type Connect = Arc<
    dyn Fn(String) -> Pin<Box<dyn Future<Output = io::Result<Box<dyn Stream>>> + Send>>
        + Send
        + Sync,
>;

/// Connects over TCP ([`tune`]d).
pub fn tcp() -> Connect {
    Arc::new(|addr: String| {
        Box::pin(async move {
            let s = within_connect_timeout(tokio::net::TcpStream::connect(&addr)).await?;
            tune(&s)?;
            Ok(Box::new(s) as Box<dyn Stream>)
        })
    })
}

/// Bounds a connection attempt (500 ms): a host that cannot be reached is routed around.
pub async fn within_connect_timeout<S>(
    connecting: impl Future<Output = io::Result<S>>,
) -> io::Result<S> {
    tokio::time::timeout(Duration::from_millis(500), connecting)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// No Nagle (calls are small and latency-bound), and TCP keepalive, so that either side finds
/// out within about 25 s that a peer vanished without closing (a partition, a machine gone):
/// the caller redials, and the owner lets go of the connection's task and socket.
fn tune(s: &tokio::net::TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    socket2::SockRef::from(s).set_tcp_keepalive(&keepalive)
}

/// The first bytes a caller sends on a new connection.
const PREFACE: &[u8; 8] = b"TSRLANE1";
/// The largest frame either side accepts (a call's body and headers, encoded).
const MAX_FRAME: usize = 512 << 20;
/// A writer task writes at most this much per system call when frames queue up.
const WRITE_BATCH: usize = 256 << 10;
/// A frame queued within this long of the previous write (or after a write of several frames)
/// waits for the rest of its scheduler tick, to share a write with them; a lone frame that comes
/// later goes out at once.
const BATCH_WINDOW: Duration = Duration::from_micros(50);

fn frame(msg: &impl Message) -> Result<Bytes, String> {
    let len = msg.encoded_len();
    if len > MAX_FRAME {
        return Err(format!(
            "the call is {len} bytes encoded, over the {MAX_FRAME}-byte limit between hosts"
        ));
    }
    let mut buf = BytesMut::with_capacity(4 + len);
    buf.put_u32(len as u32);
    msg.encode(&mut buf).map_err(|e| e.to_string())?;
    Ok(buf.freeze())
}

/// Reads one frame's message; `Ok(None)` at a clean end of the stream.
async fn read_frame<M: Message + Default>(
    r: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
) -> io::Result<Option<M>> {
    loop {
        if buf.len() >= 4 {
            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if len > MAX_FRAME {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a {len}-byte frame is over the {MAX_FRAME}-byte limit"),
                ));
            }
            if buf.len() >= 4 + len {
                buf.advance(4);
                let body = buf.split_to(len);
                return M::decode(body.freeze())
                    .map(Some)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
            }
            buf.reserve(4 + len - buf.len());
        } else {
            buf.reserve(64 << 10);
        }
        if r.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
    }
}

/// Writes the frames sent to `rx`, many per system call when they queue up, until every sender
/// is gone; then closes the write side.
async fn write_frames(
    mut w: impl AsyncWrite + Unpin,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    batch_window: Duration,
) {
    let mut batch = BytesMut::new();
    let mut last_write: Option<Instant> = None;
    // Frames in the previous write.
    let mut last_frames = 0usize;
    while let Some(first) = rx.recv().await {
        // The first frame woke this task at once (tokio runs a task just woken next), before the
        // other calls that are ready this tick could queue theirs. Under load (the previous write
        // carried several frames, or this one comes close behind it) yielding lets them queue,
        // so that one system call carries the tick's frames instead of one each. A frame that
        // comes alone goes out at once: the yield would cost it a pass of the scheduler.
        if last_frames > 1 || last_write.is_some_and(|t| t.elapsed() < batch_window) {
            tokio::task::yield_now().await;
        }
        let result = if let Ok(second) = rx.try_recv() {
            batch.extend_from_slice(&first);
            batch.extend_from_slice(&second);
            last_frames = 2;
            while batch.len() < WRITE_BATCH {
                match rx.try_recv() {
                    Ok(more) => batch.extend_from_slice(&more),
                    Err(_) => break,
                }
                last_frames += 1;
            }
            let r = w.write_all(&batch).await;
            batch.clear();
            r
        } else {
            last_frames = 1;
            w.write_all(&first).await
        };
        if result.is_err() {
            return;
        }
        last_write = Some(Instant::now());
    }
    let _ = w.shutdown().await;
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

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<ActorReply>>>>;

/// A caller's connection to one other host.
struct Conn {
    frames: mpsc::UnboundedSender<Bytes>,
    pending: Pending,
    next_id: AtomicU64,
    /// Set by the reader when the connection ends.
    broken: Arc<AtomicBool>,
}

impl Conn {
    async fn open(connect: &Connect, addr: &str) -> io::Result<Arc<Conn>> {
        let mut stream = connect(addr.to_string()).await?;
        stream.write_all(PREFACE).await?;
        let (mut r, w) = tokio::io::split(stream);
        let (frames, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_frames(w, rx, BATCH_WINDOW));
        let pending: Pending = Arc::default();
        let broken = Arc::new(AtomicBool::new(false));
        {
            let pending = pending.clone();
            let broken = broken.clone();
            let addr = addr.to_string();
            tokio::spawn(async move {
                let mut buf = BytesMut::new();
                let end = loop {
                    match read_frame::<ActorReply>(&mut r, &mut buf).await {
                        Ok(Some(reply)) => {
                            let waiter = pending.lock().expect("lock").remove(&reply.call_id);
                            if let Some(tx) = waiter {
                                let _ = tx.send(reply);
                            }
                        }
                        Ok(None) => break None,
                        Err(e) => break Some(e),
                    }
                };
                broken.store(true, Ordering::Release);
                if let Some(e) = end {
                    tracing::debug!(host = %addr, error = %e, "connection to host ended");
                }
                // Every call still waiting learns that its answer will not come.
                pending.lock().expect("lock").clear();
            });
        }
        Ok(Arc::new(Conn {
            frames,
            pending,
            next_id: AtomicU64::new(1),
            broken,
        }))
    }
}

/// Removes a call's entry if it ends without an answer (timed out, or its caller went away).
struct Waiting<'a> {
    pending: &'a Pending,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.pending.lock().expect("lock").remove(&self.id);
    }
}

type Slot = Arc<OnceCell<Arc<Conn>>>;

/// Connections to other hosts, one per host, dialed on first use.
pub struct Peers {
    connect: Connect,
    conns: Mutex<HashMap<String, Slot>>,
}

impl Peers {
    pub fn new(connect: Connect) -> Self {
        Peers {
            connect,
            conns: Mutex::new(HashMap::new()),
        }
    }

    /// The connection to `addr` (dialed if there is none) and the cache slot holding it.
    async fn conn(&self, addr: &str) -> io::Result<(Slot, Arc<Conn>)> {
        let slot = self
            .conns
            .lock()
            .expect("lock")
            .entry(addr.to_string())
            .or_default()
            .clone();
        let conn = slot
            .get_or_try_init(|| Conn::open(&self.connect, addr))
            .await;
        match conn {
            Ok(c) if !c.broken.load(Ordering::Acquire) => {
                let c = c.clone();
                Ok((slot, c))
            }
            Ok(_) => {
                self.forget(addr, &slot);
                Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "the connection had closed",
                ))
            }
            Err(e) => {
                self.forget(addr, &slot);
                Err(e)
            }
        }
    }

    /// Drops the connection in `slot` so the next call dials afresh (unless another call has
    /// already put a new one in its place).
    fn forget(&self, addr: &str, slot: &Slot) {
        let mut conns = self.conns.lock().expect("lock");
        if conns.get(addr).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            conns.remove(addr);
        }
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
        let (slot, conn) = match self.conn(addr).await {
            Ok(c) => c,
            // Nothing was sent: the owner is down or not listening. Placement will move its
            // actors once its lease lapses; route again until then (bounded by the deadline).
            Err(e) => {
                tracing::debug!(host = addr, error = %e, "cannot reach host");
                return Local::Retry(version + 1);
            }
        };
        let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
        let left = deadline.saturating_duration_since(Instant::now());
        let call = ActorCall {
            actor_type: key.actor_type.clone(),
            actor_id: key.actor_id.clone(),
            path: path.to_string(),
            body: body.to_vec(),
            headers: to_wire(headers),
            table_version: version,
            call_id: id,
            timeout_ms: (left.as_millis() as u64).max(1),
        };
        let bytes = match frame(&call) {
            Ok(b) => b,
            Err(e) => return Local::Done(Err(CallError::invoke(e))),
        };
        let (tx, rx) = oneshot::channel();
        conn.pending.lock().expect("lock").insert(id, tx);
        let _waiting = Waiting {
            pending: &conn.pending,
            id,
        };
        // The reader marks the connection broken before it drops the waiting calls' entries,
        // so a call that sees it unbroken here hears of a break later through its entry.
        // Either way, nothing of this call has been sent yet, so routing again is safe.
        if conn.broken.load(Ordering::Acquire) || conn.frames.send(bytes).is_err() {
            self.forget(addr, &slot);
            return Local::Retry(version + 1);
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(reply)) => match reply.reply {
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
            // The connection broke after the call was written: it may have run.
            Ok(Err(_)) => {
                self.forget(addr, &slot);
                Local::Done(Err(CallError::invoke(format!(
                    "error invoking actor {key} on host {addr}: the connection closed before it answered"
                ))))
            }
            Err(_) => {
                // A partition can black-hole a connection, and nothing on it would ever answer
                // again: the next call dials afresh (calls in flight keep this one until they end).
                self.forget(addr, &slot);
                Local::Done(Err(CallError::invoke(format!(
                    "error invoking actor {key} on host {addr}: timed out waiting for the answer"
                ))))
            }
        }
    }
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

/// Serves the internal port: every connection accepted on `listener` until `stop`.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    runtime: Arc<ActorRuntime>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                if let Err(e) = tune(&stream) {
                    tracing::debug!(error = %e, "internal port: cannot set socket options");
                }
                tokio::spawn(serve_connection(stream, runtime.clone(), stop.clone()));
            }
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "internal port: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Runs the calls another host sends on one connection, answering each as it ends. On `stop`
/// it reads no more calls, answers those in flight, then closes.
pub async fn serve_connection(
    mut stream: impl Stream,
    runtime: Arc<ActorRuntime>,
    stop: CancellationToken,
) {
    let mut preface = [0u8; PREFACE.len()];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut preface));
    if !matches!(read.await, Ok(Ok(_))) || &preface != PREFACE {
        tracing::debug!("internal port: a connection did not open with the host preface");
        return;
    }
    let (mut r, w) = tokio::io::split(stream);
    let (answers, rx) = mpsc::unbounded_channel();
    tokio::spawn(write_frames(w, rx, BATCH_WINDOW));
    let mut buf = BytesMut::new();
    loop {
        let call = tokio::select! {
            c = read_frame::<ActorCall>(&mut r, &mut buf) => c,
            () = stop.cancelled() => return,
        };
        let call = match call {
            Ok(Some(c)) => c,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "internal port: closing a connection");
                return;
            }
        };
        let runtime = runtime.clone();
        let answers = answers.clone();
        tokio::spawn(async move {
            let reply = run_call(&runtime, call).await;
            match frame(&reply) {
                Ok(bytes) => {
                    let _ = answers.send(bytes);
                }
                Err(e) => {
                    let error = ActorReply {
                        call_id: reply.call_id,
                        reply: Some(Reply::Error(WireError {
                            status: 500,
                            error_code: "ERR_ACTOR_INVOKE_METHOD".into(),
                            message: e,
                        })),
                    };
                    if let Ok(bytes) = frame(&error) {
                        let _ = answers.send(bytes);
                    }
                }
            }
        });
    }
}

/// Runs one call for an actor this host owns (or answers with its table version if it does not).
async fn run_call(runtime: &Arc<ActorRuntime>, call: ActorCall) -> ActorReply {
    let timeout = match call.timeout_ms {
        0 => runtime.cfg.call_timeout,
        ms => Duration::from_millis(ms),
    };
    let key = ActorKey::new(call.actor_type, call.actor_id);
    let outcome = runtime
        .call_local(
            &key,
            &call.path,
            &from_wire(call.headers),
            Bytes::from(call.body),
            call.table_version,
            None,
            Instant::now() + timeout,
        )
        .await;
    let reply = match outcome {
        Local::Retry(v) => Reply::WrongOwner(v.max(runtime.table_version())),
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
    ActorReply {
        call_id: call.call_id,
        reply: Some(reply),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::DuplexStream;

    fn call(id: u64, body: &[u8]) -> ActorCall {
        ActorCall {
            actor_type: "T".into(),
            actor_id: format!("a{id}"),
            path: "method/m".into(),
            body: body.to_vec(),
            headers: vec![Header {
                name: "x-h".into(),
                value: b"v".to_vec(),
            }],
            table_version: 3,
            call_id: id,
            timeout_ms: 1000,
        }
    }

    /// Records the size of every write it is given.
    struct CountingWriter(Arc<Mutex<Vec<usize>>>);

    impl AsyncWrite for CountingWriter {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.0.lock().unwrap().push(buf.len());
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    // The sidecar's runtime: one worker, where a task just woken by another runs next.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn frames_queued_in_one_tick_share_a_write() {
        let writes = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::unbounded_channel();
        // A window of a minute: every frame after the first counts as coming close together.
        let window = Duration::from_secs(60);
        let writer = tokio::spawn(write_frames(CountingWriter(writes.clone()), rx, window));
        tokio::task::yield_now().await; // the writer now waits on the channel
        let senders: Vec<_> = (0..10u64)
            .map(|i| {
                let tx = tx.clone();
                tokio::spawn(async move { tx.send(frame(&call(i, b"x")).unwrap()).unwrap() })
            })
            .collect();
        for s in senders {
            s.await.unwrap();
        }
        drop(tx);
        writer.await.unwrap();
        let writes = writes.lock().unwrap().clone();
        let all: usize = (0..10).map(|i| frame(&call(i, b"x")).unwrap().len()).sum();
        assert_eq!(writes.iter().sum::<usize>(), all);
        // Without the yield every frame takes a write of its own. With it, the first goes out
        // alone and the rest share one (more only if this thread is descheduled while it spawns
        // the callers).
        assert!(
            writes.len() <= 4,
            "10 frames took {} writes: {writes:?}",
            writes.len()
        );
    }

    #[tokio::test]
    async fn frames_survive_reads_split_anywhere() {
        // An 7-byte pipe forces every frame to arrive in pieces.
        let (mut w, mut r) = tokio::io::duplex(7);
        let sent: Vec<ActorCall> = (1..=20)
            .map(|i| call(i, &vec![i as u8; i as usize * 13]))
            .collect();
        let to_send = sent.clone();
        let writer = tokio::spawn(async move {
            for c in &to_send {
                w.write_all(&frame(c).unwrap()).await.unwrap();
            }
        });
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        while let Some(c) = read_frame::<ActorCall>(&mut r, &mut buf).await.unwrap() {
            got.push(c);
        }
        writer.await.unwrap();
        assert_eq!(got, sent);
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_errors() {
        let (mut w, mut r) = tokio::io::duplex(64);
        w.write_all(&((MAX_FRAME as u32) + 1).to_be_bytes())
            .await
            .unwrap();
        let e = read_frame::<ActorCall>(&mut r, &mut BytesMut::new())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);

        let (mut w, mut r) = tokio::io::duplex(64);
        let f = frame(&call(1, b"abc")).unwrap();
        w.write_all(&f[..f.len() - 1]).await.unwrap();
        drop(w);
        let e = read_frame::<ActorCall>(&mut r, &mut BytesMut::new())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    proptest! {
        /// Whatever bytes arrive, reading ends in messages, a clean end or an error, never a panic.
        #[test]
        fn reading_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let mut r = &bytes[..];
                let mut buf = BytesMut::new();
                for _ in 0..bytes.len() + 1 {
                    match read_frame::<ActorCall>(&mut r, &mut buf).await {
                        Ok(Some(_)) => continue,
                        Ok(None) | Err(_) => break,
                    }
                }
            });
        }
    }

    /// A `Connect` handing out one end of an in-memory pipe per dial, the other end to the test.
    fn pipes() -> (
        Connect,
        mpsc::UnboundedReceiver<DuplexStream>,
        Arc<AtomicUsize>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let dials = Arc::new(AtomicUsize::new(0));
        let counter = dials.clone();
        let connect: Connect = Arc::new(move |_addr: String| {
            let tx = tx.clone();
            let counter = counter.clone();
            Box::pin(async move {
                counter.fetch_add(1, Ordering::SeqCst);
                let (ours, theirs) = tokio::io::duplex(1 << 16);
                tx.send(theirs)
                    .map_err(|_| io::Error::from(io::ErrorKind::ConnectionRefused))?;
                Ok(Box::new(ours) as Box<dyn Stream>)
            })
        });
        (connect, rx, dials)
    }

    async fn accept(server: &mut DuplexStream) {
        let mut preface = [0u8; 8];
        server.read_exact(&mut preface).await.unwrap();
        assert_eq!(&preface, PREFACE);
    }

    fn answer(id: u64, body: &str) -> Bytes {
        frame(&ActorReply {
            call_id: id,
            reply: Some(Reply::App(AppReply {
                status: 200,
                headers: vec![],
                body: body.as_bytes().to_vec(),
            })),
        })
        .unwrap()
    }

    /// Calls actor `T/{id}` on host `h:1` (table version 7) in a task of its own.
    fn spawn_call(
        peers: &Arc<Peers>,
        id: &'static str,
        deadline: Instant,
    ) -> tokio::task::JoinHandle<Local> {
        let peers = peers.clone();
        tokio::spawn(async move {
            peers
                .call(
                    "h:1",
                    &ActorKey::new("T", id),
                    "method/m",
                    &HeaderMap::new(),
                    Bytes::from_static(b"x"),
                    7,
                    deadline,
                )
                .await
        })
    }

    fn body_of(outcome: Local) -> String {
        match outcome {
            Local::Done(Ok(r)) => String::from_utf8(r.body.to_vec()).unwrap(),
            Local::Done(Err(e)) => panic!("error: {}", e.message),
            Local::Retry(v) => panic!("retry {v}"),
        }
    }

    #[tokio::test]
    async fn concurrent_calls_share_a_connection_and_get_their_own_answers() {
        let (connect, mut dialed, dials) = pipes();
        let peers = Arc::new(Peers::new(connect));
        let deadline = Instant::now() + Duration::from_secs(5);
        let first = spawn_call(&peers, "a", deadline);
        let second = spawn_call(&peers, "b", deadline);
        let mut server = dialed.recv().await.unwrap();
        accept(&mut server).await;
        let mut buf = BytesMut::new();
        let c1 = read_frame::<ActorCall>(&mut server, &mut buf)
            .await
            .unwrap()
            .unwrap();
        let c2 = read_frame::<ActorCall>(&mut server, &mut buf)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c1.table_version, 7);
        assert!(c1.timeout_ms > 0 && c1.timeout_ms <= 5000);
        // Answer in the opposite order: each caller must still get its own.
        for c in [&c2, &c1] {
            server
                .write_all(&answer(c.call_id, &c.actor_id))
                .await
                .unwrap();
        }
        assert_eq!(body_of(first.await.unwrap()), "a");
        assert_eq!(body_of(second.await.unwrap()), "b");
        assert_eq!(
            dials.load(Ordering::SeqCst),
            1,
            "both calls used one connection"
        );
    }

    #[tokio::test]
    async fn a_broken_connection_fails_the_waiting_call_and_is_dialed_again() {
        let (connect, mut dialed, dials) = pipes();
        let peers = Arc::new(Peers::new(connect));
        let deadline = Instant::now() + Duration::from_secs(5);
        let waiting = spawn_call(&peers, "a", deadline);
        let mut server = dialed.recv().await.unwrap();
        accept(&mut server).await;
        read_frame::<ActorCall>(&mut server, &mut BytesMut::new())
            .await
            .unwrap()
            .unwrap();
        // The owner goes away after reading the call: it may have run, so no retry.
        drop(server);
        match waiting.await.unwrap() {
            Local::Done(Err(e)) => assert!(e.message.contains("closed"), "{}", e.message),
            _ => panic!("expected an error"),
        }
        let again = spawn_call(&peers, "a", deadline);
        let mut server = dialed.recv().await.unwrap();
        accept(&mut server).await;
        let c = read_frame::<ActorCall>(&mut server, &mut BytesMut::new())
            .await
            .unwrap()
            .unwrap();
        server.write_all(&answer(c.call_id, "ok")).await.unwrap();
        assert_eq!(body_of(again.await.unwrap()), "ok");
        assert_eq!(dials.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn connections_between_hosts_have_keepalive_and_no_nagle() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        tune(&s).unwrap();
        let sock = socket2::SockRef::from(&s);
        assert!(s.nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(10));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(5)
        );
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 3);
    }

    #[tokio::test]
    async fn an_unreachable_host_means_route_again() {
        let connect: Connect =
            Arc::new(|_| Box::pin(async { Err(io::ErrorKind::ConnectionRefused.into()) }));
        let peers = Peers::new(connect);
        let outcome = peers
            .call(
                "h:1",
                &ActorKey::new("T", "a"),
                "method/m",
                &HeaderMap::new(),
                Bytes::new(),
                4,
                Instant::now() + Duration::from_secs(1),
            )
            .await;
        assert!(matches!(outcome, Local::Retry(5)));
    }

    #[tokio::test]
    async fn a_call_nobody_answers_times_out_and_the_next_dials_afresh() {
        let (connect, mut dialed, dials) = pipes();
        let peers = Peers::new(connect);
        let key = ActorKey::new("T", "a");
        let outcome = peers
            .call(
                "h:1",
                &key,
                "method/m",
                &HeaderMap::new(),
                Bytes::new(),
                1,
                Instant::now() + Duration::from_millis(200),
            )
            .await;
        match outcome {
            Local::Done(Err(e)) => assert!(e.message.contains("timed out"), "{}", e.message),
            _ => panic!("expected a timeout"),
        }
        let _black_hole = dialed.recv().await.unwrap();
        assert!(
            peers.conns.lock().unwrap().is_empty(),
            "forgotten after the timeout"
        );
        assert_eq!(dials.load(Ordering::SeqCst), 1);
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
