//! Raft RPCs between replicas: openraft's requests, JSON-encoded, over a `Raft` method of the
//! replicas' own gRPC service (the same port their clients use). Generic over the Raft type
//! configuration and the gRPC client ([`RaftTransport`]), so the placement replicas and the
//! scheduler replicas share it.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RaftTypeConfig};
use proto::placement::placement_client::PlacementClient;
use proto::placement::RaftMessage;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::raft_log::NodeId;

/// Opens a (lazy) gRPC channel to `host:port`: plain TCP in production, simulated sockets in
/// `sims/`.
pub type Dial = Arc<dyn Fn(&str) -> Result<Channel, tonic::transport::Error> + Send + Sync>;

/// Dials over TCP.
pub fn tcp() -> Dial {
    Arc::new(|addr: &str| {
        Ok(Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .connect_lazy())
    })
}

/// The `Raft` method of a replica's gRPC service: `(kind, payload)` in, payload out.
pub trait RaftTransport: Clone + Send + Sync + 'static {
    fn connect(channel: Channel) -> Self;
    fn call(
        &mut self,
        kind: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> impl std::future::Future<Output = Result<Vec<u8>, tonic::Status>> + Send;
}

impl RaftTransport for PlacementClient<Channel> {
    fn connect(channel: Channel) -> Self {
        PlacementClient::new(channel)
    }

    async fn call(
        &mut self,
        kind: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, tonic::Status> {
        let mut request = tonic::Request::new(RaftMessage {
            kind: kind.to_string(),
            payload,
        });
        request.set_timeout(timeout);
        Ok(self.raft(request).await?.into_inner().payload)
    }
}

/// Creates one [`Peer`] per target replica.
pub struct Network<C, T = PlacementClient<Channel>> {
    pub dial: Dial,
    _types: PhantomData<fn() -> (C, T)>,
}

impl<C, T> Network<C, T> {
    pub fn new(dial: Dial) -> Self {
        Network {
            dial,
            _types: PhantomData,
        }
    }
}

impl<C, T> Clone for Network<C, T> {
    fn clone(&self) -> Self {
        Network::new(self.dial.clone())
    }
}

impl<C, T> RaftNetworkFactory<C> for Network<C, T>
where
    C: RaftTypeConfig<NodeId = NodeId, Node = BasicNode>,
    T: RaftTransport,
{
    type Network = Peer<C, T>;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer<C, T> {
        Peer {
            target,
            addr: node.addr.clone(),
            dial: self.dial.clone(),
            client: None,
            _types: PhantomData,
        }
    }
}

/// The connection to one other replica.
pub struct Peer<C, T> {
    target: NodeId,
    addr: String,
    dial: Dial,
    client: Option<T>,
    _types: PhantomData<fn() -> C>,
}

impl<C, T: RaftTransport> Peer<C, T> {
    fn client(&mut self) -> Result<T, tonic::transport::Error> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let c = T::connect((self.dial)(&self.addr)?);
        self.client = Some(c.clone());
        Ok(c)
    }

    async fn call<Req, Resp, E>(
        &mut self,
        kind: &str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: DeserializeOwned + std::error::Error,
    {
        let payload =
            serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut client = self
            .client()
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let reply = match client.call(kind, payload, option.hard_ttl()).await {
            Ok(r) => r,
            Err(status) => {
                // Reconnect next time: the peer may have restarted on the same address.
                self.client = None;
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
        };
        let res: Result<Resp, E> =
            serde_json::from_slice(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl<C, T> RaftNetwork<C> for Peer<C, T>
where
    C: RaftTypeConfig<NodeId = NodeId, Node = BasicNode>,
    T: RaftTransport,
{
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call("append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<C>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call("snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call("vote", &rpc, &option).await
    }
}

/// Serves one of openraft's RPCs on the receiving replica: `Ok(None)` if `kind` is not one of
/// them (the service may have kinds of its own).
pub async fn handle<C>(
    raft: &openraft::Raft<C>,
    kind: &str,
    payload: &[u8],
) -> Result<Option<Vec<u8>>, tonic::Status>
where
    C: RaftTypeConfig<NodeId = NodeId, Node = BasicNode>,
{
    fn decode<T: DeserializeOwned>(p: &[u8]) -> Result<T, tonic::Status> {
        serde_json::from_slice(p)
            .map_err(|e| tonic::Status::invalid_argument(format!("bad raft payload: {e}")))
    }
    fn encode<T: Serialize>(v: &T) -> Result<Option<Vec<u8>>, tonic::Status> {
        serde_json::to_vec(v)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
    match kind {
        "append" => encode(&raft.append_entries(decode(payload)?).await),
        "vote" => encode(&raft.vote(decode(payload)?).await),
        "snapshot" => encode(&raft.install_snapshot(decode(payload)?).await),
        _ => Ok(None),
    }
}
