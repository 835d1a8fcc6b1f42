//! Counts of the hostcalls the filter makes and of Envoy's callbacks into it, so that
//! `make bench` can trace a request's cost to its calls. Only a build with the `host-calls`
//! feature counts (and reports the counts as `resilience.host_calls.<call>` counters at the
//! end of every stream); in any other build [`count`] is nothing.

/// A hostcall, or a callback Envoy makes into the VM.
#[derive(Clone, Copy)]
pub enum Call {
    Log,
    Now,
    SetTickPeriod,
    Buffer,
    Header,
    Headers,
    AddHeader,
    RemoveHeader,
    Property,
    SetProperty,
    GetSharedData,
    SetSharedData,
    SendLocalResponse,
    ContinueRequest,
    SetEffectiveContext,
    DefineMetric,
    IncrementMetric,
    RecordMetric,
    DispatchHttp,
    OnContextCreate,
    OnRequestHeaders,
    OnRequestBody,
    OnRequestTrailers,
    OnResponseHeaders,
    OnResponseBody,
    OnResponseTrailers,
    OnLog,
}

/// Metric names, in [`Call`] order.
#[cfg(feature = "host-calls")]
const NAMES: [&str; 27] = [
    "log",
    "now",
    "set_tick_period",
    "buffer",
    "header",
    "headers",
    "add_header",
    "remove_header",
    "property",
    "set_property",
    "get_shared_data",
    "set_shared_data",
    "send_local_response",
    "continue_request",
    "set_effective_context",
    "define_metric",
    "increment_metric",
    "record_metric",
    "dispatch_http_call",
    "on_context_create",
    "on_request_headers",
    "on_request_body",
    "on_request_trailers",
    "on_response_headers",
    "on_response_body",
    "on_response_trailers",
    "on_log",
];

#[cfg(feature = "host-calls")]
thread_local! {
    /// Per call, in [`Call`] order: how many since the last report.
    static COUNTS: std::cell::RefCell<[u64; 27]> = const { std::cell::RefCell::new([0; 27]) };
    /// Per call: its counter's id, once defined.
    static METRICS: std::cell::RefCell<[Option<u32>; 27]> =
        const { std::cell::RefCell::new([None; 27]) };
}

#[inline]
pub fn count(call: Call) {
    #[cfg(feature = "host-calls")]
    COUNTS.with(|counts| {
        if let Some(n) = counts.borrow_mut().get_mut(call as usize) {
            *n += 1;
        }
    });
    #[cfg(not(feature = "host-calls"))]
    let _ = call;
}

/// Adds what was counted to the counters. The report's own hostcalls are then forgotten:
/// they exist only in this build.
#[cfg(feature = "host-calls")]
pub fn report() {
    let counted = COUNTS.with(|counts| std::mem::take(&mut *counts.borrow_mut()));
    METRICS.with(|metrics| {
        let mut metrics = metrics.borrow_mut();
        for ((n, name), id) in counted.iter().zip(NAMES).zip(metrics.iter_mut()) {
            if *n == 0 {
                continue;
            }
            if id.is_none() {
                let full = format!("resilience.host_calls.{name}");
                *id = super::abi::define_metric(crate::telemetry::MetricKind::Counter, &full).ok();
            }
            if let Some(id) = id {
                let _ = super::abi::increment_metric(*id, i64::try_from(*n).unwrap_or(i64::MAX));
            }
        }
    });
    COUNTS.with(|counts| *counts.borrow_mut() = [0; 27]);
}
