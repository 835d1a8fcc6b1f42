//! One idempotency record: who owns the slot, what state the key is in, and the stored
//! response.

use crate::clock::Instant;
use crate::store::{DecodeError, Reader, Record};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Nothing, or a record reclaimed after it expired: a small value that gives its bytes back.
    Free,
    /// The first request is being executed; `claim` identifies it.
    InFlight { claim: u64 },
    /// Executed; a duplicate gets this response.
    Completed(StoredResponse),
    /// Executed, but the response could not be stored (too large, cut short, or not
    /// replayable as a local reply).
    Unreplayable { status: u16 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    /// Lower-case names; values as the upstream sent them, in any bytes.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

/// The most headers a stored response keeps.
pub const MAX_STORED_HEADERS: usize = 64;
/// The bytes each stored header costs beyond its name and value: their two lengths.
pub const HEADER_FRAMING_BYTES: usize = 4;

impl StoredResponse {
    /// What storing this response costs beyond the record's fixed fields: every header's name,
    /// value and framing, and the body. `max_response_bytes` bounds exactly this.
    pub fn size(&self) -> usize {
        self.headers
            .iter()
            .map(|(name, value)| name.len() + value.len() + HEADER_FRAMING_BYTES)
            .sum::<usize>()
            + self.body.len()
    }

    /// Whether the record's fixed-width lengths can hold it whole. One that cannot is stored as
    /// unreplayable, never cut: a cut header or body would replay something else.
    pub fn fits_record(&self) -> bool {
        self.headers.len() <= MAX_STORED_HEADERS
            && self.headers.iter().all(|(name, value)| {
                name.len() <= usize::from(u16::MAX) && value.len() <= usize::from(u16::MAX)
            })
            && u32::try_from(self.body.len()).is_ok()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyRecord {
    /// Hash of (client identity, key): tells keys sharing a slot apart.
    pub owner: u64,
    /// SHA-256 of the first request: method, path and query, body.
    pub fingerprint: [u8; 32],
    /// When the lease (in flight) or the record (completed) runs out.
    pub deadline: Instant,
    pub entry: Entry,
}

/// A record's bytes beyond its stored response: format, kind, owner, fingerprint, deadline,
/// claim, status, header count, body length.
pub const RECORD_FIXED_BYTES: usize = 1 + 1 + 8 + 32 + 8 + 8 + 2 + 1 + 4;

impl IdempotencyRecord {
    pub fn free() -> Self {
        IdempotencyRecord {
            owner: 0,
            fingerprint: [0; 32],
            deadline: Instant::default(),
            entry: Entry::Free,
        }
    }

    pub fn is_live(&self, now: Instant) -> bool {
        self.entry != Entry::Free && now < self.deadline
    }
}

impl Record for IdempotencyRecord {
    const FORMAT: u8 = 0x41;

    fn encode_fields(&self, out: &mut Vec<u8>) {
        let (kind, claim, status) = match &self.entry {
            Entry::Free => {
                out.push(0);
                return;
            }
            Entry::InFlight { claim } => (1, *claim, 0),
            Entry::Completed(response) if response.fits_record() => (2, 0, response.status),
            // Never cut to fit: what does not fit was executed and is not replayable.
            Entry::Completed(StoredResponse { status, .. }) | Entry::Unreplayable { status } => {
                (3, 0, *status)
            }
        };
        out.push(kind);
        out.extend_from_slice(&self.owner.to_le_bytes());
        out.extend_from_slice(&self.fingerprint);
        out.extend_from_slice(&self.deadline.as_nanos().to_le_bytes());
        out.extend_from_slice(&claim.to_le_bytes());
        out.extend_from_slice(&status.to_le_bytes());
        if let (2, Entry::Completed(response)) = (kind, &self.entry) {
            out.push(response.headers.len() as u8);
            for (name, value) in &response.headers {
                for bytes in [name.as_bytes(), value.as_slice()] {
                    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
                    out.extend_from_slice(bytes);
                }
            }
            out.extend_from_slice(&(response.body.len() as u32).to_le_bytes());
            out.extend_from_slice(&response.body);
        }
    }

    fn decode_fields(fields: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let kind = fields.u8()?;
        if kind == 0 {
            return Ok(IdempotencyRecord::free());
        }
        let owner = fields.u64()?;
        let fingerprint = fields.bytes::<32>()?;
        let deadline = Instant::from_nanos(fields.u64()?);
        let claim = fields.u64()?;
        let status = u16::from_le_bytes(fields.bytes()?);
        let entry = match kind {
            1 => Entry::InFlight { claim },
            2 => {
                let count = fields.u8()?;
                let mut headers = Vec::with_capacity(usize::from(count));
                let field = |fields: &mut Reader<'_>| -> Result<Vec<u8>, DecodeError> {
                    let len = u16::from_le_bytes(fields.bytes()?);
                    Ok(fields.take(usize::from(len))?.to_vec())
                };
                for _ in 0..count {
                    let name =
                        String::from_utf8(field(fields)?).map_err(|_| DecodeError::Invalid)?;
                    headers.push((name, field(fields)?));
                }
                let len = fields.u32()?;
                let body = fields.take(len as usize)?.to_vec();
                Entry::Completed(StoredResponse {
                    status,
                    headers,
                    body,
                })
            }
            3 => Entry::Unreplayable { status },
            _ => return Err(DecodeError::Invalid),
        };
        Ok(IdempotencyRecord {
            owner,
            fingerprint,
            deadline,
            entry,
        })
    }
}
