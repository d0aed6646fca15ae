//! Write sandgate policy guests in Rust: one function from a typed input to a [`Decision`],
//! registered with [`policy!`], which generates every export of guest ABI v1.
//!
//! ```
//! use sandgate_guest::{Decision, ForwardAuth, Input};
//!
//! /// Reads are open to everyone; anything else needs the admin role.
//! fn evaluate(input: Input<ForwardAuth>) -> Decision {
//!     let request = &input.input.request;
//!     let user = request.header("x-user").unwrap_or("anonymous");
//!     if request.method == "GET" || request.header("x-role") == Some("admin") {
//!         sandgate_guest::debug!("allowing {} {} for {user}", request.method, request.path);
//!         Decision::allow().header("x-user", user)
//!     } else {
//!         Decision::deny()
//!             .status(403)
//!             .reason(format!("{user} may not {} {}", request.method, request.path))
//!     }
//! }
//!
//! sandgate_guest::policy!(evaluate);
//!
//! # fn main() {
//! // On the host, the generated `sandgate_evaluate_document` runs the export's glue:
//! let output = sandgate_evaluate_document(
//!     br#"{"input":{"request":{"method":"DELETE","path":"/api/orders/7","headers":{"x-user":"bob"}}}}"#,
//! );
//! assert_eq!(
//!     output,
//!     br#"{"allow":false,"reason":"bob may not DELETE /api/orders/7","status":403}"#
//! );
//! # }
//! ```
//!
//! Build the crate as a `cdylib` with `cargo build --release --target wasm32-wasip1`; the module
//! exports `memory`, `sandgate_abi_version`, `sandgate_alloc` and `sandgate_evaluate`, and
//! imports from `sandgate` only what it calls ([`log`], [`http`]).
//!
//! Everything also compiles for the host, so policies are unit-tested natively: the raw
//! imports are replaced by harmless stand-ins there (log lines go to stderr, HTTP calls are
//! refused unless a test installs [`http::mock`]).

pub mod arena;
mod decision;
mod export;
pub mod files;
pub mod http;
mod input;
pub mod log;
mod sys;

pub use arena::DecisionArena;
pub use decision::Decision;
pub use export::{IntoDecision, evaluate_document};
pub use input::{Context, ForwardAuth, Input, Request, Source};

/// The guest ABI version this SDK implements, returned by the `sandgate_abi_version` export.
pub const ABI_VERSION: i32 = 1;

/// Registers the policy function and generates the ABI v1 exports.
///
/// `policy!(evaluate)` takes a function (or closure) `Input<T> -> R`, where `T` is any
/// `Deserialize` type (borrowing from the document is fine) and `R` is [`Decision`] or
/// `Result<Decision, E: Display>` (see [`IntoDecision`]). It generates, at the place of the call:
///
/// - `pub fn sandgate_evaluate_document(document: &[u8]) -> Vec<u8>`: the whole glue over byte
///   slices ([`evaluate_document`] with this policy), on every target, for host tests;
/// - on wasm32 only, the exports `sandgate_abi_version`, `sandgate_alloc` and
///   `sandgate_evaluate`.
///
/// Invoke it once per crate. An input the policy's type cannot read is denied with the reason,
/// and the output is allocated and leaked (a fresh instance serves each evaluation). The
/// generated exports are `unsafe` code, so the crate cannot `forbid(unsafe_code)`.
///
/// `policy!(evaluate, init = load)` also exports `sandgate_init`, which the host runs **once,
/// when the policy loads**: `load` is a `fn() -> Result<S, E: Display>` building the policy's
/// state (parse a data file from a preopen, compile rules, …), and `evaluate` then takes
/// `(Input<T>, &S)`. Every evaluation starts from the memory init left behind, so `S` is plain
/// Rust data, built once. `Err` refuses the load (`module_invalid`) with the error as the reason.
/// At init there is no clock and no randomness (so no `HashMap::new()`, whose hasher is random:
/// use `BTreeMap`); see the SDK guide. In host tests `sandgate_evaluate_document` runs `load`
/// on first use.
///
/// ```
/// use sandgate_guest::{Decision, Input};
///
/// struct Allowed(Vec<String>);
///
/// fn load() -> Result<Allowed, std::convert::Infallible> {
///     Ok(Allowed(vec!["alice".into()]))
/// }
///
/// fn evaluate(input: Input, allowed: &Allowed) -> Decision {
///     let user = input.input["user"].as_str().unwrap_or("");
///     if allowed.0.iter().any(|u| u == user) { Decision::allow() } else { Decision::deny() }
/// }
///
/// sandgate_guest::policy!(evaluate, init = load);
///
/// let out = sandgate_evaluate_document(br#"{"input":{"user":"alice"}}"#);
/// assert_eq!(out, br#"{"allow":true}"#);
/// ```
#[macro_export]
macro_rules! policy {
    ($policy:expr, init = $init:expr $(,)?) => {
        /// The state `sandgate_init` built, shared by every evaluation of this instance.
        static SANDGATE_STATE: $crate::__private::State = $crate::__private::State::new();

        /// Runs the policy registered with `sandgate_guest::policy!` over one ABI v1 input
        /// document and returns the decision document, exactly as the `sandgate_evaluate`
        /// export does (running the init function first if it has not run).
        #[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
        pub fn sandgate_evaluate_document(document: &[u8]) -> ::std::vec::Vec<u8> {
            $crate::__private::evaluate_with_state(&SANDGATE_STATE, $init, document, $policy)
        }

        /// ABI v1 export: runs the policy's init function once at load; 0 when it succeeded.
        #[cfg(target_arch = "wasm32")]
        #[unsafe(no_mangle)]
        pub extern "C" fn sandgate_init() -> i32 {
            $crate::__private::init(&SANDGATE_STATE, $init)
        }

        $crate::__policy_exports!();
    };
    ($policy:expr $(,)?) => {
        /// Runs the policy registered with `sandgate_guest::policy!` over one ABI v1 input
        /// document and returns the decision document, exactly as the `sandgate_evaluate`
        /// export does.
        #[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
        pub fn sandgate_evaluate_document(document: &[u8]) -> ::std::vec::Vec<u8> {
            $crate::evaluate_document(document, $policy)
        }

        $crate::__policy_exports!();
    };
}

/// The ABI v1 exports both forms of [`policy!`] generate; not a stable interface.
#[doc(hidden)]
#[macro_export]
macro_rules! __policy_exports {
    () => {
        /// ABI v1 export: the guest ABI version of this module.
        #[cfg(target_arch = "wasm32")]
        #[unsafe(no_mangle)]
        pub extern "C" fn sandgate_abi_version() -> i32 {
            $crate::ABI_VERSION
        }

        /// ABI v1 export: `len` writable bytes for the input document; 0 on failure.
        #[cfg(target_arch = "wasm32")]
        #[unsafe(no_mangle)]
        pub extern "C" fn sandgate_alloc(len: i32) -> i32 {
            $crate::__private::alloc(len)
        }

        /// ABI v1 export: evaluates the input document at `[ptr, ptr+len)` and returns
        /// `(out_ptr << 32) | out_len` of the decision document.
        ///
        /// # Safety
        ///
        /// `[ptr, ptr+len)` must be a buffer from `sandgate_alloc` filled by the host.
        #[cfg(target_arch = "wasm32")]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn sandgate_evaluate(ptr: i32, len: i32) -> i64 {
            // SAFETY: this function's contract is `evaluate`'s.
            unsafe { $crate::__private::evaluate(ptr, len, sandgate_evaluate_document) }
        }
    };
}

/// What [`policy!`] expands to; not a stable interface.
#[doc(hidden)]
pub mod __private {
    pub use crate::export::{State, evaluate_with_state, init};
    #[cfg(target_arch = "wasm32")]
    pub use crate::export::{alloc, evaluate};
}
