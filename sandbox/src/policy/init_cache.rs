//! The cache of init results: a policy whose module, grants and the files
//! its `sandgate_init` read are unchanged starts from the snapshot made the
//! last time, without running init again (a restart, or a reload that changed
//! another policy). Stored in the engine's authenticated artifact cache, so
//! the trust rules of compiled modules hold: an entry this daemon did not
//! write, or one altered since, is refused, logged, and init runs.
//!
//! Two entries per result: `init`, keyed by the module's digest and what else
//! init depends on ([`material`]), records the content digest of every path
//! init opened and of its preopened directories' listings, and the digest of
//! the snapshot; `snapshot`, keyed by that digest, holds the module bytes. A
//! hit needs every recorded digest to match the files as they are now.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{Digest, PolicySpec};
use crate::engine::{ArtifactCache, ArtifactKind};

/// What init read and the snapshot it made.
const INIT: ArtifactKind = ArtifactKind::new("init");
/// An initialised module's bytes, keyed by their digest.
const SNAPSHOT: ArtifactKind = ArtifactKind::new("snapshot");

/// The digest of everything besides its files that init's result depends
/// on: this daemon's version (the snapshot procedure), the module, the
/// grants, environment and limits init runs with, and what the ABI hands init
/// (a filter's `plugin_config`, a language policy's entrypoint).
pub fn material(spec: &PolicySpec, module: &Digest) -> Digest {
    #[derive(Serialize)]
    struct Material<'a> {
        format: &'static str,
        daemon: &'static str,
        module: String,
        functions: Vec<&'static str>,
        on_denied: String,
        env: &'a std::collections::BTreeMap<String, String>,
        preopens: Vec<(String, &'a str, String)>,
        timeout_ms: u128,
        memory_limit_bytes: u64,
        /// The ABI and what init hands it (a proxy-wasm filter's
        /// `plugin_config`), and a language policy's files and entrypoint.
        abi: String,
        language: String,
    }
    let grants = &spec.grants;
    let material = Material {
        format: "sandgate-init-1",
        daemon: env!("CARGO_PKG_VERSION"),
        module: module.hex(),
        functions: grants.functions.iter().copied().collect(),
        on_denied: format!("{:?}", grants.on_denied),
        env: &grants.env,
        preopens: grants
            .preopens
            .iter()
            .map(|p| {
                (
                    p.host.display().to_string(),
                    p.guest.as_str(),
                    format!("{:?}", p.access),
                )
            })
            .collect(),
        timeout_ms: spec.timeout.as_millis(),
        memory_limit_bytes: spec.memory_limit_bytes,
        abi: format!("{:?}", spec.abi),
        language: format!("{:?}", spec.language),
    };
    Digest::of(&serde_json::to_vec(&material).unwrap_or_default())
}

/// One path init depended on, and its content's digest then.
#[derive(Debug, Deserialize, Serialize, PartialEq)]
struct Read {
    path: PathBuf,
    digest: String,
}

#[derive(Debug, Deserialize, Serialize)]
struct Recorded {
    snapshot: String,
    reads: Vec<Read>,
}

/// A snapshot found in the cache, valid for the files as they are now.
pub struct Hit {
    pub bytes: Vec<u8>,
    pub digest: Digest,
}

/// The snapshot recorded for `material` when every path it depended on still
/// has the recorded content; `None` (init must run) otherwise. A refused or
/// unreadable entry is logged by the cache or here.
pub fn lookup(cache: &ArtifactCache, material: &Digest, policy: &str) -> Option<Hit> {
    let payload = cache.load(INIT, material)?;
    let recorded: Recorded = match serde_json::from_slice(&payload) {
        Ok(recorded) => recorded,
        Err(e) => {
            tracing::warn!(policy, error = %e, "init cache entry unreadable; init runs");
            return None;
        }
    };
    if let Some(changed) = recorded
        .reads
        .iter()
        .find(|read| content_digest(&read.path).map(|d| d.hex()) != Some(read.digest.clone()))
    {
        tracing::debug!(policy, path = %changed.path.display(), "a file init read has changed; init runs");
        return None;
    }
    let digest = Digest::parse(&recorded.snapshot).ok()?;
    let bytes = cache.load(SNAPSHOT, &digest)?;
    if Digest::of(&bytes) != digest {
        tracing::warn!(policy, snapshot = %digest, "cached snapshot does not match its digest; init runs");
        return None;
    }
    Some(Hit { bytes, digest })
}

/// Records a snapshot made from `reads` (the paths init opened) and the
/// listings of `preopens`. Paths whose content cannot be read now are not
/// recorded as a result: the next load runs init again.
pub fn store(
    cache: &ArtifactCache,
    material: &Digest,
    snapshot: (&Digest, &[u8]),
    reads: &[PathBuf],
    preopens: impl Iterator<Item = PathBuf>,
) {
    let mut recorded = Recorded {
        snapshot: snapshot.0.hex(),
        reads: Vec::new(),
    };
    for path in preopens.chain(reads.iter().cloned()) {
        if recorded.reads.iter().any(|r| r.path == path) {
            continue;
        }
        let Some(digest) = content_digest(&path) else {
            return;
        };
        recorded.reads.push(Read {
            path,
            digest: digest.hex(),
        });
    }
    let Ok(payload) = serde_json::to_vec(&recorded) else {
        return;
    };
    cache.store(SNAPSHOT, snapshot.0, snapshot.1);
    cache.store(INIT, material, &payload);
}

/// The digest of a path's content: a file's bytes, a directory's sorted
/// listing (names and kinds), or a marker for a path that does not exist
/// (so creating it later changes the digest). `None` when it cannot be read.
fn content_digest(path: &Path) -> Option<Digest> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {
            let mut names: Vec<String> = std::fs::read_dir(path)
                .ok()?
                .map(|entry| {
                    let entry = entry.ok()?;
                    let kind = entry.file_type().ok()?;
                    let kind = if kind.is_dir() { "d" } else { "f" };
                    Some(format!("{}\0{kind}\n", entry.file_name().to_string_lossy()))
                })
                .collect::<Option<_>>()?;
            names.sort();
            Some(Digest::of(format!("dir\n{}", names.concat()).as_bytes()))
        }
        Ok(_) => std::fs::read(path).ok().map(|bytes| Digest::of(&bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(Digest::of(b"missing\n")),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Abi, ProxyWasmSettings};

    #[test]
    fn what_init_is_configured_with_is_part_of_the_key() {
        let spec = PolicySpec::for_module(Path::new("filter.wasm"));
        let module = Digest::of(b"filter");
        let configured = |plugin_config: &str| {
            let mut spec = spec.clone();
            spec.abi = Abi::ProxyWasm(ProxyWasmSettings {
                plugin_config: plugin_config.into(),
                ..Default::default()
            });
            material(&spec, &module)
        };
        assert_ne!(configured("{}"), configured("not json"));
        assert_ne!(material(&spec, &module), configured("{}"));
        assert_eq!(configured("{}"), configured("{}"));
    }

    #[test]
    fn a_file_or_a_listing_that_changes_changes_its_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("roles.json");
        let missing = content_digest(&file).expect("missing is a digest");
        std::fs::write(&file, "a").expect("write");
        let a = content_digest(&file).expect("file");
        assert_ne!(a, missing);
        std::fs::write(&file, "b").expect("write");
        assert_ne!(content_digest(&file).expect("file"), a);
        let listing = content_digest(dir.path()).expect("dir");
        std::fs::write(dir.path().join("more.json"), "").expect("write");
        assert_ne!(content_digest(dir.path()).expect("dir"), listing);
    }
}
