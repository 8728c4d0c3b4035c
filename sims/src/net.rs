//! Simulated TCP (turmoil) for the services: a dialer for tonic clients, an incoming stream for
//! tonic servers, and raw connections between actor hosts.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actor_host::actors::remote;
use hyper_util::rt::TokioIo;
use placement::network::Dial;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;
use tonic::transport::Endpoint;

/// Dials `host:port` inside the simulation.
pub fn dial() -> Dial {
    Arc::new(|addr: &str| {
        let target = addr.to_string();
        Ok(Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_millis(500))
            .connect_with_connector_lazy(tower::service_fn(move |_uri| {
                let target = target.clone();
                async move {
                    turmoil::net::TcpStream::connect(target)
                        .await
                        .map(TokioIo::new)
                }
            })))
    })
}

/// Opens simulated connections to other actor hosts' internal ports.
pub fn connect() -> remote::Connect {
    Arc::new(|addr: String| {
        Box::pin(async move {
            let s = remote::within_connect_timeout(turmoil::net::TcpStream::connect(addr)).await?;
            Ok(Box::new(s) as Box<dyn remote::Stream>)
        })
    })
}

/// A simulated connection that tonic's server accepts.
pub struct Io(pub turmoil::net::TcpStream);

impl Connected for Io {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

type Accept =
    Pin<Box<dyn Future<Output = io::Result<(turmoil::net::TcpStream, std::net::SocketAddr)>>>>;

/// The connections accepted on a simulated listener, as a stream.
pub struct Incoming {
    listener: Arc<turmoil::net::TcpListener>,
    pending: Option<Accept>,
}

impl Incoming {
    pub fn new(listener: turmoil::net::TcpListener) -> Self {
        Incoming {
            listener: Arc::new(listener),
            pending: None,
        }
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = io::Result<Io>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let listener = self.listener.clone();
        let fut = self
            .pending
            .get_or_insert_with(|| Box::pin(async move { listener.accept().await }));
        match fut.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => {
                self.pending = None;
                Poll::Ready(Some(r.map(|(s, _)| Io(s))))
            }
        }
    }
}
