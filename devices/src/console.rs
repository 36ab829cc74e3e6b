//! Guest console output that never blocks the guest.
//!
//! The UART hands every byte to a [`ConsoleOutput`], which only appends it
//! to a bounded buffer: the vCPU thread never waits for the host's sink.
//! A writer thread of its own ("console") moves the buffer to the sink
//! (stdout, a file) with ordinary blocking writes. When nobody reads the
//! sink (a pipe no one drains, a terminal stopped with Ctrl-S), that thread
//! blocks, the buffer fills, and what the guest writes beyond it is
//! dropped and counted. A sink that fails (`EPIPE`: the reader went away)
//! drops everything from then on, counted too. [`Console::finish`] gives
//! the writer a bounded time to drain the buffer when the VM ends and
//! never waits for a blocked write.

use crate::sync::Recover;
use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Guest output buffered for the sink at most; beyond it output is dropped.
pub const OUTPUT_BUFFER: usize = 1 << 20;
/// Largest single write to the sink.
const CHUNK: usize = 64 * 1024;
/// The writer waits this long for the rest of a line before writing part of
/// one (so that it writes lines, not bytes, like a line-buffered stdout).
const LINE_WAIT: Duration = Duration::from_millis(10);
/// Buffered bytes that make the writer write even without a newline.
const BATCH: usize = 4096;

struct State {
    buf: VecDeque<u8>,
    /// Bytes taken from `buf` whose write is under way.
    in_flight: usize,
    /// No more output will come: write what is left and end.
    closed: bool,
    /// The sink failed, or the console was abandoned: drop everything.
    broken: bool,
    /// The writer sleeps until told.
    writer_waiting: bool,
    written: u64,
    dropped: u64,
    last_progress: Instant,
}

struct Shared {
    state: Mutex<State>,
    /// Output for the writer, or closing.
    work: Condvar,
    /// The writer made progress (or stopped).
    progress: Condvar,
    capacity: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().recover()
    }
}

/// What happened to the guest's output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsoleStats {
    /// Bytes the sink took.
    pub written: u64,
    /// Bytes dropped: beyond the buffer, after the sink failed, or still
    /// buffered when the VM ended and the sink did not take them in time.
    pub dropped: u64,
}

/// The UART's side: appends, never blocks (beyond a short lock).
#[derive(Clone)]
pub struct ConsoleOutput {
    shared: Arc<Shared>,
}

impl Write for ConsoleOutput {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let shared = &self.shared;
        let mut s = shared.lock();
        if s.broken || s.closed {
            s.dropped += data.len() as u64;
            return Ok(data.len());
        }
        let was_empty = s.buf.is_empty();
        let room = shared.capacity.saturating_sub(s.buf.len());
        let n = room.min(data.len());
        s.buf.extend(&data[..n]);
        s.dropped += (data.len() - n) as u64;
        let worth_waking = was_empty
            || data[..n].contains(&b'\n')
            || s.buf.len() >= BATCH && s.buf.len() - n < BATCH;
        if n > 0 && s.writer_waiting && worth_waking {
            shared.work.notify_one();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // The writer flushes; the guest never waits for it.
        Ok(())
    }
}

/// The writer thread and its buffer.
pub struct Console {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Console {
    /// Starts a writer thread for `sink` with a buffer of `capacity` bytes;
    /// returns it and the output to give the UART.
    pub fn spawn(
        sink: Box<dyn Write + Send>,
        capacity: usize,
    ) -> io::Result<(Console, ConsoleOutput)> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                buf: VecDeque::new(),
                in_flight: 0,
                closed: false,
                broken: false,
                writer_waiting: false,
                written: 0,
                dropped: 0,
                last_progress: Instant::now(),
            }),
            work: Condvar::new(),
            progress: Condvar::new(),
            capacity,
        });
        let writer = shared.clone();
        let thread = std::thread::Builder::new()
            .name("console".into())
            .spawn(move || write_loop(&writer, sink))?;
        let output = ConsoleOutput {
            shared: shared.clone(),
        };
        Ok((
            Console {
                shared,
                thread: Some(thread),
            },
            output,
        ))
    }

    /// What happened to the output so far.
    pub fn stats(&self) -> ConsoleStats {
        let s = self.shared.lock();
        ConsoleStats {
            written: s.written,
            dropped: s.dropped,
        }
    }

    /// Ends the console: no more output is taken; the writer gets until
    /// the buffer is written, or until the sink took nothing for `stall`,
    /// or `limit` in all. What is still buffered then is dropped (counted)
    /// and a writer blocked in the sink is left behind (it ends with the
    /// process, or with its write).
    pub fn finish(mut self, stall: Duration, limit: Duration) -> ConsoleStats {
        let start = Instant::now();
        let mut s = self.shared.lock();
        s.closed = true;
        self.shared.work.notify_all();
        loop {
            if s.buf.is_empty() && s.in_flight == 0 || s.broken {
                break;
            }
            let now = Instant::now();
            let quiet_since = s.last_progress.max(start);
            let stalled_at = quiet_since + stall;
            let give_up = (start + limit).min(stalled_at);
            if now >= give_up {
                break;
            }
            s = self
                .shared
                .progress
                .wait_timeout(s, give_up - now)
                .recover()
                .0;
        }
        let drained = s.buf.is_empty() && s.in_flight == 0;
        if !drained {
            s.dropped += (s.buf.len() + s.in_flight) as u64;
            s.buf = VecDeque::new();
            s.in_flight = 0;
            s.broken = true;
        }
        let stats = ConsoleStats {
            written: s.written,
            dropped: s.dropped,
        };
        drop(s);
        if drained {
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
        stats
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        // Not finished: let the writer end once it has nothing to do,
        // without waiting for it.
        let mut s = self.shared.lock();
        s.closed = true;
        self.shared.work.notify_all();
    }
}

/// The writer thread: takes what the guest wrote and writes it.
fn write_loop(shared: &Shared, mut sink: Box<dyn Write + Send>) {
    let mut chunk = Vec::with_capacity(CHUNK);
    loop {
        {
            let mut s = shared.lock();
            loop {
                if s.broken || s.closed && s.buf.is_empty() {
                    shared.progress.notify_all();
                    return;
                }
                if s.buf.is_empty() {
                    s.writer_waiting = true;
                    s = shared.work.wait(s).recover();
                    s.writer_waiting = false;
                    continue;
                }
                // Part of a line: give the rest a moment to come.
                if !s.closed && s.buf.len() < BATCH && !s.buf.contains(&b'\n') {
                    s.writer_waiting = true;
                    s = shared.work.wait_timeout(s, LINE_WAIT).recover().0;
                    s.writer_waiting = false;
                }
                break;
            }
            let n = s.buf.len().min(CHUNK);
            chunk.clear();
            chunk.extend(s.buf.drain(..n));
            s.in_flight = n;
        }
        let mut at = 0;
        let mut failed = false;
        while at < chunk.len() {
            match sink.write(&chunk[at..]) {
                Ok(0) => failed = true,
                Ok(k) => {
                    at += k;
                    let mut s = shared.lock();
                    s.written += k as u64;
                    s.in_flight = s.in_flight.saturating_sub(k);
                    s.last_progress = Instant::now();
                    shared.progress.notify_all();
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => failed = true,
            }
            break;
        }
        if !failed && sink.flush().is_ok() {
            continue;
        }
        // The sink is gone (EPIPE, a full disk): drop what is left, and
        // everything that comes.
        let mut s = shared.lock();
        let lost = s.in_flight + s.buf.len();
        s.dropped += lost as u64;
        s.in_flight = 0;
        s.buf = VecDeque::new();
        s.broken = true;
        shared.progress.notify_all();
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    use crate::test_util::SharedSink as Shared;

    /// A sink that blocks (like a pipe nobody drains) until released.
    struct Stuck(Arc<AtomicBool>);
    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            while !self.0.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_the_sink_in_order_even_without_a_newline() {
        let sink = Shared::default();
        let (console, mut out) = Console::spawn(Box::new(sink.clone()), 1024).unwrap();
        for b in b"line one\nprompt> " {
            out.write_all(&[*b]).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while sink.0.lock().unwrap().len() < 17 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"line one\nprompt> ");
        let stats = console.finish(Duration::from_secs(1), Duration::from_secs(5));
        assert_eq!(
            stats,
            ConsoleStats {
                written: 17,
                dropped: 0
            }
        );
    }

    #[test]
    fn a_stuck_sink_never_blocks_the_writer_and_excess_is_counted() {
        let release = Arc::new(AtomicBool::new(false));
        let (console, mut out) = Console::spawn(Box::new(Stuck(release.clone())), 1000).unwrap();
        let start = Instant::now();
        for _ in 0..10_000 {
            out.write_all(b"x\n").unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the guest side waited"
        );
        let stats = console.finish(Duration::from_millis(100), Duration::from_secs(1));
        // Everything but what the stuck write holds (at most the buffer) is
        // dropped; nothing was written.
        assert_eq!(stats.written, 0);
        assert_eq!(stats.dropped, 20_000);
        assert!(start.elapsed() < Duration::from_secs(10));
        release.store(true, Ordering::SeqCst);
    }

    #[test]
    fn a_broken_sink_drops_and_counts_everything() {
        let (console, mut out) = Console::spawn(Box::new(Broken), 1000).unwrap();
        out.write_all(b"first\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while console.stats().dropped < 6 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        out.write_all(b"second\n").unwrap();
        let stats = console.finish(Duration::from_secs(1), Duration::from_secs(5));
        assert_eq!(
            stats,
            ConsoleStats {
                written: 0,
                dropped: 13
            }
        );
    }
}
