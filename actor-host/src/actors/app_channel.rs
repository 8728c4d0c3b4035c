//! The app channel: how the host calls the application (Dapr's app-callback protocol over HTTP).
//!
//! A trait so that tests and `sims/` can put an in-process app behind the same runtime.

use std::time::Duration;

use async_trait::async_trait;
use axum::http::{HeaderMap, Method, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// One request to the app.
#[derive(Debug, Clone)]
pub struct AppRequest {
    pub method: Method,
    /// Path and query, e.g. `/actors/Counter/7/method/Increment`.
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The app's answer.
#[derive(Debug, Clone)]
pub struct AppResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Why the app could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("the app did not answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach the app: {0}")]
    Unreachable(String),
}

#[async_trait]
pub trait AppChannel: Send + Sync + 'static {
    async fn call(&self, req: AppRequest) -> Result<AppResponse, ChannelError>;
}

/// The app on `http://address:port`, over pooled HTTP/1.1 connections.
pub struct HttpChannel {
    base: String,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    timeout: Duration,
    token: Option<String>,
}

impl HttpChannel {
    /// `token` is `APP_API_TOKEN`: sent as `dapr-api-token` on every call when set.
    pub fn new(address: &str, port: u16, timeout: Duration, token: Option<String>) -> Self {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1024)
            .build(connector);
        HttpChannel {
            base: format!("http://{address}:{port}"),
            client,
            timeout,
            token,
        }
    }
}

/// Hop-by-hop and framing headers are the transport's business, not forwarded.
pub fn forwardable(name: &str) -> bool {
    !matches!(
        name,
        "host"
            | "content-length"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "upgrade"
            | "te"
            | "trailer"
            | "proxy-connection"
            | "dapr-api-token"
    )
}

#[async_trait]
impl AppChannel for HttpChannel {
    async fn call(&self, req: AppRequest) -> Result<AppResponse, ChannelError> {
        let mut builder = hyper::Request::builder()
            .method(req.method)
            .uri(format!("{}{}", self.base, req.path));
        for (name, value) in req.headers.iter() {
            if forwardable(name.as_str()) {
                builder = builder.header(name, value);
            }
        }
        if let Some(t) = &self.token {
            builder = builder.header("dapr-api-token", t.as_str());
        }
        let request = builder
            .body(Full::new(req.body))
            .map_err(|e| ChannelError::Unreachable(e.to_string()))?;
        let fut = async {
            let resp = self
                .client
                .request(request)
                .await
                .map_err(|e| ChannelError::Unreachable(format!("{e:#}")))?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| ChannelError::Unreachable(e.to_string()))?
                .to_bytes();
            Ok(AppResponse {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| ChannelError::Timeout(self.timeout))?
    }
}
