//! `vmm profile`: asks a running VMM for a profile (`GET /profile`), names
//! its frames with `--symbols` if given, and writes it as folded stacks,
//! an SVG flame graph or a table.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::api::client::{self, ClientError};
use crate::files::file_kind;
use crate::profile::output;
use crate::profile::symbols::Symbols;
use crate::profile::{Profile, Request};

/// How long past the profile's own length the answer may take.
const ANSWER_MARGIN: Duration = Duration::from_secs(30);

/// What `vmm profile` writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Folded stacks, one line per stack (`outer;...;leaf COUNT`).
    Folded,
    /// An SVG flame graph.
    Svg,
    /// A `perf report --stdio`-like table.
    #[default]
    Text,
}

/// What `vmm profile` was asked.
#[derive(Clone, Debug)]
pub struct ProfileOptions {
    pub socket: PathBuf,
    pub request: Request,
    pub symbols: Option<PathBuf>,
    pub format: Format,
    pub output: Option<PathBuf>,
}

/// Why `vmm profile` failed, with its exit code.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("--symbols {0}")]
    Symbols(#[from] crate::profile::symbols::SymbolsError),
    #[error("{0}")]
    Api(#[from] ClientError),
    #[error("drawing the flame graph: {0}")]
    Draw(std::io::Error),
    /// `-o` cannot be written: found before the profile is taken.
    #[error("-o {0}: {1}")]
    Output(PathBuf, String),
    #[error("-o {0}: {1}")]
    Write(PathBuf, std::io::Error),
    #[error("writing to stdout: {0}")]
    Stdout(std::io::Error),
}

impl Failure {
    /// 2: bad input (flags, files, the socket, a refused request); 1: the
    /// profile could not be taken or written.
    fn exit_code(&self) -> i32 {
        match self {
            Failure::Api(ClientError::Refused { status: 400, .. }) => 2,
            Failure::Api(
                ClientError::Refused { .. }
                | ClientError::Busy(..)
                | ClientError::Closed(_)
                | ClientError::Timeout(..),
            ) => 1,
            Failure::Symbols(_) | Failure::Output(..) | Failure::Api(_) => 2,
            Failure::Draw(_) | Failure::Write(..) | Failure::Stdout(_) => 1,
        }
    }
}

/// Runs `vmm profile`; returns the exit code.
pub fn run(opts: &ProfileOptions) -> i32 {
    match profile(opts) {
        Ok(()) => 0,
        // A closed stdout (`| head`) ends the output quietly.
        Err(Failure::Stdout(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            eprintln!("vmm profile: {}", client::printable(&e.to_string()));
            e.exit_code()
        }
    }
}

fn profile(opts: &ProfileOptions) -> Result<(), Failure> {
    // Before the profile is taken: a bad file fails at once.
    let symbols = opts.symbols.as_deref().map(Symbols::load).transpose()?;
    let output = opts.output.as_deref().map(Output::open).transpose()?;
    let mut profile = fetch(&opts.socket, opts.request)?;
    if let Some(symbols) = &symbols {
        profile.name_frames(Ok(symbols));
    }
    // The server's text (and the file's names) reach a terminal.
    profile.map_text(|text| client::printable(text).into_owned());
    let bytes = match opts.format {
        Format::Folded => output::folded(&profile).into_bytes(),
        Format::Text => output::text(&profile).into_bytes(),
        Format::Svg => output::svg(&profile).map_err(Failure::Draw)?,
    };
    match output {
        Some(mut output) => output.write(&bytes),
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(&bytes)
                .and_then(|()| stdout.flush())
                .map_err(Failure::Stdout)
        }
    }
}

/// `GET /profile` for `request`.
pub fn fetch(socket: &Path, request: Request) -> Result<Profile, ClientError> {
    let uri = format!("/profile?{}", request.query());
    let timeout = Duration::from_secs_f64(request.seconds) + ANSWER_MARGIN;
    let body = client::get_patiently(socket, &uri, timeout)?;
    serde_json::from_slice(&body)
        .map_err(|e| ClientError::NotVmm(socket.to_path_buf(), format!("not a profile: {e}")))
}

/// Where `-o` goes, opened before the profile is taken so that a bad path
/// fails at once.
enum Output {
    /// A regular file (or none yet): written to a temporary file beside it,
    /// renamed over it when complete, so it is never left half written.
    Replace {
        path: PathBuf,
        target: PathBuf,
        temp: PathBuf,
        file: File,
    },
    /// A character device (`/dev/null`, a terminal): written directly.
    Device { path: PathBuf, file: File },
}

impl Output {
    fn open(path: &Path) -> Result<Output, Failure> {
        let fail = |why: String| Failure::Output(path.to_path_buf(), why);
        // The file a symbolic link names is the one replaced.
        let target = match std::fs::canonicalize(path) {
            Ok(target) => target,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => path.to_path_buf(),
            Err(e) => return Err(fail(e.to_string())),
        };
        match std::fs::metadata(&target) {
            Ok(m) if m.file_type().is_char_device() => {
                let file = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
                    .open(&target)
                    .map_err(|e| fail(e.to_string()))?;
                return Ok(Output::Device {
                    path: path.to_path_buf(),
                    file,
                });
            }
            Ok(m) if !m.is_file() => {
                let kind = file_kind(&m.file_type());
                return Err(fail(format!(
                    "{kind}, not a regular file (leave -o out to write to stdout)"
                )));
            }
            _ => {}
        }
        let name = target
            .file_name()
            .ok_or_else(|| fail("names no file".into()))?;
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".vmm-profile-{}", std::process::id()));
        let temp = target.with_file_name(temp_name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|e| fail(e.to_string()))?;
        Ok(Output::Replace {
            path: path.to_path_buf(),
            target,
            temp,
            file,
        })
    }

    /// Writes `bytes`; a replaced file is renamed into place when whole
    /// (what is left at the temporary path, if anything, goes on drop).
    fn write(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        match self {
            Output::Device { path, file } => file
                .write_all(bytes)
                .map_err(|e| Failure::Write(path.clone(), e)),
            Output::Replace {
                path,
                target,
                temp,
                file,
            } => file
                .write_all(bytes)
                .and_then(|()| file.sync_all())
                .and_then(|()| std::fs::rename(&temp, &target))
                .map_err(|e| Failure::Write(path.clone(), e)),
        }
    }
}

impl Drop for Output {
    /// A profile that failed leaves no temporary file behind.
    fn drop(&mut self) {
        if let Output::Replace { temp, .. } = self {
            let _ = std::fs::remove_file(temp);
        }
    }
}
