//! What a claimed request's response looks like as it streams back, and whether it can be
//! stored for replay.

use super::config::IdempotencyConfig;
use super::policy::Outcome;
use super::record::{StoredResponse, HEADER_FRAMING_BYTES, MAX_STORED_HEADERS};
use crate::policy::Completion;

#[derive(Debug, Default)]
pub struct Capture {
    status: Option<u16>,
    /// The response is the upstream's (`response.code_details` is `via_upstream`), not a local
    /// reply from this filter, a chained instance, or any other filter.
    from_upstream: bool,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    /// The response ended: its last body chunk, or its trailers.
    complete: bool,
    /// It cannot be stored: larger than `max_response_bytes`, a header too long for the
    /// record, or a gRPC response, whose trailers a local reply cannot carry. Only its status
    /// is kept, so a duplicate is refused rather than executed again.
    unstorable: bool,
}

impl Capture {
    /// Takes the response's status and the allow-listed headers among `headers`.
    pub fn headers(
        &mut self,
        config: &IdempotencyConfig,
        status: Option<u16>,
        from_upstream: bool,
        headers: &[(String, Vec<u8>)],
        end_of_stream: bool,
    ) {
        self.status = status;
        self.from_upstream = from_upstream;
        self.complete = end_of_stream;
        let grpc = headers
            .iter()
            .any(|(name, value)| name == "content-type" && value.starts_with(b"application/grpc"));
        self.headers = headers
            .iter()
            .filter(|(name, _)| config.stored_headers.contains(name))
            .cloned()
            .collect();
        let fits = self.headers.len() <= MAX_STORED_HEADERS
            && self
                .headers
                .iter()
                .all(|(_, value)| value.len() <= usize::from(u16::MAX));
        if grpc || !fits {
            self.give_up();
        } else {
            self.check_size(config);
        }
    }

    pub fn body(&mut self, config: &IdempotencyConfig, chunk: &[u8], end_of_stream: bool) {
        if !self.unstorable {
            self.body.extend_from_slice(chunk);
            self.check_size(config);
        }
        self.complete |= end_of_stream;
    }

    /// The response ended with trailers. They are not stored: a replay is a local reply, which
    /// has none (a gRPC response, which needs them, was already marked unstorable).
    pub fn trailers(&mut self) {
        self.complete = true;
    }

    /// How the claimed request ended, for the record.
    pub fn outcome(self, completion: &Completion) -> Outcome {
        // A gRPC call's status is 200 whatever happened: judge it by its grpc-status.
        let status = self
            .status
            .map(|status| completion.grpc_status.map_or(status, |g| g.http_status()));
        match status.filter(|_| self.from_upstream) {
            None if completion.may_have_reached_upstream() => Outcome::Unanswered,
            None => Outcome::NotSent,
            Some(status) if self.unstorable || !self.complete => {
                Outcome::ResponseNotStored { status }
            }
            Some(status) => Outcome::Response(StoredResponse {
                status,
                headers: self.headers,
                body: self.body,
            }),
        }
    }

    fn check_size(&mut self, config: &IdempotencyConfig) {
        let size = self
            .headers
            .iter()
            .map(|(name, value)| name.len() + value.len() + HEADER_FRAMING_BYTES)
            .sum::<usize>()
            .saturating_add(self.body.len());
        if size > config.max_response_bytes {
            self.give_up();
        }
    }

    fn give_up(&mut self) {
        self.unstorable = true;
        self.headers = Vec::new();
        self.body = Vec::new();
    }
}
