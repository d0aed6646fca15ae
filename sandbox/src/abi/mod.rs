//! Guest ABI v1 (DESIGN §2): the names and version this host speaks, the
//! calling convention `policy` drives (`call`), and `memory`, the only code
//! that turns guest `(ptr, len)` pairs into bytes. A leaf of the host side:
//! `host`, `wasi`, `bridge` and `policy` import it; it imports none of them.

pub mod call;
pub mod memory;

pub use call::validate;
pub use memory::AbiViolation;

/// The ABI version this host speaks.
pub const ABI_VERSION: i32 = 1;
/// The host import module.
pub const MODULE: &str = "sandgate";
/// The import module of WASI preview 1, the only other one a guest may import.
pub const WASI_MODULE: &str = "wasi_snapshot_preview1";

/// Longest guest log message kept; longer ones are truncated.
pub const MAX_LOG_BYTES: usize = 16 * 1024;
/// Guest log calls per evaluation that become span events.
pub const MAX_LOG_CALLS: u32 = 256;

/// Imports of module `sandgate` this host provides.
pub const IMPORTS: [&str; 3] = ["log", "http_send", "http_read"];
