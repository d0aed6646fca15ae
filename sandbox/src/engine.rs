//! The wasmtime engine shared by every policy: pooling allocation, epoch
//! deadlines (one ticker thread), the memory limiter, and the caches of
//! compiled modules (memory, then the authenticated disk cache of `cache`;
//! modules pinned by URL are downloaded through `fetch` only when neither has
//! them). `policy` asks it for compiled modules and creates a `Store` holding
//! one evaluation's host state (`Invocation`).

mod cache;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use cache::{ArtifactCache, ArtifactKind, CacheRefused, CacheReport};
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

/// Compiled modules kept in memory, so a reload (or a rollback to a version
/// loaded earlier) neither recompiles nor reads the disk cache.
const MEMORY_CACHE_ENTRIES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot configure the wasmtime engine: {0}")]
    Setup(String),
    #[error("module does not compile: {0}")]
    Compile(String),
    #[error("the module's bytes have digest {actual}, not {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
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
    cache: DiskCache,
    memory: Arc<Mutex<MemoryCache>>,
    fetcher: Arc<Fetcher>,
    /// One permit per instance slot of the pool (`max_instances`): taken
    /// before instantiating, so a full pool makes an evaluation wait (up to
    /// its deadline), never fail to instantiate.
    instances: Arc<tokio::sync::Semaphore>,
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
        let cache = DiskCache::open(settings.cache_dir.as_deref(), &wasmtime);
        let ticker = Arc::new(EpochTicker::start(wasmtime.clone()));
        Ok(Engine {
            wasmtime,
            cache,
            memory: Arc::new(Mutex::new(MemoryCache::default())),
            fetcher: Arc::new(Fetcher::new(settings)),
            instances: Arc::new(tokio::sync::Semaphore::new(settings.max_instances as usize)),
            _ticker: ticker,
        })
    }

    /// Downloads modules pinned by URL (through the download cache).
    pub fn fetcher(&self) -> &Fetcher {
        &self.fetcher
    }

    /// The instance slots of the pool, one permit each.
    pub fn instances(&self) -> &Arc<tokio::sync::Semaphore> {
        &self.instances
    }

    pub fn wasmtime(&self) -> &wasmtime::Engine {
        &self.wasmtime
    }

    /// The directory of the disk cache when it is in use (configured and
    /// trusted).
    pub fn cache_dir(&self) -> Option<&Path> {
        self.artifact_cache().map(ArtifactCache::dir)
    }

    /// The disk cache of compiled artifacts when it is in use: any artifact
    /// derived from a module (bytes keyed by digest material) is stored and
    /// authenticated there under the same trust rules as compiled modules.
    pub fn artifact_cache(&self) -> Option<&ArtifactCache> {
        match &self.cache {
            DiskCache::On(cache) => Some(cache),
            DiskCache::Off | DiskCache::Refused(_) => None,
        }
    }

    /// Whether the disk cache is in use, off, or refused and why.
    pub fn cache_report(&self) -> CacheReport {
        match &self.cache {
            DiskCache::Off => CacheReport {
                state: "off",
                dir: None,
                reason: None,
            },
            DiskCache::On(cache) => CacheReport {
                state: "on",
                dir: Some(cache.dir().display().to_string()),
                reason: None,
            },
            DiskCache::Refused(refused) => CacheReport {
                state: "refused",
                dir: Some(refused.path.display().to_string()),
                reason: Some(refused.reason.clone()),
            },
        }
    }

    /// Compiles a module, or loads it from the caches when this process or
    /// the disk cache holds an authenticated entry for this digest and engine
    /// configuration. `bytes` must have `digest`: the cache entry written is
    /// bound to it. May block: call it off the request path.
    pub fn compile(
        &self,
        bytes: &[u8],
        digest: &Digest,
    ) -> Result<(Module, CompiledFrom), EngineError> {
        // A caller's mistake here would store one module under another's
        // digest, which is exactly the poisoning the cache refuses.
        let actual = Digest::of(bytes);
        if actual != *digest {
            return Err(EngineError::DigestMismatch {
                expected: *digest,
                actual,
            });
        }
        if let Some(found) = self.cached(digest) {
            return Ok(found);
        }
        let module = Module::new(&self.wasmtime, bytes)
            .map_err(|e| EngineError::Compile(format!("{e:#}")))?;
        if let Some(cache) = self.artifact_cache() {
            match module.serialize() {
                Ok(payload) => cache.store(ArtifactKind::MODULE, digest, &payload),
                Err(e) => {
                    tracing::warn!(digest = %digest, error = %format!("{e:#}"), "cannot serialise a compiled module for the disk cache")
                }
            }
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
        let cache = self.artifact_cache()?;
        let payload = cache.load(ArtifactKind::MODULE, digest)?;
        // SAFETY: `load` returns only a payload authenticated with this
        // daemon's private key over (format, kind, engine compatibility hash,
        // digest, payload), so these are the bytes `Module::serialize` wrote
        // in `compile` for a module whose bytes had `digest`, under this
        // engine configuration; the bytes are in memory, verified as held.
        let module = match unsafe { Module::deserialize(&self.wasmtime, &payload) } {
            Ok(module) => module,
            Err(e) => {
                tracing::warn!(path = %cache.entry_path(ArtifactKind::MODULE, digest).display(), error = %format!("{e:#}"), "module cache entry refused by wasmtime; recompiling");
                return None;
            }
        };
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

/// The disk cache as configured: off, in use, or refused (the daemon then
/// compiles at every start and says why in its log, `/readyz` and `check`).
#[derive(Clone)]
enum DiskCache {
    Off,
    On(Arc<ArtifactCache>),
    Refused(Arc<CacheRefused>),
}

impl DiskCache {
    fn open(dir: Option<&Path>, engine: &wasmtime::Engine) -> DiskCache {
        let Some(dir) = dir else {
            return DiskCache::Off;
        };
        match ArtifactCache::open(dir, engine) {
            Ok(cache) => DiskCache::On(Arc::new(cache)),
            Err(refused) => {
                tracing::warn!(
                    path = %refused.path.display(),
                    reason = %refused.reason,
                    "module cache refused: not trusted, so nothing is read from or written to it; modules are compiled at every start"
                );
                DiskCache::Refused(Arc::new(refused))
            }
        }
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
