//! The client side of the API, for `vmm stat` and `vmm profile`: a few
//! lines of HTTP/1.1 over a `UnixStream`, one `GET` with
//! `Connection: close` per call, the answer read to its end, the whole
//! exchange by one deadline (a server that trickles its answer cannot hold
//! a client longer). What the server says is its own text: [`printable`]
//! escapes its control characters before a terminal sees it.

use std::borrow::Cow;
use std::io::ErrorKind;
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

/// Connects by `deadline`, retrying while the server's backlog is full (a
/// stopped or swamped server): a connect never blocks.
fn connect_by(socket: &Path, deadline: Instant) -> Result<UnixStream, ClientError> {
    loop {
        match super::socket::connect_now(socket) {
            Ok(stream) => return Ok(stream),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                return Err(ClientError::Stale(socket.to_path_buf()))
            }
            Err(e) => return Err(ClientError::Connect(socket.to_path_buf(), e)),
        }
    }
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
            n if raw.len() + n > max => {
                return Err(std::io::Error::other(format!("answer over {max} bytes")))
            }
            n => raw.extend_from_slice(&chunk[..n]),
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
    let not_vmm = |why: String| ClientError::NotVmm(socket.to_path_buf(), why);
    let mut stream = connect_by(socket, deadline)?;
    let io = |e: std::io::Error| match e.kind() {
        ErrorKind::TimedOut => ClientError::Timeout(socket.to_path_buf(), timeout),
        _ => not_vmm(e.to_string()),
    };
    // A server with no free connection answers 503 and closes at once,
    // maybe before our request is written or read: the write can fail and
    // the read end in a reset, after the answer. Keep what came.
    let mut request = format!("{method} {uri} HTTP/1.1\r\nHost: vmm\r\nConnection: close\r\n");
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    let mut request = request.into_bytes();
    request.extend_from_slice(body.unwrap_or_default());
    let written = write_by(&mut stream, &request, deadline);
    let mut raw = Vec::new();
    let read = read_answer(&mut stream, &mut raw, max, deadline);
    if let Some(busy) = busy_status(&raw) {
        return Err(ClientError::Busy(socket.to_path_buf(), busy));
    }
    written.map_err(io)?;
    read.map_err(io)?;
    if raw.is_empty() {
        return Err(ClientError::Closed(socket.to_path_buf()));
    }
    match response_body(&raw) {
        Ok(body) => Ok(body.to_vec()),
        Err(Answer::Status(status, status_line, body)) => {
            let message = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v["error"].as_str().map(String::from));
            match message {
                Some(message) => Err(ClientError::Refused {
                    uri: format!("{method} {uri}"),
                    status,
                    message,
                }),
                None => Err(not_vmm(format!("{method} {uri} answered {status_line:?}"))),
            }
        }
        Err(Answer::Broken(why)) => Err(not_vmm(why)),
    }
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
    let text = String::from_utf8_lossy(raw);
    let status_line = text.lines().next()?;
    let mut words = status_line.split_whitespace();
    if !words.next()?.starts_with("HTTP/1.") || words.next()? != "503" {
        return None;
    }
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
