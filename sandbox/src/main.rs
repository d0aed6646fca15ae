//! The `sandgate` binary: argument parsing over the library (DESIGN §4).
//! Exit codes: 0 done, 1 a check or inspection found a problem, 2 usage or
//! configuration error, 3 the evaluation failed (its fail-closed decision is
//! still printed).
//!
//! Over 600 lines: one function per command of DESIGN §4 and the rendering of
//! what `check` and `inspect` print; each is short, and splitting them
//! would scatter the CLI contract over files.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use sandgate::audit::AuditLog;
use sandgate::config::{self, AuditTarget, Config, EngineSettings, PolicySpec};
use sandgate::engine::CacheReport;
use sandgate::policy::PolicyReport;
use sandgate::{Engine, EvalOptions, FailMode, Policy, abi, policy, wasi};

/// mimalloc instead of the system allocator: the daemon allocates on every
/// thread (HTTP workers, guests, the audit writer, the span exporter), and
/// glibc's arenas made those threads wait on each other's locks.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sandgate",
    version,
    about = "Policy sandbox runtime: WebAssembly policies behind ext_authz, auth_request and a JSON API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Evaluate one input and print the decision JSON.
    Eval {
        /// The policy module (.wasm or .wat). Without --config nothing is granted.
        #[arg(long, required_unless_present = "policy")]
        module: Option<PathBuf>,
        /// Input JSON file, or `-` for stdin.
        #[arg(long)]
        input: PathBuf,
        /// Evaluate with this config's capabilities for --policy.
        #[arg(long, requires = "policy")]
        config: Option<PathBuf>,
        /// The policy of --config to evaluate.
        #[arg(long, requires = "config")]
        policy: Option<String>,
        /// Append this evaluation's audit lines to FILE.
        #[arg(long)]
        audit: Option<PathBuf>,
    },
    /// Validate the config and every module; print what each policy is granted.
    Check {
        #[arg(long)]
        config: PathBuf,
        /// Print the resolved settings as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the daemon: the HTTP API, forward-auth and Envoy ext_authz gRPC.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Receive OTLP traces and print their span trees (a terminal view of
    /// what the daemon exports, for machines without Jaeger).
    Trace(sandgate::cli::trace::Args),
    /// Show a module's imports, exports, ABI version and the WASI it needs.
    Inspect {
        #[arg(long)]
        module: PathBuf,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `println!` for the CLI's output: a closed pipe (`sandgate inspect … |
/// head`) ends the process quietly with exit code 0, as it would end `cat`;
/// any other write error is reported and exits 1. Never a panic.
macro_rules! out {
    () => {
        write_stdout(format_args!(""))
    };
    ($($arg:tt)*) => {
        write_stdout(format_args!($($arg)*))
    };
}

fn write_stdout(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let written = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("sandgate: cannot write to stdout: {e}");
            std::process::exit(1);
        }
    }
}

/// An error that exits with code 2 (usage or configuration).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    // The trace view is one receiver printing to one terminal: a single
    // thread serves it without handing each export between threads.
    let mut builder = match cli.command {
        Command::Trace(_) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sandgate: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sandgate: {e:#}");
            if e.downcast_ref::<UsageError>().is_some()
                || e.downcast_ref::<config::ConfigError>().is_some()
            {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SANDGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sandgate::guest=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Eval {
            module,
            input,
            config,
            policy,
            audit,
        } => eval(module, &input, config, policy, audit).await,
        Command::Check { config, json } => check(&config, json).await,
        Command::Inspect { module, json } => inspect(&module, json).await,
        Command::Serve { config } => serve(&config).await,
        Command::Trace(args) => {
            sandgate::cli::trace::run(args).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn eval(
    module: Option<PathBuf>,
    input: &Path,
    config_path: Option<PathBuf>,
    policy_name: Option<String>,
    audit_path: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let (mut spec, engine_settings) = match (&config_path, &policy_name) {
        (Some(path), Some(name)) => {
            let config = config::load(path)?;
            let spec = config
                .policies
                .iter()
                .find(|p| &p.name == name)
                .cloned()
                .ok_or_else(|| {
                    let known: Vec<&str> =
                        config.policies.iter().map(|p| p.name.as_str()).collect();
                    UsageError(format!(
                        "policy `{name}` is not in {} (it has: {})",
                        path.display(),
                        known.join(", ")
                    ))
                })?;
            (spec, config.engine)
        }
        _ => {
            let Some(module) = &module else {
                return Err(UsageError("give --module, or --config with --policy".into()).into());
            };
            (PolicySpec::for_module(module), EngineSettings::default())
        }
    };
    if let Some(module) = module {
        spec = spec.with_module(config::ModuleSource::File(module));
    }
    let input = read_input(input)?;
    let audit = match &audit_path {
        Some(path) => AuditLog::open(&AuditTarget::File(path.clone()))
            .map_err(|e| UsageError(format!("cannot open audit log: {e}")))?,
        None => AuditLog::disabled(),
    };
    let engine = Engine::new(&engine_settings)?;
    let evaluation = match Policy::load_audited(&engine, spec.clone(), &audit).await {
        Ok(policy) => {
            policy
                .evaluate(&input, &EvalOptions::default(), &audit)
                .await
        }
        Err(e) => {
            // The module could not be loaded: still answer with the
            // fail-closed decision the daemon would give.
            let decision = sandgate::Decision::failed(e.code(), e.to_string(), spec.fail_mode);
            out!("{}", serde_json::to_string(&decision)?);
            eprintln!("sandgate: {e}");
            audit.flush();
            return Ok(ExitCode::from(3));
        }
    };
    audit.flush();
    // The guest's output is written by the log writer thread: let it finish
    // before the process exits.
    sandgate::telemetry::log::flush(GUEST_LOG_FLUSH);
    out!("{}", serde_json::to_string(&evaluation.decision)?);
    Ok(if evaluation.decision.error.is_some() {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

/// How long `sandgate eval` waits for the guest's output to reach the log.
const GUEST_LOG_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

fn read_input(path: &Path) -> anyhow::Result<Vec<u8>> {
    if path == Path::new("-") {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading input from stdin")?;
        return Ok(buf);
    }
    std::fs::read(path)
        .map_err(|e| UsageError(format!("cannot read input {}: {e}", path.display())).into())
}

async fn check(path: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let config = config::load(path)?;
    for warning in config.warnings() {
        eprintln!("sandgate: warning: {warning}");
    }
    let engine = Engine::new(&config.engine)?;
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for spec in &config.policies {
        match sandgate::policy::Versions::load(
            &engine,
            spec,
            &sandgate::audit::AuditLog::disabled(),
        )
        .await
        {
            Ok(versions) => {
                let mut policy_report = PolicyReport::of(&versions);
                if let Some(language) = &mut policy_report.language
                    && let Some((policy, _)) = versions.iter().next()
                {
                    language.policy_ids = policy_ids(policy).await;
                }
                report.push(policy_report);
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    if json {
        out!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "config": config.source,
                "server": {
                    "listen": config.server.listen.to_string(),
                    "grpc_listen": config.server.grpc_listen.map(|a| a.to_string()),
                    "header_read_timeout_ms": config.server.header_read_timeout.as_millis() as u64,
                    "idle_timeout_ms": config.server.idle_timeout.as_millis() as u64,
                    "max_connections": config.server.max_connections.limit,
                    "forward_auth_headers": config.server.forward_auth_headers.as_str(),
                    "syscall_filter": config.server.syscall_filter.as_str(),
                },
                "module_cache": engine.cache_report(),
                "policies": report,
                "errors": failures,
            }))?
        );
    } else {
        print_check(&config, &report, &engine.cache_report());
    }
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("sandgate: {f}");
        }
        bail!(UsageError(format!(
            "{} of {} policies failed to load",
            failures.len(),
            config.policies.len()
        )));
    }
    Ok(ExitCode::SUCCESS)
}

/// The ids of a Cedar policy's loaded policies, as its guest lists them;
/// `None` for other languages.
async fn policy_ids(policy: &Policy) -> Option<Vec<String>> {
    let language = policy.spec().language.as_ref()?;
    if language.language != sandgate::language::Language::Cedar {
        return None;
    }
    let options = EvalOptions {
        query: Some(sandgate::language::CEDAR_DESCRIBE.to_owned()),
        ..EvalOptions::default()
    };
    let answer = policy
        .evaluate(b"null", &options, &AuditLog::disabled())
        .await;
    let ids = answer
        .decision
        .extra
        .get("obligations")?
        .get(sandgate::language::CEDAR_POLICIES)?
        .as_array()?
        .iter()
        .filter_map(|id| id.as_str().map(str::to_owned))
        .collect();
    Some(ids)
}

fn print_check(config: &Config, report: &[PolicyReport], cache: &CacheReport) {
    out!("config {}: ok", config.source.display());
    out!("  listen {}", config.server.listen);
    if let Some(grpc) = config.server.grpc_listen {
        out!("  grpc_listen {grpc}");
    }
    let server = &config.server;
    let cap = &server.max_connections;
    out!(
        "  connections: at most {}{}, header_read_timeout {} ms, idle_timeout {} ms",
        cap.limit,
        cap.derived_from
            .map(|n| format!(" (derived from RLIMIT_NOFILE {n})"))
            .unwrap_or_default(),
        server.header_read_timeout.as_millis(),
        server.idle_timeout.as_millis()
    );
    out!(
        "  forward_auth_headers {}",
        server.forward_auth_headers.as_str()
    );
    out!("  syscall_filter {}", server.syscall_filter);
    let dir = cache.dir.as_deref().unwrap_or_default();
    match (cache.state, &cache.reason) {
        ("on", _) => out!("  module cache {dir}"),
        (_, Some(reason)) => {
            out!("  module cache refused ({dir}): {reason}; modules are compiled at every start")
        }
        _ => out!("  module cache off"),
    }
    if let Some(dir) = &config.engine.download_dir
        && config
            .policies
            .iter()
            .flat_map(|p| &p.versions)
            .any(|v| matches!(v.module, config::ModuleSource::Url(_)))
    {
        out!("  downloads    {}", dir.display());
    }
    for p in report {
        out!();
        let versions = &p.versions;
        if versions.len() > 1 {
            out!("policy {}", p.name);
        } else {
            out!("policy {} (version {})", p.name, p.version);
        }
        for v in versions {
            let label = if versions.len() > 1 {
                format!(
                    "  version {} (weight {})",
                    v.summary.version, v.summary.weight
                )
            } else {
                "  module".to_owned()
            };
            // Where the module came from: the file, the download cache or the
            // network, or not read at all when a compiled copy was cached.
            let fetched = match &v.fetched_from {
                Some(from) => format!("read from {from}"),
                None => "not read".to_owned(),
            };
            out!(
                "{label:<15} {}\n                {}; {fetched}; compiled: {}",
                v.module,
                v.summary.digest,
                v.compiled_from
            );
        }
        if let Some(language) = &p.language {
            out!(
                "  engine        {} ({})",
                language.engine,
                language.engine_version
            );
            out!("  files         {}", listed(&language.files));
            if let Some(entrypoint) = &language.entrypoint {
                out!("  entrypoint    {entrypoint}");
            }
            if let Some(ids) = &language.policy_ids {
                out!("  policy ids    {}", listed(ids));
            }
            if let Some(header) = &language.principal_header {
                out!(
                    "  principal     User::\"<{header} header>\" (else {})",
                    sandgate::language::CEDAR_ANONYMOUS
                );
            }
        }
        if versions.len() > 1 {
            out!(
                "  routing       header {}, sticky {}",
                p.routing.version_header.unwrap_or("off"),
                p.routing.sticky.as_deref().unwrap_or("off")
            );
        }
        if let Some(cache) = &p.decision_cache {
            out!(
                "  decisions     cached {} ms, at most {} entries",
                cache.ttl_ms,
                cache.max_entries
            );
        }
        out!(
            "  limits        timeout {} ms, memory {} MiB, output {} bytes, fail_mode {}",
            p.timeout_ms,
            p.memory_limit_mb,
            p.max_output_bytes,
            match p.fail_mode {
                FailMode::Closed => "closed",
                FailMode::Open => "open",
            }
        );
        let w = &p.wasi;
        out!(
            "  wasi allow    {} (on_denied {})",
            listed(&w.allow),
            w.on_denied
        );
        out!("  wasi granted  {}", listed(&w.functions));
        out!("  env           {}", listed(&w.env));
        if !w.env_not_set.is_empty() {
            out!(
                "  env not set   {} (listed but absent from the daemon's environment)",
                listed(&w.env_not_set)
            );
        }
        let preopens: Vec<String> = w
            .preopens
            .iter()
            .map(|o| format!("{} -> {} ({})", o.host.display(), o.guest, o.mode))
            .collect();
        out!("  preopens      {}", listed(&preopens));
        out!("  refused       {}", listed(&w.imports_refused));
        out!("  egress allow  {}", listed(&p.egress.allow));
        if let Some(filter) = &p.proxy_wasm {
            out!(
                "  abi           proxy-wasm {} (plugin_config {} bytes)",
                filter.abi_version.as_deref().unwrap_or("?"),
                filter.plugin_config_bytes
            );
            let clusters: Vec<String> = filter
                .clusters
                .iter()
                .map(|(name, url)| format!("{name} -> {url}"))
                .collect();
            out!("  clusters      {}", listed(&clusters));
            out!("  host calls    {}", listed(&filter.host_calls));
            out!(
                "  host refused  {} (audited as wasi_denied when called)",
                listed(&filter.host_calls_refused)
            );
        }
        let credentials: Vec<String> = p
            .egress
            .credentials
            .iter()
            .map(|c| format!("{} for {} (from {})", c.header, c.prefix, c.source))
            .collect();
        if !credentials.is_empty() {
            out!("  credentials   {}", credentials.join(", "));
        }
    }
}

/// `items` joined with commas, or `(none)`.
fn listed(items: &[impl std::fmt::Display]) -> String {
    if items.is_empty() {
        return "(none)".to_owned();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Binds, prints the syscall filter in force (`sandgate: syscall filter
/// MODE (installed): …`) and the bound addresses on stderr (one parseable
/// line each: `sandgate: http listening on ADDR`, `sandgate: grpc listening
/// on ADDR`), then serves until SIGTERM/SIGINT.
async fn serve(path: &Path) -> anyhow::Result<ExitCode> {
    let config = config::load(path)?;
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let server = sandgate::server::Server::bind(config).await?;
    let seccomp = server.syscall_filter();
    eprintln!("sandgate: syscall filter {seccomp}");
    if seccomp.mode != sandgate::seccomp::Mode::Off && !seccomp.installed {
        tracing::warn!("the seccomp allowlist is not installed: {}", seccomp.detail);
    }
    if let Some(addr) = server.http_addr() {
        eprintln!("sandgate: http listening on {addr}");
    }
    if let Some(addr) = server.grpc_addr() {
        eprintln!("sandgate: grpc listening on {addr}");
    }
    server.run_until_signalled().await?;
    sandgate::telemetry::log::flush(GUEST_LOG_FLUSH);
    Ok(ExitCode::SUCCESS)
}

async fn inspect(path: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let bytes = std::fs::read(path)
        .map_err(|e| UsageError(format!("cannot read module {}: {e}", path.display())))?;
    let engine = Engine::new(&EngineSettings::default())?;
    let digest = config::Digest::of(&bytes);
    let (module, _) = engine
        .compile(&bytes, &digest)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let imports: Vec<(String, String, String)> = module
        .imports()
        .map(|i| {
            (
                i.module().to_owned(),
                i.name().to_owned(),
                format!("{:?}", i.ty()),
            )
        })
        .collect();
    let exports: Vec<String> = module.exports().map(|e| e.name().to_owned()).collect();
    let wasi_imports: Vec<String> = imports
        .iter()
        .filter(|(m, _, _)| m == wasi::MODULE)
        .map(|(_, n, _)| n.clone())
        .collect();
    let groups = policy::needed_groups(&wasi_imports);
    if let Some(version) = sandgate::proxywasm::abi_version(&module) {
        return inspect_filter(
            path,
            &digest,
            &module,
            version,
            &wasi_imports,
            &groups,
            json,
        );
    }
    let abi_result = match abi::validate(&module) {
        Err(e) => Err(e),
        Ok(()) => match Policy::load(&engine, PolicySpec::for_module(path)).await {
            Ok(_) => Ok(abi::ABI_VERSION),
            Err(e) => Err(e.to_string()),
        },
    };
    if json {
        out!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "module": path,
                "digest": digest.to_string(),
                "imports": imports.iter().map(|(m, n, _)| format!("{m}::{n}")).collect::<Vec<_>>(),
                "exports": exports,
                "abi_version": abi_result.as_ref().ok(),
                "abi_error": abi_result.as_ref().err(),
                "wasi_functions": wasi_imports,
                "wasi_groups": groups,
            }))?
        );
    } else {
        out!("module {} ({digest})", path.display());
        match &abi_result {
            Ok(v) => out!("  abi version   {v}"),
            Err(e) => out!("  abi           invalid: {e}"),
        }
        out!("  exports       {}", exports.join(", "));
        out!("  imports");
        for (m, n, _) in &imports {
            let group = if m == wasi::MODULE {
                wasi::group_of(n)
                    .map(|g| format!("  [{g}]"))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            out!("    {m}::{n}{group}");
        }
        out!("  wasi needs    {}", wasi_needs(&groups));
    }
    Ok(if abi_result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `inspect` of a proxy-wasm filter: its ABI version, whether this host can
/// run it, and which of its host calls sandgate provides or refuses.
fn inspect_filter(
    path: &Path,
    digest: &config::Digest,
    module: &wasmtime::Module,
    version: &str,
    wasi_imports: &[String],
    groups: &[&str],
    json: bool,
) -> anyhow::Result<ExitCode> {
    use sandgate::proxywasm;
    let valid = proxywasm::validate(module);
    let mut calls: Vec<String> = module
        .imports()
        .filter(|i| i.module() == proxywasm::MODULE)
        .map(|i| i.name().to_owned())
        .collect();
    calls.sort_unstable();
    let (provided, refused): (Vec<String>, Vec<String>) = calls
        .into_iter()
        .partition(|c| proxywasm::SUPPORTED.contains(&c.as_str()));
    if json {
        out!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "module": path,
                "digest": digest.to_string(),
                "abi": "proxy-wasm",
                "proxy_wasm_abi_version": version,
                "abi_error": valid.as_ref().err(),
                "host_calls": provided,
                "host_calls_refused": refused,
                "exports": module.exports().map(|e| e.name().to_owned()).collect::<Vec<_>>(),
                "wasi_functions": wasi_imports,
                "wasi_groups": groups,
            }))?
        );
    } else {
        out!("module {} ({digest})", path.display());
        match &valid {
            Ok(()) => {
                out!("  abi           proxy-wasm {version} (configure with abi = \"proxy-wasm\")")
            }
            Err(e) => out!("  abi           proxy-wasm {version}, cannot run here: {e}"),
        }
        out!("  host calls    {}", listed(&provided));
        out!(
            "  host refused  {} (audited as wasi_denied when called)",
            listed(&refused)
        );
        out!("  wasi imports  {}", listed(wasi_imports));
        out!("  wasi needs    {}", wasi_needs(groups));
    }
    Ok(if valid.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// What `inspect` says a module's WASI imports need: `nothing`, or the
/// `wasi.allow` line that grants them.
fn wasi_needs(groups: &[&str]) -> String {
    if groups.is_empty() {
        return "nothing".to_owned();
    }
    let quoted: Vec<String> = groups.iter().map(|g| format!("\"{g}\"")).collect();
    format!("allow = [{}]", quoted.join(", "))
}
