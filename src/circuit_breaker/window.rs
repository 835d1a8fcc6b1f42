//! Sliding windows of call outcomes, compact enough to live in one shared-data value.
//!
//! Count-based: the last K calls exactly, as two K-bit rings (failed, slow). Time-based: the
//! last T split into ten buckets of T/10, so the window slides in steps of T/10 and counts
//! between 0.9·T and T of history.

use crate::clock::Instant;
use crate::store::{DecodeError, Reader};

pub const TIME_BUCKETS: usize = 10;
pub const MAX_CALLS: u16 = 1000;

/// The window a breaker is configured with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowSpec {
    /// No rate-based tripping: nothing to keep.
    None,
    Calls(u16),
    Time {
        bucket_ns: u64,
    },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub calls: u32,
    pub failures: u32,
    pub slow: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Window {
    None,
    Calls(CallWindow),
    Time(TimeWindow),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallWindow {
    size: u16,
    /// Where the next outcome goes.
    next: u16,
    /// Outcomes held, up to `size`.
    len: u16,
    failed: Vec<u8>,
    slow: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeWindow {
    bucket_ns: u64,
    buckets: Box<[TimeBucket; TIME_BUCKETS]>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct TimeBucket {
    /// `now / bucket_ns` of the period this bucket counts.
    period: u64,
    calls: u32,
    failures: u32,
    slow: u32,
}

impl Window {
    pub fn new(spec: WindowSpec) -> Window {
        match spec {
            WindowSpec::None => Window::None,
            WindowSpec::Calls(size) => {
                let bytes = usize::from(size).div_ceil(8);
                Window::Calls(CallWindow {
                    size,
                    next: 0,
                    len: 0,
                    failed: vec![0; bytes],
                    slow: vec![0; bytes],
                })
            }
            WindowSpec::Time { bucket_ns } => Window::Time(TimeWindow {
                bucket_ns,
                buckets: Box::new([TimeBucket::default(); TIME_BUCKETS]),
            }),
        }
    }

    pub fn spec(&self) -> WindowSpec {
        match self {
            Window::None => WindowSpec::None,
            Window::Calls(w) => WindowSpec::Calls(w.size),
            Window::Time(w) => WindowSpec::Time {
                bucket_ns: w.bucket_ns,
            },
        }
    }

    pub fn record(&mut self, now: Instant, failed: bool, slow: bool) {
        match self {
            Window::None => {}
            Window::Calls(w) => {
                let (byte, bit) = (usize::from(w.next) / 8, 1u8 << (w.next % 8));
                for (ring, set) in [(&mut w.failed, failed), (&mut w.slow, slow)] {
                    if let Some(byte) = ring.get_mut(byte) {
                        *byte = if set { *byte | bit } else { *byte & !bit };
                    }
                }
                w.next = (w.next + 1) % w.size.max(1);
                w.len = (w.len + 1).min(w.size);
            }
            Window::Time(w) => {
                let period = now.as_nanos() / w.bucket_ns.max(1);
                let bucket = &mut w.buckets[(period % TIME_BUCKETS as u64) as usize];
                if bucket.period != period {
                    *bucket = TimeBucket {
                        period,
                        ..TimeBucket::default()
                    };
                }
                bucket.calls = bucket.calls.saturating_add(1);
                bucket.failures = bucket.failures.saturating_add(u32::from(failed));
                bucket.slow = bucket.slow.saturating_add(u32::from(slow));
            }
        }
    }

    pub fn totals(&self, now: Instant) -> Totals {
        match self {
            Window::None => Totals::default(),
            Window::Calls(w) => {
                let count = |ring: &[u8]| ring.iter().map(|b| b.count_ones()).sum();
                Totals {
                    calls: u32::from(w.len),
                    failures: count(&w.failed),
                    slow: count(&w.slow),
                }
            }
            Window::Time(w) => {
                let period = now.as_nanos() / w.bucket_ns.max(1);
                let oldest = period.saturating_sub(TIME_BUCKETS as u64 - 1);
                // Buckets from a future period (the clock stepped back) are left out.
                w.buckets
                    .iter()
                    .filter(|b| b.calls > 0 && (oldest..=period).contains(&b.period))
                    .fold(Totals::default(), |t, b| Totals {
                        calls: t.calls.saturating_add(b.calls),
                        failures: t.failures.saturating_add(b.failures),
                        slow: t.slow.saturating_add(b.slow),
                    })
            }
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Window::None => out.push(0),
            Window::Calls(w) => {
                out.push(1);
                for n in [w.size, w.next, w.len] {
                    out.extend_from_slice(&n.to_le_bytes());
                }
                out.extend_from_slice(&w.failed);
                out.extend_from_slice(&w.slow);
            }
            Window::Time(w) => {
                out.push(2);
                out.extend_from_slice(&w.bucket_ns.to_le_bytes());
                for b in w.buckets.iter() {
                    out.extend_from_slice(&b.period.to_le_bytes());
                    for n in [b.calls, b.failures, b.slow] {
                        out.extend_from_slice(&n.to_le_bytes());
                    }
                }
            }
        }
    }

    pub fn decode(fields: &mut Reader<'_>) -> Result<Window, DecodeError> {
        match fields.u8()? {
            0 => Ok(Window::None),
            1 => {
                let size = u16::from_le_bytes(fields.bytes()?);
                let next = u16::from_le_bytes(fields.bytes()?);
                let len = u16::from_le_bytes(fields.bytes()?);
                if size == 0 || size > MAX_CALLS || next >= size || len > size {
                    return Err(DecodeError::Invalid);
                }
                let bytes = usize::from(size).div_ceil(8);
                let mut ring = || {
                    (0..bytes)
                        .map(|_| fields.u8())
                        .collect::<Result<Vec<u8>, _>>()
                };
                let failed = ring()?;
                let slow = ring()?;
                Ok(Window::Calls(CallWindow {
                    size,
                    next,
                    len,
                    failed,
                    slow,
                }))
            }
            2 => {
                let bucket_ns = fields.u64()?;
                let mut buckets = Box::new([TimeBucket::default(); TIME_BUCKETS]);
                for b in buckets.iter_mut() {
                    *b = TimeBucket {
                        period: fields.u64()?,
                        calls: fields.u32()?,
                        failures: fields.u32()?,
                        slow: fields.u32()?,
                    };
                }
                Ok(Window::Time(TimeWindow { bucket_ns, buckets }))
            }
            _ => Err(DecodeError::Invalid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const T0: Instant = Instant::from_nanos(1_000_000_000_000);

    fn at(ms: u64) -> Instant {
        T0.saturating_add(Duration::from_millis(ms))
    }

    #[test]
    fn a_call_window_holds_exactly_the_last_k_outcomes() {
        let mut w = Window::new(WindowSpec::Calls(10));
        for i in 0..10 {
            w.record(T0, i < 4, i == 9);
        }
        assert_eq!(
            w.totals(T0),
            Totals {
                calls: 10,
                failures: 4,
                slow: 1
            }
        );
        for _ in 0..3 {
            w.record(T0, false, false);
        }
        assert_eq!(
            w.totals(T0),
            Totals {
                calls: 10,
                failures: 1,
                slow: 1
            },
            "3 oldest failures pushed out"
        );
        for _ in 0..10 {
            w.record(T0, true, false);
        }
        assert_eq!(
            w.totals(T0),
            Totals {
                calls: 10,
                failures: 10,
                slow: 0
            }
        );
    }

    #[test]
    fn a_time_window_forgets_what_is_older_than_its_span() {
        let mut w = Window::new(WindowSpec::Time {
            bucket_ns: 1_000_000_000,
        }); // 10 s span
        w.record(at(0), true, false);
        w.record(at(5_000), false, true);
        assert_eq!(
            w.totals(at(9_999)),
            Totals {
                calls: 2,
                failures: 1,
                slow: 1
            }
        );
        assert_eq!(w.totals(at(10_000)).calls, 1, "the first second slid out");
        assert_eq!(w.totals(at(15_000)), Totals::default());
        w.record(at(20_000), true, true);
        assert_eq!(
            w.totals(at(20_000)),
            Totals {
                calls: 1,
                failures: 1,
                slow: 1
            },
            "reused bucket was reset"
        );
    }

    #[test]
    fn a_clock_stepping_back_does_not_count_the_future() {
        let mut w = Window::new(WindowSpec::Time {
            bucket_ns: 1_000_000_000,
        });
        w.record(at(50_000), true, false);
        assert_eq!(w.totals(at(1_000)), Totals::default());
    }

    #[test]
    fn windows_round_trip_and_refuse_nonsense() {
        let mut calls = Window::new(WindowSpec::Calls(13));
        calls.record(T0, true, false);
        let mut time = Window::new(WindowSpec::Time { bucket_ns: 7 });
        time.record(T0, false, true);
        for w in [Window::None, calls, time] {
            let mut bytes = Vec::new();
            w.encode(&mut bytes);
            let mut reader = crate::store::Reader::new(&bytes);
            assert_eq!(Window::decode(&mut reader), Ok(w));
        }
        for bad in [
            &[9u8][..],
            &[1, 0, 0, 0, 0, 0, 0],
            &[1, 5, 0, 7, 0, 0, 0, 0, 0],
        ] {
            assert!(Window::decode(&mut crate::store::Reader::new(bad)).is_err());
        }
    }
}
