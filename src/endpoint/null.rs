//! `null:`: a destination that discards everything, for measuring reads.

use super::{Capabilities, Endpoint, Tuning};
use crate::error::Result;

/// Discards writes; has no size limit.
#[derive(Debug, Default)]
pub struct NullEndpoint;

impl Endpoint for NullEndpoint {
    fn name(&self) -> &str {
        "null:"
    }

    fn kind(&self) -> &'static str {
        "null"
    }

    fn size(&self) -> Option<u64> {
        None
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            starts_zeroed: true,
            ..Capabilities::default()
        }
    }

    fn tuning(&self) -> Tuning {
        // Writes are thrown away: finding zeroes in data is wasted work.
        Tuning {
            zero_scan: false,
            ..Tuning::default()
        }
    }

    fn read_at(&mut self, _buf: &mut [u8], _offset: u64) -> Result<()> {
        Err(
            crate::Error::new(crate::ErrorKind::Unsupported, "null: cannot be read")
                .with_endpoint("null:"),
        )
    }

    fn write_at(&mut self, _data: &[u8], _offset: u64) -> Result<()> {
        Ok(())
    }

    fn zero(&mut self, _offset: u64, _length: u64, _allocate: bool) -> Result<()> {
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    fn connect_another(&self) -> Result<Option<Box<dyn Endpoint>>> {
        Ok(Some(Box::new(NullEndpoint)))
    }
}
