//! A host's fleet of VMMs: the API sockets in a directory, found afresh at
//! every look, and each one's `GET /vpmu` read in parallel, every VM by its
//! own deadline and all of them by one bound, so that a stuck VMM (stopped,
//! swamped) or a stale socket costs a scrape its deadline and no more.
//!
//! Owns: discovery ([`discover`]: bounded entries, sockets only, never a
//! symlink followed) and the fan-out ([`Fleet::scrape`]). `vmm exporter`
//! ([`exporter`]) and `vmm top` read the fleet through it. Imports `api`
//! (its client and documents) only.

pub mod exporter;

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use devices::sync::Recover;

use crate::api::client::{self, ClientError, KeptConnections};
use crate::api::documents::VpmuDoc;
use crate::api::VmName;

/// Directory entries looked at per scan (more are not looked at, and
/// counted).
pub const MAX_ENTRIES: usize = 10_000;
/// Sockets read per scrape (more are skipped, and counted); those that
/// answered as a VMM before go first.
pub const MAX_VMS: usize = 256;
/// Largest `GET /vpmu` answer taken from one VM.
const MAX_DOCUMENT: usize = 8 << 20;
/// VMs read at once.
/// What each VM is asked: its views as they are, each with its age, and a
/// refresh for the next read (`api::Refresh::Async`): a scrape never waits
/// for a VM's vCPU threads to get a CPU.
const PATH: &str = "/vpmu?refresh=async";

/// The sockets found in a directory.
#[derive(Debug, Default)]
pub struct Discovery {
    /// Sockets to read, in order.
    pub sockets: Vec<PathBuf>,
    /// Sockets beyond [`MAX_VMS`], and entries beyond [`MAX_ENTRIES`].
    pub skipped: usize,
}

/// Why the directory could not be read.
#[derive(Debug, thiserror::Error)]
#[error("--sockets {path}: {source}")]
pub struct DirectoryError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// The sockets in `dir` (not following symlinks), sorted by name, those in
/// `known` first; at most [`MAX_VMS`].
pub fn discover(dir: &Path, known: impl Fn(&Path) -> bool) -> Result<Discovery, DirectoryError> {
    let error = |source| DirectoryError {
        path: dir.to_path_buf(),
        source,
    };
    let mut found = Discovery::default();
    let mut sockets = Vec::new();
    for (seen, entry) in std::fs::read_dir(dir).map_err(error)?.enumerate() {
        if seen >= MAX_ENTRIES {
            found.skipped += 1;
            continue;
        }
        let Ok(entry) = entry else { continue };
        // The directory entry's own type: a symlink is not followed.
        if entry.file_type().is_ok_and(|t| t.is_socket()) {
            sockets.push(entry.path());
        }
    }
    sockets.sort_by_key(|p| (!known(p), p.clone()));
    found.skipped += sockets.len().saturating_sub(MAX_VMS);
    sockets.truncate(MAX_VMS);
    found.sockets = sockets;
    Ok(found)
}

/// Why a VM was not read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Down {
    /// Nothing listens on the socket (its VMM ended).
    Stale,
    /// No whole answer by its deadline (a stopped or stuck VMM).
    Timeout,
    /// Its API had no free connection (503).
    Busy,
    /// The socket vanished, or the connect failed otherwise.
    Gone,
    /// Something answered, but not a vmm API (another program's socket).
    NotVmm,
    /// Its name is taken by a VM read before it in this scrape.
    DuplicateName,
    /// Not tried: the scrape's bound passed first.
    NotTried,
}

impl Down {
    /// Every kind, for counting.
    pub const ALL: [Down; 7] = [
        Down::Stale,
        Down::Timeout,
        Down::Busy,
        Down::Gone,
        Down::NotVmm,
        Down::DuplicateName,
        Down::NotTried,
    ];

    /// Its name in labels and tables.
    pub fn label(self) -> &'static str {
        match self {
            Down::Stale => "stale",
            Down::Timeout => "timeout",
            Down::Busy => "busy",
            Down::Gone => "gone",
            Down::NotVmm => "not_vmm",
            Down::DuplicateName => "duplicate_name",
            Down::NotTried => "not_tried",
        }
    }

    fn of(error: &ClientError) -> Self {
        match error {
            ClientError::Timeout(..) => Down::Timeout,
            ClientError::Stale(_) => Down::Stale,
            ClientError::Busy(..) => Down::Busy,
            ClientError::NoSocket(_) | ClientError::NotASocket(_) | ClientError::Connect(..) => {
                Down::Gone
            }
            ClientError::NotVmm(..) | ClientError::Closed(_) | ClientError::Refused { .. } => {
                Down::NotVmm
            }
        }
    }
}

/// One VM of a scrape.
#[derive(Debug)]
pub struct Scraped {
    pub socket: PathBuf,
    /// Its name: from its answer, else the last one it gave, else derived
    /// from the socket's file name.
    pub name: String,
    pub state: Result<VpmuDoc, Down>,
    /// How long reading it took.
    pub took: Duration,
}

/// How a fleet is read: deadlines, and what it remembers between scrapes.
pub struct Fleet {
    pub dir: PathBuf,
    /// Each VM's deadline.
    pub per_vm: Duration,
    /// The whole scrape's.
    pub bound: Duration,
    /// The name each socket last answered with (sockets still present).
    names: Mutex<HashMap<PathBuf, String>>,
    /// Connections to the VMMs kept open for the next scrape.
    kept: Mutex<KeptConnections>,
}

/// One scrape: the VMs in socket order, and the sockets skipped.
pub struct Scrape {
    pub vms: Vec<Scraped>,
    pub skipped: usize,
    pub took: Duration,
}

impl Fleet {
    pub fn new(dir: PathBuf, per_vm: Duration, bound: Duration) -> Self {
        Self {
            dir,
            per_vm,
            bound,
            names: Mutex::new(HashMap::new()),
            kept: Mutex::new(KeptConnections::default()),
        }
    }

    /// Finds the sockets and reads every VM, all by the bound.
    pub fn scrape(&self) -> Result<Scrape, DirectoryError> {
        let start = Instant::now();
        let found = {
            let names = self.names.lock().recover();
            discover(&self.dir, |p| names.contains_key(p))?
        };
        let end = start + self.bound;
        // Taken for this scrape: one running beside it connects afresh.
        let mut kept = std::mem::take(&mut *self.kept.lock().recover());
        kept.retain(|p| found.sockets.iter().any(|s| s == p));
        let mut vms = read_all(&found.sockets, self.per_vm, end, &mut kept);
        self.kept.lock().recover().merge(kept);
        self.name(&mut vms);
        Ok(Scrape {
            vms,
            skipped: found.skipped,
            took: start.elapsed(),
        })
    }

    /// Names every VM, marks a repeated name down, and remembers the names
    /// of the sockets present.
    fn name(&self, vms: &mut [Scraped]) {
        let mut names = self.names.lock().recover();
        let mut taken = std::collections::HashSet::new();
        for vm in vms.iter_mut() {
            vm.name = match &vm.state {
                Ok(doc) if !doc.vm.name.is_empty() => doc.vm.name.clone(),
                _ => names
                    .get(&vm.socket)
                    .cloned()
                    .unwrap_or_else(|| VmName::from_socket(Some(&vm.socket)).to_string()),
            };
            if !taken.insert(vm.name.clone()) {
                vm.state = Err(Down::DuplicateName);
            } else if vm.state.is_ok() {
                names.insert(vm.socket.clone(), vm.name.clone());
            }
        }
        let present: std::collections::HashSet<&PathBuf> = vms.iter().map(|v| &v.socket).collect();
        names.retain(|path, _| present.contains(path));
    }
}

/// Reads every socket's `GET /vpmu` at once on this thread
/// ([`client::get_all`], over the connections `kept` from the last scrape),
/// each by `per_vm` and all by `end`.
fn read_all(
    sockets: &[PathBuf],
    per_vm: Duration,
    end: Instant,
    kept: &mut KeptConnections,
) -> Vec<Scraped> {
    if Instant::now() >= end {
        let not_tried = |socket: &PathBuf| Scraped {
            socket: socket.clone(),
            name: String::new(),
            state: Err(Down::NotTried),
            took: Duration::ZERO,
        };
        return sockets.iter().map(not_tried).collect();
    }
    client::get_all(sockets, PATH, per_vm, end, MAX_DOCUMENT, kept)
        .into_iter()
        .zip(sockets)
        .map(|((answer, took), socket)| Scraped {
            socket: socket.clone(),
            name: String::new(),
            state: match answer {
                Ok(body) => serde_json::from_slice::<VpmuDoc>(&body).map_err(|_| Down::NotVmm),
                Err(e) => Err(Down::of(&e)),
            },
            took,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn discovery_takes_sockets_only_known_first_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let _b = UnixListener::bind(dir.path().join("b.sock")).unwrap();
        let _a = UnixListener::bind(dir.path().join("a.sock")).unwrap();
        std::fs::write(dir.path().join("file"), "x").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("a.sock"), dir.path().join("link")).unwrap();
        let found = discover(dir.path(), |_| false).unwrap();
        let names: Vec<_> = found
            .sockets
            .iter()
            .map(|p| p.file_name().unwrap())
            .collect();
        assert_eq!(names, ["a.sock", "b.sock"]);
        let known = dir.path().join("b.sock");
        let found = discover(dir.path(), |p| p == known).unwrap();
        assert_eq!(found.sockets[0], known, "known sockets first");
        let many: Vec<_> = (0..MAX_VMS + 3)
            .map(|i| UnixListener::bind(dir.path().join(format!("s{i:04}"))).unwrap())
            .collect();
        let found = discover(dir.path(), |_| false).unwrap();
        assert_eq!((found.sockets.len(), found.skipped), (MAX_VMS, 5));
        drop(many);
        assert!(discover(&dir.path().join("none"), |_| false).is_err());
    }

    #[test]
    fn stale_silent_and_foreign_sockets_are_down_by_their_deadlines() {
        let dir = tempfile::tempdir().unwrap();
        drop(UnixListener::bind(dir.path().join("stale.sock")).unwrap());
        // Accepts (the kernel queues the connection) but never answers.
        let _silent = UnixListener::bind(dir.path().join("silent.sock")).unwrap();
        let foreign = UnixListener::bind(dir.path().join("foreign.sock")).unwrap();
        std::thread::spawn(move || {
            for mut c in foreign.incoming().flatten() {
                use std::io::Write;
                let _ = c.write_all(b"SSH-2.0-OpenSSH\r\n");
            }
        });
        let fleet = Fleet::new(
            dir.path().to_path_buf(),
            Duration::from_millis(200),
            Duration::from_millis(400),
        );
        let scrape = fleet.scrape().unwrap();
        let states: Vec<_> = scrape
            .vms
            .iter()
            .map(|v| (v.name.as_str(), v.state.as_ref().err()))
            .collect();
        assert_eq!(
            states,
            [
                ("foreign", Some(&Down::NotVmm)),
                ("silent", Some(&Down::Timeout)),
                ("stale", Some(&Down::Stale)),
            ]
        );
        assert!(
            scrape.took < Duration::from_millis(1500),
            "{:?}",
            scrape.took
        );
    }
}
