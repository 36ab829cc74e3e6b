//! Creating the API socket: mode 0600, never replacing anything but a
//! socket proven stale, and at exit removing only the very socket we
//! created.
//!
//! A path that exists is replaced only when it is a socket and a connect to
//! it is refused (`ECONNREFUSED`: nothing listens, a VMM died). Any other
//! answer leaves it alone and refuses to start (exit code 2): a connect
//! that succeeds or would wait (a live socket, maybe with a full backlog),
//! and a permission error (`EACCES`: someone else's socket, which we cannot
//! even probe). The connect never blocks. At exit the path is removed only
//! if it is still the socket bound at start (same device and inode): one
//! replaced in the meantime (another VMM's socket, a file) stays.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Errors creating the socket (bad input: exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("--api-socket {0}: a VMM is already serving this socket")]
    InUse(PathBuf),
    #[error("--api-socket {0}: exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error(
        "--api-socket {0}: a socket we may not connect to (permission denied: another user's?); \
         refusing to replace it"
    )]
    NotOurs(PathBuf),
    #[error(
        "--api-socket {path}: cannot tell whether it is in use ({source}); refusing to replace it"
    )]
    Unknown {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--api-socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A bound socket that removes its file on drop, if the file is still it.
pub struct BoundSocket {
    pub listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file we created.
    id: Option<(u64, u64)>,
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta)
                if meta.file_type().is_socket() && Some((meta.dev(), meta.ino())) == self.id =>
            {
                let _ = std::fs::remove_file(&self.path);
            }
            Ok(_) => eprintln!(
                "vmm: --api-socket {} was replaced while the VMM ran; left as it is",
                self.path.display()
            ),
            Err(_) => {}
        }
    }
}

/// What a connect to an existing socket file says about it.
#[derive(Debug)]
enum Probe {
    /// Something accepts (or would: its backlog is full).
    Live,
    /// `ECONNREFUSED`: nobody listens.
    Stale,
    /// `EACCES`/`EPERM`: not ours to probe.
    Forbidden,
    Other(std::io::Error),
}

/// Connects to `path` without blocking: a Unix socket connect either
/// completes at once or fails (`EAGAIN`: its backlog is full). The stream
/// returned is blocking.
pub fn connect_now(path: &Path) -> std::io::Result<UnixStream> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_un is valid (AF_UNSPEC, empty path).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: addr is a valid sockaddr_un of at least `len` bytes; fd is
    // an open socket.
    let rc = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            std::ptr::addr_of!(addr).cast(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Connects to `path` without blocking.
fn probe(path: &Path) -> Probe {
    let Err(err) = connect_now(path) else {
        return Probe::Live;
    };
    match err.raw_os_error() {
        Some(libc::ECONNREFUSED) => Probe::Stale,
        Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => Probe::Live,
        Some(libc::EACCES) | Some(libc::EPERM) => Probe::Forbidden,
        _ => Probe::Other(err),
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
        Ok(meta) if meta.file_type().is_socket() => match probe(path) {
            Probe::Live => return Err(SocketError::InUse(path.to_path_buf())),
            Probe::Forbidden => return Err(SocketError::NotOurs(path.to_path_buf())),
            Probe::Other(source) => {
                return Err(SocketError::Unknown {
                    path: path.to_path_buf(),
                    source,
                })
            }
            Probe::Stale => {
                // Nobody listens: a stale socket from a VMM that died.
                // Remove it only if it is still the file we probed.
                match std::fs::symlink_metadata(path) {
                    Ok(now) if (now.dev(), now.ino()) == (meta.dev(), meta.ino()) => {
                        std::fs::remove_file(path).map_err(io)?
                    }
                    Ok(_) => return Err(SocketError::InUse(path.to_path_buf())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io(e)),
                }
            }
        },
        Ok(_) => return Err(SocketError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    // SAFETY: umask only changes the process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(io)?;
    let id = std::fs::symlink_metadata(path)
        .ok()
        .map(|meta| (meta.dev(), meta.ino()));
    Ok(BoundSocket {
        listener,
        path: path.to_path_buf(),
        id,
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

    #[test]
    fn a_path_replaced_while_bound_is_left_at_exit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let bound = bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let theirs = UnixListener::bind(&path).unwrap();
        drop(bound);
        assert!(path.exists(), "another socket at the path was removed");
        drop(theirs);
        std::fs::remove_file(&path).unwrap();
        let bound = bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "a file").unwrap();
        drop(bound);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a file");
    }

    #[test]
    fn a_listener_with_a_full_backlog_is_in_use_and_probing_never_waits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("busy.sock");
        let listener = UnixListener::bind(&path).unwrap();
        // Fill its backlog without accepting (beyond somaxconn's default):
        // a blocking connect would now wait forever.
        for _ in 0..5000 {
            assert!(matches!(probe(&path), Probe::Live));
        }
        let start = std::time::Instant::now();
        assert!(matches!(bind(&path), Err(SocketError::InUse(_))));
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
        drop(listener);
    }
}
