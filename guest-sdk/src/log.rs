//! Logging through the host (`sandgate.log`): the host records each line with the policy,
//! version and decision id, and applies its own level filter.
//!
//! Use the macros [`trace!`](crate::trace), [`debug!`](crate::debug), [`info!`](crate::info),
//! [`warn!`](crate::warn) and [`error!`](crate::error), which take `format!` arguments:
//!
//! ```
//! let subject = "alice";
//! sandgate_guest::info!("checking {subject}");
//! sandgate_guest::log::warn!("role table has {} entries", 0);
//! ```
//!
//! On host builds (unit tests) lines go to stderr.

use std::fmt;

pub use crate::{debug, error, info, trace, warn};

/// Severity of a log line, as the ABI numbers it (0 trace … 4 error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(i32)]
pub enum Level {
    /// Step-by-step detail (0).
    Trace = 0,
    /// Diagnostic detail (1).
    Debug = 1,
    /// Normal events (2).
    Info = 2,
    /// Something unexpected that the policy handled (3).
    Warn = 3,
    /// Something that failed (4).
    Error = 4,
}

/// Writes one log line at `level`.
pub fn write(level: Level, message: &str) {
    crate::sys::log(level as i32, message);
}

/// Writes one log line from format arguments; what the logging macros call. Formats without
/// allocating when the arguments are a plain string.
pub fn write_args(level: Level, args: fmt::Arguments<'_>) {
    match args.as_str() {
        Some(message) => write(level, message),
        None => write(level, &args.to_string()),
    }
}

/// Logs at trace level: `trace!("step {n}")`.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => {
        $crate::log::write_args($crate::log::Level::Trace, ::core::format_args!($($arg)+))
    };
}

/// Logs at debug level: `debug!("parsed {count} roles")`.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => {
        $crate::log::write_args($crate::log::Level::Debug, ::core::format_args!($($arg)+))
    };
}

/// Logs at info level: `info!("allowing {user}")`.
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => {
        $crate::log::write_args($crate::log::Level::Info, ::core::format_args!($($arg)+))
    };
}

/// Logs at warn level: `warn!("unknown role {role}")`.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => {
        $crate::log::write_args($crate::log::Level::Warn, ::core::format_args!($($arg)+))
    };
}

/// Logs at error level: `error!("introspection failed: {err}")`.
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => {
        $crate::log::write_args($crate::log::Level::Error, ::core::format_args!($($arg)+))
    };
}

#[cfg(test)]
mod tests {
    use super::Level;

    #[test]
    fn levels_have_their_abi_numbers() {
        let numbers = [
            Level::Trace,
            Level::Debug,
            Level::Info,
            Level::Warn,
            Level::Error,
        ]
        .map(|level| level as i32);
        assert_eq!(numbers, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn macros_accept_format_arguments() {
        let user = "alice";
        crate::trace!("plain");
        crate::debug!("{user}");
        crate::info!("{} {}", user, 1);
        crate::warn!("{user:?}");
        crate::error!("done");
    }
}
