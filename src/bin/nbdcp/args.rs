//! The command line's definition: every option of nbdcp with its help, and
//! the parts of the manual page that are not options (endpoints, exit
//! status, examples).
//!
//! This file uses nothing but clap and the nbdcp library's constants. The
//! binary includes it as `mod args`; the workspace tool `xtask` includes it
//! by path and writes the manual page and the shell completions from it
//! (`cargo run -p xtask -- generate`), so that neither can drift from the
//! options the binary accepts.

use std::ffi::OsString;
use std::time::Duration;

use clap::{ArgAction, CommandFactory, Parser, ValueHint};

/// Exit status for a failed copy.
pub const EXIT_FAILURE: i32 = 1;
/// Exit status for a command line that could not be understood.
pub const EXIT_USAGE: i32 = 2;
/// Exit status for a `--verify` that found the destination differs.
pub const EXIT_MISMATCH: i32 = 3;

/// One line under the program's name, in `--help` and the manual's NAME.
const ABOUT: &str = "Copy a disk image between NBD servers, files, block devices and pipes";

/// The manual's DESCRIPTION, and the top of `--help`.
const DESCRIPTION: &str = "\
nbdcp copies the whole of SOURCE to DESTINATION. Either may be an NBD \
server, given by URI or started by nbdcp from a command between brackets, a \
local file or block device, or a pipe; the destination may also be null:, \
which throws the data away. nbdcp takes the command line of libnbd's \
nbdcopy(1), so that scripts written for nbdcopy can call it, and speaks the \
NBD protocol itself.

Holes in the source (NBD block status, SEEK_DATA and SEEK_HOLE on files) \
and runs of zero bytes in its data become zero requests or holes on the \
destination instead of data, unless --allocated is given. The source is cut \
into 128 MiB segments that several connections copy at once; no two \
connections ever write the same place and the destination is never read, \
so several connections are safe even to a server that does not advertise \
multi-conn.

A destination file is created, or truncated and sized to the source; a \
destination NBD server or block device must be at least as large. Unless \
--no-flush is given the destination is flushed at the end, so that success \
means the data is on stable storage.

Sizes (SIZE) are a number of bytes with an optional suffix K, M, G, T, P \
or E, powers of 1024 (256K, 1M). A long option may be shortened to any \
prefix that no other option starts with, as getopt allows. Options end at \
--; the words between [ and ] are never options of nbdcp's.";

/// After the options in `-h`.
const AFTER_HELP: &str = "\
SOURCE and DESTINATION are each one of: a file or block device; '-' (stdin/stdout);
an NBD URI (nbd://host[:port]/export, nbd+unix:///export?socket=PATH);
'[ CMD ARGS ... ]', an NBD server to run with socket activation; or
(destination only) 'null:'. Sizes take K, M, G, T suffixes.
'nbdcp --help' says more; 'man nbdcp' says all.";

/// The forms SOURCE and DESTINATION take: the manual's ENDPOINTS.
pub const ENDPOINTS: &[(&str, &str)] = &[
    (
        "FILE",
        "A regular file or a block device. A destination file that does not exist is \
         created; one that does is truncated and sized to the source, and zero runs become \
         holes in it. A FIFO or character device is read or written in order, as a pipe.",
    ),
    (
        "-",
        "Standard input as the source, standard output as the destination (refused when \
         standard output is a terminal). A stream is copied in order, one request at a time.",
    ),
    (
        "nbd://HOST[:PORT][/EXPORT]",
        "An NBD server on TCP; the port is 10809 unless given.",
    ),
    (
        "nbd+unix:///[EXPORT]?socket=PATH",
        "An NBD server on the Unix domain socket PATH.",
    ),
    (
        "nbd+vsock://[CID][:PORT][/EXPORT]",
        "An NBD server over AF_VSOCK, such as the host of the VM nbdcp runs in: CID 2 \
         (the host) and port 10809 unless given.",
    ),
    (
        "nbd+ssh://[USER@]HOST[:PORT][/EXPORT]?socket=PATH",
        "An NBD server on HOST reached through ssh(1), which runs 'nc -U -- PATH' there \
         (without socket=, 'nc localhost N' for nbd-port=N, default 10809). PORT is ssh's; \
         NBDCP_SSH names another program to run instead of ssh.",
    ),
    (
        "[ CMD ARGS ... ]",
        "An NBD server that nbdcp runs itself with systemd socket activation, such as \
         qemu-nbd(8) or nbdkit(1), and stops when the copy ends. '[' and ']' are words of \
         their own, and the words between them are the server's, never options of nbdcp's \
         (nbdcopy needs '--' before the first '[' for that; nbdcp accepts it too). Extra \
         connections are opened only if the server advertises multi-conn.",
    ),
    (
        "null:",
        "Destination only: throw the data away, as fast as it can be read. Useful for \
         measuring a server.",
    ),
];

/// The manual's EXIT STATUS.
pub const EXIT_STATUS: &[(&str, &str)] = &[
    (
        "0",
        "The copy is complete, and flushed unless --no-flush was given.",
    ),
    (
        "1",
        "The copy failed. One line on standard error names the endpoint, the operation, and \
         the offset and length where it failed.",
    ),
    (
        "2",
        "The command line could not be used: an unknown option, a bad value, a missing or \
         extra endpoint.",
    ),
    (
        "3",
        "--verify found that the destination differs from the source; the one line names \
         the first block that differs.",
    ),
    (
        "130, 143",
        "Interrupted by SIGINT or SIGTERM (128 plus the signal's number). The servers nbdcp \
         started are stopped; a second signal ends nbdcp at once.",
    ),
];

/// The manual's ENVIRONMENT.
pub const ENVIRONMENT: &[(&str, &str)] = &[(
    "RUST_LOG",
    "Overrides the level of messages that -v sets, e.g. RUST_LOG=debug.",
)];

/// The manual's EXAMPLES: a command line and what it does.
pub const EXAMPLES: &[(&str, &str)] = &[
    (
        "nbdcp nbd://example.com/disk disk.img",
        "Copy the export 'disk' of the NBD server at example.com to the local file disk.img, \
         keeping its holes.",
    ),
    (
        "nbdcp -p /dev/sdb 'nbd+unix:///?socket=/run/nbd.sock'",
        "Copy a whole local disk to the NBD server on a Unix socket, showing a progress bar \
         with the total, the elapsed time and an estimate of the time left.",
    ),
    (
        "nbdcp -- [ qemu-nbd -r -f qcow2 disk.qcow2 ] disk.raw",
        "Convert a qcow2 image to raw: qemu-nbd, started by nbdcp, reads the qcow2 file and \
         serves its contents.",
    ),
    (
        "nbdcp -- disk.raw [ qemu-nbd -f qcow2 out.qcow2 ]",
        "Write a raw image into an existing qcow2 file, at least as large.",
    ),
    (
        "nbdcp nbd://example.com/disk - | file -",
        "Stream the disk to standard output, here to file(1) to say what is on it.",
    ),
    (
        "nbdcp -- [ nbdkit memory 1G ] null:",
        "Read a server as fast as possible and throw the data away: a benchmark.",
    ),
    (
        "nbdcp --progress=3 src.img nbd://host/disk 3>progress.txt",
        "Write the progress as lines 0/100 to 100/100 to descriptor 3, for another program \
         to read.",
    ),
];

/// The manual's SEE ALSO.
pub const SEE_ALSO: &str = "nbdcopy(1), nbdkit(1), qemu-nbd(8), qemu-img(1), nbdinfo(1)";

/// The options; the order here is the order of `--help` and the manual.
/// Numbers are `ValueHint::Other`, so that shells do not offer file names
/// for them.
#[derive(Parser, Debug)]
#[command(
    name = "nbdcp",
    version = nbdcp::VERSION,
    about = ABOUT,
    long_about = DESCRIPTION,
    after_help = AFTER_HELP,
    after_long_help = after_long_help(),
    // As getopt_long: `--alloc` for `--allocated`, if no other option
    // starts so.
    infer_long_args = true,
)]
pub struct Args {
    /// Leave the destination fully allocated (no holes).
    ///
    /// Holes in the source and runs of zeroes are written as allocated
    /// zeroes instead of being left as holes on the destination.
    #[arg(long)]
    pub allocated: bool,

    /// Connections to each NBD endpoint (workers for other kinds).
    ///
    /// Up to N connections are opened to each NBD server, and as many
    /// workers copy at once; it also bounds the workers between local files.
    /// A server subprocess gets extra connections only if it advertises
    /// multi-conn; extra connections to a server that serves one client at
    /// a time are given up on, and the copy goes on with those it has.
    #[arg(short = 'C', long, value_name = "N", value_hint = ValueHint::Other, default_value_t = nbdcp::DEFAULT_CONNECTIONS, value_parser = parse_positive)]
    pub connections: usize,

    /// The destination already reads as zeroes: skip zeroing it.
    ///
    /// No zero requests are sent, and holes in the source are skipped. It
    /// is not safe unless the destination really reads as zeroes.
    /// --target-is-zero is the same option, under qemu-img's name.
    #[arg(long, visible_alias = "target-is-zero")]
    pub destination_is_zero: bool,

    /// Flush the destination at the end (the default).
    ///
    /// Ask the destination to put everything on stable storage before
    /// nbdcp reports success. nbdcp does this unless --no-flush is given
    /// (nbdcopy only with --flush).
    #[arg(long, overrides_with = "no_flush")]
    pub flush: bool,

    /// Do not flush the destination at the end.
    ///
    /// Success then means the destination has accepted every write, not
    /// that the data is on stable storage.
    #[arg(long, overrides_with = "flush")]
    pub no_flush: bool,

    /// Do not ask the source which parts hold data; read everything.
    ///
    /// For a server whose block status is wrong, or slower than reading.
    /// Runs of zeroes in what is read are still found (see --sparse).
    #[arg(long)]
    pub no_extents: bool,

    /// Show a progress bar, or with =FD write "N/100" lines to FD.
    ///
    /// -p and --progress show a bar on standard error with the percentage,
    /// the bytes done and the total, the rate, the elapsed time and an
    /// estimate of the time left, redrawn in place. When standard error is
    /// not a terminal only the final line is written.
    ///
    /// --progress=FD writes the line 0/100 to the open file descriptor FD
    /// first, a line N/100 each time the percentage grows, and 100/100 when
    /// the copy is complete, for another program to read.
    ///
    /// --progress=json:FD writes one JSON object a line to FD instead: a
    /// start event, progress events at least once a second and when a
    /// segment completes, retry events, and a final done or error event
    /// with the exit status (the fields are in README).
    #[arg(short = 'p', long, value_name = "FD|json:FD", value_hint = ValueHint::Other, num_args = 0..=1, require_equals = true, default_missing_value = "")]
    pub progress: Option<String>,

    /// Bytes of data in flight per connection.
    ///
    /// At least the request size. Takes K, M and G suffixes.
    #[arg(long, value_name = "SIZE", value_hint = ValueHint::Other, default_value = "16M", value_parser = parse_size_arg)]
    pub queue_size: u64,

    /// Largest request, a power of two from 4K to 32M [default: 1M on NBD
    /// Unix sockets, 256K otherwise].
    ///
    /// Unset, it is 1M when an NBD endpoint is on a Unix socket and neither
    /// is on TCP, and 256K otherwise, as nbdcopy's default. Takes K and M
    /// suffixes.
    #[arg(long, value_name = "SIZE", value_hint = ValueHint::Other, value_parser = parse_size_arg)]
    pub request_size: Option<u64>,

    /// Requests in flight per connection.
    ///
    /// Enough for a server to work on several at once; the bytes they carry
    /// are bounded by --queue-size as well.
    #[arg(short = 'R', long, value_name = "N", value_hint = ValueHint::Other, default_value_t = nbdcp::DEFAULT_REQUESTS, value_parser = parse_positive)]
    pub requests: usize,

    /// Detect runs of zero bytes of this size in data (0 turns it off).
    ///
    /// Data is scanned in blocks of SIZE, a power of two of at least 512;
    /// blocks of zero bytes are sent as zero requests or left as holes.
    #[arg(short = 'S', long, value_name = "SIZE", value_hint = ValueHint::Other, default_value = "4096", value_parser = parse_size_arg)]
    pub sparse: u64,

    /// One connection, one request at a time.
    ///
    /// Slow, but in order, and kind to a server that cannot handle requests
    /// in flight. Streams (pipes, standard input and output) are always
    /// copied this way.
    #[arg(long)]
    pub synchronous: bool,

    /// Most workers (0: the number of cores, plus one when the source is an
    /// NBD server).
    ///
    /// -T 1 copies with one worker. A worker that reads from a server waits
    /// for it part of the time, so one more than the cores keeps them busy.
    #[arg(short = 'T', long, value_name = "N", value_hint = ValueHint::Other, default_value = "0")]
    pub threads: usize,

    /// Fail an NBD request that takes longer than this many seconds.
    ///
    /// A stalled request counts as a dropped connection and is retried (see
    /// --retries). By default nbdcp waits for as long as the server takes.
    #[arg(long, value_name = "SECONDS", value_hint = ValueHint::Other, value_parser = parse_seconds)]
    pub timeout: Option<Duration>,

    /// Retry a segment this many times after a dropped or stalled NBD
    /// connection, reconnecting first (0: never).
    ///
    /// nbdcp waits 100 ms before the first reconnection, doubling up to 2 s.
    /// With retries on, each finished segment is flushed, so that a server
    /// that restarts cannot lose writes it had acknowledged.
    #[arg(long, value_name = "N", value_hint = ValueHint::Other, default_value_t = nbdcp::DEFAULT_RETRIES)]
    pub retries: u32,

    /// Copy from this byte of the source on (as dd's skip).
    ///
    /// With --destination-offset and --length, a range of the source is
    /// copied to a place on the destination; the rest of the destination
    /// is left as it was (a regular file is not truncated, only grown if
    /// shorter). Offsets on an NBD server must be whole blocks of its
    /// minimum block size.
    #[arg(long, value_name = "N", value_hint = ValueHint::Other, value_parser = parse_size_arg)]
    pub source_offset: Option<u64>,

    /// Write from this byte of the destination on (as dd's seek).
    #[arg(long, value_name = "N", value_hint = ValueHint::Other, value_parser = parse_size_arg)]
    pub destination_offset: Option<u64>,

    /// Copy this many bytes (as dd's count) [default: to the end of the
    /// source].
    #[arg(long, value_name = "N", value_hint = ValueHint::Other, value_parser = parse_size_arg)]
    pub length: Option<u64>,

    /// Record finished segments in FILE, to resume after an interruption.
    ///
    /// Run again with the same FILE after any interruption, nbdcp copies
    /// only the segments not recorded. A journal written for another copy
    /// is refused; a complete one makes the run do nothing.
    #[arg(long, value_name = "FILE", value_hint = ValueHint::FilePath, value_parser = clap::value_parser!(std::path::PathBuf))]
    pub journal: Option<std::path::PathBuf>,

    /// Read at most SIZE bytes of data a second from the source.
    ///
    /// One limit shared by all connections; holes skipped through extents
    /// do not count.
    #[arg(long, value_name = "SIZE", value_hint = ValueHint::Other, value_parser = parse_size_arg)]
    pub rate: Option<u64>,

    /// Compute the blkhash of the source while copying and print it.
    ///
    /// ALG is md5, sha1, sha256 or sha512, SIZE the block size, a power of
    /// two [default: sha256/64K]. The hash, as nbdcopy 1.24 computes it,
    /// goes to standard output as lowercase hex, or to --blkhash-file.
    #[arg(long, value_name = "ALG[/SIZE]", num_args = 0..=1, require_equals = true, default_missing_value = "", value_hint = ValueHint::Other)]
    pub blkhash: Option<String>,

    /// Write the blkhash to FILE instead of standard output.
    #[arg(long, value_name = "FILE", value_hint = ValueHint::FilePath, value_parser = clap::value_parser!(OsString))]
    pub blkhash_file: Option<OsString>,

    /// After the copy, read the destination back and compare it with the
    /// source.
    ///
    /// The destination is read with all connections (ranges it reports as
    /// zero are not read) and its blkhash compared with the source's,
    /// computed while copying. A match is reported on standard error with
    /// the hash; a mismatch exits with status 3, naming the first block that
    /// differs. Not with null: or a pipe as the destination.
    #[arg(long)]
    pub verify: bool,

    /// Say more (repeat for more detail).
    ///
    /// -v reports each side's kind, name and size, the connections opened
    /// and the settings before the copy starts, and what was copied and
    /// how fast at the end; -vv and -vvv add debugging detail.
    #[arg(short = 'v', long, action = ArgAction::Count)]
    pub verbose: u8,

    /// SOURCE and DESTINATION.
    #[arg(
        value_names = ["SOURCE", "DESTINATION"],
        num_args = 2,
        required = true,
        value_hint = ValueHint::AnyPath,
        value_parser = clap::value_parser!(OsString),
    )]
    pub endpoints: Vec<OsString>,
}

/// The end of `--help`: what the manual has besides the options.
fn after_long_help() -> String {
    let mut out = String::new();
    let mut list = |title: &str, items: &[(&str, &str)]| {
        out.push_str(title);
        out.push_str(":\n");
        for (term, text) in items {
            out.push_str(&format!("  {term}\n          {text}\n"));
        }
        out.push('\n');
    };
    list("SOURCE and DESTINATION", ENDPOINTS);
    list("Exit status", EXIT_STATUS);
    list("Examples", EXAMPLES);
    list("Environment", ENVIRONMENT);
    out.push_str(&format!("See nbdcp(1), and also {SEE_ALSO}."));
    out
}

/// The command line as clap builds it, with `--help` and `--version`.
pub fn command() -> clap::Command {
    let mut cmd = Args::command();
    cmd.build();
    cmd
}

/// Every long option and alias nbdcp takes, as `--name`, in the order of
/// `--help`; `--long-options` prints them. `--long-options` and
/// `--short-options` themselves are not clap's and not listed, as nbdcopy
/// leaves them out of its own lists.
pub fn long_options() -> Vec<String> {
    command()
        .get_arguments()
        .filter(|a| !a.is_hide_set())
        .flat_map(|a| {
            a.get_long()
                .into_iter()
                .chain(a.get_visible_aliases().unwrap_or_default())
                .map(|name| format!("--{name}"))
        })
        .collect()
}

/// Every short option nbdcp takes, as `-c`, in the order of `--help`;
/// `--short-options` prints them.
pub fn short_options() -> Vec<String> {
    command()
        .get_arguments()
        .filter(|a| !a.is_hide_set())
        .flat_map(|a| {
            a.get_short()
                .into_iter()
                .chain(a.get_visible_short_aliases().unwrap_or_default())
                .map(|c| format!("-{c}"))
        })
        .collect()
}

/// Parse a size such as `4096`, `256K`, `2M`, `1G` or `1GiB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits == 0 {
        return Err(format!("'{text}' is not a size"));
    }
    let number: u64 = t[..digits]
        .parse()
        .map_err(|_| format!("'{text}' is too large"))?;
    let suffix = &t[digits..];
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        "e" | "eb" | "eib" => 60,
        _ => {
            return Err(format!(
                "'{text}' has an unknown size suffix '{suffix}' (use K, M, G, T, P or E)"
            ));
        }
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{text}' is too large"))
}

fn parse_size_arg(text: &str) -> Result<u64, String> {
    parse_size(text)
}

fn parse_positive(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{text}' is not a whole number")),
    }
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a number of seconds"))?;
    if !(secs > 0.0 && secs.is_finite() && secs < 1e9) {
        return Err(format!("'{text}' is not a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}
