//! `-`: standard input as a source, standard output as a destination.
//!
//! Pipes can only be read or written in order, once. A redirected regular
//! file is not a pipe: it is handed to [`FileEndpoint`] so that it gets
//! holes, extents and parallel workers like any other file.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};

use super::file::FileEndpoint;
use super::{Capabilities, Endpoint, Tuning};
use crate::error::{Error, ErrorKind, Operation, Result};

/// The name streams go by in messages.
const NAME: &str = "-";

/// Zero bytes for zero requests on a pipe.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

fn is_regular(file: &File) -> bool {
    file.metadata().map(|m| m.is_file()).unwrap_or(false)
}

/// Open standard input as a source.
pub fn open_stdin() -> Result<Box<dyn Endpoint>> {
    let fd = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::io(NAME, Operation::Open, e))?;
    let file = File::from(fd);
    if is_regular(&file) {
        return Ok(Box::new(FileEndpoint::from_file(NAME, file, false, false)?));
    }
    Ok(from_file(NAME, file, false))
}

/// Open standard output as a destination for a source of `source_size`.
pub fn open_stdout(source_size: Option<u64>) -> Result<Box<dyn Endpoint>> {
    let stdout = io::stdout();
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(stdout.as_raw_fd()) } == 1 {
        return Err(Error::new(
            ErrorKind::Usage,
            "refusing to write a binary image to a terminal",
        )
        .with_endpoint(NAME));
    }
    let fd = stdout
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::io(NAME, Operation::Open, e))?;
    let file = File::from(fd);
    // SAFETY: F_GETFL only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if is_regular(&file) && flags >= 0 && flags & libc::O_APPEND == 0 && source_size.is_some() {
        // `> file`: the shell made it empty, so it reads as zeroes once
        // grown. A file opened without truncating keeps what is past the
        // source and gets zeroes written where the source has holes.
        let len = file
            .metadata()
            .map_err(|e| Error::io(NAME, Operation::Stat, e))?
            .len();
        let size = source_size.unwrap_or(0);
        if len < size {
            file.set_len(size)
                .map_err(|e| Error::io(NAME, Operation::Resize, e).at_offset(size))?;
        }
        return Ok(Box::new(FileEndpoint::from_file(
            NAME,
            file,
            true,
            len == 0,
        )?));
    }
    Ok(from_file(NAME, file, true))
}

/// Wrap an open pipe, FIFO or character device (e.g. `/dev/full`).
pub fn from_file(name: &str, file: File, writable: bool) -> Box<dyn Endpoint> {
    grow_pipe(&file);
    Box::new(StreamEndpoint {
        name: name.to_string(),
        file,
        position: 0,
        writable,
    })
}

/// Pipe capacity asked for (the most an unprivileged process may set by
/// default): with the default 64 KiB, nbdcp and the program at the other
/// end wake each other for every 64 KiB.
const PIPE_SIZE: libc::c_int = 1024 * 1024;

/// Make a pipe or FIFO hold [`PIPE_SIZE`] bytes if it holds less. Only a
/// hint: a pipe that cannot grow still works.
fn grow_pipe(file: &File) {
    use std::os::unix::fs::FileTypeExt;
    if !file.metadata().is_ok_and(|m| m.file_type().is_fifo()) {
        return;
    }
    let fd = file.as_raw_fd();
    // SAFETY: F_GETPIPE_SZ and F_SETPIPE_SZ on a descriptor we hold, known
    // to be a pipe.
    unsafe {
        if libc::fcntl(fd, libc::F_GETPIPE_SZ) < PIPE_SIZE {
            libc::fcntl(fd, libc::F_SETPIPE_SZ, PIPE_SIZE);
        }
    }
}

/// A pipe (or terminal, socket, character device) read or written in order.
#[derive(Debug)]
pub struct StreamEndpoint {
    name: String,
    file: File,
    position: u64,
    writable: bool,
}

impl StreamEndpoint {
    fn out_of_order(&self, op: Operation, offset: u64) -> Error {
        Error::new(
            ErrorKind::Unsupported,
            format!(
                "a stream can only be accessed in order (at offset {})",
                self.position
            ),
        )
        .with_endpoint(&self.name)
        .with_operation(op)
        .at_offset(offset)
    }

    fn write_all(&mut self, data: &[u8], offset: u64, op: Operation) -> Result<()> {
        if offset != self.position {
            return Err(self.out_of_order(op, offset));
        }
        self.file
            .write_all(data)
            .map_err(|e| Error::io(&self.name, op, e).at(offset, data.len() as u64))?;
        self.position += data.len() as u64;
        Ok(())
    }
}

impl Endpoint for StreamEndpoint {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "pipe"
    }

    fn size(&self) -> Option<u64> {
        None
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: !self.writable,
            sequential: true,
            ..Capabilities::default()
        }
    }

    fn tuning(&self) -> Tuning {
        Tuning {
            // The pipe holds this much: larger batches only cost memory.
            batch_size: PIPE_SIZE as usize,
            ..Tuning::default()
        }
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = self.read_stream(buf, offset)?;
        if n < buf.len() {
            return Err(Error::new(ErrorKind::Io, "unexpected end of input")
                .with_endpoint(&self.name)
                .with_operation(Operation::Read)
                .at(offset + n as u64, (buf.len() - n) as u64));
        }
        Ok(())
    }

    fn read_stream(&mut self, buf: &mut [u8], offset: u64) -> Result<usize> {
        if offset != self.position {
            return Err(self.out_of_order(Operation::Read, offset));
        }
        let mut filled = 0;
        while filled < buf.len() {
            match self.file.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::io(&self.name, Operation::Read, e)
                        .at(offset + filled as u64, (buf.len() - filled) as u64));
                }
            }
        }
        self.position += filled as u64;
        Ok(filled)
    }

    fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()> {
        self.write_all(data, offset, Operation::Write)
    }

    fn zero(&mut self, offset: u64, length: u64, _allocate: bool) -> Result<()> {
        let mut done = 0;
        while done < length {
            let n = (length - done).min(ZEROES.len() as u64) as usize;
            self.write_all(&ZEROES[..n], offset + done, Operation::Zero)?;
            done += n as u64;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    fn connect_another(&self) -> Result<Option<Box<dyn Endpoint>>> {
        Ok(None)
    }
}
