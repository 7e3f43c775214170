//! The lifecycle scenario's applier: a `ChangeApplier` in the bench process that applies every
//! request at once, so the full lifecycle (create, two approvals, APPLIED) is measured.

use approvals::pb::{
    self,
    change_applier_server::{ChangeApplier, ChangeApplierServer},
    policies_client::PoliciesClient,
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, transport::Channel};

struct Instant;

#[tonic::async_trait]
impl ChangeApplier for Instant {
    async fn apply_changes(
        &self,
        _request: Request<pb::ApplyChangesRequest>,
    ) -> Result<Response<pb::ApplyChangesResponse>, Status> {
        Ok(Response::new(pb::ApplyChangesResponse {
            outcome: pb::Outcome::Applied as i32,
            ..Default::default()
        }))
    }
}

/// Serves the applier on an ephemeral port and returns its endpoint.
pub async fn start() -> Result<String, String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("applier: bind: {e}"))?;
    let endpoint = format!(
        "http://{}",
        listener.local_addr().map_err(|e| format!("applier: {e}"))?
    );
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        if let Err(err) = tonic::transport::Server::builder()
            .add_service(ChangeApplierServer::new(Instant))
            .serve_with_incoming(incoming)
            .await
        {
            eprintln!("applier stopped: {err}");
        }
    });
    Ok(endpoint)
}

/// An AUTO policy for `project`: two approvals, applied through `endpoint` on quorum.
pub async fn auto_policy(channel: Channel, project: &str, endpoint: &str) -> Result<(), String> {
    let mut client = PoliciesClient::new(channel);
    client
        .create_policy(crate::with_actor(
            pb::CreatePolicyRequest {
                policy: Some(pb::Policy {
                    name: format!("{project}-auto"),
                    project: project.to_owned(),
                    action_key: "*".into(),
                    min_approvals: 2,
                    apply_mode: pb::ApplyMode::Auto as i32,
                    applier_endpoint: endpoint.to_owned(),
                    ..Default::default()
                }),
            },
            "user:bench-admin",
        ))
        .await
        .map_err(|s| format!("create the lifecycle policy: {s}"))?;
    Ok(())
}
