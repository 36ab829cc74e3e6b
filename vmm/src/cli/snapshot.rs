//! `vmm snapshot`: asks a running VMM to save its VM (`PUT /vm/snapshot`)
//! and prints what it wrote.

use std::path::Path;
use std::time::Duration;

use crate::api::client::{self, ClientError};
use crate::api::documents::{SnapshotDoc, SnapshotRequest};

/// How long the VMM may take: writing guest memory is most of it.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// Returns the exit code (see the subcommand's help).
pub fn run(socket: &Path, path: &Path, overwrite: bool, resume: bool) -> i32 {
    // The VMM may run elsewhere in the file system's view: an absolute path.
    let path = match std::path::absolute(path) {
        Ok(path) => path,
        Err(e) => {
            eprintln!("vmm snapshot: {}: {e}", path.display());
            return 2;
        }
    };
    let request = SnapshotRequest {
        path,
        overwrite,
        resume,
    };
    let body = serde_json::to_vec(&request).unwrap_or_default();
    let answer = client::put(socket, "/vm/snapshot", &body, SNAPSHOT_TIMEOUT);
    let doc = answer.and_then(|raw| {
        serde_json::from_slice::<SnapshotDoc>(&raw)
            .map_err(|e| ClientError::NotVmm(socket.to_path_buf(), e.to_string()))
    });
    match doc {
        Ok(doc) => {
            println!(
                "{}: {} bytes ({} of guest memory data), {} vCPUs running and {} parked, \
                 the guest held {:.1} ms, {}",
                client::printable(&doc.path.display().to_string()),
                doc.bytes,
                doc.memory_data_bytes,
                doc.vcpus_running,
                doc.vcpus_parked,
                doc.paused_ms,
                if doc.resumed {
                    "running again"
                } else {
                    "left paused"
                }
            );
            0
        }
        Err(e) => {
            eprintln!("vmm snapshot: {}", client::printable(&e.to_string()));
            match e {
                ClientError::Refused { status, .. } if status != 400 && status != 404 => 1,
                ClientError::Timeout(..) | ClientError::Closed(_) => 1,
                _ => 2,
            }
        }
    }
}
