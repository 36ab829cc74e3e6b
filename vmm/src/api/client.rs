//! The client side of the API, for `vmm stat` and `vmm profile`: a few
//! lines of HTTP/1.1 over a `UnixStream`, one `GET` with
//! `Connection: close` per call, the answer read to its end, the whole
//! exchange by one deadline (a server that trickles its answer cannot hold
//! a client longer). What the server says is its own text: [`printable`]
//! escapes its control characters before a terminal sees it.

use std::borrow::Cow;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::http::{read_by, write_by};

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

/// The bytes of one request (`body`: a JSON document) on a connection that
/// closes after the answer.
fn request(method: &str, uri: &str, body: Option<&[u8]>) -> Vec<u8> {
    let mut head = format!("{method} {uri} HTTP/1.1\r\nHost: vmm\r\nConnection: close\r\n");
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
    let request = request(method, uri, body);
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

/// One socket's exchange in [`get_all`].
struct Pending<'a> {
    socket: &'a Path,
    stream: Option<UnixStream>,
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
/// a CPU). Each exchange is bounded by `per_socket` and all by `end`, each
/// answer by `max` bytes; per socket, what [`get_bounded`] would give, and
/// how long it took.
pub fn get_all(
    sockets: &[PathBuf],
    uri: &str,
    per_socket: Duration,
    end: Instant,
    max: usize,
) -> Vec<(Result<Vec<u8>, ClientError>, Duration)> {
    let start = Instant::now();
    let request = &request("GET", uri, None)[..];
    let mut all: Vec<Pending> = sockets
        .iter()
        .map(|socket| Pending {
            socket,
            stream: None,
            unwritten: request.len(),
            written: Ok(()),
            raw: Vec::new(),
            deadline: (start + per_socket).min(end),
            done: None,
        })
        .collect();
    for p in &mut all {
        if let Err(e) = check_socket(p.socket) {
            p.done = Some((Err(e), start.elapsed()));
        }
    }
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let now = Instant::now();
        let mut retry_connect = false;
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
                Ok(None) => retry_connect = true,
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
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break None,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => break Some(Err(e)),
                }
            };
            if let Some(read) = read {
                let written = std::mem::replace(&mut p.written, Ok(()));
                let timeout = p.deadline.saturating_duration_since(start);
                let result = answer(p.socket, uri, &p.raw, written, read, timeout);
                p.done = Some((result, start.elapsed()));
                p.stream = None;
            }
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
        if retry_connect {
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

/// The body of a `200` HTTP/1.1 answer read to its end.
pub fn response_body(raw: &[u8]) -> Result<&[u8], Answer<'_>> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(Answer::Broken("no HTTP answer".into()))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let mut words = status_line.split_whitespace();
    if !words.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(Answer::Broken("no HTTP answer".into()));
    }
    let status = words.next().and_then(|s| s.parse::<u16>().ok());
    let length = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())?
    });
    let body = &raw[split + 4..];
    let body = match length {
        Some(n) if n > body.len() => return Err(Answer::Broken("the answer was cut short".into())),
        Some(n) => &body[..n],
        None => body,
    };
    match status {
        Some(200) => Ok(body),
        Some(code) => Err(Answer::Status(code, status_line.to_string(), body)),
        None => Err(Answer::Broken(format!("bad status line {status_line:?}"))),
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
        let answers = get_all(&sockets, "/vpmu", per_socket, start + per_socket * 5, 1024);
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

    #[test]
    fn get_all_takes_no_answer_over_its_size_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.sock");
        late_server(&path, Duration::ZERO, "x");
        let end = Instant::now() + Duration::from_secs(2);
        let answers = get_all(&[path], "/vpmu", Duration::from_secs(2), end, 10);
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
