//! The wasmtime engine shared by every policy: pooling allocation, epoch
//! deadlines (one ticker thread), the memory limiter, and the caches of
//! compiled modules (memory, then disk; modules pinned by URL are downloaded
//! through `fetch` only when neither has them). `policy` asks it for compiled
//! modules and creates a `Store` holding one evaluation's host state
//! (`Invocation`).

use std::collections::HashMap;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::Digest as _;
use wasmtime::{
    Config, Enabled, InstanceAllocationStrategy, Module, PoolingAllocationConfig, ResourceLimiter,
};

use crate::config::{Digest, EngineSettings};
use crate::fetch::Fetcher;

/// Bytes of each linear memory slot kept resident between instances (the
/// 1 MiB default guest stack of Rust guests sits below their data and heap).
const KEEP_RESIDENT: usize = 4 << 20;

/// How often the epoch advances: the granularity of evaluation deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Tables are small in policy guests; this bounds a guest growing them.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Format tag of a cache entry; bump when the layout changes.
const CACHE_MAGIC: &[u8; 8] = b"SGMOD\x00\x00\x01";

/// Compiled modules kept in memory, so a reload (or a rollback to a version
/// loaded earlier) neither recompiles nor reads the disk cache.
const MEMORY_CACHE_ENTRIES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot configure the wasmtime engine: {0}")]
    Setup(String),
    #[error("module does not compile: {0}")]
    Compile(String),
}

/// Where a compiled module came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompiledFrom {
    /// Compiled now (and written to the disk cache when enabled).
    Compiler,
    /// Loaded from the disk cache.
    DiskCache,
    /// Already compiled by this process (an earlier load or reload).
    MemoryCache,
}

impl std::fmt::Display for CompiledFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CompiledFrom::Compiler => "compiled",
            CompiledFrom::DiskCache => "disk cache",
            CompiledFrom::MemoryCache => "memory cache",
        })
    }
}

/// The shared engine. Cloning is cheap.
#[derive(Clone)]
pub struct Engine {
    wasmtime: wasmtime::Engine,
    cache: Option<Arc<ModuleCache>>,
    memory: Arc<Mutex<MemoryCache>>,
    fetcher: Arc<Fetcher>,
    _ticker: Arc<EpochTicker>,
}

impl Engine {
    pub fn new(settings: &EngineSettings) -> Result<Engine, EngineError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.max_wasm_stack(512 * 1024);
        config.async_stack_size(1024 * 1024);
        // Every evaluation maps the policy's initialised memory image
        // (its snapshot) copy-on-write instead of copying its data segments.
        config.memory_init_cow(true);
        let mut pool = PoolingAllocationConfig::new();
        pool.total_core_instances(settings.max_instances)
            .total_memories(settings.max_instances)
            .total_tables(settings.max_instances)
            .total_stacks(settings.max_instances)
            .max_memory_size(settings.max_memory_bytes as usize)
            // A fresh instance per evaluation makes slot reuse the hot path:
            // reset only the pages the last guest dirtied (PAGEMAP_SCAN, Linux
            // 6.7+) and keep them resident, so the next guest takes no page
            // faults on its stack, data and heap.
            .pagemap_scan(Enabled::Auto)
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(16 * 1024);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let wasmtime =
            wasmtime::Engine::new(&config).map_err(|e| EngineError::Setup(format!("{e:#}")))?;
        let cache = settings
            .cache_dir
            .as_ref()
            .map(|dir| Arc::new(ModuleCache::new(dir, &wasmtime)));
        let ticker = Arc::new(EpochTicker::start(wasmtime.clone()));
        Ok(Engine {
            wasmtime,
            cache,
            memory: Arc::new(Mutex::new(MemoryCache::default())),
            fetcher: Arc::new(Fetcher::new(settings)),
            _ticker: ticker,
        })
    }

    /// Downloads modules pinned by URL (through the download cache).
    pub fn fetcher(&self) -> &Fetcher {
        &self.fetcher
    }

    pub fn wasmtime(&self) -> &wasmtime::Engine {
        &self.wasmtime
    }

    pub fn cache_dir(&self) -> Option<&Path> {
        self.cache.as_deref().map(|c| c.dir.as_path())
    }

    /// Compiles a module, or loads it from the disk cache when an intact entry
    /// for this digest and engine configuration exists. May block: call it off
    /// the request path.
    pub fn compile(
        &self,
        bytes: &[u8],
        digest: &Digest,
    ) -> Result<(Module, CompiledFrom), EngineError> {
        if let Some(found) = self.cached(digest) {
            return Ok(found);
        }
        let module = Module::new(&self.wasmtime, bytes)
            .map_err(|e| EngineError::Compile(format!("{e:#}")))?;
        if let Some(cache) = &self.cache {
            cache.store(digest, &module);
        }
        self.remember(digest, &module);
        Ok((module, CompiledFrom::Compiler))
    }

    /// The compiled module of `digest` when this process or the disk cache
    /// has it, without its source. May block (disk): call it off the request path.
    pub fn cached(&self, digest: &Digest) -> Option<(Module, CompiledFrom)> {
        let in_memory = self.memory.lock().ok().and_then(|mut m| m.get(digest));
        if let Some(module) = in_memory {
            return Some((module, CompiledFrom::MemoryCache));
        }
        let module = self.cache.as_ref()?.load(&self.wasmtime, digest)?;
        self.remember(digest, &module);
        Some((module, CompiledFrom::DiskCache))
    }

    fn remember(&self, digest: &Digest, module: &Module) {
        if let Ok(mut memory) = self.memory.lock() {
            memory.insert(*digest, module.clone());
        }
    }
}

/// The compiled modules of this process, least recently used evicted first.
#[derive(Default)]
struct MemoryCache {
    entries: HashMap<Digest, (Module, u64)>,
    clock: u64,
}

impl MemoryCache {
    fn get(&mut self, digest: &Digest) -> Option<Module> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(digest).map(|(module, used)| {
            *used = clock;
            module.clone()
        })
    }

    fn insert(&mut self, digest: Digest, module: Module) {
        self.clock += 1;
        if self.entries.len() >= MEMORY_CACHE_ENTRIES
            && !self.entries.contains_key(&digest)
            && let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(d, _)| *d)
        {
            self.entries.remove(&oldest);
        }
        self.entries.insert(digest, (module, self.clock));
    }
}

/// Advances the engine's epoch every `EPOCH_TICK` until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    fn start(engine: wasmtime::Engine) -> EpochTicker {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let spawned = std::thread::Builder::new()
            .name("sandgate-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            });
        if let Err(e) = spawned {
            // Without the ticker no deadline would ever fire: refuse loudly.
            panic!("cannot start the epoch ticker thread: {e}");
        }
        EpochTicker { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Compiled modules on disk, keyed by module digest and engine configuration.
///
/// Entry layout: magic, sha256 of the payload, payload (`Module::serialize`).
/// Entries are written to a temporary file and renamed into place, so a crash
/// leaves either the old entry or the new one; an entry whose checksum does not
/// match is recompiled, never deserialised.
struct ModuleCache {
    dir: PathBuf,
    engine_key: String,
}

impl ModuleCache {
    fn new(dir: &Path, engine: &wasmtime::Engine) -> ModuleCache {
        let mut hasher = Sha256Hasher(sha2::Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_key = hex::encode(&hasher.0.finalize()[..8]);
        ModuleCache {
            dir: dir.to_path_buf(),
            engine_key,
        }
    }

    fn entry_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join(format!("{}-{}.cwasm", digest.hex(), self.engine_key))
    }

    fn load(&self, engine: &wasmtime::Engine, digest: &Digest) -> Option<Module> {
        let path = self.entry_path(digest);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "module cache entry unreadable; recompiling");
                return None;
            }
        };
        let Some(payload) = verified_payload(&bytes) else {
            tracing::warn!(path = %path.display(), "module cache entry is corrupt; recompiling");
            return None;
        };
        // SAFETY: the payload is exactly what `Module::serialize` wrote for this
        // engine configuration (the key includes its compatibility hash), and
        // its checksum was verified above, so it is not torn or altered by
        // accident. The cache directory belongs to the operator.
        match unsafe { Module::deserialize(engine, payload) } {
            Ok(module) => Some(module),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "module cache entry refused; recompiling");
                None
            }
        }
    }

    fn store(&self, digest: &Digest, module: &Module) {
        let path = self.entry_path(digest);
        if let Err(e) = self.write_entry(&path, module) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write module cache entry");
        }
    }

    fn write_entry(&self, path: &Path, module: &Module) -> anyhow::Result<()> {
        let payload = module.serialize()?;
        fs::create_dir_all(&self.dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        tmp.write_all(CACHE_MAGIC)?;
        tmp.write_all(&sha2::Sha256::digest(&payload))?;
        tmp.write_all(&payload)?;
        tmp.as_file().sync_all()?;
        tmp.persist(path)?;
        Ok(())
    }
}

fn verified_payload(bytes: &[u8]) -> Option<&[u8]> {
    let rest = bytes.strip_prefix(CACHE_MAGIC.as_slice())?;
    if rest.len() < 32 {
        return None;
    }
    let (sum, payload) = rest.split_at(32);
    (sha2::Sha256::digest(payload).as_slice() == sum).then_some(payload)
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

/// Caps linear memory and tables of one store. Remembers that it refused, so a
/// guest that fails after a refused `memory.grow` is reported as `memory_limit`.
pub struct MemoryLimiter {
    limit: usize,
    refused: bool,
}

impl MemoryLimiter {
    pub fn new(limit_bytes: u64) -> MemoryLimiter {
        MemoryLimiter {
            limit: usize::try_from(limit_bytes).unwrap_or(usize::MAX),
            refused: false,
        }
    }

    pub fn refused(&self) -> bool {
        self.refused
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.refused = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_cache_payloads_are_rejected() {
        let payload = b"compiled code";
        let mut entry = CACHE_MAGIC.to_vec();
        entry.extend_from_slice(&sha2::Sha256::digest(payload));
        entry.extend_from_slice(payload);
        assert_eq!(verified_payload(&entry), Some(&payload[..]));
        let last = entry.len() - 1;
        entry[last] ^= 1;
        assert_eq!(verified_payload(&entry), None);
        assert_eq!(verified_payload(b"SGMOD"), None);
        assert_eq!(verified_payload(&entry[..20]), None);
    }
}
