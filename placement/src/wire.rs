//! The placement gRPC service as mounted on a replica: the generated service, except that the
//! host stream (`ReportHost`) sends orders that are already protobuf-encoded.
//!
//! A committed table goes to every connected host. Encoding it once per version (in
//! [`crate::publish`]) and handing each session the same bytes keeps the leader's cost per
//! version close to one encode plus one copy per session, instead of a deep clone and an encode
//! of the whole table per session. Hosts decode these frames with the generated types as usual:
//! the bytes on the wire are the same.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes};
use proto::placement::placement_server::PlacementServer;
use proto::placement::HostReport;
use tokio_stream::wrappers::ReceiverStream;
use tonic::body::Body;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::server::NamedService;
use tonic::Status;

use crate::server::{Node, Service};

/// The host stream's path.
pub const REPORT_HOST: &str = "/tessera.placement.v1.Placement/ReportHost";

/// Encodes pre-encoded messages (copies them into the frame), decodes host reports.
#[derive(Debug, Default, Clone, Copy)]
pub struct PreEncoded;

/// The encoding half of [`PreEncoded`].
#[derive(Debug, Default, Clone, Copy)]
pub struct BytesEncoder;

impl Encoder for BytesEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Codec for PreEncoded {
    type Encode = Bytes;
    type Decode = HostReport;
    type Encoder = BytesEncoder;
    type Decoder = tonic_prost::ProstDecoder<HostReport>;

    fn encoder(&mut self) -> BytesEncoder {
        BytesEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

/// The sessions' outgoing stream: encoded orders.
pub type Orders = ReceiverStream<Result<Bytes, Status>>;

/// Opens a host session on `node` (the leader runs it; a follower points the host to the leader).
struct ReportHost(Arc<Node>);

impl tonic::server::StreamingService<HostReport> for ReportHost {
    type Response = Bytes;
    type ResponseStream = Orders;
    type Future = std::future::Ready<Result<tonic::Response<Orders>, Status>>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<HostReport>>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(
            self.0.clone().open_session(request.into_inner()),
        )))
    }
}

/// The replica's gRPC service: `ReportHost` with [`PreEncoded`], the rest generated.
#[derive(Clone)]
pub struct PlacementService {
    node: Arc<Node>,
    generated: PlacementServer<Service>,
}

impl PlacementService {
    pub fn new(node: Arc<Node>) -> Self {
        PlacementService {
            generated: PlacementServer::new(Service(node.clone())),
            node,
        }
    }
}

impl NamedService for PlacementService {
    const NAME: &'static str = "tessera.placement.v1.Placement";
}

impl<B> tower::Service<http::Request<B>> for PlacementService
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<http::Response<Body>, Infallible>> + Send>,
    >;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() == REPORT_HOST {
            let node = self.node.clone();
            Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(PreEncoded);
                Ok(grpc.streaming(ReportHost(node), req).await)
            })
        } else {
            self.generated.call(req)
        }
    }
}
