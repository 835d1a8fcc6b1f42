//! The proxy-wasm hostcalls the filter makes, each returning the host's status.
//!
//! A panic is a Wasm trap, which takes the worker's VM (and every later request on that
//! worker) down; the SDK's wrappers (proxy-wasm 0.2.5) panic on any status they do not expect,
//! and its `String` getters unwrap UTF-8. These never panic: header values and bodies are
//! bytes, and every failure is a `Status` the caller decides about. The entry points Envoy
//! calls are ours too ([`super::exports`]).

use super::tally::{count, Call};
use crate::clock::Instant;
use crate::reply::Reply;
use crate::telemetry::{Level, MetricKind};
use std::ptr::{null, null_mut};
use std::time::Duration;

/// A proxy-wasm status other than `Ok`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status(pub u32);

pub const NOT_FOUND: Status = Status(1);
pub const CAS_MISMATCH: Status = Status(8);

/// A header map, by the ABI's number for it.
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Map {
    Request = 0,
    Response = 2,
    ResponseTrailers = 3,
    /// The answer to a call the filter dispatched.
    CallResponse = 6,
}

#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Buffer {
    RequestBody = 0,
    ResponseBody = 1,
    HttpCallResponseBody = 4,
    PluginConfiguration = 7,
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_add_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_http_call(
        upstream_data: *const u8,
        upstream_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        body_data: *const u8,
        body_size: usize,
        trailers_data: *const u8,
        trailers_size: usize,
        timeout_milliseconds: u32,
        return_token: *mut u32,
    ) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
}

fn check(status: u32) -> Result<(), Status> {
    match status {
        0 => Ok(()),
        other => Err(Status(other)),
    }
}

/// Takes ownership of bytes the host wrote into memory it allocated through
/// [`super::exports::proxy_on_memory_allocate`] (a `Vec<u8>` of exactly `size`).
///
/// # Safety
/// `data` must be null or such an allocation of `size` bytes, owned by no one else.
unsafe fn take(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, size, size)
    }
}

pub fn log(level: Level, message: &str) {
    let level = match level {
        Level::Debug => 1,
        Level::Info => 2,
        Level::Warn => 3,
        Level::Error => 4,
    };
    count(Call::Log);
    // Nothing to do if logging fails.
    let _ = unsafe { proxy_log(level, message.as_ptr(), message.len()) };
}

/// Envoy's wall clock, shared by all workers; it may step backwards, which the core absorbs.
pub fn now() -> Instant {
    count(Call::Now);
    let mut nanos = 0;
    let _ = unsafe { proxy_get_current_time_nanoseconds(&mut nanos) };
    Instant::from_nanos(nanos)
}

pub fn set_tick_period(period: Duration) -> Result<(), Status> {
    count(Call::SetTickPeriod);
    let millis = u32::try_from(period.as_millis()).unwrap_or(u32::MAX);
    check(unsafe { proxy_set_tick_period_milliseconds(millis) })
}

/// Up to `max` bytes of a buffer, from its start.
pub fn buffer(buffer: Buffer, max: usize) -> Result<Vec<u8>, Status> {
    count(Call::Buffer);
    let (mut data, mut size) = (null_mut(), 0);
    check(unsafe { proxy_get_buffer_bytes(buffer as u32, 0, max, &mut data, &mut size) })?;
    Ok(unsafe { take(data, size) })
}

pub fn header(map: Map, name: &str) -> Result<Option<Vec<u8>>, Status> {
    count(Call::Header);
    let (mut data, mut size) = (null_mut(), 0);
    let status = unsafe {
        proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), &mut data, &mut size)
    };
    match check(status) {
        Ok(()) => Ok(Some(unsafe { take(data, size) })),
        Err(NOT_FOUND) => Ok(None),
        Err(other) => Err(other),
    }
}

/// Every header of a map; names are tokens (ASCII), values any bytes.
pub fn headers(map: Map) -> Result<Vec<(String, Vec<u8>)>, Status> {
    headers_named(map, |_| true)
}

/// The lines of a map whose names `wanted` picks, in order: the others are never copied.
pub fn headers_named(
    map: Map,
    wanted: impl Fn(&[u8]) -> bool,
) -> Result<Vec<(String, Vec<u8>)>, Status> {
    count(Call::Headers);
    let (mut data, mut size) = (null_mut(), 0);
    check(unsafe { proxy_get_header_map_pairs(map as u32, &mut data, &mut size) })?;
    let bytes = unsafe { take(data, size) };
    Ok(parse_pairs(&bytes, wanted).unwrap_or_default())
}

/// The host's serialized map: a count, then a (name length, value length) pair per entry, then
/// each name and value followed by a NUL. `None` if the bytes do not add up.
fn parse_pairs(bytes: &[u8], wanted: impl Fn(&[u8]) -> bool) -> Option<Vec<(String, Vec<u8>)>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let u32_at = |at: usize| -> Option<usize> {
        let field = bytes.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes(field.try_into().ok()?) as usize)
    };
    let count = u32_at(0)?;
    let mut data = count.checked_mul(8)?.checked_add(4)?;
    let mut pairs = Vec::with_capacity(count.min(bytes.len() / 8));
    for i in 0..count {
        let name_len = u32_at(4 + i * 8)?;
        let value_len = u32_at(8 + i * 8)?;
        let name = bytes.get(data..data.checked_add(name_len)?)?;
        data = data.checked_add(name_len)?.checked_add(1)?;
        let value = bytes.get(data..data.checked_add(value_len)?)?;
        data = data.checked_add(value_len)?.checked_add(1)?;
        if wanted(name) {
            pairs.push((String::from_utf8_lossy(name).into_owned(), value.to_vec()));
        }
    }
    Some(pairs)
}

/// The host's serialized map, for headers we send.
fn serialize_pairs(pairs: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (name, value) in pairs {
        bytes.extend_from_slice(&(name.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&(value.len() as u32).to_le_bytes());
    }
    for (name, value) in pairs {
        bytes.extend_from_slice(name.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(value);
        bytes.push(0);
    }
    bytes
}

pub fn add_header(map: Map, name: &str, value: &[u8]) -> Result<(), Status> {
    count(Call::AddHeader);
    check(unsafe {
        proxy_add_header_map_value(
            map as u32,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

/// Removes every line of a header.
pub fn remove_header(map: Map, name: &str) -> Result<(), Status> {
    count(Call::RemoveHeader);
    check(unsafe { proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()) })
}

/// A stream or plugin attribute, e.g. `["source", "address"]`.
pub fn property(path: &[&str]) -> Result<Option<Vec<u8>>, Status> {
    count(Call::Property);
    let serialized = path.join("\0");
    let (mut data, mut size) = (null_mut(), 0);
    let status =
        unsafe { proxy_get_property(serialized.as_ptr(), serialized.len(), &mut data, &mut size) };
    match check(status) {
        Ok(()) => Ok(Some(unsafe { take(data, size) })),
        Err(NOT_FOUND) => Ok(None),
        Err(other) => Err(other),
    }
}

/// Sets the stream's filter state `wasm.<key>` (bytes, for access logs' `%FILTER_STATE%` and
/// later filters); it lives as long as the stream.
pub fn set_filter_state(key: &str, value: &[u8]) -> Result<(), Status> {
    count(Call::SetProperty);
    check(unsafe { proxy_set_property(key.as_ptr(), key.len(), value.as_ptr(), value.len()) })
}

/// An integer attribute (Envoy passes them as 8 little-endian bytes).
pub fn int_property(path: &[&str]) -> Option<u64> {
    let bytes = property(path).ok()??;
    Some(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?))
}

/// A shared-data value and its version; `None` when the key is missing.
pub fn get_shared_data(key: &str) -> Result<Option<(Vec<u8>, u32)>, Status> {
    count(Call::GetSharedData);
    let (mut data, mut size, mut version) = (null_mut(), 0, 0);
    let status = unsafe {
        proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut version)
    };
    match check(status) {
        Ok(()) => Ok(Some((unsafe { take(data, size) }, version))),
        Err(NOT_FOUND) => Ok(None),
        Err(other) => Err(other),
    }
}

/// Writes a shared-data value; `cas` 0 writes unconditionally.
pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
    count(Call::SetSharedData);
    check(unsafe {
        proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
    })
}

pub fn send_local_response(reply: &Reply) -> Result<(), Status> {
    count(Call::SendLocalResponse);
    let headers = serialize_pairs(&reply.headers);
    check(unsafe {
        proxy_send_local_response(
            u32::from(reply.status),
            reply.details.as_ptr(),
            reply.details.len(),
            if reply.body.is_empty() {
                null()
            } else {
                reply.body.as_ptr()
            },
            reply.body.len(),
            headers.as_ptr(),
            headers.len(),
            // Without one, Envoy derives a gRPC call's status from the HTTP status.
            reply
                .grpc_status
                .map_or(-1, |status| i32::from(status.code())),
        )
    })
}

/// Lets a request the filter paused go on (`proxy_continue_stream` of the request stream).
pub fn continue_request() -> Result<(), Status> {
    count(Call::ContinueRequest);
    check(unsafe { proxy_continue_stream(0) })
}

/// Sends an HTTP call to `cluster`; its answer comes to `proxy_on_http_call_response` with
/// the returned token.
pub fn http_call(
    cluster: &str,
    headers: &[(String, Vec<u8>)],
    body: &[u8],
    timeout: Duration,
) -> Result<u32, Status> {
    count(Call::DispatchHttp);
    let headers = serialize_pairs(headers);
    let trailers = serialize_pairs(&[]);
    let mut token = 0;
    check(unsafe {
        proxy_http_call(
            cluster.as_ptr(),
            cluster.len(),
            headers.as_ptr(),
            headers.len(),
            body.as_ptr(),
            body.len(),
            trailers.as_ptr(),
            trailers.len(),
            u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
            &mut token,
        )
    })?;
    Ok(token)
}

/// Makes a later hostcall act on stream `context_id` (from a timer, outside its callbacks).
pub fn set_effective_context(context_id: u32) -> Result<(), Status> {
    count(Call::SetEffectiveContext);
    check(unsafe { proxy_set_effective_context(context_id) })
}

pub fn define_metric(kind: MetricKind, name: &str) -> Result<u32, Status> {
    count(Call::DefineMetric);
    let kind = match kind {
        MetricKind::Counter => 0,
        MetricKind::Gauge => 1,
    };
    let mut id = 0;
    check(unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

pub fn increment_metric(id: u32, offset: i64) -> Result<(), Status> {
    count(Call::IncrementMetric);
    check(unsafe { proxy_increment_metric(id, offset) })
}

pub fn record_metric(id: u32, value: u64) -> Result<(), Status> {
    count(Call::RecordMetric);
    check(unsafe { proxy_record_metric(id, value) })
}
