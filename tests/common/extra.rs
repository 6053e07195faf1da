//! More harness pieces for the NBD endpoint tests: reading an export
//! back independently of nbdcp (qemu-img), a minimal NBD handshake probe
//! for the advertised transmission flags, the pattern plugin's expected
//! bytes, and a check for leftover server processes.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::require;

/// Read the whole export at `uri` into `out` with `qemu-img convert`, an
/// NBD client independent of nbdcp, and cut the file to `size` bytes.
/// qemu rounds export sizes up to 512 bytes; the extra tail must read as
/// zeroes and is checked before it is cut off.
pub fn read_back(uri: &str, out: &Path, size: u64) {
    require("qemu-img");
    let status = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", uri])
        .arg(out)
        .stdin(Stdio::null())
        .output()
        .expect("run qemu-img");
    assert!(
        status.status.success(),
        "qemu-img convert {uri} failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let len = std::fs::metadata(out).unwrap().len();
    assert!(
        len >= size && len < size + 512,
        "qemu-img read {len} bytes from {uri}, expected {size} (rounded up to 512)"
    );
    if len > size {
        let all = std::fs::read(out).unwrap();
        assert!(
            all[size as usize..].iter().all(|&b| b == 0),
            "{uri}: bytes past the end are not zero"
        );
        std::fs::OpenOptions::new()
            .write(true)
            .open(out)
            .unwrap()
            .set_len(size)
            .unwrap();
    }
}

/// Write the file `src` into the export at `uri` with qemu-img (no
/// nbdcp involved), e.g. to fill an nbdkit memory disk before a test.
pub fn write_with_qemu_img(src: &Path, uri: &str) {
    require("qemu-img");
    let out = Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(src)
        .arg(uri)
        .stdin(Stdio::null())
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img convert -n {} {uri} failed: {}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What nbdkit's pattern plugin serves: every 8-byte big-endian word holds
/// its own offset.
pub fn pattern_bytes(size: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(size as usize + 8);
    let mut off = 0u64;
    while off < size {
        v.extend_from_slice(&off.to_be_bytes());
        off += 8;
    }
    v.truncate(size as usize);
    v
}

/// Write `bytes` to a new file at `path`.
pub fn write_file(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

/// Panic naming the first differing offset unless the file at `path`
/// holds exactly `expected`.
pub fn assert_file_is(path: &Path, expected: &[u8]) {
    let got = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if got.len() != expected.len() {
        panic!(
            "{}: {} bytes, expected {}",
            path.display(),
            got.len(),
            expected.len()
        );
    }
    if let Some(i) = got.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{}: first difference at offset {i} ({i:#x}): {:#04x}, expected {:#04x}",
            path.display(),
            got[i],
            expected[i]
        );
    }
}

/// Transmission flags (NBD protocol).
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// Server supports NBD_CMD_FLUSH.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Server supports NBD_CMD_WRITE_ZEROES.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Server promises consistency between connections.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// What a server advertises for an export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
}

/// Negotiate export `export` on the Unix socket `sock` with a minimal
/// fixed-newstyle handshake (NBD_OPT_GO), independent of nbdcp, and
/// return the size and transmission flags the server advertises; then
/// disconnect cleanly.
///
/// An independent byte-level oracle on purpose: it writes and parses the
/// bytes by hand rather than with `nbd::wire`, so that what it says a
/// real server advertises does not depend on the encoders and decoders
/// nbdcp itself uses.
pub fn probe_export(sock: &Path, export: &str) -> ExportInfo {
    const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
    const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    const NBD_OPT_GO: u32 = 7;
    const NBD_REP_ACK: u32 = 1;
    const NBD_REP_INFO: u32 = 3;
    const NBD_INFO_EXPORT: u16 = 0;

    let mut s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).unwrap();
    assert_eq!(&greet[..8], b"NBDMAGIC");
    assert_eq!(&greet[8..16], IHAVEOPT, "not a fixed-newstyle server");
    let hflags = u16::from_be_bytes([greet[16], greet[17]]);
    // FIXED_NEWSTYLE, and NO_ZEROES when offered.
    let cflags: u32 = 1 | (u32::from(hflags) & 2);
    let mut msg = Vec::new();
    msg.extend_from_slice(&cflags.to_be_bytes());
    msg.extend_from_slice(IHAVEOPT);
    msg.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
    msg.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
    msg.extend_from_slice(&(export.len() as u32).to_be_bytes());
    msg.extend_from_slice(export.as_bytes());
    msg.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&msg).unwrap();

    let mut info = None;
    loop {
        let mut head = [0u8; 20];
        s.read_exact(&mut head).unwrap();
        let magic = u64::from_be_bytes(head[..8].try_into().unwrap());
        assert_eq!(magic, OPT_REPLY_MAGIC, "bad option reply magic");
        let rtype = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        s.read_exact(&mut data).unwrap();
        match rtype {
            NBD_REP_ACK => break,
            NBD_REP_INFO
                if len >= 12 && u16::from_be_bytes([data[0], data[1]]) == NBD_INFO_EXPORT =>
            {
                info = Some(ExportInfo {
                    size: u64::from_be_bytes(data[2..10].try_into().unwrap()),
                    flags: u16::from_be_bytes([data[10], data[11]]),
                });
            }
            NBD_REP_INFO => {}
            other => panic!(
                "NBD_OPT_GO for export {export:?} failed: reply type {other:#x}: {}",
                String::from_utf8_lossy(&data)
            ),
        }
    }
    // NBD_CMD_DISC.
    let mut disc = Vec::new();
    disc.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    disc.extend_from_slice(&0u16.to_be_bytes());
    disc.extend_from_slice(&2u16.to_be_bytes());
    disc.extend_from_slice(&0u64.to_be_bytes());
    disc.extend_from_slice(&0u64.to_be_bytes());
    disc.extend_from_slice(&0u32.to_be_bytes());
    let _ = s.write_all(&disc);
    info.expect("server sent no NBD_INFO_EXPORT")
}

/// Live (non-zombie) processes, other than this one, whose command line
/// contains `needle`: `(pid, command line)`.
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(needle) && super::process_exists(pid) {
            found.push((pid, cmdline.trim_end().to_string()));
        }
    }
    found
}

/// Panic if any process still mentions `needle` (a unique temporary path
/// given to a server nbdcp started) once nbdcp has exited.
pub fn assert_no_process_mentions(needle: &Path) {
    let needle = needle.to_str().unwrap();
    let left = processes_mentioning(needle);
    assert!(
        left.is_empty(),
        "server processes left behind after nbdcp exited: {left:?}"
    );
}

/// A path for a Unix socket that nothing listens on, though the socket
/// file exists (connecting gives ECONNREFUSED, not ENOENT).
pub fn dead_socket(dir: &Path) -> PathBuf {
    let path = dir.join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    path
}

/// [`super::assert_same_bytes`] for large files: compares 4 MiB chunks
/// with `memcmp` (fast even in a debug build) and only on a mismatch lets
/// `assert_same_bytes` find and report the first differing byte.
pub fn assert_same_content(a: &Path, b: &Path) {
    use std::fs::File;
    let (la, lb) = (
        std::fs::metadata(a).unwrap().len(),
        std::fs::metadata(b).unwrap().len(),
    );
    if la == lb {
        let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
        let (mut ba, mut bb) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
        let mut left = la;
        let mut equal = true;
        while left > 0 {
            let n = left.min(ba.len() as u64) as usize;
            fa.read_exact(&mut ba[..n]).unwrap();
            fb.read_exact(&mut bb[..n]).unwrap();
            if ba[..n] != bb[..n] {
                equal = false;
                break;
            }
            left -= n as u64;
        }
        if equal {
            return;
        }
    }
    super::assert_same_bytes(a, b);
    unreachable!("assert_same_bytes found no difference that memcmp found");
}

/// Write and zero requests (the ones that change the export) in a parsed
/// nbdkit log.
pub fn modifying_requests(entries: &[super::LogEntry]) -> Vec<&super::LogEntry> {
    use super::LogCommand;
    entries
        .iter()
        .filter(|e| {
            matches!(
                e.command,
                LogCommand::Write | LogCommand::Zero | LogCommand::Trim
            )
        })
        .collect()
}

/// Whether the union of `[offset, end)` of `requests` covers all of
/// `[start, end)`.
pub fn covers(requests: &[&super::LogEntry], start: u64, end: u64) -> bool {
    let mut spans: Vec<(u64, u64)> = requests.iter().map(|e| (e.offset, e.end())).collect();
    spans.sort();
    let mut at = start;
    for (s, e) in spans {
        if e <= at {
            continue;
        }
        if s > at {
            return false;
        }
        at = e;
        if at >= end {
            return true;
        }
    }
    at >= end
}

/// Requests among `requests` that overlap `[start, end)`.
pub fn overlapping<'a>(
    requests: &[&'a super::LogEntry],
    start: u64,
    end: u64,
) -> Vec<&'a super::LogEntry> {
    requests
        .iter()
        .filter(|e| e.offset < end && e.end() > start)
        .copied()
        .collect()
}
