//! Files a user names (`--kernel`, `--initrd`, `vmm profile --symbols`),
//! opened and read so that nothing waits or grows: only regular files are
//! taken, their kind is checked before they are opened and again on the
//! opened file, they are opened non-blocking (a FIFO put in their place
//! never waits for a writer), and they are read to at most a cap even if
//! they grow.
//!
//! A leaf: imports nothing of the crate.

use std::fs::{File, FileType, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Not a regular file: what it is.
    #[error("{0}, not a regular file")]
    NotAFile(&'static str),
    /// Larger than the cap: its size as known.
    #[error("{0}")]
    TooLarge(String),
}

/// What a file that is not a regular file is, for messages.
pub fn file_kind(kind: &FileType) -> &'static str {
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_symlink() {
        "a symbolic link"
    } else if kind.is_file() {
        "a regular file"
    } else {
        "an unknown kind of file"
    }
}

fn regular(meta: &std::fs::Metadata) -> Result<(), FileError> {
    match meta.is_file() {
        true => Ok(()),
        false => Err(FileError::NotAFile(file_kind(&meta.file_type()))),
    }
}

/// Opens `path` for reading if it is a regular file: checked before the
/// open (nothing with side effects on open is opened) and on the opened
/// file (it may have been replaced in between); opened non-blocking.
pub fn open_regular(path: &Path) -> Result<File, FileError> {
    regular(&std::fs::metadata(path)?)?;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    regular(&file.metadata()?)?;
    Ok(file)
}

/// All of `file` from its start, at most `max` bytes, even if it grows
/// while it is read.
pub fn read_capped(mut file: &File, max: u64) -> Result<Vec<u8>, FileError> {
    let len = file.metadata()?.len();
    if len > max {
        return Err(FileError::TooLarge(format!("{len} bytes")));
    }
    file.seek(SeekFrom::Start(0))?;
    let mut data = Vec::with_capacity(len as usize);
    file.take(max + 1).read_to_end(&mut data)?;
    if data.len() as u64 > max {
        return Err(FileError::TooLarge(format!(
            "more than {max} bytes as it was read"
        )));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_are_opened_and_reads_stop_at_the_cap() {
        let dir = std::env::temp_dir().join(format!("vmm-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f");
        std::fs::write(&file, [7u8; 100]).unwrap();
        let opened = open_regular(&file).unwrap();
        assert_eq!(read_capped(&opened, 100).unwrap().len(), 100);
        // Read again from the start, as a kept descriptor is.
        assert_eq!(read_capped(&opened, 100).unwrap().len(), 100);
        assert!(matches!(
            read_capped(&opened, 99),
            Err(FileError::TooLarge(_))
        ));
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path and a mode.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for (path, kind) in [
            (fifo.as_path(), "a FIFO"),
            (dir.as_path(), "a directory"),
            (Path::new("/dev/zero"), "a character device"),
        ] {
            match open_regular(path) {
                Err(FileError::NotAFile(k)) => assert_eq!(k, kind),
                other => panic!("{}: {other:?}", path.display()),
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
