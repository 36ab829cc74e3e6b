//! `vmm exporter`: one Prometheus endpoint on TCP for every VMM whose API
//! socket is in a directory ([`crate::fleet::exporter`]).

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::api::http::Server;
use crate::fleet::exporter::Exporter;
use crate::fleet::Fleet;

/// What `vmm exporter` was asked.
pub struct ExporterOptions {
    pub listen: SocketAddr,
    pub sockets: PathBuf,
    pub per_vm: Duration,
    pub bound: Duration,
}

/// Why the exporter did not start (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum ExporterError {
    #[error("--sockets {0}: not a directory")]
    NotADirectory(PathBuf),
    #[error("--sockets {0}: {1}")]
    Sockets(PathBuf, std::io::Error),
    #[error("--vm-timeout must not exceed --scrape-timeout")]
    Deadlines,
    #[error("--listen {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("starting the server: {0}")]
    Server(std::io::Error),
}

/// Serves until the process is ended; returns the exit code only when it
/// cannot start.
pub fn run(options: &ExporterOptions) -> i32 {
    match start(options) {
        Ok(_server) => loop {
            std::thread::park();
        },
        Err(e) => {
            eprintln!("vmm exporter: {e}");
            2
        }
    }
}

fn start(options: &ExporterOptions) -> Result<Server, ExporterError> {
    let dir = &options.sockets;
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(ExporterError::NotADirectory(dir.clone())),
        Err(e) => return Err(ExporterError::Sockets(dir.clone(), e)),
    }
    if options.per_vm > options.bound {
        return Err(ExporterError::Deadlines);
    }
    let listener =
        TcpListener::bind(options.listen).map_err(|e| ExporterError::Listen(options.listen, e))?;
    let listen = listener.local_addr().unwrap_or(options.listen);
    let fleet = Fleet::new(dir.clone(), options.per_vm, options.bound);
    let exporter = Exporter::new(fleet);
    // A scrape is bounded by the fleet's deadlines: the connection need not be watched.
    let server = Server::start(listener, Arc::new(move |r, _| exporter.handle(r)))
        .map_err(ExporterError::Server)?;
    if !listen.ip().is_loopback() {
        eprintln!("vmm exporter: listening on {listen}, beyond this host: anyone who reaches it reads every VM's counters");
    }
    eprintln!(
        "vmm exporter: serving http://{listen}/metrics for the VMs whose API sockets are in {}",
        dir.display()
    );
    Ok(server)
}
