//! The host-side API on a Unix socket: the guest's counters as JSON
//! (`GET /vpmu`) and Prometheus text (`GET /metrics`), a profile of where
//! the guest spends its time (`GET /profile`), and the VM-level
//! operations the vPMU context switch hangs off (`PUT /vm/pause`,
//! `PUT /vm/resume`), and snapshots (`PUT /vm/snapshot`, through the
//! [`Snapshots`] the VM gives it). [`documents`] defines the JSON answers for both ends;
//! [`client`] is the other end, for `vmm stat` and `vmm profile`.
//!
//! Owns: the HTTP/1.1 server and its bounds ([`http`]), the socket
//! ([`socket`]), the documents, the Prometheus text ([`metrics`]) and the
//! client. May use `vcpu` (pause, resume, kicks through `VmControl`), `pmu`
//! (the export it reads) and `profile` (the sessions it serves); knows
//! nothing of how the VM is built or of the command line.

pub mod client;
pub mod documents;
pub mod http;
pub mod metrics;
mod name;
mod slice;
pub mod socket;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::pmu::export::{Export, VcpuView};
use crate::profile::{self, Hub, ProfileError};
use crate::vcpu::control::VmControl;
use documents::{PauseDoc, SnapshotDoc, SnapshotRequest, VpmuDoc};
use http::{Request, Response};
pub use name::{NameError, VmName, MAX_NAME};
pub use socket::{bind, SocketError};

/// How long a read waits for vCPUs to publish fresh views.
const REFRESH_WAIT: Duration = Duration::from_millis(50);
/// Views younger than this are served as they are (no kick), unless the
/// guest changed its vPMU since.
const FRESH_ENOUGH: Duration = Duration::from_millis(10);
/// How a read treats stale views (`GET /vpmu?refresh=...`, also
/// `GET /metrics`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refresh {
    /// `wait` (the default): ask stale vCPUs to republish and wait for
    /// them, at most `REFRESH_WAIT` (50 ms).
    Wait,
    /// `async`: answer at once from the views there are (each with its
    /// age), and ask stale vCPUs to republish for the next read. A reader
    /// that reads on a schedule (`vmm exporter`) does not wait for vCPU
    /// threads to be scheduled, except for a view that shows a programming
    /// the guest has since left (or no view yet): that one is waited for
    /// as under `Wait`.
    Async,
}

impl Refresh {
    /// The `refresh` key of a query (other keys are ignored, as before
    /// the key existed); a value other than `wait` or `async` is an error.
    pub fn from_query(query: &str) -> Result<Self, String> {
        let mut refresh = Refresh::Wait;
        for pair in query.split('&') {
            let Some(value) = pair.strip_prefix("refresh=") else {
                continue;
            };
            refresh = match value {
                "wait" => Refresh::Wait,
                "async" => Refresh::Async,
                _ => {
                    return Err(format!(
                        "refresh={value}: use refresh=wait or refresh=async"
                    ))
                }
            };
        }
        Ok(refresh)
    }
}

/// How long a pause waits for every vCPU to leave the CPU.
const PAUSE_WAIT: Duration = Duration::from_secs(2);

/// Why a snapshot was not taken, by whose fault.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFailure {
    /// The request cannot be done (bad path, file exists): 400.
    #[error("{0}")]
    Request(String),
    /// Not now (another snapshot, the VM stopping or between boots): 409.
    #[error("{0}")]
    Conflict(String),
    /// The host failed (KVM, the file system): 500.
    #[error("{0}")]
    Host(String),
}

/// Takes snapshots of the running VM (implemented where the VM is built).
pub trait Snapshots: Send + Sync {
    fn take(&self, request: &SnapshotRequest) -> Result<SnapshotDoc, SnapshotFailure>;
}

/// Answers API requests for one VM.
pub struct Api {
    name: VmName,
    export: Arc<Export>,
    control: Arc<VmControl>,
    profiles: Arc<Hub>,
    snapshots: Option<Arc<dyn Snapshots>>,
}

impl Api {
    pub fn new(
        name: VmName,
        export: Arc<Export>,
        control: Arc<VmControl>,
        profiles: Arc<Hub>,
    ) -> Self {
        Self {
            name,
            export,
            control,
            profiles,
            snapshots: None,
        }
    }

    /// Serves `PUT /vm/snapshot` with `snapshots`.
    pub fn with_snapshots(mut self, snapshots: Arc<dyn Snapshots>) -> Self {
        self.snapshots = Some(snapshots);
        self
    }

    pub fn handle(&self, request: &Request) -> Response {
        self.handle_for(request, None)
    }

    /// [`Api::handle`] for the client at the other end of `peer`: a
    /// profile ends early if that client goes away ([`client_gone`]).
    pub fn handle_for(&self, request: &Request, peer: Option<&UnixStream>) -> Response {
        let (path, query) = request
            .path
            .split_once('?')
            .unwrap_or((request.path.as_str(), ""));
        let method = request.method.as_str();
        match (method, path) {
            ("GET", "/vpmu" | "/metrics") => match Refresh::from_query(query) {
                Ok(refresh) if path == "/vpmu" => {
                    Response::document(200, &self.doc(refresh), "the vPMU export")
                }
                Ok(refresh) => Response::text(
                    200,
                    metrics::CONTENT_TYPE,
                    metrics::render(&self.doc(refresh)),
                ),
                Err(e) => Response::error(400, &e),
            },
            ("GET", "/profile") => self.profile(query, &|| peer.is_some_and(client_gone)),
            ("PUT", "/vm/pause") => self.pause(),
            ("PUT", "/vm/resume") => self.resume(),
            ("PUT", "/vm/snapshot") => self.snapshot(&request.body),
            (_, "/vpmu" | "/metrics" | "/profile") => Response::error(405, "use GET"),
            (_, "/vm/pause" | "/vm/resume" | "/vm/snapshot") => Response::error(405, "use PUT"),
            _ => Response::error(404, &format!("no such resource: {path}")),
        }
    }

    /// The export, from fresh views (or, under [`Refresh::Async`], the
    /// latest ones, each with its age).
    fn doc(&self, refresh: Refresh) -> VpmuDoc {
        let views = self.fresh_views(refresh);
        let paused = self.control.pause_requested();
        VpmuDoc::new(&self.name, &self.export, &views, paused)
    }

    /// Samples the guest for the asked seconds (this connection waits),
    /// then answers with the profile. `gone` says whether the client has
    /// gone away (the profile then ends at once).
    fn profile(&self, query: &str, gone: &dyn Fn() -> bool) -> Response {
        let request = match profile::Request::from_query(query) {
            Ok(request) => request,
            Err(e) => return Response::error(400, &e.to_string()),
        };
        match self.profiles.run(request, &self.control, gone) {
            Ok(profile) => Response::document(200, &profile, "the profile"),
            Err(e @ (ProfileError::Busy | ProfileError::Paused | ProfileError::Stopping)) => {
                Response::error(409, &e.to_string())
            }
            // Nobody reads this.
            Err(e @ ProfileError::ClientGone) => Response::error(400, &e.to_string()),
        }
    }

    /// Pauses the VM. A guest reboot (`--on-reset reboot`) does not refuse
    /// it: the pause holds across the reboot (see [`VmControl::pause`]);
    /// only a VM that is ending answers 409.
    fn pause(&self) -> Response {
        if self.control.ending() {
            return Response::error(409, "the VM is stopping");
        }
        let paused = PauseDoc {
            paused: true,
            all_vcpus_parked: Some(self.control.pause(PAUSE_WAIT)),
        };
        Response::document(200, &paused, "the pause answer")
    }

    fn resume(&self) -> Response {
        self.control.resume();
        let resumed = PauseDoc {
            paused: false,
            all_vcpus_parked: None,
        };
        Response::document(200, &resumed, "the resume answer")
    }

    /// Writes a snapshot of the VM where the body says.
    fn snapshot(&self, body: &[u8]) -> Response {
        let Some(snapshots) = &self.snapshots else {
            return Response::error(404, "this VM takes no snapshots");
        };
        let request: SnapshotRequest = match serde_json::from_slice(body) {
            Ok(request) => request,
            Err(e) => {
                return Response::error(
                    400,
                    &format!("the body must be {{\"path\": \"/absolute/path\"}} ({e})"),
                )
            }
        };
        match snapshots.take(&request) {
            Ok(doc) => Response::document(200, &doc, "the snapshot answer"),
            Err(e @ SnapshotFailure::Request(_)) => Response::error(400, &e.to_string()),
            Err(e @ SnapshotFailure::Conflict(_)) => Response::error(409, &e.to_string()),
            Err(e @ SnapshotFailure::Host(_)) => Response::error(500, &e.to_string()),
        }
    }

    /// The latest view of every vCPU, asking stale ones to republish (a
    /// kick costs the vCPU one exit; it never waits for us) and, under
    /// [`Refresh::Wait`], waiting for them at most [`REFRESH_WAIT`].
    fn fresh_views(&self, refresh: Refresh) -> Vec<Arc<VcpuView>> {
        let asked = Instant::now();
        let n = self.export.vcpus() as u8;
        let stale = |i: u8| {
            self.export.latest(i).is_none_or(|v| {
                let old = asked.duration_since(v.taken) > FRESH_ENOUGH;
                (old || self.export.outdated(i)) && !v.paused
            })
        };
        let mut waiting: Vec<u8> = (0..n).filter(|&i| stale(i)).collect();
        if !self.control.pause_requested() {
            for &i in &waiting {
                self.export.request_refresh(i);
                self.control.kick(usize::from(i));
            }
            // Async: wait only for a view that shows a programming the
            // guest has left (or none yet), which no age makes right.
            if refresh == Refresh::Async {
                waiting.retain(|&i| self.export.latest(i).is_none() || self.export.outdated(i));
            }
            while !waiting.is_empty() && asked.elapsed() < REFRESH_WAIT {
                std::thread::sleep(Duration::from_millis(1));
                waiting.retain(|&i| self.export.latest(i).is_none_or(|v| v.taken < asked));
            }
        }
        (0..n).filter_map(|i| self.export.latest(i)).collect()
    }
}

/// Whether the client at the other end of `peer` has closed its end (a
/// hang-up; a client that only shut down its writing half still waits for
/// the answer). Never waits.
pub fn client_gone(peer: &UnixStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: peer.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, its count, and no wait.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
    ready > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pmu::export::fixtures;

    #[test]
    fn refresh_is_read_from_the_query_wait_unless_asked() {
        assert_eq!(Refresh::from_query(""), Ok(Refresh::Wait));
        assert_eq!(Refresh::from_query("x=1&y"), Ok(Refresh::Wait));
        assert_eq!(Refresh::from_query("refresh=wait"), Ok(Refresh::Wait));
        assert_eq!(Refresh::from_query("refresh=async"), Ok(Refresh::Async));
        assert_eq!(Refresh::from_query("x=1&refresh=async"), Ok(Refresh::Async));
        assert!(Refresh::from_query("refresh=").is_err());
        assert!(Refresh::from_query("refresh=later").is_err());
    }

    /// An API over one vCPU whose only view is `age` old (no vCPU thread
    /// runs to republish it).
    fn api_with_a_view_aged(age: Duration) -> (Api, Arc<Export>) {
        let plan = fixtures::plan(Some(fixtures::snapshot(vec![]).model));
        let export = Arc::new(Export::new(Arc::new(plan), 1));
        let mut view = fixtures::view(0, vec![], &[]);
        view.taken = Instant::now() - age;
        export.publish(view);
        let control = Arc::new(VmControl::new(1).unwrap());
        let api = Api::new(
            "vm".parse().unwrap(),
            export.clone(),
            control,
            Arc::new(Hub::new(1)),
        );
        (api, export)
    }

    #[test]
    fn an_async_read_answers_at_once_with_the_old_view_and_asks_for_a_new_one() {
        let (api, export) = api_with_a_view_aged(Duration::from_secs(1));
        let start = Instant::now();
        let views = api.fresh_views(Refresh::Async);
        let took = start.elapsed();
        assert!(took < REFRESH_WAIT, "waited {took:?}");
        assert_eq!(views.len(), 1);
        assert!(start.duration_since(views[0].taken) >= Duration::from_secs(1));
        assert!(export.take_refresh(0), "a refresh asked for the next read");
        let doc = api.doc(Refresh::Async);
        assert!(doc.vcpus[0].age_ms >= 1000, "its age is told");
        // A view the guest has outdated (it reprogrammed since) is waited
        // for, as by a waiting read.
        export.mark_outdated(0);
        let start = Instant::now();
        api.fresh_views(Refresh::Async);
        assert!(start.elapsed() >= REFRESH_WAIT);
    }

    #[test]
    fn a_waiting_read_waits_for_a_stale_view_at_most_its_bound() {
        let (api, export) = api_with_a_view_aged(Duration::from_secs(1));
        let start = Instant::now();
        let views = api.fresh_views(Refresh::Wait);
        let took = start.elapsed();
        assert!(took >= REFRESH_WAIT, "answered after {took:?}");
        assert_eq!(views.len(), 1);
        assert!(export.take_refresh(0));
        // A fresh view is served at once, and asks for nothing.
        let (api, export) = api_with_a_view_aged(Duration::ZERO);
        let start = Instant::now();
        api.fresh_views(Refresh::Wait);
        assert!(start.elapsed() < REFRESH_WAIT);
        assert!(!export.take_refresh(0));
    }

    #[test]
    fn a_client_is_gone_when_it_closes_not_when_it_only_stops_writing() {
        let (server, client) = UnixStream::pair().unwrap();
        assert!(!client_gone(&server));
        client.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(!client_gone(&server));
        drop(client);
        assert!(client_gone(&server));
    }
}
