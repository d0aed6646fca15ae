//! The raw `sandgate` imports of ABI v1 and their host-build stand-ins. The only place the SDK
//! hands guest pointers to the host; [`crate::log`] and [`crate::http`] call it.
//!
//! A guest imports only what it calls: the linker drops the imports of unused functions, so a
//! policy that never logs has no `sandgate.log` import.

#[cfg(target_arch = "wasm32")]
mod raw {
    #[link(wasm_import_module = "sandgate")]
    unsafe extern "C" {
        pub fn log(level: i32, ptr: *const u8, len: usize);
        pub fn http_send(ptr: *const u8, len: usize) -> i64;
        pub fn http_read(ptr: *mut u8, len: usize) -> i32;
    }
}

/// Hands one log line to the host.
#[cfg(target_arch = "wasm32")]
pub(crate) fn log(level: i32, message: &str) {
    // SAFETY: the host reads `len` bytes at `ptr` during the call; `message` is borrowed for
    // the whole call, so the range is initialised and stays alive.
    unsafe { raw::log(level, message.as_ptr(), message.len()) }
}

/// Host builds have no sandbox: log lines go to stderr (captured by the test harness).
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn log(level: i32, message: &str) {
    eprintln!("sandgate-guest log level={level}: {message}");
}

/// Sends an HttpRequest document through the bridge and returns the HttpResponse document, or
/// the negative status code of `http_send`/`http_read`.
#[cfg(target_arch = "wasm32")]
pub(crate) fn http_exchange(request: &[u8]) -> Result<Vec<u8>, i64> {
    // SAFETY: the host reads `len` bytes at `ptr` during the call; `request` is borrowed for the
    // whole call.
    let pending = unsafe { raw::http_send(request.as_ptr(), request.len()) };
    if pending < 0 {
        return Err(pending);
    }
    // A length that does not fit the guest's address space cannot be read: too large.
    let Ok(len) = usize::try_from(pending) else {
        return Err(-4);
    };
    let mut response = vec![0_u8; len];
    // SAFETY: `response` owns `len` initialised, writable bytes at its pointer, and nothing else
    // refers to them while the host writes at most `len` bytes there.
    let copied = unsafe { raw::http_read(response.as_mut_ptr(), response.len()) };
    if copied < 0 {
        return Err(i64::from(copied));
    }
    response.truncate(usize::try_from(copied).unwrap_or(0));
    Ok(response)
}
