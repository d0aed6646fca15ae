//! The WASI preview 1 function list and the groups of DESIGN §5 a policy
//! grants by name. A leaf module: config resolves `wasi.allow` with it, the
//! `wasi` host enforces it, probes and the CLI name functions and groups
//! with it; it imports nothing of the crate.

/// Every function of `wasi_snapshot_preview1`.
pub const PREVIEW1: [&str; 46] = [
    "args_get",
    "args_sizes_get",
    "environ_get",
    "environ_sizes_get",
    "clock_res_get",
    "clock_time_get",
    "fd_advise",
    "fd_allocate",
    "fd_close",
    "fd_datasync",
    "fd_fdstat_get",
    "fd_fdstat_set_flags",
    "fd_fdstat_set_rights",
    "fd_filestat_get",
    "fd_filestat_set_size",
    "fd_filestat_set_times",
    "fd_pread",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "fd_pwrite",
    "fd_read",
    "fd_readdir",
    "fd_renumber",
    "fd_seek",
    "fd_sync",
    "fd_tell",
    "fd_write",
    "path_create_directory",
    "path_filestat_get",
    "path_filestat_set_times",
    "path_link",
    "path_open",
    "path_readlink",
    "path_remove_directory",
    "path_rename",
    "path_symlink",
    "path_unlink_file",
    "poll_oneoff",
    "proc_exit",
    "proc_raise",
    "sched_yield",
    "random_get",
    "sock_accept",
    "sock_recv",
    "sock_send",
    "sock_shutdown",
];

/// The groups of DESIGN §5 and the exact functions each grants.
pub const GROUPS: [(&str, &[&str]); 9] = [
    ("args", &["args_get", "args_sizes_get"]),
    ("env", &["environ_get", "environ_sizes_get"]),
    ("clock", &["clock_res_get", "clock_time_get"]),
    ("random", &["random_get"]),
    (
        "fs_read",
        &[
            "fd_advise",
            "fd_close",
            "fd_fdstat_get",
            "fd_fdstat_set_flags",
            "fd_fdstat_set_rights",
            "fd_filestat_get",
            "fd_pread",
            "fd_prestat_get",
            "fd_prestat_dir_name",
            "fd_read",
            "fd_readdir",
            "fd_renumber",
            "fd_seek",
            "fd_tell",
            "path_filestat_get",
            "path_open",
            "path_readlink",
        ],
    ),
    (
        "fs_write",
        &[
            "fd_allocate",
            "fd_datasync",
            "fd_filestat_set_size",
            "fd_filestat_set_times",
            "fd_pwrite",
            "fd_sync",
            "fd_write",
            "path_create_directory",
            "path_filestat_set_times",
            "path_link",
            "path_remove_directory",
            "path_rename",
            "path_symlink",
            "path_unlink_file",
        ],
    ),
    ("poll", &["poll_oneoff", "sched_yield"]),
    (
        "sock",
        &["sock_accept", "sock_recv", "sock_send", "sock_shutdown"],
    ),
    ("proc_exit", &["proc_exit", "proc_raise"]),
];

/// Expands one `wasi.allow` entry (a group or an exact function name).
pub fn expand_grant(word: &str) -> Option<&'static [&'static str]> {
    if let Some((_, functions)) = GROUPS.iter().find(|(g, _)| *g == word) {
        return Some(functions);
    }
    PREVIEW1
        .iter()
        .position(|f| *f == word)
        .map(|i| std::slice::from_ref(&PREVIEW1[i]))
}

/// The group a function belongs to, for telling an operator what to grant.
pub fn group_of(function: &str) -> Option<&'static str> {
    GROUPS
        .iter()
        .find(|(_, fs)| fs.contains(&function))
        .map(|(g, _)| *g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_group_names_only_preview1_functions_and_covers_them_all() {
        let mut covered: Vec<&str> = GROUPS
            .iter()
            .flat_map(|(_, fs)| fs.iter().copied())
            .collect();
        for f in &covered {
            assert!(PREVIEW1.contains(f), "{f} is not a preview1 function");
        }
        covered.sort_unstable();
        let mut all = PREVIEW1.to_vec();
        all.sort_unstable();
        assert_eq!(covered, all, "each function belongs to exactly one group");
    }

    #[test]
    fn grants_expand_groups_and_exact_names() {
        assert_eq!(
            expand_grant("clock"),
            Some(&["clock_res_get", "clock_time_get"][..])
        );
        assert_eq!(expand_grant("random_get"), Some(&["random_get"][..]));
        assert_eq!(expand_grant("network"), None);
        assert_eq!(group_of("path_open"), Some("fs_read"));
    }
}
