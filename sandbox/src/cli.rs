//! The commands of the `sandgate` binary that are more than a call into the
//! daemon's library: each submodule owns one command's arguments and run.
//! `main.rs` parses the command line and calls them.

pub mod trace;
