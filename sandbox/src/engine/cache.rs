//! The disk cache of compiled artifacts (compiled modules; any other artifact
//! the engine derives from a module, such as an initialised snapshot, uses
//! the same API): bytes stored under digest material, each entry
//! authenticated with a key only the daemon's user holds. `engine` owns it;
//! a caller deserialises only what [`ArtifactCache::load`] returned.
//!
//! Trust model: the directory must be owned by the daemon's uid and not
//! writable by its group or others (it is created `0700`); it holds the key
//! (`cache.key`, 32 random bytes, created on first use with mode `0600` and
//! refused when its owner or mode is looser). Each entry carries an
//! HMAC-SHA256 over the format version, the artifact kind, the engine's
//! compatibility hash, the digest material and the payload, so an entry
//! planted, mutated, or copied from another digest or another cache fails
//! before anything is deserialised.

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use hmac::{KeyInit, Mac};
use sha2::Digest as _;

use crate::config::Digest;

/// Format tag of an entry; bump when the layout or the MAC's input changes.
const MAGIC: &[u8; 8] = b"SGART\x00\x00\x02";

/// Length of the HMAC-SHA256 tag after the magic.
const TAG_LEN: usize = 32;

/// Name of the key file in the cache directory.
pub const KEY_FILE: &str = "cache.key";

/// Length of the key in bytes.
const KEY_LEN: usize = 32;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// What an entry holds; part of the file name and of the authenticated data,
/// so an entry of one kind is never accepted as another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArtifactKind(&'static str);

impl ArtifactKind {
    /// A compiled module (`Module::serialize`), keyed by the module's digest.
    pub const MODULE: ArtifactKind = ArtifactKind::new("cwasm");

    /// A kind named `name`: lower-case ASCII letters, the extension of its
    /// entries' files (checked when the constant is evaluated).
    pub const fn new(name: &'static str) -> ArtifactKind {
        let bytes = name.as_bytes();
        assert!(!bytes.is_empty(), "an artifact kind needs a name");
        let mut i = 0;
        while i < bytes.len() {
            assert!(
                bytes[i].is_ascii_lowercase(),
                "an artifact kind is named in lower-case ASCII letters"
            );
            i += 1;
        }
        ArtifactKind(name)
    }

    pub fn name(self) -> &'static str {
        self.0
    }
}

/// Why the cache directory (or its key) is not used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct CacheRefused {
    pub path: PathBuf,
    pub reason: String,
}

/// The state of the disk cache, as `/readyz` and `sandgate check` show it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CacheReport {
    /// `on`, `off` (not configured) or `refused` (configured but not trusted:
    /// modules are compiled at every start).
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Authenticated artifacts on disk. Cheap to share behind an `Arc`.
pub struct ArtifactCache {
    dir: PathBuf,
    mac: HmacSha256,
    /// sha256 of the engine's precompile compatibility hash: entries of
    /// another wasmtime version or configuration are neither found nor
    /// accepted.
    engine: [u8; 32],
}

impl ArtifactCache {
    /// Opens (creating when missing) the cache in `dir` for `engine`: the
    /// directory must be the daemon user's own and not writable by others,
    /// and its key file private; anything else is refused, never repaired.
    pub fn open(dir: &Path, engine: &wasmtime::Engine) -> Result<ArtifactCache, CacheRefused> {
        let refused = |path: &Path, reason: String| CacheRefused {
            path: path.to_path_buf(),
            reason,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| refused(dir, format!("cannot create the directory: {e}")))?;
        let meta = fs::metadata(dir).map_err(|e| refused(dir, e.to_string()))?;
        if !meta.is_dir() {
            return Err(refused(dir, "not a directory".into()));
        }
        owned_privately(&meta, "the directory").map_err(|reason| refused(dir, reason))?;
        let key_path = dir.join(KEY_FILE);
        let key =
            read_or_create_key(dir, &key_path).map_err(|reason| refused(&key_path, reason))?;
        let mac = <HmacSha256 as KeyInit>::new_from_slice(&key)
            .map_err(|e| refused(&key_path, e.to_string()))?;
        let mut hasher = Sha256Hasher(sha2::Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(ArtifactCache {
            dir: dir.to_path_buf(),
            mac,
            engine: hasher.0.finalize().into(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the entry of `kind` for `material` lives.
    pub fn entry_path(&self, kind: ArtifactKind, material: &Digest) -> PathBuf {
        self.dir.join(format!(
            "{}-{}.{}",
            material.hex(),
            hex::encode(&self.engine[..8]),
            kind.name()
        ))
    }

    /// The payload stored for `kind` and `material` when an entry exists and
    /// passes every check (owner, mode, format, MAC). A refused entry is
    /// logged and treated as missing: the caller rebuilds and stores it again.
    pub fn load(&self, kind: ArtifactKind, material: &Digest) -> Option<Vec<u8>> {
        let path = self.entry_path(kind, material);
        match self.read_entry(&path, kind, material) {
            Ok(found) => found,
            Err(reason) => {
                tracing::warn!(
                    path = %path.display(),
                    kind = kind.name(),
                    digest = %material,
                    reason,
                    "cache entry refused, not deserialised; rebuilding it"
                );
                None
            }
        }
    }

    /// Stores `payload` as the entry of `kind` for `material` (a temporary
    /// file renamed into place, so a reader sees the old entry or the new
    /// one). A failure is logged; the cache is an optimisation.
    pub fn store(&self, kind: ArtifactKind, material: &Digest, payload: &[u8]) {
        let path = self.entry_path(kind, material);
        if let Err(e) = self.write_entry(&path, kind, material, payload) {
            tracing::warn!(path = %path.display(), kind = kind.name(), error = %e, "cannot write cache entry");
        }
    }

    /// `Ok(None)` when there is no entry, `Err` saying why one is refused.
    fn read_entry(
        &self,
        path: &Path,
        kind: ArtifactKind,
        material: &Digest,
    ) -> Result<Option<Vec<u8>>, String> {
        let mut file = match open_no_follow(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("unreadable: {e}")),
        };
        let meta = file.metadata().map_err(|e| e.to_string())?;
        if !meta.is_file() {
            return Err("not a regular file".into());
        }
        owned_privately(&meta, "the entry")?;
        let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
        file.read_to_end(&mut bytes)
            .map_err(|e| format!("unreadable: {e}"))?;
        let rest = bytes
            .strip_prefix(MAGIC.as_slice())
            .ok_or("not in this version's format")?;
        if rest.len() < TAG_LEN {
            return Err("truncated".into());
        }
        let (tag, payload) = rest.split_at(TAG_LEN);
        self.mac(kind, material, payload)
            .verify_slice(tag)
            .map_err(|_| {
                "its authentication tag does not match (not written by this daemon for this digest and engine, or altered)".to_owned()
            })?;
        let start = MAGIC.len() + TAG_LEN;
        bytes.drain(..start);
        Ok(Some(bytes))
    }

    fn write_entry(
        &self,
        path: &Path,
        kind: ArtifactKind,
        material: &Digest,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let tag = self.mac(kind, material, payload).finalize().into_bytes();
        let mut tmp = tempfile::Builder::new()
            .prefix(".entry-")
            .tempfile_in(&self.dir)?;
        tmp.write_all(MAGIC)?;
        tmp.write_all(&tag)?;
        tmp.write_all(payload)?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    }

    fn mac(&self, kind: ArtifactKind, material: &Digest, payload: &[u8]) -> HmacSha256 {
        let mut mac = self.mac.clone();
        mac.update(MAGIC);
        // Every field before the payload has a fixed or prefixed length, so
        // no two inputs share an encoding.
        let name = kind.name().as_bytes();
        mac.update(&(name.len() as u64).to_be_bytes());
        mac.update(name);
        mac.update(&self.engine);
        mac.update(&material.0);
        mac.update(payload);
        mac
    }
}

/// The key in `path`, created (32 random bytes, mode 0600) when missing.
fn read_or_create_key(dir: &Path, path: &Path) -> Result<[u8; KEY_LEN], String> {
    match open_no_follow(path) {
        Ok(file) => return read_key(file),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot open the key: {e}")),
    }
    let mut key = [0u8; KEY_LEN];
    getrandom::fill(&mut key).map_err(|e| format!("no randomness for a new key: {e}"))?;
    let created = (|| -> std::io::Result<()> {
        // tempfile creates the file with mode 0600.
        let mut tmp = tempfile::Builder::new().prefix(".key-").tempfile_in(dir)?;
        tmp.write_all(&key)?;
        tmp.as_file().sync_all()?;
        tmp.persist_noclobber(path).map_err(|e| e.error)?;
        Ok(())
    })();
    match created {
        Ok(()) => {
            tracing::info!(path = %path.display(), "created the module cache key");
            Ok(key)
        }
        // Another process created it first: use theirs, with the same checks.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read_key(open_no_follow(path).map_err(|e| format!("cannot open the key: {e}"))?)
        }
        Err(e) => Err(format!("cannot create the key: {e}")),
    }
}

fn read_key(mut file: fs::File) -> Result<[u8; KEY_LEN], String> {
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("the key is not a regular file".into());
    }
    let uid = rustix::process::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(format!(
            "the key is owned by uid {}, not by the daemon's uid {uid}",
            meta.uid()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "the key has mode {:04o}; it must be readable by its owner only (chmod 600)",
            meta.mode() & 0o7777
        ));
    }
    let mut key = [0u8; KEY_LEN];
    let mut extra = [0u8; 1];
    file.read_exact(&mut key)
        .map_err(|_| format!("the key is not {KEY_LEN} bytes long"))?;
    if file.read(&mut extra).map_err(|e| e.to_string())? != 0 {
        return Err(format!("the key is not {KEY_LEN} bytes long"));
    }
    Ok(key)
}

/// Refuses what another uid owns or what its group or others may write.
fn owned_privately(meta: &fs::Metadata, what: &str) -> Result<(), String> {
    let uid = rustix::process::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(format!(
            "{what} is owned by uid {}, not by the daemon's uid {uid}",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{what} is writable by its group or others (mode {:04o}); make it the daemon user's own (chmod go-w)",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Opens `path` for reading without following a symbolic link in its last
/// component (checks then apply to the file itself, through its descriptor).
fn open_no_follow(path: &Path) -> std::io::Result<fs::File> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    Ok(fs::File::from(fd))
}

struct Sha256Hasher(sha2::Sha256);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        u64::from_le_bytes(digest[..8].try_into().unwrap_or([0; 8]))
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn engine() -> wasmtime::Engine {
        wasmtime::Engine::default()
    }

    #[test]
    fn an_entry_is_bound_to_its_digest_kind_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ArtifactCache::open(dir.path(), &engine()).expect("open");
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        cache.store(ArtifactKind::MODULE, &a, b"compiled a");
        assert_eq!(
            cache.load(ArtifactKind::MODULE, &a).as_deref(),
            Some(&b"compiled a"[..])
        );
        const SNAPSHOT: ArtifactKind = ArtifactKind::new("snapshot");
        let snapshot = SNAPSHOT;
        assert_eq!(cache.load(snapshot, &a), None, "no entry of another kind");

        // Copied over another digest's entry, or renamed to another kind.
        let copied = cache.entry_path(ArtifactKind::MODULE, &b);
        fs::copy(cache.entry_path(ArtifactKind::MODULE, &a), &copied).expect("copy");
        let refused = cache.read_entry(&copied, ArtifactKind::MODULE, &b);
        assert!(refused.is_err_and(|r| r.contains("authentication tag")));
        let renamed = cache.entry_path(snapshot, &a);
        fs::copy(cache.entry_path(ArtifactKind::MODULE, &a), &renamed).expect("copy");
        assert!(cache.read_entry(&renamed, snapshot, &a).is_err());

        // The same entry under a cache with another key.
        let other_dir = tempfile::tempdir().expect("tempdir");
        let other = ArtifactCache::open(other_dir.path(), &engine()).expect("open");
        let moved = other.entry_path(ArtifactKind::MODULE, &a);
        fs::copy(cache.entry_path(ArtifactKind::MODULE, &a), &moved).expect("copy");
        assert!(other.read_entry(&moved, ArtifactKind::MODULE, &a).is_err());
    }

    #[test]
    fn a_mutated_entry_with_a_recomputed_plain_checksum_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ArtifactCache::open(dir.path(), &engine()).expect("open");
        let digest = Digest::of(b"m");
        cache.store(ArtifactKind::MODULE, &digest, b"compiled code");
        let path = cache.entry_path(ArtifactKind::MODULE, &digest);
        let mut forged = MAGIC.to_vec();
        forged.extend_from_slice(&sha2::Sha256::digest(b"planted code"));
        forged.extend_from_slice(b"planted code");
        fs::write(&path, &forged).expect("forge");
        assert!(
            cache
                .read_entry(&path, ArtifactKind::MODULE, &digest)
                .is_err()
        );
        fs::write(&path, &forged[..20]).expect("truncate");
        assert!(
            cache
                .read_entry(&path, ArtifactKind::MODULE, &digest)
                .is_err()
        );
        fs::write(&path, b"SGMOD\x00\x00\x01 an older format").expect("old");
        assert!(
            cache
                .read_entry(&path, ArtifactKind::MODULE, &digest)
                .is_err()
        );
    }

    #[test]
    fn loose_entries_keys_and_directories_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ArtifactCache::open(dir.path(), &engine()).expect("open");
        let key = dir.path().join(KEY_FILE);
        assert_eq!(
            fs::metadata(&key).expect("key").permissions().mode() & 0o777,
            0o600
        );
        let digest = Digest::of(b"m");
        cache.store(ArtifactKind::MODULE, &digest, b"compiled");
        let entry = cache.entry_path(ArtifactKind::MODULE, &digest);
        fs::set_permissions(&entry, fs::Permissions::from_mode(0o666)).expect("chmod");
        let refused = cache.read_entry(&entry, ArtifactKind::MODULE, &digest);
        assert!(refused.is_err_and(|r| r.contains("writable by its group or others")));

        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
        let refused = ArtifactCache::open(dir.path(), &engine())
            .err()
            .expect("refused");
        assert!(refused.reason.contains("chmod 600"), "{refused}");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod");

        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).expect("chmod");
        let refused = ArtifactCache::open(dir.path(), &engine())
            .err()
            .expect("refused");
        assert!(refused.reason.contains("mode 0777"), "{refused}");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).expect("chmod");

        // A symbolic link in place of the key is not followed.
        fs::rename(&key, dir.path().join("elsewhere")).expect("move key");
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &key).expect("symlink");
        assert!(ArtifactCache::open(dir.path(), &engine()).is_err());
    }
}
