//! What a copy is about to do, for a program that wants to say so (the
//! command line's `-v`): told once, when both endpoints are open and the
//! connections are made, before any data moves.

use std::sync::Arc;

use crate::endpoint::Endpoint;

use super::plan::Plan;

/// One side of the copy.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SideReport {
    /// The endpoint's kind ([`Endpoint::kind`]): `"nbd"`, `"file"`, ...
    pub kind: &'static str,
    /// Its name, as the user gave it.
    pub name: String,
    /// Its size in bytes, if known.
    pub size: Option<u64>,
    /// For an NBD server: whether it advertised multi-conn.
    pub multi_conn: Option<bool>,
    /// Handles (for NBD servers, connections) opened on it.
    pub connections: usize,
}

impl SideReport {
    fn of(endpoint: &dyn Endpoint, connections: usize) -> SideReport {
        let caps = endpoint.capabilities();
        SideReport {
            kind: endpoint.kind(),
            name: endpoint.name().to_string(),
            size: endpoint.size(),
            multi_conn: (endpoint.kind() == "nbd").then_some(caps.multi_conn),
            connections,
        }
    }
}

/// The copy as planned.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// The source.
    pub source: SideReport,
    /// The destination.
    pub destination: SideReport,
    /// Connections asked for per NBD endpoint (`-C`).
    pub connections: usize,
    /// Workers copying in parallel: the connections opened.
    pub workers: usize,
    /// Most requests in flight per connection.
    pub requests: usize,
    /// Largest read or write request.
    pub request_size: usize,
    /// Bytes of data in flight per worker, at most.
    pub queue_size: usize,
    /// Zero-detection block size in data, 0 for none.
    pub sparse_size: usize,
    /// Whether the source is asked where its data is.
    pub extents: bool,
    /// Whether zeroed ranges are left allocated.
    pub allocated: bool,
    /// Whether the destination is taken to read as zeroes already.
    pub destination_is_zero: bool,
    /// Whether the destination is flushed at the end.
    pub flush: bool,
    /// Whether one request at a time is sent.
    pub synchronous: bool,
}

/// A function told about the copy as planned ([`Report`]).
pub type ReportFn = Arc<dyn Fn(&Report) + Send + Sync>;

impl Report {
    /// The report for a copy by `plan` from `source` to `destination`
    /// with `workers` handles on each.
    pub(crate) fn new(
        plan: &Plan,
        options: &crate::CopyOptions,
        source: &dyn Endpoint,
        destination: &dyn Endpoint,
        workers: usize,
    ) -> Report {
        Report {
            source: SideReport::of(source, workers),
            destination: SideReport::of(destination, workers),
            connections: options.connections,
            workers,
            requests: plan.limits.requests,
            request_size: plan.limits.chunk,
            queue_size: options.queue_size.max(plan.limits.chunk),
            sparse_size: plan.limits.sparse,
            extents: plan.use_extents,
            allocated: plan.limits.allocate,
            destination_is_zero: plan.limits.skip_zeroes,
            flush: plan.final_flush,
            synchronous: options.synchronous,
        }
    }
}
