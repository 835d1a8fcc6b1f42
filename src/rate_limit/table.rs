//! Keyed buckets in a fixed-size table, so memory is set by configuration, not by traffic.
//!
//! Shared data has no delete: a key per client would grow Envoy's memory with every new
//! client, forever. Instead each rule owns `table_size` slots; a request's key is hashed
//! (SipHash-1-3 with a secret seed shared by all workers, so clients cannot aim at another
//! client's slot, see [`crate::hashing`]) to one slot and to an owner tag stored in it.
//!
//! Eviction: a slot held by another key whose bucket is **full** (its TAT has passed) is
//! taken over: a full idle bucket behaves exactly like no bucket, so nothing is lost. A slot
//! held by another key whose bucket is still refilling is **shared**: both keys draw from
//! the one bucket until it refills. Sharing can only make a key's limit stricter, never
//! looser, so no client ever gets more than its configured limit; the price is that two
//! clients active at once in the same slot share one budget.

use super::bucket::{Bucket, Check, Tat};
use crate::clock::Instant;
use crate::store::{DecodeError, Reader, Record};

/// The state of one slot: whose bucket it holds, and that bucket's TAT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub owner: u64,
    pub tat: Tat,
    /// The tick rate the TAT is counted in (the refill's tokens), so a changed refill reads it.
    pub ticks_per_ns: u64,
}

impl Record for Slot {
    const FORMAT: u8 = 0x13;

    fn encode_fields(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.owner.to_le_bytes());
        out.extend_from_slice(&self.tat.0.to_le_bytes());
        out.extend_from_slice(&self.ticks_per_ns.to_le_bytes());
    }

    fn decode_fields(fields: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Slot {
            owner: fields.u64()?,
            tat: Tat(u128::from_le_bytes(fields.bytes()?)),
            ticks_per_ns: fields.u64()?,
        })
    }
}

/// Decides a request against the slot's current state; see the module's eviction rule.
/// Returns the check, the owner the slot keeps, and the slot to write: after an admission,
/// or after a refusal that found a TAT a backwards clock step had left too far ahead.
pub fn admit(
    bucket: &Bucket,
    slot: Option<Slot>,
    owner: u64,
    now: Instant,
    cost: u64,
) -> (Check, u64, Option<Slot>) {
    let (holder, tat) = holding(bucket, slot, owner, now);
    let check = bucket.check(tat, now, cost);
    let repaired = tat.is_some_and(|tat| check.tat < tat);
    let next = (check.admitted || repaired).then_some(Slot {
        owner: holder,
        tat: check.tat,
        ticks_per_ns: bucket.ticks_per_ns(),
    });
    (check, holder, next)
}

/// Whose bucket a request of `owner` draws from, and its TAT in `bucket`'s ticks (`None`: a
/// full bucket of its own); see the module's eviction rule.
pub fn holding(
    bucket: &Bucket,
    slot: Option<Slot>,
    owner: u64,
    now: Instant,
) -> (u64, Option<Tat>) {
    let slot = slot.map(|slot| Slot {
        tat: bucket.rescale(slot.tat, slot.ticks_per_ns),
        ..slot
    });
    match slot {
        Some(slot) if slot.owner == owner => (owner, Some(slot.tat)),
        Some(slot) if slot.tat > bucket.ticks(now) => (slot.owner, Some(slot.tat)),
        _ => (owner, None),
    }
}

/// Gives `cost` back to the bucket `holder` drew from, if the slot still holds it.
pub fn refund(bucket: &Bucket, slot: Option<Slot>, holder: u64, cost: u64) -> Option<Slot> {
    slot.filter(|slot| slot.owner == holder).map(|slot| Slot {
        owner: holder,
        tat: bucket.refund(bucket.rescale(slot.tat, slot.ticks_per_ns), cost),
        ticks_per_ns: bucket.ticks_per_ns(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const NOW: Instant = Instant::from_nanos(1_000_000_000_000);

    fn bucket() -> Bucket {
        match Bucket::new(2, 1, Duration::from_secs(10)) {
            Some(b) => b,
            None => panic!(),
        }
    }

    #[test]
    fn a_key_keeps_its_own_bucket() {
        let (first, _, slot) = admit(&bucket(), None, 7, NOW, 1);
        let (second, _, slot) = admit(&bucket(), slot, 7, NOW, 1);
        let (third, _, _) = admit(&bucket(), slot, 7, NOW, 1);
        assert_eq!(
            (first.admitted, second.admitted, third.admitted),
            (true, true, false)
        );
    }

    #[test]
    fn a_full_bucket_of_another_key_is_reclaimed_without_loss() {
        let (_, _, slot) = admit(&bucket(), None, 7, NOW, 2);
        let refilled = NOW.saturating_add(Duration::from_secs(20));
        let (check, holder, next) = admit(&bucket(), slot, 8, refilled, 1);
        assert!(check.admitted);
        assert_eq!(check.remaining, 1, "key 8 starts with a full bucket");
        assert_eq!((holder, next.map(|s| s.owner)), (8, Some(8)));
    }

    #[test]
    fn a_refilling_bucket_of_another_key_is_shared_never_reset() {
        let (_, _, slot) = admit(&bucket(), None, 7, NOW, 2);
        let (check, holder, next) = admit(&bucket(), slot, 8, NOW, 1);
        assert!(!check.admitted, "key 8 may not reset key 7's empty bucket");
        assert_eq!((holder, next), (7, None));
    }

    #[test]
    fn a_refusal_repairs_a_tat_left_ahead_by_a_clock_step() {
        let (_, _, slot) = admit(&bucket(), None, 7, NOW, 2);
        let back = NOW.saturating_sub(Duration::from_secs(3600));
        let (check, _, next) = admit(&bucket(), slot, 7, back, 1);
        assert!(!check.admitted);
        assert_eq!(
            next.map(|s| s.tat),
            Some(bucket().ticks(back.saturating_add(Duration::from_secs(20))))
        );
        let (again, _, unchanged) = admit(&bucket(), next, 7, back, 1);
        assert!(!again.admitted);
        assert_eq!(unchanged, None, "an ordinary refusal writes nothing");
        let (later, _, _) = admit(
            &bucket(),
            next,
            7,
            back.saturating_add(Duration::from_secs(10)),
            1,
        );
        assert!(
            later.admitted,
            "a token came back 10 s after the step, not an hour"
        );
    }

    #[test]
    fn refund_only_touches_the_bucket_it_drew_from() {
        let (_, holder, slot) = admit(&bucket(), None, 7, NOW, 2);
        let refunded = refund(&bucket(), slot, holder, 1);
        assert_eq!(
            refunded.map(|s| bucket().check(Some(s.tat), NOW, 1).remaining),
            Some(0)
        );
        let taken_over = slot.map(|s| Slot { owner: 9, ..s });
        assert_eq!(refund(&bucket(), taken_over, holder, 1), None);
    }
}
