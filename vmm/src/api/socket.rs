//! Creating the API socket: mode 0600, never replacing anything but a
//! stale socket, removed when the VMM ends.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Errors creating the socket (bad input: exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("--api-socket {0}: a VMM is already serving this socket")]
    InUse(PathBuf),
    #[error("--api-socket {0}: exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("--api-socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A bound socket that removes its file on drop.
pub struct BoundSocket {
    pub listener: UnixListener,
    path: PathBuf,
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path` with mode 0600. Call while the process is single-threaded
/// (it sets the umask around the bind).
pub fn bind(path: &Path) -> Result<BoundSocket, SocketError> {
    let io = |source| SocketError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse(path.to_path_buf()));
            }
            // Nobody listens: a stale socket from a VMM that died.
            std::fs::remove_file(path).map_err(io)?;
        }
        Ok(_) => return Err(SocketError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    // SAFETY: umask only changes the process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    Ok(BoundSocket {
        listener: bound.map_err(io)?,
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn socket_is_private_stale_ones_replaced_others_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let bound = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(bind(&path), Err(SocketError::InUse(_))));
        drop(bound);
        assert!(!path.exists(), "removed on drop");
        // A socket nobody listens on (its VMM died) is replaced.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        drop(bind(&path).unwrap());
        let file = dir.path().join("file");
        std::fs::write(&file, "keep me").unwrap();
        assert!(matches!(bind(&file), Err(SocketError::NotASocket(_))));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    }
}
