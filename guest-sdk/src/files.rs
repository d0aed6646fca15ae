//! Reading a policy's files at init: walks configured entries (a file, or a directory read in
//! name order, recursively) from the guest's read-only preopens and hands each file to the
//! policy with the path its errors should name. Used by the built-in language guests for their
//! `files`, and by any policy whose init reads a preopened directory.
//!
//! ```no_run
//! use std::path::Path;
//!
//! // Every `.json` file below the preopen `/data`, named `data/…` in errors.
//! let mut tables = Vec::new();
//! sandgate_guest::files::walk(Path::new("/data"), "data", |file| {
//!     if file.extension() == "json" {
//!         tables.push((file.shown.to_owned(), file.read()?));
//!     }
//!     Ok(())
//! })?;
//! # Ok::<(), String>(())
//! ```

use std::fs;
use std::path::Path;

/// One file found by [`walk`] or [`walk_listing`].
pub struct File<'a> {
    /// Where the file is inside the sandbox.
    pub path: &'a Path,
    /// The path to name in messages: the entry as given, then the names below it.
    pub shown: &'a str,
    /// The directories between the entry given and this file (empty for the entry itself or
    /// a file directly in it), outermost first.
    pub dirs: &'a [String],
    /// Whether this file is the entry itself, rather than found in a directory: a policy
    /// usually refuses a listed file it cannot use, and skips such a file in a directory (a
    /// README, fixtures).
    pub listed: bool,
}

impl File<'_> {
    /// The file's extension (after the last dot), or `""`.
    pub fn extension(&self) -> &str {
        self.path.extension().and_then(|e| e.to_str()).unwrap_or("")
    }

    /// The file's name, or `""`.
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The file's text; the error names [`File::shown`].
    pub fn read(&self) -> Result<String, String> {
        fs::read_to_string(self.path).map_err(|e| format!("cannot read {}: {e}", self.shown))
    }
}

/// Calls `visit` for the entry at `path` if it is a file, or for every file below it, in name
/// order, if it is a directory. Stops at the first error, `visit`'s or the walk's own (which
/// names the entry by `shown`).
pub fn walk(
    path: &Path,
    shown: &str,
    mut visit: impl FnMut(&File) -> Result<(), String>,
) -> Result<(), String> {
    walk_entry(path, shown, &mut visit)
}

/// [`walk`] over every entry of a listing, one per line: `<path in the sandbox>\t<path to
/// show>`, or just the path (shown as it is). Blank lines are skipped. This is the form in
/// which sandgate passes a language policy's `files`.
pub fn walk_listing(
    listing: &str,
    mut visit: impl FnMut(&File) -> Result<(), String>,
) -> Result<(), String> {
    for line in listing.lines().filter(|l| !l.is_empty()) {
        let (inside, shown) = line.split_once('\t').unwrap_or((line, line));
        walk_entry(Path::new(inside), shown, &mut visit)?;
    }
    Ok(())
}

/// The callback of a walk.
type Visit<'v> = dyn FnMut(&File) -> Result<(), String> + 'v;

fn walk_entry(path: &Path, shown: &str, visit: &mut Visit) -> Result<(), String> {
    let meta = fs::metadata(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    if meta.is_dir() {
        return walk_dir(path, shown, &[], visit);
    }
    visit(&File {
        path,
        shown,
        dirs: &[],
        listed: true,
    })
}

/// Every file below `dir`, whose own path below the entry is `dirs`.
fn walk_dir(dir: &Path, shown: &str, dirs: &[String], visit: &mut Visit) -> Result<(), String> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(|e| format!("cannot list {shown}: {e}"))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot list {shown}: {e}"))?;
    names.sort();
    for name in names {
        let name = name.to_string_lossy().into_owned();
        let path = dir.join(&name);
        let shown = format!("{shown}/{name}");
        let meta = fs::metadata(&path).map_err(|e| format!("cannot read {shown}: {e}"))?;
        if meta.is_dir() {
            walk_dir(&path, &shown, &[dirs, &[name]].concat(), visit)?;
        } else {
            visit(&File {
                path: &path,
                shown: &shown,
                dirs,
                listed: false,
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of its own under the system's temporary directory, removed on drop.
    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!(
                "sandgate-guest-files-{name}-{}",
                std::process::id()
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("scratch dir");
            Scratch(dir)
        }

        fn file(&self, relative: &str, text: &str) {
            let path = self.0.join(relative);
            fs::create_dir_all(path.parent().expect("parent")).expect("dirs");
            fs::write(path, text).expect("write");
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    type Seen = (String, Vec<String>, bool, String);

    fn seen(listing: &str) -> Result<Vec<Seen>, String> {
        let mut seen = Vec::new();
        walk_listing(listing, |file| {
            seen.push((
                file.shown.to_owned(),
                file.dirs.to_vec(),
                file.listed,
                file.read()?,
            ));
            Ok(())
        })?;
        Ok(seen)
    }

    #[test]
    fn files_and_directories_are_walked_in_name_order_with_their_shown_paths() {
        let scratch = Scratch::new("order");
        scratch.file("one.rego", "1");
        scratch.file("tree/b.json", "b");
        scratch.file("tree/a/z/deep.json", "deep");
        scratch.file("tree/a/x.json", "x");
        let root = scratch.0.display();
        let listing = format!("{root}/one.rego\tpolicy/one.rego\n\n{root}/tree\ttree");
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            seen(&listing).expect("walked"),
            [
                ("policy/one.rego".into(), vec![], true, "1".into()),
                ("tree/a/x.json".into(), strings(&["a"]), false, "x".into()),
                (
                    "tree/a/z/deep.json".into(),
                    strings(&["a", "z"]),
                    false,
                    "deep".into()
                ),
                ("tree/b.json".into(), vec![], false, "b".into()),
            ]
        );
    }

    #[test]
    fn a_missing_entry_and_the_visitors_error_name_the_shown_path() {
        let scratch = Scratch::new("errors");
        scratch.file("bad.txt", "?");
        let root = scratch.0.display();
        let missing = seen(&format!("{root}/none.rego\tconfigured/none.rego"))
            .expect_err("a missing entry fails");
        assert!(
            missing.starts_with("cannot read configured/none.rego: "),
            "{missing}"
        );
        let refused = walk_listing(&format!("{root}/bad.txt\tbad.txt"), |file| {
            Err(format!("{}: not policy", file.shown))
        })
        .expect_err("the visitor's error stops the walk");
        assert_eq!(refused, "bad.txt: not policy");
    }
}
