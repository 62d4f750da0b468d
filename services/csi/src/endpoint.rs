//! The CSI endpoint: a unix socket (`unix:///PATH`) serving Identity and,
//! when given, the Controller service with SnapshotMetadata beside it. A
//! stale socket file from an earlier run is replaced; a live one
//! (something accepts a connection on it) is left alone and the start
//! fails, naming it (`cowsnap_proto::listen::replace_stale_socket`, the
//! rule every cowsnap socket follows).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use cowsnap_proto::csi::v1 as csi;
use cowsnap_proto::listen::{Bound, replace_stale_socket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Router;

use crate::controller::Controller;
use crate::identity::Identity;
use crate::metadata::SnapshotMetadata;

/// The socket path of an endpoint: `unix:///abs/path`, `unix:/abs/path` or
/// a plain absolute path.
pub fn socket_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    anyhow::ensure!(
        path.starts_with('/'),
        "CSI endpoint {endpoint:?}: give unix:///ABSOLUTE/PATH"
    );
    Ok(PathBuf::from(path))
}

/// Binds the endpoint's socket, replacing a stale one, refusing a live one.
pub fn bind(endpoint: &str) -> anyhow::Result<BoundEndpoint> {
    let path = socket_path(endpoint)?;
    replace_stale_socket(&path, "CSI endpoint")?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("CSI endpoint: cannot create {}", dir.display()))?;
    }
    let std_listener = std::os::unix::net::UnixListener::bind(&path)
        .with_context(|| format!("CSI endpoint {}: cannot listen", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("CSI endpoint {}: cannot restrict", path.display()))?;
    std_listener.set_nonblocking(true)?;
    Ok(BoundEndpoint {
        listener: std_listener,
        path,
    })
}

/// A bound CSI socket, not yet served.
pub struct BoundEndpoint {
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
}

impl BoundEndpoint {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves `router` on it until `shutdown` is cancelled; the socket file
    /// is removed then. Must run inside a tokio runtime.
    pub fn serve(self, router: Router, shutdown: CancellationToken) -> anyhow::Result<RunningCsi> {
        let listener = tokio::net::UnixListener::from_std(self.listener)?;
        let path = self.path.clone();
        tracing::info!("CSI endpoint serving on unix://{}", path.display());
        let task = tokio::spawn(Bound::Unix(listener, self.path).serve(router, shutdown));
        Ok(RunningCsi { path, task })
    }
}

/// A served CSI endpoint.
pub struct RunningCsi {
    pub path: PathBuf,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningCsi {
    /// Waits until it has stopped (after its shutdown token was cancelled).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await?
    }
}

/// The CSI services of one endpoint: Identity always, the others when
/// given. SnapshotMetadata goes with the Controller: both sit on the
/// control service's domain (Identity advertises it when told to).
pub fn router(identity: Identity, controller: Option<Controller>) -> Router {
    let metadata = controller.as_ref().map(|c| {
        csi::snapshot_metadata_server::SnapshotMetadataServer::new(SnapshotMetadata::new(
            c.control(),
        ))
    });
    tonic::transport::Server::builder()
        .add_service(csi::identity_server::IdentityServer::new(identity))
        .add_optional_service(controller.map(csi::controller_server::ControllerServer::new))
        .add_optional_service(metadata)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_name_absolute_socket_paths() {
        assert_eq!(
            socket_path("unix:///run/csi.sock").unwrap(),
            PathBuf::from("/run/csi.sock")
        );
        assert_eq!(
            socket_path("unix:/run/csi.sock").unwrap(),
            PathBuf::from("/run/csi.sock")
        );
        assert_eq!(
            socket_path("/run/csi.sock").unwrap(),
            PathBuf::from("/run/csi.sock")
        );
        assert!(socket_path("unix://relative.sock").is_err());
        assert!(socket_path("tcp://1.2.3.4:5").is_err());
    }
}
