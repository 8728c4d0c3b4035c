//! Raft RPCs between placement replicas: openraft's requests, JSON-encoded, over the `Raft` method
//! of the placement gRPC service (the same port hosts use).

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
use openraft::BasicNode;
use proto::placement::placement_client::PlacementClient;
use proto::placement::RaftMessage;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::store::NodeId;
use crate::{Raft, TypeConfig};

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

/// Creates one [`Peer`] per target replica.
#[derive(Clone)]
pub struct Network {
    pub dial: Dial,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            target,
            addr: node.addr.clone(),
            dial: self.dial.clone(),
            client: None,
        }
    }
}

/// The connection to one other replica.
pub struct Peer {
    target: NodeId,
    addr: String,
    dial: Dial,
    client: Option<PlacementClient<Channel>>,
}

impl Peer {
    fn client(&mut self) -> Result<PlacementClient<Channel>, tonic::transport::Error> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let c = PlacementClient::new((self.dial)(&self.addr)?);
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
        let mut request = tonic::Request::new(RaftMessage {
            kind: kind.to_string(),
            payload,
        });
        request.set_timeout(option.hard_ttl());
        let reply = match client.raft(request).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                // Reconnect next time: the peer may have restarted on the same address.
                self.client = None;
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
        };
        let res: Result<Resp, E> = serde_json::from_slice(&reply.payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call("append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
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

/// Serves one Raft RPC on the receiving replica.
pub async fn handle(raft: &Raft, msg: RaftMessage) -> Result<RaftMessage, tonic::Status> {
    fn decode<T: DeserializeOwned>(p: &[u8]) -> Result<T, tonic::Status> {
        serde_json::from_slice(p)
            .map_err(|e| tonic::Status::invalid_argument(format!("bad raft payload: {e}")))
    }
    fn encode<T: Serialize>(kind: String, v: &T) -> Result<RaftMessage, tonic::Status> {
        let payload = serde_json::to_vec(v).map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(RaftMessage { kind, payload })
    }
    match msg.kind.as_str() {
        "append" => encode(
            msg.kind.clone(),
            &raft.append_entries(decode(&msg.payload)?).await,
        ),
        "vote" => encode(msg.kind.clone(), &raft.vote(decode(&msg.payload)?).await),
        "snapshot" => encode(
            msg.kind.clone(),
            &raft.install_snapshot(decode(&msg.payload)?).await,
        ),
        other => Err(tonic::Status::invalid_argument(format!(
            "unknown raft message kind {other:?}"
        ))),
    }
}
