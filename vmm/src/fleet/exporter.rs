//! `vmm exporter`'s answers: `GET /metrics` reads the fleet (one
//! [`Fleet::scrape`] per request) and renders every VM that answered with
//! the VMM's own renderer ([`metrics::render_into`], a `vm` label first),
//! then the exporter's own series. Served by [`crate::api::http`]'s bounded
//! server on TCP.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::{Down, Fleet, Scrape};
use crate::api::http::{Request, Response};
use crate::api::metrics::{self, Exposition, Family, Labelled};

/// Scrapes answered at once; more get 503 (each reads up to
/// [`super::MAX_VMS`] VMs on its own threads).
pub const MAX_SCRAPES: usize = 2;

const SCRAPES: Family = Family::counter(
    "vmm_exporter_scrapes_total",
    "Scrapes of the fleet the exporter answered.",
);
const SCRAPE_SECONDS: Family = Family::gauge(
    "vmm_exporter_scrape_seconds",
    "How long this scrape took to find and read every VM.",
);
const VMS_SEEN: Family = Family::gauge(
    "vmm_exporter_vms_seen",
    "VMM API sockets found in the sockets directory (at most the exporter's limit).",
);
const VMS_UP: Family = Family::gauge(
    "vmm_exporter_vms_up",
    "VMs whose GET /vpmu answered within their deadline.",
);
const SKIPPED: Family = Family::gauge(
    "vmm_exporter_sockets_skipped",
    "Sockets or directory entries beyond the exporter's limits, not read.",
);
const VM_UP: Family = Family::gauge(
    "vmm_exporter_vm_up",
    "1 when the VM answered within its deadline, 0 when it is down.",
);
const VM_SECONDS: Family = Family::gauge(
    "vmm_exporter_vm_scrape_seconds",
    "How long reading the VM took (at most its deadline).",
);
const ERRORS: Family = Family::counter(
    "vmm_exporter_errors_total",
    "VMs found down, by why, and the exporter's own errors (directory, busy).",
);

/// Answers the exporter's requests.
pub struct Exporter {
    fleet: Fleet,
    scrapes: AtomicU64,
    running: AtomicUsize,
    /// Per [`Down::ALL`], then `directory`, then `busy`.
    errors: [AtomicU64; Down::ALL.len() + 2],
}

const DIRECTORY: usize = Down::ALL.len();
const BUSY: usize = Down::ALL.len() + 1;

impl Exporter {
    pub fn new(fleet: Fleet) -> Self {
        Self {
            fleet,
            scrapes: AtomicU64::new(0),
            running: AtomicUsize::new(0),
            errors: Default::default(),
        }
    }

    /// Only `GET` of `/metrics` and `/`.
    pub fn handle(&self, request: &Request) -> Response {
        let path = request
            .path
            .split_once('?')
            .map_or(request.path.as_str(), |(p, _)| p);
        match (request.method.as_str(), path) {
            ("GET", "/metrics") => self.metrics(),
            ("GET", "/") => Response::text(
                200,
                "text/plain; charset=utf-8",
                "vmm exporter: the host's VMs are at /metrics\n".into(),
            ),
            (_, "/metrics" | "/") => Response::error(405, "use GET"),
            _ => Response::error(404, "no such resource (try /metrics)"),
        }
    }

    fn metrics(&self) -> Response {
        if self.running.fetch_add(1, Ordering::SeqCst) >= MAX_SCRAPES {
            self.running.fetch_sub(1, Ordering::SeqCst);
            self.errors[BUSY].fetch_add(1, Ordering::Relaxed);
            return Response::error(503, "too many scrapes at once");
        }
        let scrape = self.fleet.scrape();
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.scrapes.fetch_add(1, Ordering::Relaxed);
        let mut out = Exposition::default();
        match &scrape {
            Ok(scrape) => {
                for vm in &scrape.vms {
                    if let Err(down) = vm.state {
                        let kind = Down::ALL.iter().position(|&d| d == down).unwrap_or(0);
                        self.errors[kind].fetch_add(1, Ordering::Relaxed);
                    }
                }
                let up: Vec<Labelled> = scrape
                    .vms
                    .iter()
                    .filter_map(|vm| {
                        let doc = vm.state.as_ref().ok()?;
                        Some(Labelled {
                            vm: Some(&vm.name),
                            doc,
                        })
                    })
                    .collect();
                metrics::render_into(&mut out, &up);
            }
            Err(_) => {
                self.errors[DIRECTORY].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.own(&mut out, scrape.as_ref().ok());
        Response::text(200, metrics::CONTENT_TYPE, out.into_text())
    }

    /// The exporter's own series.
    fn own(&self, out: &mut Exposition, scrape: Option<&Scrape>) {
        let gauge = |out: &mut Exposition, family: &Family, value: f64| {
            out.header(family);
            out.sample(family.name, &[], value);
        };
        gauge(out, &SCRAPES, self.scrapes.load(Ordering::Relaxed) as f64);
        let vms = scrape.map_or(&[][..], |s| &s.vms[..]);
        let up = vms.iter().filter(|v| v.state.is_ok()).count();
        gauge(
            out,
            &SCRAPE_SECONDS,
            scrape.map_or(0.0, |s| s.took.as_secs_f64()),
        );
        gauge(out, &VMS_SEEN, vms.len() as f64);
        gauge(out, &VMS_UP, up as f64);
        gauge(out, &SKIPPED, scrape.map_or(0, |s| s.skipped) as f64);
        let labels = |vm: &super::Scraped| {
            let socket = vm.socket.file_name().unwrap_or_default();
            [
                ("vm", vm.name.clone()),
                ("socket", socket.to_string_lossy().into_owned()),
            ]
        };
        out.header(&VM_UP);
        for vm in vms {
            out.sample(VM_UP.name, &labels(vm), u8::from(vm.state.is_ok()));
        }
        out.header(&VM_SECONDS);
        for vm in vms {
            out.sample(VM_SECONDS.name, &labels(vm), vm.took.as_secs_f64());
        }
        out.header(&ERRORS);
        let kinds = Down::ALL
            .iter()
            .map(|d| d.label())
            .chain(["directory", "busy"]);
        for (kind, count) in kinds.zip(&self.errors) {
            let value = count.load(Ordering::Relaxed);
            out.sample(ERRORS.name, &[("kind", kind.to_string())], value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::Duration;

    fn exporter(dir: PathBuf) -> Exporter {
        let ms = Duration::from_millis;
        Exporter::new(Fleet::new(dir, ms(100), ms(300)))
    }

    fn get(e: &Exporter, method: &str, path: &str) -> Response {
        e.handle(&Request {
            method: method.into(),
            path: path.into(),
            body: Vec::new(),
        })
    }

    #[test]
    fn only_get_of_its_paths_and_its_own_series_without_vms() {
        let dir = tempfile::tempdir().unwrap();
        let e = exporter(dir.path().to_path_buf());
        assert_eq!(get(&e, "POST", "/metrics").status, 405);
        assert_eq!(get(&e, "GET", "/metrics/../vpmu").status, 404);
        assert_eq!(get(&e, "GET", "//metrics").status, 404);
        assert_eq!(get(&e, "GET", "/").status, 200);
        let answer = get(&e, "GET", "/metrics?x=1");
        let text = String::from_utf8(answer.body).unwrap();
        assert!(text.contains("vmm_exporter_vms_seen 0\n"), "{text}");
        assert!(text.contains("vmm_exporter_scrapes_total 1\n"), "{text}");
        let gone = exporter(dir.path().join("none"));
        let text = String::from_utf8(get(&gone, "GET", "/metrics").body).unwrap();
        assert!(
            text.contains("vmm_exporter_errors_total{kind=\"directory\"} 1\n"),
            "{text}"
        );
    }
}
