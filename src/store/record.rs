//! Binary encoding of stored state: one format byte, then fixed-width little-endian fields.
//!
//! Shared data outlives a VM: after a `.wasm` upgrade with the same `vm_id`, the new code reads
//! what the old code wrote. The format byte makes such bytes (or anyone else's) a
//! [`DecodeError`], never a misread and never a panic.

use std::fmt;

/// State that lives in one shared-data value.
pub trait Record: Sized {
    /// The first byte of every stored value of this type. A new layout takes a new byte.
    const FORMAT: u8;

    fn encode_fields(&self, out: &mut Vec<u8>);

    fn decode_fields(fields: &mut Reader<'_>) -> Result<Self, DecodeError>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    Empty,
    /// The value starts with another type's or another version's format byte.
    Format {
        expected: u8,
        found: u8,
    },
    Truncated,
    TrailingBytes,
    /// A field holds a value the type cannot have.
    Invalid,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Empty => f.write_str("empty value"),
            DecodeError::Format { expected, found } => {
                write!(f, "format byte {found:#04x}, expected {expected:#04x}")
            }
            DecodeError::Truncated => f.write_str("value too short"),
            DecodeError::TrailingBytes => f.write_str("unexpected bytes after the last field"),
            DecodeError::Invalid => f.write_str("field out of range"),
        }
    }
}

/// Room for every fixed-size record at once: growing the vector field by field was a tenth of
/// the filter's own work on a request.
const ENCODED_CAPACITY: usize = 128;

pub fn encode<T: Record>(record: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(ENCODED_CAPACITY);
    out.push(T::FORMAT);
    record.encode_fields(&mut out);
    out
}

pub fn decode<T: Record>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (&format, fields) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if format != T::FORMAT {
        return Err(DecodeError::Format {
            expected: T::FORMAT,
            found: format,
        });
    }
    let mut reader = Reader::new(fields);
    let record = T::decode_fields(&mut reader)?;
    if reader.rest.is_empty() {
        Ok(record)
    } else {
        Err(DecodeError::TrailingBytes)
    }
}

/// Reads fixed-width fields off the front of a value; running short is an error.
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    pub fn bytes<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let (head, rest) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or(DecodeError::Truncated)?;
        self.rest = rest;
        Ok(*head)
    }

    /// The next `n` bytes, for variable-length fields whose length was read first.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.rest.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(u8::from_le_bytes(self.bytes()?))
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
}
