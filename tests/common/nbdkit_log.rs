//! Parser for the output of nbdkit's log filter (nbdkit 1.32 format).
//!
//! Request and completion are separate lines:
//!
//! ```text
//! 2026-11-28 17:52:50.309846 connection=1 Connect export="" tls=0 size=0x100000 ... write=1 ...
//! 2026-11-28 17:52:50.310220 connection=1 Write id=1 offset=0x0 count=0x200 fua=1 ...
//! 2026-11-28 17:52:50.310301 connection=1 ...Write id=1 return=0
//! 2026-11-28 17:52:50.310914 connection=1 Zero id=3 offset=0x1000 count=0x2000 trim=0 fua=1 fast=0 ...
//! 2026-11-28 17:52:50.212950 connection=1 ...Read id=1 return=-1 error=EIO
//! 2026-11-28 17:52:46.220149 connection=1 ...Extents id=1 extents=(0x0 0x100000 "hole,zero") return=0
//! 2026-11-28 17:52:50.311973 connection=1 Disconnect transactions=7
//! ```
//!
//! Lines without `connection=` (Ready, Preconnect) are skipped.

use std::collections::{BTreeMap, HashMap};

/// The kind of a logged event.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LogCommand {
    /// A client finished the handshake (`args` has export, size, write...).
    Connect,
    /// A client went away (`args` has transactions).
    Disconnect,
    /// NBD_CMD_READ.
    Read,
    /// NBD_CMD_WRITE.
    Write,
    /// NBD_CMD_WRITE_ZEROES (`args`: trim, fua, fast).
    Zero,
    /// NBD_CMD_TRIM.
    Trim,
    /// NBD_CMD_FLUSH.
    Flush,
    /// NBD_CMD_BLOCK_STATUS.
    Extents,
    /// NBD_CMD_CACHE.
    Cache,
    /// Anything else, by its logged name.
    Other(String),
}

impl LogCommand {
    fn from_name(name: &str) -> LogCommand {
        match name {
            "Connect" => LogCommand::Connect,
            "Disconnect" => LogCommand::Disconnect,
            "Read" => LogCommand::Read,
            "Write" => LogCommand::Write,
            "Zero" => LogCommand::Zero,
            "Trim" => LogCommand::Trim,
            "Flush" => LogCommand::Flush,
            "Extents" => LogCommand::Extents,
            "Cache" => LogCommand::Cache,
            other => LogCommand::Other(other.to_string()),
        }
    }

    /// Whether this is an NBD request (not a connection event).
    pub fn is_request(&self) -> bool {
        !matches!(self, LogCommand::Connect | LogCommand::Disconnect)
    }
}

/// One event: a connection, a disconnection, or a request together with
/// its completion.
#[derive(Clone, Debug)]
pub struct LogEntry {
    /// nbdkit's connection number, from 1.
    pub connection: u64,
    /// What happened.
    pub command: LogCommand,
    /// Request id within the connection (`None` for Connect/Disconnect).
    pub id: Option<u64>,
    /// Request offset, 0 where there is none.
    pub offset: u64,
    /// Request length, 0 where there is none.
    pub count: u64,
    /// Every other `key=value` of the request line (`fua`, `fast`, `trim`,
    /// `req_one`; for Connect `export`, `size`, `write`, ...), values as
    /// logged (quotes removed).
    pub args: BTreeMap<String, String>,
    /// The completion's `return=` (0 success, -1 error), once logged.
    pub result: Option<i64>,
    /// The completion's `error=` (`EIO`, ...), if any.
    pub error: Option<String>,
    /// The completion's other values (e.g. `extents=(...)`).
    pub reply: BTreeMap<String, String>,
    /// Index of the request line among the connection-tagged lines.
    pub line: usize,
    /// Index of the completion line, once logged.
    pub done_line: Option<usize>,
}

impl LogEntry {
    /// A `key=value` of the request line.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args.get(key).map(String::as_str)
    }

    /// A boolean flag of the request line (`fua=1` → true).
    pub fn flag(&self, key: &str) -> bool {
        self.arg(key) == Some("1")
    }

    /// The request completed successfully.
    pub fn ok(&self) -> bool {
        self.result == Some(0)
    }

    /// One past the last byte of the request.
    pub fn end(&self) -> u64 {
        self.offset + self.count
    }
}

/// Parse the text of an nbdkit log file into events, in log order of
/// their first line. Unparseable lines are skipped.
pub fn parse_nbdkit_log(text: &str) -> Vec<LogEntry> {
    let mut entries: Vec<LogEntry> = Vec::new();
    // (connection, id) -> index in `entries`, for matching completions.
    let mut open: HashMap<(u64, u64), usize> = HashMap::new();
    let mut line_no = 0;
    for raw in text.lines() {
        let tokens = tokenize(raw);
        // Date, time, then connection=N.
        let Some(conn_pos) = tokens.iter().position(|t| t.starts_with("connection=")) else {
            continue;
        };
        let Some(connection) = tokens[conn_pos]["connection=".len()..].parse().ok() else {
            continue;
        };
        let Some(name) = tokens.get(conn_pos + 1) else {
            continue;
        };
        let this_line = line_no;
        line_no += 1;
        let rest = &tokens[conn_pos + 2..];
        let kv = key_values(rest);
        if let Some(done) = name.strip_prefix("...") {
            let id = kv.get("id").and_then(|v| parse_num(v));
            let Some(&index) = id.and_then(|id| open.get(&(connection, id))) else {
                continue;
            };
            let entry = &mut entries[index];
            if entry.command != LogCommand::from_name(done) {
                continue;
            }
            entry.result = kv.get("return").and_then(|v| v.parse().ok());
            entry.error = kv.get("error").cloned();
            entry.done_line = Some(this_line);
            entry.reply = kv
                .into_iter()
                .filter(|(k, _)| !matches!(k.as_str(), "id" | "return" | "error"))
                .collect();
            if let Some(id) = id {
                open.remove(&(connection, id));
            }
            continue;
        }
        let command = LogCommand::from_name(name);
        let id = kv.get("id").and_then(|v| parse_num(v));
        let offset = kv.get("offset").and_then(|v| parse_num(v)).unwrap_or(0);
        let count = kv.get("count").and_then(|v| parse_num(v)).unwrap_or(0);
        let args = kv
            .into_iter()
            .filter(|(k, _)| !matches!(k.as_str(), "id" | "offset" | "count"))
            .collect();
        if let Some(id) = id {
            open.insert((connection, id), entries.len());
        }
        entries.push(LogEntry {
            connection,
            command,
            id,
            offset,
            count,
            args,
            result: None,
            error: None,
            reply: BTreeMap::new(),
            line: this_line,
            done_line: None,
        });
    }
    entries
}

/// Requests of one kind.
pub fn requests_of(entries: &[LogEntry], command: LogCommand) -> Vec<&LogEntry> {
    entries.iter().filter(|e| e.command == command).collect()
}

/// Number of connections that completed the handshake.
pub fn connection_count(entries: &[LogEntry]) -> usize {
    entries
        .iter()
        .filter(|e| e.command == LogCommand::Connect)
        .count()
}

/// The most requests that were in flight at once on `connection`, from
/// the order of request and completion lines (the log filter writes a
/// request line when the request reaches it and the completion line when
/// it finishes, so overlapping requests show up interleaved).
pub fn max_in_flight(entries: &[LogEntry], connection: u64) -> usize {
    most_at_once(entries, connection, |e| e.command.is_request().then_some(1)) as usize
}

/// The most bytes of reads in flight at once on `connection`, as
/// [`max_in_flight`] counts requests.
pub fn max_read_bytes_in_flight(entries: &[LogEntry], connection: u64) -> u64 {
    most_at_once(entries, connection, |e| {
        (e.command == LogCommand::Read).then_some(e.count)
    })
}

/// The most of `weight` (per request; `None` leaves it out) in flight at
/// once on `connection`.
fn most_at_once(
    entries: &[LogEntry],
    connection: u64,
    weight: impl Fn(&LogEntry) -> Option<u64>,
) -> u64 {
    let mut events: Vec<(usize, i128)> = Vec::new();
    for e in entries.iter().filter(|e| e.connection == connection) {
        if let Some(w) = weight(e) {
            events.push((e.line, i128::from(w)));
            events.push((e.done_line.unwrap_or(usize::MAX), -i128::from(w)));
        }
    }
    events.sort();
    let (mut now, mut max) = (0i128, 0i128);
    for (_, delta) in events {
        now += delta;
        max = max.max(now);
    }
    max as u64
}

/// Split on spaces, keeping `"quoted strings"` and `(parenthesised
/// lists)` whole.
fn tokenize(line: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut cur = String::new();
    let (mut in_quotes, mut depth) = (false, 0u32);
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if in_quotes => {
                cur.push(c);
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '"' => {
                in_quotes = !in_quotes;
                cur.push(c);
            }
            '(' if !in_quotes => {
                depth += 1;
                cur.push(c);
            }
            ')' if !in_quotes => {
                depth = depth.saturating_sub(1);
                cur.push(c);
            }
            ' ' if !in_quotes && depth == 0 => {
                if !cur.is_empty() {
                    tokens.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        tokens.push(cur);
    }
    tokens
}

/// `key=value` tokens (the trailing `...` is not one), quotes stripped.
fn key_values(tokens: &[String]) -> BTreeMap<String, String> {
    tokens
        .iter()
        .filter_map(|t| t.split_once('='))
        .map(|(k, v)| {
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// `0x1f` or `31`.
fn parse_num(v: &str) -> Option<u64> {
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}
