//! Hot reload. A reload reads the config file again, loads every policy and
//! version of it off the request path (modules compiled through the engine's
//! caches, so unchanged ones cost a lookup), and only when all of that
//! succeeded swaps the new generation in, whole. Anything that fails — the
//! config, a module that does not compile or does not match its pin, a
//! setting that needs a restart — changes nothing: the previous generation
//! keeps serving, and the failure is logged, shown in `/readyz` and counted.
//! Requests in flight keep the generation and version they started with.
//! Triggers: SIGHUP, `POST /v1/reload`, and changes to the config file, a
//! module file or a file in the preopens of a policy that ran `sandgate_init`
//! (its snapshot holds what init read; watched with `notify`, debounced).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;

use super::registry::{Generation, Serving, Slot, State, Status};
use crate::config::{self, Config, Digest, ModuleSource};
use crate::policy::VersionSummary;
use crate::policy::Versions;
use crate::telemetry::log::Escaped;

/// How long a stream of file events may postpone a reload beyond ten
/// debounce periods.
const MAX_QUIET_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// What asked for a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Trigger {
    Signal,
    Api,
    Watch,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "sighup",
            Trigger::Api => "api",
            Trigger::Watch => "file change",
        }
    }
}

/// One reload attempt, as `/readyz` and `POST /v1/reload` report it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ReloadRecord {
    /// RFC 3339 time the attempt finished.
    pub at: String,
    pub trigger: &'static str,
    /// `ok` or `failed`.
    pub result: &'static str,
    /// The generation serving after the attempt.
    pub generation: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The policies of the generation serving after the attempt, with their versions.
    pub policies: HashMap<String, Vec<VersionSummary>>,
}

impl ReloadRecord {
    pub(crate) fn ok(&self) -> bool {
        self.result == "ok"
    }
}

/// The reload machinery of a daemon: one reload at a time, the last
/// attempt, the file watcher and its wake-up.
#[derive(Default)]
pub(crate) struct Reloads {
    serial: tokio::sync::Mutex<()>,
    last: Mutex<Option<ReloadRecord>>,
    watcher: Mutex<Option<Watcher>>,
    wake: Arc<Notify>,
}

impl Reloads {
    pub(crate) fn last(&self) -> Option<ReloadRecord> {
        self.last.lock().ok().and_then(|last| last.clone())
    }
}

/// A config read and every policy of it loaded, not yet serving.
struct Prepared {
    config: Config,
    config_digest: Digest,
    loaded: HashMap<String, Versions>,
}

impl State {
    /// Reloads the config file and every module; applies the result whole or
    /// not at all. Returns `None` when a file event changed nothing.
    pub(crate) async fn reload(&self, trigger: Trigger) -> Option<ReloadRecord> {
        let _one_at_a_time = self.reloads.serial.lock().await;
        let current = self.current();
        let prepared = self.prepare(&current).await;
        if let Ok(prepared) = &prepared
            && trigger == Trigger::Watch
            && unchanged(&current, prepared)
        {
            if self.reloads.last().is_none_or(|last| last.ok()) {
                tracing::debug!("file event, but the config and modules are unchanged");
                return None;
            }
            // The files are back to what serves (a bad edit reverted): the
            // last failure no longer describes them, so it is cleared.
            self.metrics.reloaded(true, current.number);
            tracing::info!(
                generation = current.number,
                trigger = trigger.as_str(),
                "config and modules are back to the serving generation; last reload failure cleared"
            );
            let record = record(trigger, &current, None);
            if let Ok(mut last) = self.reloads.last.lock() {
                *last = Some(record.clone());
            }
            return Some(record);
        }
        let record = match prepared {
            Ok(prepared) => {
                let generation = self.apply(&current, prepared);
                self.metrics.reloaded(true, generation.number);
                for (name, versions) in summaries(&generation) {
                    for v in versions {
                        tracing::info!(policy = %name, version = %v.version, weight = v.weight, digest = %v.digest, generation = generation.number, "policy serving");
                    }
                }
                tracing::info!(
                    generation = generation.number,
                    trigger = trigger.as_str(),
                    "reload applied"
                );
                record(trigger, &generation, None)
            }
            Err(error) => {
                self.metrics.reloaded(false, current.number);
                tracing::error!(
                    generation = current.number,
                    trigger = trigger.as_str(),
                    error = %Escaped(&error),
                    "reload failed; generation {} keeps serving",
                    current.number
                );
                record(trigger, &current, Some(error))
            }
        };
        if let Ok(mut last) = self.reloads.last.lock() {
            *last = Some(record.clone());
        }
        Some(record)
    }

    /// Reads and validates the config, refuses changes that need a restart,
    /// and loads every policy. Every failure is collected into one message.
    async fn prepare(&self, current: &Generation) -> Result<Prepared, String> {
        let path = current.config.source.clone();
        let read = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                let text = std::fs::read(&path)
                    .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
                let digest = Digest::of(&text);
                let text = String::from_utf8(text)
                    .map_err(|_| format!("config {} is not UTF-8", path.display()))?;
                let config = config::parse(&text, &path).map_err(|e| e.to_string())?;
                Ok::<_, String>((config, digest))
            })
        };
        let (config, config_digest) = read
            .await
            .map_err(|e| format!("config task failed: {e}"))??;
        self.watch_files(&[&current.config, &config], init_reads(current));
        let restart = restart_only_changes(&current.config, &config);
        if !restart.is_empty() {
            return Err(format!(
                "{} changed; these settings take effect only when the daemon restarts (restart it, or put them back)",
                restart.join(", ")
            ));
        }
        let mut loading = JoinSet::new();
        for spec in &config.policies {
            let (engine, spec, audit) = (self.engine.clone(), spec.clone(), self.audit.clone());
            loading.spawn(async move {
                let loaded = Versions::load(&engine, &spec, &audit).await;
                (spec.name, loaded)
            });
        }
        let mut loaded = HashMap::new();
        let mut failures = Vec::new();
        while let Some(joined) = loading.join_next().await {
            match joined {
                Ok((name, Ok(versions))) => {
                    loaded.insert(name, versions);
                }
                Ok((_, Err(e))) => failures.push(e.to_string()),
                Err(e) => failures.push(format!("load task failed: {e}")),
            }
        }
        if !failures.is_empty() {
            failures.sort();
            return Err(failures.join("; "));
        }
        let mut trees = init_reads(current);
        trees.extend(loaded.values().flat_map(versions_init_reads));
        self.watch_files(&[&current.config, &config], trees);
        Ok(Prepared {
            config,
            config_digest,
            loaded,
        })
    }

    /// Swaps the prepared generation in. Policies keep their `max_in_flight`
    /// gate across the swap when its size did not change, so evaluations of
    /// the old and new generation share one limit.
    fn apply(&self, current: &Generation, prepared: Prepared) -> Arc<Generation> {
        let Prepared {
            config,
            config_digest,
            mut loaded,
        } = prepared;
        let mut slots = HashMap::new();
        for spec in &config.policies {
            let Some(versions) = loaded.remove(&spec.name) else {
                continue;
            };
            let permits = match current.slots.get(&spec.name) {
                Some(old) if old.spec.max_in_flight == spec.max_in_flight => {
                    Arc::clone(&old.permits)
                }
                _ => Arc::new(Semaphore::new(spec.max_in_flight as usize)),
            };
            let metrics = self.metrics.policy(&spec.name, &spec.version);
            metrics.set_ready(true);
            let serving = Serving::new(versions, spec, &self.metrics);
            let slot = Slot {
                spec: spec.clone(),
                permits,
                metrics,
                status: RwLock::new(Status::Ready(Arc::new(serving))),
            };
            slots.insert(spec.name.clone(), Arc::new(slot));
        }
        for name in current.slots.keys() {
            if !slots.contains_key(name) {
                self.metrics.forget_policy(name);
            }
        }
        let generation = Arc::new(Generation::new(
            current.number + 1,
            config,
            Some(config_digest),
            slots,
        ));
        match self.generation.write() {
            Ok(mut serving) => *serving = Arc::clone(&generation),
            Err(poisoned) => *poisoned.into_inner() = Arc::clone(&generation),
        }
        generation
    }

    /// Points the file watcher at what the serving generation depends on
    /// (once a policy of the first generation has loaded, its preopens).
    pub(crate) fn watch_serving(&self) {
        let current = self.current();
        self.watch_files(&[&current.config], init_reads(&current));
    }

    /// Points the file watcher at the config files and module files of
    /// `configs` and at the directories init read (`trees`).
    fn watch_files(&self, configs: &[&Config], trees: HashSet<PathBuf>) {
        let Ok(mut watcher) = self.reloads.watcher.lock() else {
            return;
        };
        if let Some(watcher) = watcher.as_mut() {
            watcher.update(watched_files(configs), trees);
        }
    }
}

/// The preopened directories of the serving policies that ran `sandgate_init`.
fn init_reads(generation: &Generation) -> HashSet<PathBuf> {
    generation
        .slots
        .values()
        .filter_map(|slot| match slot.status() {
            Status::Ready(serving) => Some(versions_init_reads(&serving.versions)),
            _ => None,
        })
        .flatten()
        .collect()
}

fn versions_init_reads(versions: &Versions) -> Vec<PathBuf> {
    versions
        .iter()
        .flat_map(|(policy, _)| policy.init_reads())
        .collect()
}

/// Whether a prepared generation is the one serving: same config text, every
/// policy loaded with the same module digests and the same snapshots (init
/// may have read other data).
fn unchanged(current: &Generation, prepared: &Prepared) -> bool {
    if current.config_digest != Some(prepared.config_digest) {
        return false;
    }
    current.slots.iter().all(|(name, slot)| {
        let Status::Ready(serving) = slot.status() else {
            return false;
        };
        let Some(new) = prepared.loaded.get(name) else {
            return false;
        };
        serving.versions.len() == new.len()
            && serving
                .versions
                .iter()
                .zip(new.iter())
                .all(|((a, _), (b, _))| {
                    a.digest() == b.digest() && a.snapshot_digest() == b.snapshot_digest()
                })
    })
}

/// The settings a running daemon cannot change: listeners, audit log,
/// telemetry, probes, engine.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut changed = Vec::new();
    if old.server.listen != new.server.listen {
        changed.push(format!(
            "server.listen ({} -> {})",
            old.server.listen, new.server.listen
        ));
    }
    if old.server.grpc_listen != new.server.grpc_listen {
        let show = |a: Option<std::net::SocketAddr>| a.map_or("none".to_owned(), |a| a.to_string());
        changed.push(format!(
            "server.grpc_listen ({} -> {})",
            show(old.server.grpc_listen),
            show(new.server.grpc_listen)
        ));
    }
    if old.server.syscall_filter != new.server.syscall_filter {
        changed.push(format!(
            "server.syscall_filter ({} -> {})",
            old.server.syscall_filter, new.server.syscall_filter
        ));
    }
    let (o, n) = (&old.server, &new.server);
    if (o.header_read_timeout, o.idle_timeout, o.max_connections)
        != (n.header_read_timeout, n.idle_timeout, n.max_connections)
    {
        changed
            .push("server.header_read_timeout_ms, idle_timeout_ms or max_connections".to_owned());
    }
    if old.audit != new.audit {
        changed.push("[audit]".to_owned());
    }
    if old.telemetry != new.telemetry {
        changed.push("[telemetry]".to_owned());
    }
    if old.ebpf != new.ebpf || old.ebpf_enforce != new.ebpf_enforce {
        changed.push("[ebpf]".to_owned());
    }
    if old.engine != new.engine {
        changed.push("[engine]".to_owned());
    }
    changed
}

fn summaries(generation: &Generation) -> HashMap<String, Vec<VersionSummary>> {
    generation
        .slots
        .iter()
        .map(|(name, slot)| {
            let versions = match slot.status() {
                Status::Ready(serving) => serving.summary(),
                _ => Vec::new(),
            };
            (name.clone(), versions)
        })
        .collect()
}

fn record(trigger: Trigger, generation: &Generation, error: Option<String>) -> ReloadRecord {
    ReloadRecord {
        at: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        trigger: trigger.as_str(),
        result: if error.is_none() { "ok" } else { "failed" },
        generation: generation.number,
        error,
        policies: summaries(generation),
    }
}

/// The files whose change means a reload: each config file and every
/// module file of every version, also by the path symlinks resolve to (a
/// Kubernetes ConfigMap swaps a symlinked directory).
fn watched_files(configs: &[&Config]) -> HashSet<PathBuf> {
    let mut files = HashSet::new();
    for config in configs {
        files.insert(config.source.clone());
        for spec in &config.policies {
            for version in &spec.versions {
                if let ModuleSource::File(path) = &version.module {
                    files.insert(path.clone());
                }
            }
        }
    }
    let resolved: Vec<PathBuf> = files
        .iter()
        .filter_map(|f| std::fs::canonicalize(f).ok())
        .collect();
    files.extend(resolved);
    files
}

/// Starts watching the config and module files of the serving generation and
/// the task that reloads after a change (once the files are quiet for
/// `reload.debounce_ms`). Without a working watcher the daemon still reloads
/// on SIGHUP and `POST /v1/reload`, and logs why it does not watch.
pub(super) fn watch(state: &Arc<State>) {
    let wake = Arc::clone(&state.reloads.wake);
    let files = Arc::new(Mutex::new(Watched::default()));
    let handler = {
        let (wake, files) = (Arc::clone(&wake), Arc::clone(&files));
        move |event: notify::Result<notify::Event>| match event {
            Ok(event) if relevant(&event, &files) => wake.notify_one(),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "watching the config and module files failed"),
        }
    };
    match notify::recommended_watcher(handler) {
        Ok(inner) => {
            let mut watcher = Watcher {
                inner,
                dirs: HashSet::new(),
                files,
            };
            let current = state.current();
            watcher.update(watched_files(&[&current.config]), init_reads(&current));
            if let Ok(mut slot) = state.reloads.watcher.lock() {
                *slot = Some(watcher);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the config and module files; reload with SIGHUP or POST /v1/reload");
            return;
        }
    }
    let state = Arc::clone(state);
    tokio::spawn(async move {
        loop {
            wake.notified().await;
            let settings = state.current().config.reload.clone();
            // Let a burst of writes settle into one reload, but do not wait
            // forever for a file that keeps changing.
            let latest = tokio::time::Instant::now() + settings.debounce * 10 + MAX_QUIET_WAIT;
            while tokio::time::timeout(settings.debounce, wake.notified())
                .await
                .is_ok()
                && tokio::time::Instant::now() < latest
            {}
            if settings.watch {
                state.reload(Trigger::Watch).await;
            }
        }
    });
}

/// A file event about a watched file that may have changed its content
/// (opening or reading one, as a reload does, is not).
fn relevant(event: &notify::Event, files: &Mutex<Watched>) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode};
    let may_change = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    };
    may_change
        && files.lock().is_ok_and(|watched| {
            event.paths.iter().any(|p| {
                watched.files.contains(p)
                    || p.parent().is_some_and(|dir| watched.trees.contains(dir))
            })
        })
}

/// What a file event must name to matter: a watched file, or any entry of a
/// directory init read.
#[derive(Default)]
struct Watched {
    files: HashSet<PathBuf>,
    trees: HashSet<PathBuf>,
}

/// The directories watched (a file replaced by rename is only seen from its
/// directory) and the files in them that matter.
struct Watcher {
    inner: notify::RecommendedWatcher,
    dirs: HashSet<PathBuf>,
    files: Arc<Mutex<Watched>>,
}

impl Watcher {
    fn update(&mut self, files: HashSet<PathBuf>, trees: HashSet<PathBuf>) {
        use notify::Watcher as _;
        let dirs: HashSet<PathBuf> = files
            .iter()
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .chain(trees.iter().cloned())
            .collect();
        for gone in self.dirs.difference(&dirs) {
            let _ = self.inner.unwatch(gone);
        }
        let mut watching = HashSet::new();
        for dir in dirs {
            if self.dirs.contains(&dir) {
                watching.insert(dir);
                continue;
            }
            match self.inner.watch(&dir, notify::RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watching.insert(dir);
                }
                // Tried again at the next reload (the directory may not exist yet).
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory; changes in it reload only on SIGHUP or POST /v1/reload")
                }
            }
        }
        self.dirs = watching;
        if let Ok(mut watched) = self.files.lock() {
            *watched = Watched { files, trees };
        }
    }
}
