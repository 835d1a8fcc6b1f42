//! The entry points Envoy calls (proxy-wasm ABI 0.2.1), and which context each call is for.
//!
//! Written here rather than taken from the SDK, whose dispatcher panics on any id it does not
//! know and whose call wrapper panics on a status it does not expect: a panic is a trap, and a
//! trap takes down the VM of a whole worker. Here an id nobody knows is a call that does
//! nothing, and a context already busy (a call back into the VM while one of its callbacks
//! runs, which Envoy does not make) lets its stream go on rather than trapping.

use super::{abi, Root, Stream};
use crate::telemetry::Level;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// What a stream callback tells Envoy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Action {
    Continue = 0,
    Pause = 1,
}

thread_local! {
    static ROOTS: RefCell<HashMap<u32, Rc<RefCell<Root>>>> = RefCell::new(HashMap::new());
    static STREAMS: RefCell<HashMap<u32, Rc<Stream>>> = RefCell::new(HashMap::new());
    /// The context each call in flight was sent for, by token.
    static CALLS: RefCell<HashMap<u32, u32>> = RefCell::new(HashMap::new());
    static UNKNOWN_ROOT_LOGGED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The answer to call `token` goes to context `context`.
pub fn calls_back(token: u32, context: u32) {
    CALLS.with(|calls| {
        if let Ok(mut calls) = calls.try_borrow_mut() {
            calls.insert(token, context);
        }
    });
}

fn root(context_id: u32) -> Option<Rc<RefCell<Root>>> {
    ROOTS.with(|roots| roots.try_borrow().ok()?.get(&context_id).cloned())
}

fn stream(context_id: u32) -> Option<Rc<Stream>> {
    STREAMS.with(|streams| streams.try_borrow().ok()?.get(&context_id).cloned())
}

/// Runs `callback` on root `context_id`, or returns `otherwise`.
fn with_root<R>(context_id: u32, otherwise: R, callback: impl FnOnce(&mut Root) -> R) -> R {
    match root(context_id) {
        Some(root) => match root.try_borrow_mut() {
            Ok(mut root) => callback(&mut root),
            Err(_) => otherwise,
        },
        None => otherwise,
    }
}

/// Runs `callback` on stream `context_id`; an unknown stream goes on.
fn with_stream(context_id: u32, callback: impl FnOnce(&Stream) -> Action) -> u32 {
    stream(context_id).map_or(Action::Continue, |stream| callback(&stream)) as u32
}

extern "C" {
    /// WASI's constructors (the runtime's own set-up); a reactor module runs them itself.
    fn __wasm_call_ctors();
}

#[no_mangle]
pub extern "C" fn _initialize() {
    unsafe { __wasm_call_ctors() };
    // None is expected: should one happen, Envoy's log says where before the trap.
    std::panic::set_hook(Box::new(|panic| {
        abi::log(Level::Error, &format!("resilience filter: {panic}"));
    }));
}

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// Memory the host fills for the VM: exactly `size` bytes, laid out as a `Vec<u8>` of that
/// capacity, which [`abi`] takes back. Memory that cannot be had is a null pointer (the
/// hostcall then fails), not the trap `Vec::with_capacity` would make of it.
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    match std::alloc::Layout::array::<u8>(size) {
        Ok(_) if size == 0 => std::ptr::NonNull::dangling().as_ptr(),
        Ok(layout) => unsafe { std::alloc::alloc(layout) },
        Err(_) => std::ptr::null_mut(),
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(context_id: u32, root_context_id: u32) {
    if root_context_id == 0 {
        let root = Root {
            id: context_id,
            ..Root::default()
        };
        // Created once: a root Envoy starts again keeps its configurations and streams.
        ROOTS.with(|roots| {
            if let Ok(mut roots) = roots.try_borrow_mut() {
                roots
                    .entry(context_id)
                    .or_insert_with(|| Rc::new(RefCell::new(root)));
            }
        });
        return;
    }
    let stream = root(root_context_id).and_then(|root| {
        let root = root.try_borrow().ok()?;
        Some(root.create_http_context(context_id))
    });
    let Some(stream) = stream else {
        // Its requests pass without policies: said once, as it would be said for every one.
        if !UNKNOWN_ROOT_LOGGED.replace(true) {
            abi::log(
                Level::Error,
                &format!("resilience filter: stream {context_id} of root context {root_context_id}, which this VM does not have: its requests pass without policies"),
            );
        }
        return;
    };
    STREAMS.with(|streams| {
        if let Ok(mut streams) = streams.try_borrow_mut() {
            streams.insert(context_id, Rc::new(stream));
        }
    });
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_context_id: u32, _vm_configuration_size: usize) -> bool {
    true
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(context_id: u32, plugin_configuration_size: usize) -> bool {
    with_root(context_id, false, |root| {
        root.on_configure(plugin_configuration_size)
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_tick(context_id: u32) {
    with_root(context_id, (), Root::on_tick);
}

#[no_mangle]
pub extern "C" fn proxy_on_done(context_id: u32) -> bool {
    with_root(context_id, true, Root::on_done)
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(context_id: u32) {
    STREAMS.with(|streams| {
        if let Ok(mut streams) = streams.try_borrow_mut() {
            streams.remove(&context_id);
        }
    });
    ROOTS.with(|roots| {
        if let Ok(mut roots) = roots.try_borrow_mut() {
            roots.remove(&context_id);
        }
    });
    // Envoy cancels the calls of a context it deletes: their answers never come.
    CALLS.with(|calls| {
        if let Ok(mut calls) = calls.try_borrow_mut() {
            calls.retain(|_, context| *context != context_id);
        }
    });
}

#[no_mangle]
pub extern "C" fn proxy_on_log(context_id: u32) {
    if let Some(stream) = stream(context_id) {
        stream.on_log();
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(
    context_id: u32,
    num_headers: usize,
    end_of_stream: bool,
) -> u32 {
    with_stream(context_id, |stream| {
        stream.on_http_request_headers(num_headers, end_of_stream)
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_request_body(
    context_id: u32,
    body_size: usize,
    end_of_stream: bool,
) -> u32 {
    with_stream(context_id, |stream| {
        stream.on_http_request_body(body_size, end_of_stream)
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_request_trailers(context_id: u32, num_trailers: usize) -> u32 {
    with_stream(context_id, |stream| {
        stream.on_http_request_trailers(num_trailers)
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(
    context_id: u32,
    num_headers: usize,
    end_of_stream: bool,
) -> u32 {
    with_stream(context_id, |stream| {
        stream.on_http_response_headers(num_headers, end_of_stream)
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_response_body(
    context_id: u32,
    body_size: usize,
    end_of_stream: bool,
) -> u32 {
    with_stream(context_id, |stream| {
        stream.on_http_response_body(body_size, end_of_stream)
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_response_trailers(context_id: u32, num_trailers: usize) -> u32 {
    with_stream(context_id, |stream| {
        stream.on_http_response_trailers(num_trailers)
    })
}

/// The answer to a call: it goes to the context that sent it, in that context.
#[no_mangle]
pub extern "C" fn proxy_on_http_call_response(
    _context_id: u32,
    token: u32,
    num_headers: usize,
    body_size: usize,
    num_trailers: usize,
) {
    let Some(context_id) = CALLS.with(|calls| calls.try_borrow_mut().ok()?.remove(&token)) else {
        return;
    };
    if abi::set_effective_context(context_id).is_err() {
        return;
    }
    if let Some(stream) = stream(context_id) {
        stream.on_http_call_response(token, num_headers, body_size, num_trailers);
    } else {
        with_root(context_id, (), |root| {
            root.on_http_call_response(token, num_headers, body_size, num_trailers);
        });
    }
}
