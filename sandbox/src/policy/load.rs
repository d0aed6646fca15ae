//! Loading one policy version: obtaining its compiled module (memory, disk
//! cache, file or download, digest checked), validating it against its ABI,
//! running init into a snapshot (or taking one from the cache of init
//! results), and linking the host modules into an `InstancePre`.
//! `Policy::load` drives these; `snapshot` links its init instance here too.

use std::time::Instant;

use wasmtime::{InstancePre, Linker, Module};

use crate::abi::{self};
use crate::audit::AuditLog;
use crate::config::{Abi, Digest, ModuleSource, PolicySpec};
use crate::engine::{CompiledFrom, Engine};
use crate::fetch::Fetched;
use crate::host::{self, Invocation};
use crate::proxywasm;

use super::{LoadError, SnapshotFacts, init_cache, snapshot};

/// The compiled module of `spec`: a file is read (and checked against its pin
/// when it has one), then compiled through the engine's caches; a URL's
/// pinned digest is looked up in the compiled caches first, and the module
/// is fetched (download cache, then network) only when they miss.
pub(super) async fn obtain(
    engine: &Engine,
    spec: &PolicySpec,
    invalid: &(dyn Fn(String) -> LoadError + Sync),
) -> Result<
    (
        Module,
        Digest,
        CompiledFrom,
        Option<Fetched>,
        Option<Vec<u8>>,
    ),
    LoadError,
> {
    let internal = |message: String| LoadError::Internal {
        policy: spec.name.clone(),
        message,
    };
    let (bytes, digest, fetched) = match &spec.module {
        ModuleSource::File(path) => {
            let bytes = tokio::fs::read(path)
                .await
                .map_err(|source| LoadError::Read {
                    policy: spec.name.clone(),
                    path: path.display().to_string(),
                    source,
                })?;
            let digest = Digest::of(&bytes);
            if let Some(expected) = spec.sha256
                && expected != digest
            {
                return Err(LoadError::DigestMismatch {
                    policy: spec.name.clone(),
                    source_name: path.display().to_string(),
                    expected,
                    actual: digest,
                });
            }
            (bytes, digest, Fetched::File)
        }
        ModuleSource::Builtin(language) => {
            let bytes = language.module().to_vec();
            let digest = Digest::of(&bytes);
            (bytes, digest, Fetched::File)
        }
        ModuleSource::Url(url) => {
            let Some(digest) = spec.sha256 else {
                return Err(invalid(
                    "a module fetched from a URL must be pinned with `sha256`".into(),
                ));
            };
            let lookup = {
                let engine = engine.clone();
                tokio::task::spawn_blocking(move || engine.cached(&digest))
            };
            if let Some((module, from)) = lookup
                .await
                .map_err(|e| internal(format!("module cache task failed: {e}")))?
            {
                return Ok((module, digest, from, None, None));
            }
            let (bytes, fetched) = engine
                .fetcher()
                .fetch(url, digest)
                .await
                .map_err(|source| LoadError::Fetch {
                    policy: spec.name.clone(),
                    source,
                })?;
            (bytes, digest, fetched)
        }
    };
    let compiled = {
        let engine = engine.clone();
        tokio::task::spawn_blocking(move || (engine.compile(&bytes, &digest), bytes))
            .await
            .map_err(|e| internal(format!("compile task failed: {e}")))?
    };
    let (module, from) = compiled.0.map_err(|e| invalid(e.to_string()))?;
    Ok((module, digest, from, Some(fetched), Some(compiled.1)))
}

/// The initialised module of a policy whose module has state to keep
/// (`_initialize`, `sandgate_init`), compiled through the engine's caches
/// under its own digest, with what `check` reports about it. A module with
/// nothing to initialise is evaluated as it is.
pub(super) async fn initialise(
    engine: &Engine,
    spec: &PolicySpec,
    module: &Module,
    digest: &Digest,
    bytes: Option<Vec<u8>>,
    audit: &AuditLog,
    invalid: &(dyn Fn(String) -> LoadError + Sync),
) -> Result<(Option<(Module, Digest)>, Option<SnapshotFacts>), LoadError> {
    let snapshot::Plan::Snapshot { sandgate_init } = snapshot::Plan::of(module) else {
        return Ok((None, None));
    };
    let started = Instant::now();
    let cache = engine.artifact_cache();
    let material = init_cache::material(spec, digest);
    let hit = cache.and_then(|cache| init_cache::lookup(cache, &material, &spec.name));
    let cached = hit.is_some();
    let initialised = match hit {
        Some(hit) => snapshot::Initialised {
            bytes: hit.bytes,
            digest: hit.digest,
            took: started.elapsed(),
            reads: Vec::new(),
            bridged: false,
        },
        None => {
            let bytes = module_bytes(engine, spec, digest, bytes).await?;
            let initialised = match snapshot::initialise(engine, spec, &bytes, digest, audit).await
            {
                Ok(initialised) => initialised,
                Err(snapshot::InitError::Unsupported(why)) if !sandgate_init => {
                    tracing::warn!(
                        policy = %spec.name,
                        version = %spec.version,
                        "no snapshot ({why}); _initialize runs at every evaluation"
                    );
                    return Ok((None, None));
                }
                Err(snapshot::InitError::Unsupported(why)) => {
                    return Err(invalid(format!(
                        "it exports `{}`, but its state cannot be snapshotted: {why}",
                        snapshot::INIT_EXPORT
                    )));
                }
                Err(snapshot::InitError::Failed(why)) => return Err(invalid(why)),
            };
            if let Some(cache) = cache {
                if initialised.bridged {
                    tracing::info!(
                        policy = %spec.name,
                        version = %spec.version,
                        "init made a bridged HTTP call: its snapshot is not cached"
                    );
                } else {
                    init_cache::store(
                        cache,
                        &material,
                        (&initialised.digest, &initialised.bytes),
                        &initialised.reads,
                        spec.grants.preopens.iter().map(|p| p.host.clone()),
                    );
                }
            }
            initialised
        }
    };
    let snapshot_digest = initialised.digest;
    let compiled = {
        let engine = engine.clone();
        tokio::task::spawn_blocking(move || engine.compile(&initialised.bytes, &snapshot_digest))
            .await
            .map_err(|e| LoadError::Internal {
                policy: spec.name.clone(),
                message: format!("compile task failed: {e}"),
            })?
    };
    let (snapshot_module, _) = compiled.map_err(|e| invalid(format!("initialised module: {e}")))?;
    validate(&spec.abi, &snapshot_module)
        .map_err(|e| invalid(format!("initialised module: {e}")))?;
    tracing::info!(
        policy = %spec.name,
        version = %spec.version,
        snapshot = %snapshot_digest,
        sandgate_init,
        init_ms = initialised.took.as_millis() as u64,
        cached,
        "policy initialised; evaluations start from its snapshot"
    );
    let facts = SnapshotFacts {
        digest: snapshot_digest.to_string(),
        sandgate_init,
        init_ms: initialised.took.as_millis() as u64,
        cached,
    };
    Ok((Some((snapshot_module, snapshot_digest)), Some(facts)))
}

/// The module's bytes for the snapshot's rewrite: those the load read, or,
/// when the compiled module came from the cache without them, read or fetched
/// again. Only an init-cache miss needs them.
async fn module_bytes(
    engine: &Engine,
    spec: &PolicySpec,
    digest: &Digest,
    bytes: Option<Vec<u8>>,
) -> Result<Vec<u8>, LoadError> {
    Ok(match (bytes, &spec.module) {
        (Some(bytes), _) => bytes,
        // Compiled and cached, but the rewrite needs the module's bytes.
        (None, ModuleSource::Url(url)) => {
            engine
                .fetcher()
                .fetch(url, *digest)
                .await
                .map_err(|source| LoadError::Fetch {
                    policy: spec.name.clone(),
                    source,
                })?
                .0
        }
        (None, ModuleSource::Builtin(language)) => language.module().to_vec(),
        (None, ModuleSource::File(path)) => {
            tokio::fs::read(path)
                .await
                .map_err(|source| LoadError::Read {
                    policy: spec.name.clone(),
                    path: path.display().to_string(),
                    source,
                })?
        }
    })
}

pub(super) fn imports_of(module: &Module, import_module: &str) -> Vec<String> {
    module
        .imports()
        .filter(|i| i.module() == import_module)
        .map(|i| i.name().to_owned())
        .collect()
}

pub(super) fn link(
    engine: &Engine,
    module: &Module,
    grants: &crate::config::Grants,
    abi: &Abi,
) -> Result<InstancePre<Invocation>, String> {
    let mut linker = Linker::new(engine.wasmtime());
    match abi {
        Abi::SandgateV1 => host::add_to_linker(&mut linker, module, grants)?,
        Abi::ProxyWasm(_) => host::add_filter_to_linker(&mut linker, module, grants)?,
    }
    linker
        .instantiate_pre(module)
        .map_err(|e| format!("cannot link the module: {e:#}"))
}

/// Checks a module against the ABI its policy declares.
pub(super) fn validate(abi: &Abi, module: &Module) -> Result<(), String> {
    match abi {
        Abi::SandgateV1 => abi::validate(module).map_err(|e| match proxywasm::abi_version(module) {
            Some(version) => format!(
                "{e}: it is a proxy-wasm {version} filter; configure it with abi = \"proxy-wasm\""
            ),
            None => e,
        }),
        Abi::ProxyWasm(_) => proxywasm::validate(module),
    }
}
