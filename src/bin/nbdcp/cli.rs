//! The command line: nbdcopy's options, parsed into [`CopyOptions`].
//!
//! Arguments stay `OsString`s from `main` to the endpoint: a file name or a
//! server command's word need not be UTF-8, and must reach the file system
//! or the server byte for byte.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Parser;
use nbdcp::{
    Blkhash, BlkhashAlgorithm, BlkhashSpec, CancelToken, CopyOptions, CopyStats, EndpointSpec,
    Error, ErrorKind, Event, OptionError, Progress, ProgressFn, Report, SideReport,
};

use crate::args::{self, Args};
pub use crate::args::{EXIT_FAILURE, EXIT_MISMATCH, EXIT_USAGE};
use crate::json::JsonProgress;
use crate::progress::{FdProgress, Outcome, ProgressBar, human_bytes};
use crate::signals;

/// Where `-p` / `--progress` shows progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressTo {
    /// A bar on standard error.
    Bar,
    /// `N/100` lines on a descriptor, as nbdcopy's.
    Lines(i32),
    /// JSON events on a descriptor.
    Json(i32),
}

/// Stands for the N-th `[ CMD ... ]` group while clap parses the rest; a
/// NUL byte cannot come from a real argument.
const COMMAND_MARK: &str = "\0command:";

/// Parse `--blkhash`'s value as nbdcopy does: empty for sha256/64K, else
/// `ALG` or `ALG/SIZE` (the algorithm's name in any case).
pub fn parse_blkhash(text: &str) -> Result<BlkhashSpec, String> {
    if text.is_empty() {
        return Ok(BlkhashSpec::default());
    }
    let (name, size) = match text.split_once('/') {
        Some((name, size)) => (name, Some(size)),
        None => (text, None),
    };
    const NAMES: &str = "md5, sha1, sha256 or sha512";
    if name.is_empty() {
        return Err(format!(
            "--blkhash={text}: name the digest before the block size ({NAMES})"
        ));
    }
    let algorithm = BlkhashAlgorithm::from_name(name).ok_or_else(|| {
        format!("--blkhash={text}: unknown digest algorithm '{name}' (use {NAMES})")
    })?;
    let block_size = match size {
        None => nbdcp::DEFAULT_BLKHASH_BLOCK_SIZE,
        Some(size) => args::parse_size(size).map_err(|e| format!("--blkhash={text}: {e}"))?,
    };
    Ok(BlkhashSpec::new(algorithm, block_size))
}

/// Take `[ CMD ARGS ... ]` groups out of the arguments, so that a server's
/// own options (`-r`, `--shared=4`) are not read as nbdcp's. Each group is
/// replaced by a marker that [`Invocation`] turns back into a command.
fn extract_commands(args: Vec<OsString>) -> Result<(Vec<OsString>, Vec<Vec<OsString>>), Error> {
    let mut out = Vec::with_capacity(args.len());
    let mut commands = Vec::new();
    let mut iter = args.into_iter();
    while let Some(arg) = iter.next() {
        if arg != "[" {
            out.push(arg);
            continue;
        }
        let mut argv = Vec::new();
        let mut closed = false;
        for a in iter.by_ref() {
            if a == "]" {
                closed = true;
                break;
            }
            argv.push(a);
        }
        if !closed {
            return Err(Error::usage("'[' without a matching ']'"));
        }
        if argv.is_empty() {
            return Err(Error::usage("'[ ]' needs a command between the brackets"));
        }
        out.push(format!("{COMMAND_MARK}{}", commands.len()).into());
        commands.push(argv);
    }
    Ok((out, commands))
}

/// A parsed command line.
#[derive(Debug)]
pub struct Invocation {
    /// Where to copy from.
    pub source: EndpointSpec,
    /// Where to copy to.
    pub destination: EndpointSpec,
    /// How to copy.
    pub options: CopyOptions,
    /// `-p` / `--progress[=FD|=json:FD]`.
    pub progress: Option<ProgressTo>,
    /// `-v` count.
    pub verbose: u8,
    /// `--blkhash-file`: where the blkhash goes instead of stdout.
    pub blkhash_file: Option<PathBuf>,
}

/// Where `--progress[=...]` asks for progress: a bar, or lines or JSON on
/// an open descriptor.
fn progress_to(value: Option<&str>) -> Result<Option<ProgressTo>, String> {
    let value = match value {
        None => return Ok(None),
        Some("") => return Ok(Some(ProgressTo::Bar)),
        Some(value) => value,
    };
    let (json, fd) = match value.strip_prefix("json:") {
        Some(fd) => (true, fd),
        None => (false, value),
    };
    match fd.parse::<i32>() {
        // SAFETY: F_GETFD only asks whether the descriptor is open.
        Ok(n) if n >= 0 && unsafe { libc::fcntl(n, libc::F_GETFD) } >= 0 => Ok(Some(if json {
            ProgressTo::Json(n)
        } else {
            ProgressTo::Lines(n)
        })),
        _ => Err(format!("--progress={value}: not an open file descriptor")),
    }
}

/// Parse the command line (including the program name). `Err` carries
/// clap's own message and exit code for help, version and usage errors.
pub fn parse(args: Vec<OsString>) -> Result<Invocation, (String, i32)> {
    let (args, commands) =
        extract_commands(args).map_err(|e| (format!("nbdcp: {e}\n"), EXIT_USAGE))?;
    // As nbdcopy's, for shell completion: one option a line on stdout,
    // whatever else the line says. Options end at `--`.
    for arg in args.iter().skip(1).take_while(|a| *a != "--") {
        let list = match arg.to_str() {
            Some("--long-options") => args::long_options(),
            Some("--short-options") => args::short_options(),
            _ => continue,
        };
        return Err((list.iter().map(|o| format!("{o}\n")).collect(), 0));
    }
    let parsed = Args::try_parse_from(&args).map_err(|e| {
        if e.use_stderr() {
            (one_line(&e.render().to_string()), EXIT_USAGE)
        } else {
            // --help and --version: their text, on stdout.
            (e.render().to_string(), 0)
        }
    })?;
    let usage = |msg: String| (format!("nbdcp: {msg}\n"), EXIT_USAGE);
    let spec = |s: &OsStr| -> EndpointSpec {
        match s
            .to_str()
            .and_then(|s| s.strip_prefix(COMMAND_MARK))
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(i) if i < commands.len() => EndpointSpec::Command(commands[i].clone()),
            _ => EndpointSpec::parse(s),
        }
    };
    let progress = progress_to(parsed.progress.as_deref()).map_err(usage)?;
    let to_usize =
        |v: u64, what: &str| usize::try_from(v).map_err(|_| usage(format!("{what} is too large")));
    let mut options = CopyOptions::default();
    options.connections = parsed.connections;
    options.threads = parsed.threads;
    options.requests = parsed.requests;
    options.request_size = parsed
        .request_size
        .map(|size| to_usize(size, "--request-size"))
        .transpose()?;
    options.queue_size = to_usize(parsed.queue_size, "--queue-size")?;
    options.sparse_size = to_usize(parsed.sparse, "--sparse")?;
    options.allocated = parsed.allocated;
    options.destination_is_zero = parsed.destination_is_zero;
    options.flush = !parsed.no_flush;
    options.extents = !parsed.no_extents;
    options.synchronous = parsed.synchronous;
    options.timeout = parsed.timeout;
    options.retries = parsed.retries;
    options.source_offset = parsed.source_offset.unwrap_or(0);
    options.destination_offset = parsed.destination_offset.unwrap_or(0);
    options.length = parsed.length;
    options.rate = parsed.rate;
    options.journal = parsed.journal;
    options.verify = parsed.verify;
    options.blkhash = parsed
        .blkhash
        .as_deref()
        .map(parse_blkhash)
        .transpose()
        .map_err(usage)?;
    options
        .validate()
        .map_err(|e| usage(describe_option_error(&e)))?;
    let source = spec(&parsed.endpoints[0]);
    let destination = spec(&parsed.endpoints[1]);
    nbdcp::endpoint::check_distinct(&source, &destination).map_err(|e| usage(e.to_string()))?;
    // As nbdcopy, --blkhash-file without --blkhash is ignored.
    let blkhash_file = parsed.blkhash_file.map(PathBuf::from);
    if options.blkhash.is_some() && blkhash_file.is_none() && destination == EndpointSpec::Stdio {
        return Err(usage(
            "--blkhash: the copy goes to standard output; name a --blkhash-file for the blkhash"
                .into(),
        ));
    }
    Ok(Invocation {
        source,
        destination,
        options,
        progress,
        verbose: parsed.verbose,
        blkhash_file,
    })
}

/// clap's usage error as nbdcp's one line: `nbdcp: ` and what is wrong,
/// without the usage summary and hints that follow it.
fn one_line(rendered: &str) -> String {
    let words: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
        .collect();
    let text = words.join(" ");
    let text = text.strip_prefix("error: ").unwrap_or(&text);
    format!("nbdcp: {text}\n")
}

/// A size as nbdcopy's `-v` shows it beside the bytes: `1M`, `64K`,
/// `1.5G`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["K", "M", "G", "T", "P", "E"];
    let mut unit = None;
    for (i, u) in UNITS.iter().enumerate() {
        if bytes >= 1u64 << (10 * (i + 1)) {
            unit = Some((i, u));
        }
    }
    match unit {
        None => bytes.to_string(),
        Some((i, u)) => {
            let scale = 1u64 << (10 * (i + 1));
            if bytes % scale == 0 {
                format!("{}{u}", bytes / scale)
            } else {
                format!("{:.1}{u}", bytes as f64 / scale as f64)
            }
        }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "true" } else { "false" }
}

/// One side of `-v`'s report: its kind and name, then its size and, for
/// NBD, what the server offered and how many connections were opened.
fn describe_side(prefix: &str, side: &SideReport) -> String {
    let size = match side.size {
        Some(n) => format!("size={n} ({})", human_size(n)),
        None => "size=unknown".to_string(),
    };
    let mut line = format!(
        "nbdcp: {prefix}: {} {:?}\nnbdcp: {prefix}: {size}",
        side.kind, side.name
    );
    if let Some(multi_conn) = side.multi_conn {
        line += &format!(
            ", multi-conn={}, connections={}",
            yes_no(multi_conn),
            side.connections
        );
    }
    line.push('\n');
    line
}

/// What `-v` prints before the copy starts, in the manner of nbdcopy's.
fn describe_plan(r: &Report) -> String {
    let mut out = describe_side("src", &r.source);
    out += &describe_side("dst", &r.destination);
    out += &format!(
        "nbdcp: connections={} threads={} requests={} request-size={} ({}) queue-size={} ({}) \
         sparse={} extents={} allocated={} destination-is-zero={} flush={} synchronous={}\n",
        r.connections,
        r.workers,
        r.requests,
        r.request_size,
        human_size(r.request_size as u64),
        r.queue_size,
        human_size(r.queue_size as u64),
        r.sparse_size,
        yes_no(r.extents),
        yes_no(r.allocated),
        yes_no(r.destination_is_zero),
        yes_no(r.flush),
        yes_no(r.synchronous),
    );
    out
}

/// The command-line flag that sets a [`CopyOptions`] field.
fn flag_of(field: &'static str) -> String {
    match field {
        "connections" => "--connections",
        "threads" => "--threads",
        "requests" => "--requests",
        "request_size" => "--request-size",
        "queue_size" => "--queue-size",
        "sparse_size" => "--sparse",
        "rate" => "--rate",
        "blkhash" => "--blkhash",
        // Not settable from the command line (the segment size).
        other => other,
    }
    .to_string()
}

/// An option error as the user typed the options: with flags, not the
/// library's field names.
fn describe_option_error(e: &OptionError) -> String {
    e.describe(flag_of)
}

/// Print the blkhash as nbdcopy does, in lower-case hex and a newline, to
/// `file` (created or truncated) or standard output.
fn write_blkhash(hash: &Blkhash, file: Option<&Path>) -> Result<(), String> {
    let line = format!("{hash}\n");
    let written = match file {
        Some(path) => std::fs::write(path, line),
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(line.as_bytes()).and_then(|()| out.flush())
        }
    };
    written.map_err(|e| {
        let to = file.map_or("standard output".into(), |f| f.display().to_string());
        format!("writing the blkhash to {to}: {e}")
    })
}

/// Log to standard error: warnings, and more for each `-v`.
fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .parse_default_env()
        .format_timestamp(None)
        .format_target(false)
        .init();
}

/// Run nbdcp with `args` (including the program name); returns the exit
/// status.
pub fn run(args: Vec<OsString>) -> i32 {
    let mut inv = match parse(args) {
        Ok(inv) => inv,
        Err((text, code)) => {
            if code == 0 {
                print!("{text}");
            } else {
                eprint!("{text}");
            }
            return code;
        }
    };
    init_logging(inv.verbose);

    if inv.verbose > 0 {
        inv.options.report = Some(Arc::new(|r: &Report| eprint!("{}", describe_plan(r))));
    }
    let cancel = CancelToken::new();
    if let Err(e) = signals::install(cancel.clone()) {
        say!("nbdcp: {e}");
        return EXIT_FAILURE;
    }
    inv.options.cancel = cancel;

    let shown = show_progress(&mut inv);
    let result = nbdcp::copy(&inv.source, &inv.destination, &inv.options);
    conclude(&inv, &shown, result)
}

/// What shows progress for one run.
#[derive(Default)]
struct Shown {
    bar: Option<Arc<ProgressBar>>,
    lines: Option<Arc<FdProgress>>,
    json: Option<Arc<JsonProgress>>,
}

/// Hook the progress display the command line asked for to the copy.
fn show_progress(inv: &mut Invocation) -> Shown {
    let mut shown = Shown::default();
    match inv.progress {
        Some(ProgressTo::Bar) => {
            let b = Arc::new(ProgressBar::new());
            let b2 = b.clone();
            let f: ProgressFn = Arc::new(move |p: Progress| b2.update(p));
            inv.options.progress = Some(f);
            shown.bar = Some(b);
        }
        Some(ProgressTo::Lines(fd)) => {
            // SAFETY: parse() checked the descriptor is open; nbdcp owns it
            // from here on, as nbdcopy does.
            let p = Arc::new(unsafe { FdProgress::from_raw_fd(fd) });
            let p2 = p.clone();
            let f: ProgressFn = Arc::new(move |pr: Progress| p2.update(pr));
            inv.options.progress = Some(f);
            shown.lines = Some(p);
        }
        Some(ProgressTo::Json(fd)) => {
            // SAFETY: as above.
            let j = Arc::new(unsafe { JsonProgress::from_raw_fd(fd) });
            let j2 = j.clone();
            inv.options.events = Some(Arc::new(move |e: &Event| j2.event(e)));
            shown.json = Some(j);
        }
        None => {}
    }
    shown
}

/// Report how the copy ended and return the exit status.
fn conclude(inv: &Invocation, shown: &Shown, result: nbdcp::Result<CopyStats>) -> i32 {
    if let Some(sig) = signals::received() {
        if let Some(b) = &shown.bar {
            b.finish(Outcome::Stopped);
        }
        if let Some(j) = &shown.json {
            j.error(&format!("interrupted by signal {sig}"), None, 128 + sig);
        }
        signals::announce(sig);
        return 128 + sig;
    }
    match result {
        Ok(stats) if stats.already_complete => {
            if let Some(journal) = &inv.options.journal {
                say!(
                    "nbdcp: journal {}: the copy is already complete; nothing to do",
                    journal.display()
                );
            }
            if let Some(j) = &shown.json {
                j.done(&stats, 0);
            }
            0
        }
        Ok(stats) => succeeded(inv, shown, &stats),
        Err(e) => {
            if let Some(b) = &shown.bar {
                b.finish(Outcome::Stopped);
            }
            say!("nbdcp: {e}");
            let status = match e.kind() {
                ErrorKind::Usage => EXIT_USAGE,
                ErrorKind::Mismatch => EXIT_MISMATCH,
                _ => EXIT_FAILURE,
            };
            if let Some(j) = &shown.json {
                j.error(&e.to_string(), Some(&e), status);
            }
            status
        }
    }
}

/// A complete copy: the displays' last word, the blkhash, `-v`'s summary.
fn succeeded(inv: &Invocation, shown: &Shown, stats: &CopyStats) -> i32 {
    if let Some(b) = &shown.bar {
        b.finish(Outcome::Complete(stats.bytes));
    }
    if let Some(p) = &shown.lines {
        p.finish();
    }
    if inv.options.verify {
        if let Some(hash) = &stats.blkhash {
            let spec = inv.options.blkhash.unwrap_or_default();
            say!(
                "nbdcp: verified: the destination matches the source, {}/{} blkhash {}",
                spec.algorithm,
                human_size(spec.block_size),
                hash
            );
        }
    }
    // The hash goes out when asked for (with --verify, --blkhash-file alone
    // asks).
    let wanted =
        inv.options.blkhash.is_some() || (inv.options.verify && inv.blkhash_file.is_some());
    if let Some(hash) = stats.blkhash.as_ref().filter(|_| wanted) {
        if let Err(msg) = write_blkhash(hash, inv.blkhash_file.as_deref()) {
            say!("nbdcp: {msg}");
            if let Some(j) = &shown.json {
                j.error(&msg, None, EXIT_FAILURE);
            }
            return EXIT_FAILURE;
        }
    }
    if let Some(j) = &shown.json {
        j.done(stats, 0);
    }
    let secs = stats.elapsed.as_secs_f64().max(1e-9);
    log::info!(
        "copied {} ({} written, {} zeroed) in {:.3} s, {}/s, {} worker(s)",
        human_bytes(stats.bytes),
        human_bytes(stats.written),
        human_bytes(stats.zeroed),
        secs,
        human_bytes((stats.bytes as f64 / secs) as u64),
        stats.workers
    );
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::parse_size;

    fn args(s: &[&str]) -> Vec<OsString> {
        std::iter::once("nbdcp")
            .chain(s.iter().copied())
            .map(OsString::from)
            .collect()
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256K"), Ok(256 << 10));
        assert_eq!(parse_size("2m"), Ok(2 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(
            parse_size("3X")
                .unwrap_err()
                .contains("unknown size suffix")
        );
        assert!(parse_size("K").is_err());
        assert!(parse_size("").is_err());
        assert!(
            parse_size("99999999999E")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn defaults_match_nbdcopy() {
        let inv = parse(args(&["a", "b"])).unwrap();
        let o = &inv.options;
        assert_eq!(
            (
                o.connections,
                o.requests,
                o.request_size,
                o.queue_size,
                o.sparse_size
            ),
            (4, 64, None, 16 << 20, 4096)
        );
        assert!(o.flush && o.extents && !o.allocated && !o.synchronous);
        assert_eq!(inv.source, EndpointSpec::Path("a".into()));
    }

    #[test]
    fn options_are_read() {
        let inv = parse(args(&[
            "-C",
            "2",
            "-R",
            "8",
            "--request-size=1M",
            "-S",
            "0",
            "--no-flush",
            "--allocated",
            "--target-is-zero",
            "--no-extents",
            "-T",
            "3",
            "src",
            "null:",
        ]))
        .unwrap();
        let o = &inv.options;
        assert_eq!(
            (
                o.connections,
                o.requests,
                o.request_size,
                o.sparse_size,
                o.threads
            ),
            (2, 8, Some(1 << 20), 0, 3)
        );
        assert!(!o.flush && o.allocated && o.destination_is_zero && !o.extents);
        assert_eq!(inv.destination, EndpointSpec::Null);
    }

    #[test]
    fn short_options_take_attached_values_as_getopt_does() {
        // Scripts written for nbdcopy say `-C4 -T4 -R2`; options must not
        // be mistaken for endpoints, wherever they stand.
        let inv = parse(args(&["-C4", "-T4", "-R2", "-S0", "src", "-"])).unwrap();
        let o = &inv.options;
        assert_eq!(
            (o.connections, o.threads, o.requests, o.sparse_size),
            (4, 4, 2, 0)
        );
        assert_eq!(inv.source, EndpointSpec::Path("src".into()));
        assert_eq!(inv.destination, EndpointSpec::Stdio);
        let inv = parse(args(&["-", "dst", "-C2", "--no-flush"])).unwrap();
        assert_eq!(inv.options.connections, 2);
        assert!(!inv.options.flush);
        assert_eq!(inv.source, EndpointSpec::Stdio);
        // A file whose name starts with '-' is reached after `--`.
        let inv = parse(args(&["-C1", "--", "-odd", "b"])).unwrap();
        assert_eq!(inv.source, EndpointSpec::Path("-odd".into()));
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for bad in [
            &["--request-size", "3", "a", "b"][..],
            &["-C", "0", "a", "b"],
            &["-R", "0", "a", "b"],
            &["--request-size", "64M", "a", "b"],
            &["--queue-size", "1X", "a", "b"],
            &["-S", "1000", "a", "b"],
            &["a"],
            &["a", "b", "c"],
            &["-", "-"],
            &["null:", "b"],
            &["--progress=99999", "a", "b"],
            &["--blkhash=sha3", "a", "b"],
            &["--blkhash=/1M", "a", "b"],
            &["--blkhash=md5/3", "a", "b"],
            &["--blkhash=md5/", "a", "b"],
            &["--blkhash=sha256/8G", "a", "b"],
            &["--blkhash=md5/1X", "a", "b"],
            &["--blkhash", "a", "-"],
        ] {
            let err = parse(args(bad)).expect_err(&format!("{bad:?} must fail"));
            assert_eq!(err.1, EXIT_USAGE, "{bad:?}: {}", err.0);
        }
    }

    #[test]
    fn bracket_commands_keep_their_own_options() {
        let inv = parse(args(&[
            "-p", "--", "[", "qemu-nbd", "-r", "-f", "qcow2", "x.qcow2", "]", "out.img",
        ]))
        .unwrap();
        assert_eq!(
            inv.source,
            EndpointSpec::Command(vec![
                "qemu-nbd".into(),
                "-r".into(),
                "-f".into(),
                "qcow2".into(),
                "x.qcow2".into()
            ])
        );
        assert_eq!(inv.destination, EndpointSpec::Path("out.img".into()));
        assert!(parse(args(&["[", "qemu-nbd", "a"])).is_err());
        assert!(parse(args(&["[", "]", "a"])).is_err());
    }

    #[test]
    fn usage_errors_are_one_line() {
        for bad in [&["-C", "0", "a", "b"][..], &["a"], &["--no-such", "a", "b"]] {
            let (text, code) = parse(args(bad)).expect_err("must fail");
            assert_eq!(code, EXIT_USAGE);
            assert_eq!(text.lines().count(), 1, "{text:?}");
            assert!(
                text.starts_with("nbdcp: ") && !text.contains("error:"),
                "{text:?}"
            );
        }
        let (text, _) = parse(args(&["a"])).unwrap_err();
        assert!(text.contains("<DESTINATION>"), "{text:?}");
    }

    #[test]
    fn sizes_for_people() {
        assert_eq!(human_size(1 << 20), "1M");
        assert_eq!(human_size(64 << 20), "64M");
        assert_eq!(human_size(1536 << 20), "1.5G");
        assert_eq!(human_size(4096), "4K");
        assert_eq!(human_size(1000), "1000");
    }

    #[test]
    fn long_options_may_be_abbreviated_as_getopt_allows() {
        let inv = parse(args(&["--alloc", "--target", "--conn=2", "a", "b"])).unwrap();
        assert!(inv.options.allocated && inv.options.destination_is_zero);
        assert_eq!(inv.options.connections, 2);
        // An exact name wins over a longer one it begins.
        assert_eq!(
            parse(args(&["--requests=3", "a", "b"]))
                .unwrap()
                .options
                .requests,
            3
        );
        // Ambiguous: --requests or --request-size; --no-flush or --no-extents.
        for bad in ["--request=3", "--no"] {
            assert_eq!(
                parse(args(&[bad, "a", "b"])).unwrap_err().1,
                EXIT_USAGE,
                "{bad}"
            );
        }
    }

    #[test]
    fn blkhash_forms() {
        use nbdcp::BlkhashAlgorithm::*;
        let spec = |a: &[&str]| parse(args(a)).unwrap().options.blkhash;
        assert_eq!(spec(&["a", "b"]), None);
        assert_eq!(
            spec(&["--blkhash", "a", "b"]),
            Some(BlkhashSpec::new(Sha256, 65536))
        );
        assert_eq!(
            spec(&["--blkhash=", "a", "b"]),
            Some(BlkhashSpec::new(Sha256, 65536))
        );
        assert_eq!(
            spec(&["--blkhash=sha512", "a", "b"]),
            Some(BlkhashSpec::new(Sha512, 65536))
        );
        assert_eq!(
            spec(&["--blkhash=MD5/4", "a", "b"]),
            Some(BlkhashSpec::new(Md5, 4))
        );
        assert_eq!(
            spec(&["--blkhash=sha1/1M", "a", "b"]),
            Some(BlkhashSpec::new(Sha1, 1 << 20))
        );
        assert_eq!(
            spec(&["--blkhash=sha512/512k", "a", "b"]),
            Some(BlkhashSpec::new(Sha512, 512 << 10))
        );
        // The value must be attached: a following word is an endpoint.
        let inv = parse(args(&["--blkhash", "md5", "b"])).unwrap();
        assert_eq!(inv.source, EndpointSpec::Path("md5".into()));
        // Standard output is the copy's: the hash goes to a file then.
        let inv = parse(args(&["--blkhash", "--blkhash-file=h", "a", "-"])).unwrap();
        assert_eq!(inv.blkhash_file, Some(PathBuf::from("h")));
        let msg = |a: &[&str]| parse(args(a)).unwrap_err().0;
        assert!(msg(&["--blkhash=sha3", "a", "b"]).contains("unknown digest algorithm 'sha3'"));
        assert!(
            msg(&["--blkhash=md5/3", "a", "b"])
                .contains("--blkhash block size must be a power of two")
        );
        assert!(msg(&["--blkhash", "a", "-"]).contains("--blkhash-file"));
    }

    #[test]
    fn progress_forms() {
        assert_eq!(
            parse(args(&["-p", "a", "b"])).unwrap().progress,
            Some(ProgressTo::Bar)
        );
        assert_eq!(
            parse(args(&["--progress", "a", "b"])).unwrap().progress,
            Some(ProgressTo::Bar)
        );
        assert_eq!(
            parse(args(&["--progress=2", "a", "b"])).unwrap().progress,
            Some(ProgressTo::Lines(2))
        );
        assert_eq!(
            parse(args(&["--progress=json:2", "a", "b"]))
                .unwrap()
                .progress,
            Some(ProgressTo::Json(2))
        );
        assert!(parse(args(&["--progress=json:99999", "a", "b"])).is_err());
        assert_eq!(parse(args(&["a", "b"])).unwrap().progress, None);
    }

    #[test]
    fn long_and_short_options_are_listed_as_nbdcopy_lists_them() {
        // What libnbd's test-long-options.sh and test-short-options.sh ask
        // of nbdcopy, and more: every name and alias clap knows, once.
        let (text, code) = parse(args(&["--long-options"])).unwrap_err();
        assert_eq!(code, 0);
        let long: Vec<&str> = text.lines().collect();
        for want in [
            "--allocated",
            "--threads",
            "--version",
            "--help",
            "--target-is-zero",
            "--destination-is-zero",
            "--progress",
            "--no-flush",
        ] {
            assert!(long.contains(&want), "{want} missing from {long:?}");
        }
        assert!(!long.contains(&"--long-options") && !long.contains(&"--short-options"));
        let (text, code) = parse(args(&["--short-options"])).unwrap_err();
        assert_eq!(code, 0);
        let short: Vec<&str> = text.lines().collect();
        for want in ["-C", "-R", "-V", "-p", "-S", "-T", "-v", "-h"] {
            assert!(short.contains(&want), "{want} missing from {short:?}");
        }
        for list in [&long, &short] {
            let mut unique = list.to_vec();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(unique.len(), list.len(), "{list:?}");
        }
        // Every option clap accepts is listed: try each name on its own.
        let cmd = args::command();
        for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
            if let Some(name) = arg.get_long() {
                assert!(long.contains(&format!("--{name}").as_str()), "--{name}");
            }
            if let Some(c) = arg.get_short() {
                assert!(short.contains(&format!("-{c}").as_str()), "-{c}");
            }
        }
        // Listing wins over everything else on the line, as in nbdcopy.
        assert_eq!(
            parse(args(&["-C", "2", "--long-options", "a", "b"]))
                .unwrap_err()
                .1,
            0
        );
    }
}
