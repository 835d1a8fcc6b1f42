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
    /// Executed, but the response was too large (or ended too early) to store.
    Unreplayable { status: u16 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
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

const MAX_HEADERS: usize = 64;

impl Record for IdempotencyRecord {
    const FORMAT: u8 = 0x41;

    fn encode_fields(&self, out: &mut Vec<u8>) {
        if self.entry == Entry::Free {
            out.push(0);
            return;
        }
        let (kind, claim, status) = match &self.entry {
            Entry::Free => (0, 0, 0),
            Entry::InFlight { claim } => (1, *claim, 0),
            Entry::Completed(response) => (2, 0, response.status),
            Entry::Unreplayable { status } => (3, 0, *status),
        };
        out.push(kind);
        out.extend_from_slice(&self.owner.to_le_bytes());
        out.extend_from_slice(&self.fingerprint);
        out.extend_from_slice(&self.deadline.as_nanos().to_le_bytes());
        out.extend_from_slice(&claim.to_le_bytes());
        out.extend_from_slice(&status.to_le_bytes());
        if let Entry::Completed(response) = &self.entry {
            let headers = &response.headers[..response.headers.len().min(MAX_HEADERS)];
            out.push(headers.len() as u8);
            for (name, value) in headers {
                for text in [name, value] {
                    let bytes = &text.as_bytes()[..text.len().min(u16::MAX as usize)];
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
                let text = |fields: &mut Reader<'_>| -> Result<String, DecodeError> {
                    let len = u16::from_le_bytes(fields.bytes()?);
                    let bytes = fields.take(usize::from(len))?;
                    String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Invalid)
                };
                for _ in 0..count {
                    headers.push((text(fields)?, text(fields)?));
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
