//! The config parser and resolver: any TOML text yields a `Config` or an
//! error naming the file, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A directory that does not exist: relative paths resolve under it and
    // nothing on this machine is read through them.
    let path = Path::new("/nonexistent/sandgate-fuzz/sandgate.toml");
    if let Err(error) = sandgate::config::parse(text, path) {
        assert!(!error.to_string().is_empty());
    }
});
