//! The client side of the API, for `vmm stat`, `vmm profile` and the
//! fleet's readers: a few lines of HTTP/1.1 over a `UnixStream`, one `GET`
//! with `Connection: close` per call (or, for [`get_all`], on connections
//! kept open from one call to the next), the answer read to its end, the
//! whole exchange by one deadline (a server that trickles its answer cannot hold
//! a client longer). What the server says is its own text: [`printable`]
//! escapes its control characters before a terminal sees it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::http::{poll_readable, read_by, write_by};

/// Largest answer accepted.
const MAX_RESPONSE: usize = 64 << 20;
/// How long a client keeps trying a busy API (503) before giving up.
const BUSY_RETRY: Duration = Duration::from_secs(5);

/// Why a client could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("--api-socket {0}: no such socket")]
    NoSocket(PathBuf),
    #[error("--api-socket {0}: not a socket")]
    NotASocket(PathBuf),
    #[error("--api-socket {0}: nothing listens on it (a stale socket of a VMM that ended?)")]
    Stale(PathBuf),
    #[error("--api-socket {0}: {1}")]
    Connect(PathBuf, std::io::Error),
    #[error("--api-socket {0}: not a vmm API socket ({1})")]
    NotVmm(PathBuf, String),
    #[error("--api-socket {0}: the VMM closed the connection without an answer (did it end?)")]
    Closed(PathBuf),
    /// No complete answer by the exchange's deadline.
    #[error("--api-socket {0}: timed out: no complete answer within {1:?} (is the VMM stuck?)")]
    Timeout(PathBuf, Duration),
    #[error("--api-socket {0}: the VMM's API is busy: it answered {1} (all its connections are taken; try again)")]
    Busy(PathBuf, String),
    /// The API answered with an error of its own (a JSON `error`).
    #[error("{uri} answered {status}: {message}")]
    Refused {
        uri: String,
        status: u16,
        message: String,
    },
}

/// Whether `socket` is a socket at all.
fn check_socket(socket: &Path) -> Result<(), ClientError> {
    match std::fs::symlink_metadata(socket) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            Err(ClientError::NoSocket(socket.to_path_buf()))
        }
        Err(e) => Err(ClientError::Connect(socket.to_path_buf(), e)),
        Ok(meta) if !meta.file_type().is_socket() => {
            Err(ClientError::NotASocket(socket.to_path_buf()))
        }
        Ok(_) => Ok(()),
    }
}

/// How long a connect that found the server's backlog full waits before it
/// tries again.
const CONNECT_RETRY: Duration = Duration::from_millis(5);

/// One connect that never blocks: the stream, `None` while the server's
/// backlog is full (a stopped or swamped server: try again), or why not.
fn connect_once(socket: &Path) -> Result<Option<UnixStream>, ClientError> {
    match super::socket::connect_now(socket) {
        Ok(stream) => Ok(Some(stream)),
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(None),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            Err(ClientError::Stale(socket.to_path_buf()))
        }
        Err(e) => Err(ClientError::Connect(socket.to_path_buf(), e)),
    }
}

/// Connects by `deadline`, retrying while the server's backlog is full.
fn connect_by(socket: &Path, deadline: Instant) -> Result<UnixStream, ClientError> {
    loop {
        match connect_once(socket)? {
            Some(stream) => return Ok(stream),
            None if Instant::now() < deadline => std::thread::sleep(CONNECT_RETRY),
            None => {
                let full = std::io::Error::from_raw_os_error(libc::EAGAIN);
                return Err(ClientError::Connect(socket.to_path_buf(), full));
            }
        }
    }
}

/// Appends `data` to the answer in `raw`; an answer over `max` bytes is an
/// error.
fn append_bounded(raw: &mut Vec<u8>, data: &[u8], max: usize) -> std::io::Result<()> {
    if raw.len() + data.len() > max {
        return Err(std::io::Error::other(format!("answer over {max} bytes")));
    }
    raw.extend_from_slice(data);
    Ok(())
}

/// Reads the answer to its end into `raw` by `deadline`; an answer over
/// `max` bytes is an error.
fn read_answer(
    stream: &mut UnixStream,
    raw: &mut Vec<u8>,
    max: usize,
    deadline: Instant,
) -> std::io::Result<()> {
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        match read_by(stream, &mut chunk, deadline)? {
            0 => return Ok(()),
            n => append_bounded(raw, &chunk[..n], max)?,
        }
    }
}

/// `GET uri` on the API socket at `socket`, the whole exchange (request
/// written, answer read to its end) bounded by `timeout`; the body of a
/// `200` answer.
pub fn get(socket: &Path, uri: &str, timeout: Duration) -> Result<Vec<u8>, ClientError> {
    get_bounded(socket, uri, timeout, MAX_RESPONSE)
}

/// [`get`] with an answer of at most `max` bytes.
pub fn get_bounded(
    socket: &Path,
    uri: &str,
    timeout: Duration,
    max: usize,
) -> Result<Vec<u8>, ClientError> {
    exchange(socket, "GET", uri, None, timeout, max)
}

/// `PUT uri` with a JSON `body`, as [`get`] does a `GET`.
pub fn put(
    socket: &Path,
    uri: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, ClientError> {
    exchange(socket, "PUT", uri, Some(body), timeout, MAX_RESPONSE)
}

/// How a request leaves its connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum After {
    /// Closed after the answer.
    Close,
    /// Open for the next request (HTTP/1.1's default).
    KeepAlive,
}

/// The bytes of one request (`body`: a JSON document).
fn request(method: &str, uri: &str, body: Option<&[u8]>, after: After) -> Vec<u8> {
    let mut head = format!("{method} {uri} HTTP/1.1\r\nHost: vmm\r\n");
    if after == After::Close {
        head.push_str("Connection: close\r\n");
    }
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    let mut request = head.into_bytes();
    request.extend_from_slice(body.unwrap_or_default());
    request
}

/// One request (`body`: a JSON document) and its answer, the whole exchange
/// bounded by `timeout`; the body of a `200` answer of at most `max` bytes.
fn exchange(
    socket: &Path,
    method: &str,
    uri: &str,
    body: Option<&[u8]>,
    timeout: Duration,
    max: usize,
) -> Result<Vec<u8>, ClientError> {
    check_socket(socket)?;
    let deadline = Instant::now() + timeout;
    let mut stream = connect_by(socket, deadline)?;
    // A server with no free connection answers 503 and closes at once,
    // maybe before our request is written or read: the write can fail and
    // the read end in a reset, after the answer. Keep what came.
    let request = request(method, uri, body, After::Close);
    let written = write_by(&mut stream, &request, deadline);
    let mut raw = Vec::new();
    let read = read_answer(&mut stream, &mut raw, max, deadline);
    answer(
        socket,
        &format!("{method} {uri}"),
        &raw,
        written,
        read,
        timeout,
    )
}

/// What an exchange with `socket` came to: `raw`, what was read of the
/// answer, and how writing the request (`written`) and reading (`read`)
/// ended. A busy server's 503 counts even if the write failed.
fn answer(
    socket: &Path,
    request: &str,
    raw: &[u8],
    written: std::io::Result<()>,
    read: std::io::Result<()>,
    timeout: Duration,
) -> Result<Vec<u8>, ClientError> {
    let not_vmm = |why: String| ClientError::NotVmm(socket.to_path_buf(), why);
    let io = |e: std::io::Error| match e.kind() {
        ErrorKind::TimedOut => ClientError::Timeout(socket.to_path_buf(), timeout),
        _ => not_vmm(e.to_string()),
    };
    if let Some(busy) = busy_status(raw) {
        return Err(ClientError::Busy(socket.to_path_buf(), busy));
    }
    written.map_err(io)?;
    read.map_err(io)?;
    if raw.is_empty() {
        return Err(ClientError::Closed(socket.to_path_buf()));
    }
    match response_body(raw) {
        Ok(body) => Ok(body.to_vec()),
        Err(Answer::Status(status, status_line, body)) => {
            let message = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v["error"].as_str().map(String::from));
            match message {
                Some(message) => Err(ClientError::Refused {
                    uri: request.to_string(),
                    status,
                    message,
                }),
                None => Err(not_vmm(format!("{request} answered {status_line:?}"))),
            }
        }
        Err(Answer::Broken(why)) => Err(not_vmm(why)),
    }
}

/// Connections to API sockets kept open from one [`get_all`] to the next,
/// by socket path: a reader that comes back (a scraper) saves each server a
/// connect, an accept and a thread start per read, each a wait for a CPU on
/// a loaded host. A connection the server closed meanwhile (idle too long,
/// its slot given to another client, the VMM gone) is found out and replaced
/// by a fresh one within the same read.
#[derive(Debug, Default)]
pub struct KeptConnections {
    streams: HashMap<PathBuf, UnixStream>,
}

impl KeptConnections {
    /// Connections kept.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Keeps only the connections to sockets `present` says are there.
    pub fn retain(&mut self, present: impl Fn(&Path) -> bool) {
        self.streams.retain(|path, _| present(path));
    }

    /// Adds `other`'s connections (one of a concurrent reader's).
    pub fn merge(&mut self, other: KeptConnections) {
        self.streams.extend(other.streams);
    }

    /// The connection kept for `socket`, if the server has neither closed
    /// it nor sent anything on it since.
    fn take_open(&mut self, socket: &Path) -> Option<UnixStream> {
        let stream = self.streams.remove(socket)?;
        // Readable: an end of file, or bytes nobody asked for.
        (!poll_readable(stream.as_raw_fd(), 0)).then_some(stream)
    }
}

/// One socket's exchange in [`get_all`].
struct Pending<'a> {
    socket: &'a Path,
    stream: Option<UnixStream>,
    /// The stream was kept from an earlier read: if it ends before any
    /// answer, the server had closed it, and a fresh connection is tried.
    reused: bool,
    /// Of the request, what is still to write.
    unwritten: usize,
    written: std::io::Result<()>,
    raw: Vec<u8>,
    deadline: Instant,
    done: Option<(Result<Vec<u8>, ClientError>, Duration)>,
}

/// `GET uri` on every socket at once, on this thread: every connect and
/// request goes out first, then one `poll` waits for whichever answers
/// come, so a slow server delays only its own answer and a reader needs no
/// thread per server (on a loaded host, each thread to wake is a wait for
/// a CPU). Connections in `kept` are used first and those whose answer
/// leaves them open are kept there for the next call. Each exchange is
/// bounded by `per_socket` and all by `end`, each answer by `max` bytes;
/// per socket, what [`get_bounded`] would give, and how long it took.
pub fn get_all(
    sockets: &[PathBuf],
    uri: &str,
    per_socket: Duration,
    end: Instant,
    max: usize,
    kept: &mut KeptConnections,
) -> Vec<(Result<Vec<u8>, ClientError>, Duration)> {
    let start = Instant::now();
    let request = &request("GET", uri, None, After::KeepAlive)[..];
    let mut all: Vec<Pending> = sockets
        .iter()
        .map(|socket| {
            let stream = kept.take_open(socket);
            Pending {
                socket,
                reused: stream.is_some(),
                stream,
                unwritten: request.len(),
                written: Ok(()),
                raw: Vec::new(),
                deadline: (start + per_socket).min(end),
                done: None,
            }
        })
        .collect();
    for p in all.iter_mut().filter(|p| p.stream.is_none()) {
        if let Err(e) = check_socket(p.socket) {
            p.done = Some((Err(e), start.elapsed()));
        }
    }
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let now = Instant::now();
        for p in all.iter_mut().filter(|p| p.done.is_none()) {
            if now >= p.deadline {
                let timeout = p.deadline.saturating_duration_since(start);
                let timed_out = std::io::Error::from(ErrorKind::TimedOut);
                let result = answer(p.socket, uri, &p.raw, Ok(()), Err(timed_out), timeout);
                p.done = Some((result, now - start));
                continue;
            }
            if p.stream.is_some() {
                continue;
            }
            let connected = connect_once(p.socket).and_then(|stream| match stream {
                Some(s) => s
                    .set_nonblocking(true)
                    .map(|()| Some(s))
                    .map_err(|e| ClientError::Connect(p.socket.to_path_buf(), e)),
                None => Ok(None),
            });
            match connected {
                Ok(Some(stream)) => p.stream = Some(stream),
                // The backlog is full: tried again after a short wait.
                Ok(None) => {}
                Err(error) => p.done = Some((Err(error), now - start)),
            }
        }
        // Write what the sockets take, read what came.
        for p in all.iter_mut().filter(|p| p.done.is_none()) {
            let Some(stream) = &mut p.stream else {
                continue;
            };
            while p.unwritten > 0 && p.written.is_ok() {
                match stream.write(&request[request.len() - p.unwritten..]) {
                    Ok(n) => p.unwritten -= n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    // A busy server may have answered and closed: read on.
                    Err(e) => p.written = Err(e),
                }
            }
            let read = loop {
                match stream.read(&mut chunk) {
                    Ok(0) => break Some(Ok(())),
                    Ok(n) => {
                        if let Err(e) = append_bounded(&mut p.raw, &chunk[..n], max) {
                            break Some(Err(e));
                        }
                        // A kept-alive answer ends at its length, not at EOF.
                        if answer_length(&p.raw).is_some() {
                            break Some(Ok(()));
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break None,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => break Some(Err(e)),
                }
            };
            let Some(read) = read else {
                continue;
            };
            let stream = p.stream.take();
            if std::mem::take(&mut p.reused) && p.raw.is_empty() {
                // The server closed the kept connection: connect afresh.
                p.unwritten = request.len();
                p.written = Ok(());
                continue;
            }
            let written = std::mem::replace(&mut p.written, Ok(()));
            let whole = written.is_ok() && read.is_ok();
            if let (Some(stream), Some((len, true)), true) = (stream, answer_length(&p.raw), whole)
            {
                if len == p.raw.len() {
                    kept.streams.insert(p.socket.to_path_buf(), stream);
                }
            }
            let timeout = p.deadline.saturating_duration_since(start);
            let result = answer(p.socket, uri, &p.raw, written, read, timeout);
            p.done = Some((result, start.elapsed()));
        }
        let waiting: Vec<&Pending> = all.iter().filter(|p| p.done.is_none()).collect();
        let Some(first) = waiting.iter().map(|p| p.deadline).min() else {
            break;
        };
        // Writing is done once the request is out: then wait for reading only.
        let mut fds: Vec<libc::pollfd> = waiting
            .iter()
            .filter_map(|p| {
                let writing = p.unwritten > 0 && p.written.is_ok();
                p.stream.as_ref().map(|s| libc::pollfd {
                    fd: s.as_raw_fd(),
                    events: libc::POLLIN | if writing { libc::POLLOUT } else { 0 },
                    revents: 0,
                })
            })
            .collect();
        let mut wait = first.saturating_duration_since(Instant::now());
        // A full backlog, or a kept connection found closed: connect soon.
        if waiting.iter().any(|p| p.stream.is_none()) {
            wait = wait.min(CONNECT_RETRY);
        }
        let ms = wait.as_millis().min(i32::MAX as u128) as i32 + 1;
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds, each an
        // open descriptor of a stream in `all`, which outlives the call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    }
    all.into_iter()
        .map(|p| p.done.expect("the loop ends when every exchange is done"))
        .collect()
}

/// `text` from the other side, safe to print: every control character
/// (C0 with newlines and tabs, DEL, C1) is written as an escape (`\n`,
/// `\u{1b}`), so a server cannot move the cursor, set the window title,
/// clear the screen or forge lines of ours.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c.is_control() {
            true => out.extend(c.escape_default()),
            false => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// [`get`], trying again for up to 5 s while the API is busy.
pub fn get_patiently(socket: &Path, uri: &str, timeout: Duration) -> Result<Vec<u8>, ClientError> {
    let start = Instant::now();
    loop {
        match get(socket, uri, timeout) {
            Err(ClientError::Busy(..)) if start.elapsed() < BUSY_RETRY => {
                std::thread::sleep(Duration::from_millis(100))
            }
            other => return other,
        }
    }
}

/// The status line of a `503` answer (the server is ours but has no free
/// connection), with its error message if it gave one.
pub fn busy_status(raw: &[u8]) -> Option<String> {
    // The status line alone first: most answers are not 503, and some are
    // large.
    let line_end = raw.iter().position(|&b| b == b'\n').unwrap_or(raw.len());
    let status_line = String::from_utf8_lossy(&raw[..line_end]);
    let mut words = status_line.split_whitespace();
    if !words.next()?.starts_with("HTTP/1.") || words.next()? != "503" {
        return None;
    }
    let text = String::from_utf8_lossy(raw);
    let message = text
        .split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(body).ok())
        .and_then(|v| v["error"].as_str().map(String::from));
    Some(match message {
        Some(m) => format!("503 Service Unavailable: {m}"),
        None => "503 Service Unavailable".into(),
    })
}

/// An answer that is not a `200` with its body.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer<'a> {
    /// Another status: its code, status line and body.
    Status(u16, String, &'a [u8]),
    /// Not HTTP, or cut short.
    Broken(String),
}

/// An answer's head, as far as a client needs it.
struct Head<'a> {
    /// Where the body starts.
    body_at: usize,
    status_line: &'a str,
    status: Option<u16>,
    content_length: Option<usize>,
    /// The server keeps the connection open after this answer.
    keep_alive: bool,
}

/// The head of the HTTP/1.x answer at the start of `raw`, once it is whole.
fn head(raw: &[u8]) -> Result<Head<'_>, Answer<'_>> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(Answer::Broken("no HTTP answer".into()))?;
    let text = std::str::from_utf8(&raw[..split])
        .map_err(|_| Answer::Broken("an answer head that is not text".into()))?;
    let mut lines = text.lines();
    let status_line = lines.next().unwrap_or_default();
    let mut words = status_line.split_whitespace();
    let version = words.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(Answer::Broken("no HTTP answer".into()));
    }
    let mut head = Head {
        body_at: split + 4,
        status_line,
        status: words.next().and_then(|s| s.parse::<u16>().ok()),
        content_length: None,
        keep_alive: version == "HTTP/1.1",
    };
    for (name, value) in lines.filter_map(|l| l.split_once(':')) {
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            head.content_length = value.parse().ok();
        } else if name.eq_ignore_ascii_case("connection") {
            head.keep_alive = value.eq_ignore_ascii_case("keep-alive");
        }
    }
    Ok(head)
}

/// Once `raw` holds a whole answer of stated length: that length, and
/// whether the server keeps the connection open after it.
fn answer_length(raw: &[u8]) -> Option<(usize, bool)> {
    let head = head(raw).ok()?;
    let len = head.body_at + head.content_length?;
    (raw.len() >= len).then_some((len, head.keep_alive))
}

/// The body of a `200` HTTP/1.1 answer read to its end.
pub fn response_body(raw: &[u8]) -> Result<&[u8], Answer<'_>> {
    let head = head(raw)?;
    let body = &raw[head.body_at..];
    let body = match head.content_length {
        Some(n) if n > body.len() => return Err(Answer::Broken("the answer was cut short".into())),
        Some(n) => &body[..n],
        None => body,
    };
    match head.status {
        Some(200) => Ok(body),
        Some(code) => Err(Answer::Status(code, head.status_line.to_string(), body)),
        None => Err(Answer::Broken(format!(
            "bad status line {:?}",
            head.status_line
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_other_text_kept() {
        assert!(matches!(printable("plain é ☃"), Cow::Borrowed("plain é ☃")));
        assert_eq!(
            printable("\u{1b}]0;x\u{7}\u{1b}[2J\nfake\r\t\u{7f}\u{9b}"),
            "\\u{1b}]0;x\\u{7}\\u{1b}[2J\\nfake\\r\\t\\u{7f}\\u{9b}"
        );
    }

    #[test]
    fn a_trickled_answer_times_out_by_the_exchange_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slow.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            for b in b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n".iter() {
                if std::io::Write::write_all(&mut s, &[*b]).is_err() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            false
        });
        // 42 bytes at 200 ms each would take over 8 s.
        let error = get(&path, "/vpmu", Duration::from_secs(1)).unwrap_err();
        assert!(matches!(error, ClientError::Timeout(..)), "{error}");
        assert!(error.to_string().contains("timed out"), "{error}");
        assert!(server.join().unwrap(), "the client hung up mid-answer");
    }

    /// A server at `path` that answers one request with `body` after
    /// `delay` (reading the request first), then closes.
    fn late_server(path: &Path, delay: Duration, body: &'static str) {
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut head = [0u8; 256];
            let _ = s.read(&mut head);
            std::thread::sleep(delay);
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(answer.as_bytes());
        });
    }

    #[test]
    fn get_all_waits_for_every_server_at_once_each_by_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let delay = Duration::from_millis(400);
        let mut sockets: Vec<PathBuf> = (0..3)
            .map(|i| dir.path().join(format!("late{i}.sock")))
            .collect();
        for (i, path) in sockets.iter().enumerate() {
            late_server(path, delay, ["a", "bb", "ccc"][i]);
        }
        // Accepts (the kernel queues the connection) but never answers.
        let silent = dir.path().join("silent.sock");
        let _silent = std::os::unix::net::UnixListener::bind(&silent).unwrap();
        sockets.push(silent);
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        sockets.push(stale);
        sockets.push(dir.path().join("none.sock"));
        let start = Instant::now();
        let per_socket = Duration::from_millis(1000);
        let answers = get_all(
            &sockets,
            "/vpmu",
            per_socket,
            start + per_socket * 5,
            1024,
            &mut KeptConnections::default(),
        );
        let took = start.elapsed();
        // One after the other, the three late answers alone take 1.2 s.
        assert!(took < Duration::from_millis(1100), "took {took:?}");
        let bodies: Vec<_> = answers[..3]
            .iter()
            .map(|(a, _)| {
                a.as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .ok()
            })
            .collect();
        assert_eq!(
            bodies,
            [Some("a".into()), Some("bb".into()), Some("ccc".into())]
        );
        assert!(answers[..3]
            .iter()
            .all(|(_, t)| *t >= delay && *t < per_socket));
        assert!(
            matches!(answers[3].0, Err(ClientError::Timeout(..))),
            "{:?}",
            answers[3]
        );
        assert!(answers[3].1 >= per_socket);
        assert!(
            matches!(answers[4].0, Err(ClientError::Stale(_))),
            "{:?}",
            answers[4]
        );
        assert!(
            matches!(answers[5].0, Err(ClientError::NoSocket(_))),
            "{:?}",
            answers[5]
        );
    }

    /// How [`numbering_server`] treats a connection after its first answer.
    #[derive(Clone, Copy)]
    enum Then {
        /// Answers every request, keeping the connection open.
        KeepOpen,
        /// Closes it at once (as a server whose idle limit passed).
        Close,
        /// Reads the next request, then closes without an answer (closed
        /// while the client wrote).
        DropNext,
    }

    /// A server at `path` that answers requests with the connection's
    /// number and the request's on it, each answer saying keep-alive.
    fn numbering_server(path: &Path, then: Then) {
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            for (connection, stream) in listener.incoming().enumerate() {
                let mut s = stream.unwrap();
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 1024];
                    for request in 1.. {
                        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut buf) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => got.extend_from_slice(&buf[..n]),
                            }
                        }
                        got.clear();
                        if request > 1 && matches!(then, Then::DropNext) {
                            return;
                        }
                        let body = format!("{connection}.{request}");
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(answer.as_bytes()).is_err() || matches!(then, Then::Close) {
                            return;
                        }
                    }
                });
            }
        });
    }

    /// One `get_all` of `sockets` with `kept`: each answer's body.
    fn read_kept(sockets: &[PathBuf], kept: &mut KeptConnections) -> Vec<String> {
        let per_socket = Duration::from_secs(5);
        let answers = get_all(
            sockets,
            "/vpmu",
            per_socket,
            Instant::now() + per_socket,
            1024,
            kept,
        );
        answers
            .iter()
            .map(|(a, _)| String::from_utf8_lossy(a.as_ref().unwrap()).into_owned())
            .collect()
    }

    #[test]
    fn get_all_keeps_connections_open_and_replaces_those_the_server_closed() {
        let dir = tempfile::tempdir().unwrap();
        let sockets = ["open", "closing", "dropping"].map(|n| dir.path().join(n));
        numbering_server(&sockets[0], Then::KeepOpen);
        numbering_server(&sockets[1], Then::Close);
        numbering_server(&sockets[2], Then::DropNext);
        let mut kept = KeptConnections::default();
        assert_eq!(read_kept(&sockets, &mut kept), ["0.1", "0.1", "0.1"]);
        assert_eq!(kept.len(), 3, "every answer said keep-alive");
        // Let the closing server's close arrive: found out before the
        // request. The dropping server closes only once the request is
        // written: found out by the end before any answer. Either way a
        // fresh connection answers within the same read.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(read_kept(&sockets, &mut kept), ["0.2", "1.1", "1.1"]);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(read_kept(&sockets, &mut kept), ["0.3", "2.1", "2.1"]);
        kept.retain(|p| p == sockets[0]);
        assert_eq!(kept.len(), 1);
    }

    #[test]
    fn an_answer_that_closes_its_connection_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("closing.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let _ = s.read(&mut [0u8; 256]);
            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx";
            let _ = s.write_all(answer);
            std::thread::sleep(Duration::from_millis(500));
        });
        let mut kept = KeptConnections::default();
        assert_eq!(read_kept(&[path], &mut kept), ["x"]);
        assert!(kept.is_empty());
    }

    #[test]
    fn get_all_takes_no_answer_over_its_size_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.sock");
        late_server(&path, Duration::ZERO, "x");
        let end = Instant::now() + Duration::from_secs(2);
        let answers = get_all(
            &[path],
            "/vpmu",
            Duration::from_secs(2),
            end,
            10,
            &mut KeptConnections::default(),
        );
        let error = answers[0].0.as_ref().unwrap_err();
        assert!(
            error.to_string().contains("answer over 10 bytes"),
            "{error}"
        );
    }

    #[test]
    fn a_busy_answer_is_told_apart() {
        let raw = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 36\r\n\r\n{\"error\": \"too many connections\"}\n";
        assert_eq!(
            busy_status(raw).as_deref(),
            Some("503 Service Unavailable: too many connections")
        );
        assert_eq!(busy_status(b"HTTP/1.1 200 OK\r\n\r\n{}"), None);
        assert_eq!(busy_status(b"SSH-2.0-OpenSSH 503"), None);
    }

    #[test]
    fn answers_are_split_into_status_and_body() {
        assert!(matches!(response_body(b"garbage"), Err(Answer::Broken(_))));
        assert!(matches!(
            response_body(b"SSH-2.0-OpenSSH\r\n\r\n"),
            Err(Answer::Broken(_))
        ));
        let e = response_body(b"HTTP/1.1 404 Not Found\r\n\r\n{}").unwrap_err();
        assert_eq!(
            e,
            Answer::Status(404, "HTTP/1.1 404 Not Found".into(), b"{}")
        );
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}extra";
        assert_eq!(response_body(ok).unwrap(), b"{}");
        assert!(response_body(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}").is_err());
    }
}
