//! A small HTTP/1.1 server, parsing with `httparse`, on any [`Listener`]:
//! the VMM's API on its Unix socket, `vmm exporter` on TCP.
//!
//! Built for a host-side API that must never be stopped by what a client
//! sends: bounded header size, bounded bodies, a cap on concurrent
//! connections, and one thread per connection so a slow client holds up
//! nobody else. Time is bounded per request, not per read: a request (head
//! and body) must arrive within [`REQUEST_DEADLINE`] of the server starting
//! to wait for it, and an answer must be taken within as long, however the
//! client trickles its bytes; between requests a kept-alive connection may
//! stay idle for [`KEEP_ALIVE_IDLE`]. When all [`MAX_CONNECTIONS`] slots are taken,
//! a new client takes the slot of the one that has waited longest for its
//! request, if that has waited [`EVICT_AFTER`] or more (a slow or idle
//! client). Newcomers that find no slot wait in a first-come line (at most
//! [`MAX_WAITING`], each for at most [`LINE_WAIT`], then 503): slow clients
//! that reconnect at once after every eviction would otherwise win every
//! slot as it comes free, since a prompt client looks like any other until
//! it has sent its request. So slow clients can never lock a prompt one
//! out. Out of file descriptors, a client is still answered 503
//! (through a descriptor held in reserve) and the accept loop never spins.

use devices::sync::Recover;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body (only `PUT /vm/snapshot` takes one, a small JSON
/// document).
pub const MAX_BODY: usize = 4 * 1024;
/// Connections served at once; more are answered 503 and closed (unless
/// they can take a slow client's slot).
pub const MAX_CONNECTIONS: usize = 64;
/// Time for a whole request to arrive, and for an answer to be taken.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// How long a kept-alive connection may stay idle between requests before
/// the server closes it (a scraper's connection kept from one scrape to the
/// next: Prometheus scrapes every 15 s by default). Its next request, once
/// its first byte came, has [`REQUEST_DEADLINE`]; an idle connection can
/// lose its slot as any client waiting for its request does.
pub const KEEP_ALIVE_IDLE: Duration = Duration::from_secs(60);
/// A client that has waited this long without a complete request loses its
/// slot to a new client when every slot is taken.
pub const EVICT_AFTER: Duration = Duration::from_millis(500);
/// Newcomers that may wait in line for a slot; more are answered 503.
pub const MAX_WAITING: usize = 64;
/// Longest a newcomer waits in line for a slot before it is answered 503.
pub const LINE_WAIT: Duration = Duration::from_secs(1);
/// When the server stops, answers being made or written get this long to
/// go out (a profile cut short by the VM's end is still answered).
pub const FINISH_ANSWERS: Duration = Duration::from_secs(3);
/// Most time spent draining a rejected client's input before closing.
const LINGER: Duration = Duration::from_secs(1);
/// How long the accept loop waits after an `accept` failure it cannot
/// answer (a listener with a client waiting stays readable).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
const MAX_HEADERS: usize = 64;

/// A connection the server reads and writes: a Unix or a TCP stream.
pub trait Stream: Read + Write + AsRawFd + Send + Sized + 'static {
    fn try_clone(&self) -> std::io::Result<Self>;
    fn shutdown(&self, how: Shutdown) -> std::io::Result<()>;
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()>;
    fn set_write_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()>;
    fn set_nonblocking(&self, nonblocking: bool) -> std::io::Result<()>;
}

/// Implements [`Stream`] with the type's own methods of the same names.
macro_rules! stream {
    ($t:ty) => {
        impl Stream for $t {
            fn try_clone(&self) -> std::io::Result<Self> {
                <$t>::try_clone(self)
            }
            fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
                <$t>::shutdown(self, how)
            }
            fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
                <$t>::set_read_timeout(self, timeout)
            }
            fn set_write_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
                <$t>::set_write_timeout(self, timeout)
            }
            fn set_nonblocking(&self, nonblocking: bool) -> std::io::Result<()> {
                <$t>::set_nonblocking(self, nonblocking)
            }
        }
    };
}
stream!(UnixStream);
stream!(TcpStream);

/// What the server accepts connections from.
pub trait Listener: AsRawFd + Send + 'static {
    type Stream: Stream;
    fn accept_stream(&self) -> std::io::Result<Self::Stream>;
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    fn accept_stream(&self) -> std::io::Result<UnixStream> {
        self.accept().map(|(stream, _)| stream)
    }
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    fn accept_stream(&self) -> std::io::Result<TcpStream> {
        let (stream, _) = self.accept()?;
        // Answers go out in one write; never hold one back for an ACK.
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// A response to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
        body.push(b'\n');
        Self {
            status,
            content_type: "application/json",
            body,
        }
    }

    /// `document` as JSON (through a `serde_json::Value`: every object's
    /// keys sorted); 500 if it cannot be encoded (`what` says what it is).
    pub fn document(status: u16, document: &impl serde::Serialize, what: &str) -> Self {
        match serde_json::to_value(document) {
            Ok(value) => Self::json(status, &value),
            Err(e) => Self::error(500, &format!("encoding {what}: {e}")),
        }
    }

    pub fn error(status: u16, message: &str) -> Self {
        Self::json(status, &serde_json::json!({ "error": message }))
    }

    pub fn text(status: u16, content_type: &'static str, body: String) -> Self {
        Self {
            status,
            content_type,
            body: body.into_bytes(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Answers a request; it gets the request's connection too (to see
/// whether the client is still there).
pub type Handler<S = UnixStream> = dyn Fn(&Request, &S) -> Response + Send + Sync;

/// Why reading a request ended without one.
enum ReadOutcome {
    Request(Request, bool),
    /// Answer this and close.
    Reject(Response),
    /// The client went away or stayed silent: just close.
    Closed,
}

/// One read that ends by `deadline`: `Ok(0)` at the end of the stream, an
/// error of kind `TimedOut` when the time is up first. Server and client
/// ([`super::client`]) bound whole exchanges this way, however the other
/// side trickles its bytes.
pub(crate) fn read_by(
    stream: &mut impl Stream,
    chunk: &mut [u8],
    deadline: Instant,
) -> std::io::Result<usize> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(chunk) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(std::io::ErrorKind::TimedOut.into())
            }
            other => return other,
        }
    }
}

/// Writes all of `data` by `deadline` (an error of kind `TimedOut` when
/// the time is up first).
pub(crate) fn write_by(
    stream: &mut impl Stream,
    mut data: &[u8],
    deadline: Instant,
) -> std::io::Result<()> {
    while !data.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        stream.set_write_timeout(Some(left))?;
        match stream.write(data) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(std::io::ErrorKind::TimedOut.into())
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// [`read_by`] for the server: `None` when the client closed, failed or ran
/// out of time.
fn read_some(stream: &mut impl Stream, chunk: &mut [u8], deadline: Instant) -> Option<usize> {
    read_by(stream, chunk, deadline).ok().filter(|&n| n > 0)
}

/// Reads one request, which must be complete by `deadline`.
fn read_request(stream: &mut impl Stream, buf: &mut Vec<u8>, deadline: Instant) -> ReadOutcome {
    let mut chunk = [0u8; 2048];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let method = parsed.method.unwrap_or_default().to_string();
                let path = parsed.path.unwrap_or_default().to_string();
                let http10 = parsed.version == Some(0);
                let header = |name: &str| {
                    parsed
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
                };
                let close = match header("connection").as_deref() {
                    Some("close") => true,
                    Some("keep-alive") => false,
                    _ => http10,
                };
                if header("transfer-encoding").is_some() {
                    return ReadOutcome::Reject(Response::error(
                        400,
                        "chunked request bodies are not accepted",
                    ));
                }
                let body_len = match header("content-length").map(|v| v.parse::<usize>()) {
                    None => 0,
                    Some(Ok(n)) if n <= MAX_BODY => n,
                    Some(Ok(_)) => {
                        return ReadOutcome::Reject(Response::error(413, "request body too large"))
                    }
                    Some(Err(_)) => {
                        return ReadOutcome::Reject(Response::error(400, "bad Content-Length"))
                    }
                };
                // Read the body, so that the next request starts
                // where it should.
                while buf.len() < head_len + body_len {
                    match read_some(stream, &mut chunk, deadline) {
                        None => return ReadOutcome::Closed,
                        Some(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = buf[head_len..head_len + body_len].to_vec();
                buf.drain(..head_len + body_len);
                return ReadOutcome::Request(Request { method, path, body }, close);
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() >= MAX_HEAD {
                    return ReadOutcome::Reject(Response::error(431, "request head too large"));
                }
            }
            Err(e) => {
                return ReadOutcome::Reject(Response::error(
                    400,
                    &format!("malformed request: {e}"),
                ))
            }
        }
        match read_some(stream, &mut chunk, deadline) {
            None => return ReadOutcome::Closed,
            Some(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn write_response(stream: &mut impl Stream, response: &Response, close: bool) -> bool {
    write_response_by(stream, response, close, Instant::now() + REQUEST_DEADLINE)
}

fn write_response_by(
    stream: &mut impl Stream,
    response: &Response,
    close: bool,
    deadline: Instant,
) -> bool {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len(),
        if close { "close" } else { "keep-alive" }
    );
    // One write: on TCP, a head sent alone would wait for the peer's ACK.
    let mut answer = head.into_bytes();
    answer.extend_from_slice(&response.body);
    write_by(stream, &answer, deadline).is_ok()
}

/// Closing with unread input makes the kernel reset the connection, which
/// can destroy the answer just written: stop writing, then drain (bounded)
/// what the client still sends.
fn linger(stream: &mut impl Stream) {
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < (1 << 20) {
        match read_some(
            stream,
            &mut sink,
            deadline.min(Instant::now() + Duration::from_millis(100)),
        ) {
            None => break,
            Some(n) => drained += n,
        }
    }
}

/// The connections being served, and how long each has waited for its
/// current request.
struct Slots<S> {
    list: Mutex<Vec<Slot<S>>>,
    next_id: AtomicU64,
}

impl<S> Default for Slots<S> {
    fn default() -> Self {
        Self {
            list: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
        }
    }
}

struct Slot<S> {
    id: u64,
    /// A handle on the connection, to cut it off when it is evicted.
    stream: S,
    /// Since when it has been waiting for a request (`None`: one is being
    /// answered).
    waiting_since: Option<Instant>,
}

impl<S: Stream> Slots<S> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Slot<S>>> {
        self.list.lock().recover()
    }

    /// A slot for `stream`: a free one, or the one of the client that has
    /// waited longest for its request, if that is [`EVICT_AFTER`] or more
    /// (its connection is shut down). `None`: all are busy.
    fn admit(&self, stream: &S) -> Option<u64> {
        let handle = stream.try_clone().ok()?;
        let mut list = self.lock();
        if list.len() >= MAX_CONNECTIONS {
            let now = Instant::now();
            let (victim, _) = list
                .iter()
                .enumerate()
                .filter_map(|(i, s)| Some((i, s.waiting_since?)))
                .filter(|(_, since)| now.saturating_duration_since(*since) >= EVICT_AFTER)
                .min_by_key(|(_, since)| *since)?;
            let evicted = list.swap_remove(victim);
            let _ = evicted.stream.shutdown(Shutdown::Both);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        list.push(Slot {
            id,
            stream: handle,
            waiting_since: Some(Instant::now()),
        });
        Some(id)
    }

    fn set_waiting(&self, id: u64, since: Option<Instant>) {
        if let Some(slot) = self.lock().iter_mut().find(|s| s.id == id) {
            slot.waiting_since = since;
        }
    }

    fn release(&self, id: u64) {
        self.lock().retain(|s| s.id != id);
    }

    /// Whether a request is being answered.
    fn answering(&self) -> bool {
        self.lock().iter().any(|s| s.waiting_since.is_none())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Serves one connection outside any slot (the unit tests' way in).
#[cfg(test)]
fn serve_connection(mut stream: UnixStream, handler: &Handler) {
    serve_in_slot::<UnixStream>(&mut stream, handler, None);
}

/// Serves one connection in slot `id` of `slots` (if any) until it closes.
fn serve_in_slot<S: Stream>(stream: &mut S, handler: &Handler<S>, slot: Option<(&Slots<S>, u64)>) {
    let mut buf = Vec::new();
    let mut answered = false;
    loop {
        let waiting_since = Instant::now();
        if let Some((slots, id)) = slot {
            slots.set_waiting(id, Some(waiting_since));
        }
        // After an answer the client may wait before its next request.
        if answered && buf.is_empty() && !poll_readable(stream.as_raw_fd(), idle_ms()) {
            return;
        }
        answered = true;
        let deadline = Instant::now() + REQUEST_DEADLINE;
        match read_request(stream, &mut buf, deadline) {
            ReadOutcome::Request(request, close) => {
                if let Some((slots, id)) = slot {
                    slots.set_waiting(id, None);
                }
                let response = handler(&request, stream);
                let deadline = Instant::now() + REQUEST_DEADLINE;
                if !write_response_by(stream, &response, close, deadline) || close {
                    return;
                }
            }
            ReadOutcome::Reject(response) => {
                write_response(stream, &response, true);
                linger(stream);
                return;
            }
            // Out of time with part of a request: say so.
            ReadOutcome::Closed if !buf.is_empty() && Instant::now() >= deadline => {
                let response = Response::error(408, "the request took too long");
                write_response_by(
                    stream,
                    &response,
                    true,
                    Instant::now() + Duration::from_millis(100),
                );
                return;
            }
            ReadOutcome::Closed => return,
        }
    }
}

/// A running server; stops on drop: no new connection is taken, answers
/// under way get [`FINISH_ANSWERS`] to go out, and the accept thread is
/// joined.
pub struct Server {
    stop: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves `listener` until dropped.
    pub fn start<L: Listener>(
        listener: L,
        handler: Arc<Handler<L::Stream>>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let slots = Arc::new(Slots::<L::Stream>::default());
        let stop_flag = stop.clone();
        let accept_thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                // A hint its connection threads inherit; refused, the
                // server works as before.
                let _ = super::slice::ask(super::slice::API_SLICE);
                accept_loop(listener, handler, stop_flag, slots)
            })?;
        Ok(Self {
            stop,
            accept_thread: Some(accept_thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
    }
}

/// Gives slots to the clients in `line`, first come first served, and
/// answers 503 to those that have waited [`LINE_WAIT`].
fn seat_the_line<S: Stream>(
    line: &mut std::collections::VecDeque<(S, Instant)>,
    handler: &Arc<Handler<S>>,
    slots: &Arc<Slots<S>>,
) {
    while let Some((stream, _)) = line.front() {
        let Some(id) = slots.admit(stream) else {
            break;
        };
        let Some((mut stream, _)) = line.pop_front() else {
            break;
        };
        let (handler, done) = (handler.clone(), slots.clone());
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .spawn(move || {
                serve_in_slot(&mut stream, &*handler, Some((&done, id)));
                done.release(id);
            });
        if spawned.is_err() {
            slots.release(id);
        }
    }
    while line
        .front()
        .is_some_and(|(_, since)| since.elapsed() >= LINE_WAIT)
    {
        if let Some((stream, _)) = line.pop_front() {
            refuse(stream, "too many connections");
        }
    }
}

/// [`KEEP_ALIVE_IDLE`] in `poll`'s milliseconds.
fn idle_ms() -> i32 {
    KEEP_ALIVE_IDLE.as_millis().min(i32::MAX as u128) as i32
}

/// Waits for `fd` to be readable for at most `ms` milliseconds.
pub(crate) fn poll_readable(fd: i32, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, its count, and a timeout.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

/// Answers `stream` 503 with `message` and closes it, within 100 ms.
fn refuse(mut stream: impl Stream, message: &str) {
    // Take what the client sent already (without waiting), so that closing
    // does not reset the connection before it reads the 503.
    let mut unread = [0u8; 4096];
    if stream.set_nonblocking(true).is_ok() {
        for _ in 0..4 {
            if !matches!(stream.read(&mut unread), Ok(1..)) {
                break;
            }
        }
        let _ = stream.set_nonblocking(false);
    }
    write_response_by(
        &mut stream,
        &Response::error(503, message),
        true,
        Instant::now() + Duration::from_millis(100),
    );
}

/// A descriptor held back for when the process has none left (`EMFILE`,
/// `ENFILE`): a client then waits in the listener's queue, which stays
/// readable, so retrying at once would spin. Closing the reserve makes
/// room to take that client and answer it 503.
struct Reserve(Option<std::fs::File>);

impl Reserve {
    fn take() -> Self {
        Self(std::fs::File::open("/dev/null").ok())
    }

    /// Out of descriptors: the waiting client gets 503 through the
    /// reserve's room, then the reserve is taken back. Without a reserve
    /// (it could not be taken back), waits [`ACCEPT_BACKOFF`] instead.
    fn shed(&mut self, listener: &impl Listener) {
        if self.0.take().is_some() {
            if let Ok(stream) = listener.accept_stream() {
                refuse(stream, "the VMM is out of file descriptors");
            }
            *self = Self::take();
        }
        if self.0.is_none() {
            std::thread::sleep(ACCEPT_BACKOFF);
        }
    }
}

fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

fn accept_loop<L: Listener>(
    listener: L,
    handler: Arc<Handler<L::Stream>>,
    stop: Arc<AtomicBool>,
    slots: Arc<Slots<L::Stream>>,
) {
    let mut reserve = Reserve::take();
    let mut line = std::collections::VecDeque::<(L::Stream, Instant)>::new();
    while !stop.load(Ordering::SeqCst) {
        seat_the_line(&mut line, &handler, &slots);
        // With clients in line, look again soon: a slot comes free (or
        // becomes evictable) without the listener saying so.
        let wait_ms = if line.is_empty() { 100 } else { 10 };
        if !poll_readable(listener.as_raw_fd(), wait_ms) {
            continue;
        }
        let stream = match listener.accept_stream() {
            Ok(stream) => stream,
            Err(e) if out_of_descriptors(&e) => {
                reserve.shed(&listener);
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // Anything else (no memory, no buffers): not at once again.
            Err(_) => {
                std::thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        if line.len() >= MAX_WAITING {
            refuse(stream, "too many connections");
        } else {
            line.push_back((stream, Instant::now()));
        }
    }
    for (stream, _) in line {
        refuse(stream, "the VMM is stopping");
    }
    let until = Instant::now() + FINISH_ANSWERS;
    while slots.answering() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(raw: &[u8]) -> String {
        let (mut client, server) = UnixStream::pair().unwrap();
        let handler = |r: &Request, _: &UnixStream| {
            Response::text(200, "text/plain", format!("{} {}", r.method, r.path))
        };
        let t = std::thread::spawn(move || serve_connection(server, &handler));
        client.write_all(raw).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).unwrap();
        t.join().unwrap();
        out
    }

    #[test]
    fn requests_are_answered_and_kept_alive() {
        let out = exchange(b"GET /a HTTP/1.1\r\n\r\nPUT /b HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(out.contains("GET /a") && out.contains("PUT /b"), "{out}");
    }

    #[test]
    fn a_kept_alive_connection_may_idle_past_the_request_deadline_between_requests() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let handler =
            |r: &Request, _: &UnixStream| Response::text(200, "text/plain", r.path.clone());
        let t = std::thread::spawn(move || serve_connection(server, &handler));
        let mut answer = [0u8; 4096];
        client.write_all(b"GET /first HTTP/1.1\r\n\r\n").unwrap();
        let n = client.read(&mut answer).unwrap();
        assert!(String::from_utf8_lossy(&answer[..n]).ends_with("/first"));
        std::thread::sleep(REQUEST_DEADLINE + Duration::from_millis(300));
        client
            .write_all(b"GET /second HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).unwrap();
        assert!(
            out.starts_with("HTTP/1.1 200") && out.ends_with("/second"),
            "{out}"
        );
        t.join().unwrap();
    }

    #[test]
    fn garbage_huge_heads_and_bodies_are_refused() {
        assert!(exchange(b"\x00\x01\x02garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        assert!(exchange(&huge).starts_with("HTTP/1.1 431"));
        let big_body = format!("PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        assert!(exchange(big_body.as_bytes()).starts_with("HTTP/1.1 413"));
        // A half-sent request is simply dropped.
        assert_eq!(exchange(b"GET / HTT"), "");
    }

    #[test]
    fn a_trickling_client_gets_408_by_the_request_deadline_not_per_read() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let handler =
            |_: &Request, _: &UnixStream| Response::text(200, "text/plain", String::new());
        let start = Instant::now();
        let t = std::thread::spawn(move || serve_connection(server, &handler));
        // One byte every 400 ms: each read is quick, the request never ends.
        let trickle = std::thread::spawn(move || {
            let mut answer = String::new();
            for b in b"GET /vpmu HTTP/1.1\r\nX-Slow: ".iter().cycle() {
                if client.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(400));
                if start.elapsed() > REQUEST_DEADLINE * 3 {
                    break;
                }
            }
            let _ = client.read_to_string(&mut answer);
            answer
        });
        t.join().unwrap();
        let took = start.elapsed();
        assert!(
            took >= REQUEST_DEADLINE && took < REQUEST_DEADLINE * 2,
            "{took:?}"
        );
        let answer = trickle.join().unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    }

    #[test]
    fn a_full_house_gives_the_longest_waiting_slot_to_a_new_client() {
        let slots = Slots::<UnixStream>::default();
        let mut held = Vec::new();
        let mut ids = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let (a, b) = UnixStream::pair().unwrap();
            ids.push(slots.admit(&b).unwrap());
            held.push((a, b));
        }
        let (_c, newcomer) = UnixStream::pair().unwrap();
        // Nobody has waited long enough yet.
        assert_eq!(slots.admit(&newcomer), None);
        // One is being answered (not evictable), another waited longest.
        slots.set_waiting(ids[0], None);
        let long_ago = Instant::now() - EVICT_AFTER * 4;
        slots.set_waiting(ids[1], Some(long_ago));
        slots.set_waiting(ids[2], Some(long_ago + EVICT_AFTER));
        assert!(slots.admit(&newcomer).is_some());
        assert_eq!(slots.len(), MAX_CONNECTIONS);
        // The evicted connection was cut off: its peer sees the end.
        let mut byte = [0u8; 1];
        held[1]
            .0
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(held[1].0.read(&mut byte).unwrap(), 0);
        assert!(slots.lock().iter().all(|s| s.id != ids[1]));
    }

    #[test]
    fn newcomers_wait_in_line_first_come_first_served_then_get_503() {
        let slots = Arc::new(Slots::<UnixStream>::default());
        let handler: Arc<Handler> =
            Arc::new(|_: &Request, _: &UnixStream| Response::text(200, "text/plain", "ok".into()));
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let (a, b) = UnixStream::pair().unwrap();
            slots.admit(&b).unwrap();
            held.push((a, b));
        }
        let mut line = std::collections::VecDeque::new();
        let (mut late, late_server) = UnixStream::pair().unwrap();
        let (mut next, next_server) = UnixStream::pair().unwrap();
        line.push_back((late_server, Instant::now() - LINE_WAIT));
        line.push_back((next_server, Instant::now()));
        // No slot: the one that waited its time is refused, the next waits.
        seat_the_line(&mut line, &handler, &slots);
        assert_eq!(line.len(), 1);
        let mut answer = String::new();
        late.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        // A slot comes free: the next in line gets it and is served.
        let first = slots.lock()[0].id;
        slots.release(first);
        seat_the_line(&mut line, &handler, &slots);
        assert!(line.is_empty());
        next.write_all(b"GET /vpmu HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        next.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}
