//! The deployment files (`deploy/`, `Dockerfile`) checked with real
//! validators and the real daemon: Kubernetes manifests against the
//! Kubernetes schemas (`kubernetes-validate --strict`), Istio resources
//! against the models generated from Istio's CRDs, the compose file against
//! the compose-spec schema (`check-jsonschema`), the Envoy bootstrap decoded
//! into Envoy's own protobuf types, and every sandgate config they embed
//! through `sandgate check` and, where a proxy would talk to it, a running
//! `sandgate serve`. The Python validators live in `target/venv`
//! (`scripts/setup` installs them); nothing here is skipped when they are
//! missing. Each validator is also shown a broken copy, which it must refuse.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{
    ApiVersion, address, grpc_service::TargetSpecifier, socket_address::PortSpecifier,
};
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::route::v3::{
    route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier,
};
use envoy_types::pb::envoy::extensions::filters::http::ext_authz::v3::{
    ExtAuthz, ExtAuthzPerRoute, ext_authz::Services, ext_authz_per_route::Override,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::RouteSpecifier, http_filter::ConfigType,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options::UpstreamProtocolOptions,
    http_protocol_options::explicit_http_config::ProtocolConfig,
};
use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::r#type::v3::StatusCode;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message as _, Name};
use prost_reflect::{DescriptorPool, DynamicMessage};
use serde::Deserialize;
use serde_json::Value;

use crate::support::*;

/// The config the image's entrypoint serves (Dockerfile `ENTRYPOINT`).
const IMAGE_CONFIG: &str = "/etc/sandgate/sandgate.toml";
/// Where the image keeps the example guests, and the rbac role table.
const IMAGE_POLICIES: &str = "/usr/share/sandgate/policies/";
const IMAGE_RBAC_DATA: &str = "/usr/share/sandgate/data/rbac";

/// Kubernetes versions the manifests must validate against: the first with
/// native sidecars (`restartPolicy: Always` init containers) and the newest
/// the validator knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29", "1.37"];

const ENVOY_EXT_AUTHZ_FILTER: &str = "envoy.filters.http.ext_authz";
const ENVOY_ROUTER_FILTER: &str = "envoy.filters.http.router";
const ENVOY_HCM_FILTER: &str = "envoy.filters.network.http_connection_manager";

// ---- shared by the tests --------------------------------------------------------

fn deploy(path: &str) -> PathBuf {
    repo_root().join("deploy").join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A validator installed by `scripts/setup` into `target/venv`.
fn venv_validator(name: &str) -> PathBuf {
    let validator = repo_root().join("target/venv/bin").join(name);
    assert!(
        validator.exists(),
        "{} is missing: run scripts/setup (it installs the deployment validators \
         kubernetes-validate, check-jsonschema and the Istio models into target/venv)",
        validator.display()
    );
    validator
}

fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every non-empty document of a YAML file, as JSON values.
fn yaml_documents(path: &Path) -> Vec<Value> {
    let source = read(path);
    serde_yaml_ng::Deserializer::from_str(&source)
        .map(|doc| {
            Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The one document of `kind` in `docs`.
fn the<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let mut found = docs.iter().filter(|d| d["kind"] == kind);
    let doc = found
        .next()
        .unwrap_or_else(|| panic!("no {kind} among the documents"));
    assert!(found.next().is_none(), "more than one {kind}");
    doc
}

/// The value at a JSON pointer, which must be there.
fn at<'a>(value: &'a Value, pointer: &str) -> &'a Value {
    value
        .pointer(pointer)
        .unwrap_or_else(|| panic!("{pointer} is missing in {value:#}"))
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    at(value, pointer)
        .as_str()
        .unwrap_or_else(|| panic!("{pointer} is not a string"))
}

fn array_at<'a>(value: &'a Value, pointer: &str) -> &'a Vec<Value> {
    at(value, pointer)
        .as_array()
        .unwrap_or_else(|| panic!("{pointer} is not a list"))
}

/// A sandgate config as a container sees it, rewritten for this machine: the
/// image's paths become the built guests and the repository's rbac data.
fn localize_image_paths(config: &str) -> String {
    let guests = guest("rbac")
        .parent()
        .expect("guests directory")
        .to_path_buf();
    let localized = config
        .replace(IMAGE_POLICIES, &format!("{}/", guests.display()))
        .replace(
            IMAGE_RBAC_DATA,
            &repo_root().join("examples/rbac/data").display().to_string(),
        );
    assert!(
        !localized.contains("/usr/share/sandgate"),
        "the config names an image path this test does not know how the Dockerfile fills:\n{config}"
    );
    localized
}

/// Points `listen` and `grpc_listen` at free loopback ports.
fn on_free_ports(config: &str) -> String {
    config
        .lines()
        .map(|line| {
            if line.starts_with("listen =") {
                "listen = \"127.0.0.1:0\"".to_owned()
            } else if line.starts_with("grpc_listen =") {
                "grpc_listen = \"127.0.0.1:0\"".to_owned()
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs `sandgate check` on `config`; it must pass.
fn sandgate_check(config: &Path, cache: &Path) -> String {
    let config_arg = config.to_str().expect("utf-8 path");
    let out = sandgate(&["check", "--config", config_arg], cache);
    assert!(
        out.status.success(),
        "sandgate check refused {}:\n{}",
        config.display(),
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn load_config(path: &Path) -> sandgate::Config {
    sandgate::config::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn policy_names(config: &sandgate::Config) -> BTreeSet<String> {
    config.policies.iter().map(|p| p.name.clone()).collect()
}

fn denied_status(response: &CheckResponse) -> Option<i32> {
    match &response.http_response {
        Some(HttpResponse::DeniedResponse(denied)) => denied.status.as_ref().map(|s| s.code),
        _ => None,
    }
}

fn is_allowed(response: &CheckResponse) -> bool {
    response.status.as_ref().map(|s| s.code) == Some(0)
        && matches!(response.http_response, Some(HttpResponse::OkResponse(_)))
}

/// Asks the daemon's ext_authz as a proxy would: a viewer may read an order
/// and may not delete it.
async fn viewer_may_read_not_delete(
    grpc: SocketAddr,
    context_extensions: &HashMap<String, String>,
    path: &str,
) {
    let mut ext_authz = ExtAuthzClient::connect(grpc).await;
    let viewer = [("x-user", "alice"), ("x-roles", "viewer")];
    let read = ext_authz
        .check(envoy_check_request(
            context_extensions.clone(),
            "GET",
            path,
            &viewer,
        ))
        .await;
    assert!(is_allowed(&read), "GET {path} as a viewer: {read:?}");
    let delete = ext_authz
        .check(envoy_check_request(
            context_extensions.clone(),
            "DELETE",
            path,
            &viewer,
        ))
        .await;
    assert_eq!(
        denied_status(&delete),
        Some(403),
        "DELETE {path} as a viewer: {delete:?}"
    );
}

// ---- Kubernetes ----------------------------------------------------------------

/// The manifests kubectl applies (the kustomization's resources).
fn kubernetes_manifests() -> Vec<PathBuf> {
    let dir = deploy("kubernetes");
    let kustomization = yaml_documents(&dir.join("kustomization.yaml"));
    array_at(&kustomization[0], "/resources")
        .iter()
        .map(|r| dir.join(r.as_str().expect("resource path")))
        .collect()
}

fn kubernetes_documents() -> Vec<Value> {
    kubernetes_manifests()
        .iter()
        .flat_map(|p| yaml_documents(p))
        .collect()
}

/// Runs kubernetes-validate strictly on `files` for `version`; returns its
/// output and whether every resource passed with no warning.
fn kubernetes_validate(files: &[PathBuf], version: &str) -> (bool, String) {
    let out = run(Command::new(venv_validator("kubernetes-validate"))
        .args(["--strict", "--kubernetes-version", version])
        .args(files));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let clean = out.status.success()
        && !stdout
            .lines()
            .any(|l| l.starts_with("WARN") || l.starts_with("ERROR") || l.starts_with("FATAL"));
    (clean, text(&out))
}

#[test]
fn kustomization_applies_every_manifest_in_the_directory() {
    let dir = deploy("kubernetes");
    let listed: BTreeSet<PathBuf> = kubernetes_manifests().into_iter().collect();
    let present: BTreeSet<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/kubernetes")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    assert_eq!(listed, present, "kustomization.yaml resources");
}

#[test]
fn kubernetes_manifests_pass_strict_schema_validation() {
    let files = kubernetes_manifests();
    let resources = kubernetes_documents().len();
    for version in KUBERNETES_VERSIONS {
        let (clean, output) = kubernetes_validate(&files, version);
        assert!(clean, "kubernetes-validate {version}:\n{output}");
        let passed = output
            .lines()
            .filter(|l| l.starts_with("INFO") && l.contains(" passed for resource "))
            .count();
        assert_eq!(passed, resources, "every resource validated:\n{output}");
    }

    // The validator is strict: a misspelt field and a wrongly typed value fail.
    let dir = tempdir();
    let deployment = read(&deploy("kubernetes/deployment.yaml"));
    for (what, from, to) in [
        (
            "unknown field",
            "readOnlyRootFilesystem: true",
            "readOnlyRootFileSystem: true",
        ),
        (
            "string for an integer",
            "periodSeconds: 10",
            "periodSeconds: \"10\"",
        ),
    ] {
        assert!(deployment.contains(from), "{from}");
        let broken = write(
            dir.path(),
            "deployment.yaml",
            &deployment.replacen(from, to, 1),
        );
        let (clean, output) = kubernetes_validate(&[broken], KUBERNETES_VERSIONS[1]);
        assert!(!clean, "a Deployment with an {what} passed:\n{output}");
    }
}

/// The pod template of the Deployment and its containers by name (the
/// native sidecar among the init containers).
struct Pod {
    labels: BTreeMap<String, String>,
    spec: Value,
    containers: BTreeMap<String, Value>,
}

impl Pod {
    fn of(deployment: &Value) -> Pod {
        let template = at(deployment, "/spec/template");
        let spec = at(template, "/spec").clone();
        let labels =
            serde_json::from_value(at(template, "/metadata/labels").clone()).expect("pod labels");
        let mut containers = BTreeMap::new();
        for list in ["initContainers", "containers"] {
            for c in spec[list].as_array().into_iter().flatten() {
                containers.insert(str_at(c, "/name").to_owned(), c.clone());
            }
        }
        Pod {
            labels,
            spec,
            containers,
        }
    }

    fn container(&self, name: &str) -> &Value {
        self.containers
            .get(name)
            .unwrap_or_else(|| panic!("no container {name} in the pod"))
    }

    /// The container port a probe or Service names (by name or number).
    fn port(&self, container: &Value, port: &Value) -> u16 {
        let ports = container["ports"].as_array().cloned().unwrap_or_default();
        let found = ports.iter().find(|p| match port {
            Value::String(name) => p["name"] == *name,
            number => p["containerPort"] == *number,
        });
        let found = found.unwrap_or_else(|| panic!("port {port} is not a port of {container}"));
        found["containerPort"]
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .expect("containerPort")
    }

    fn volume(&self, name: &str) -> &Value {
        array_at(&self.spec, "/volumes")
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    }
}

/// The sandgate sidecar's config directory as the kubelet lays it out from
/// the ConfigMap (the volume's `items`), written into `dir`, with the image's
/// paths localized. Returns the config file.
fn materialize_sidecar_config(dir: &Path) -> PathBuf {
    let docs = kubernetes_documents();
    let pod = Pod::of(the(&docs, "Deployment"));
    let configmap = the(&docs, "ConfigMap");
    let sidecar = pod.container("sandgate");
    let config_dir = Path::new(IMAGE_CONFIG).parent().expect("config dir");
    let mount = array_at(sidecar, "/volumeMounts")
        .iter()
        .find(|m| Path::new(str_at(m, "/mountPath")) == config_dir)
        .unwrap_or_else(|| panic!("nothing is mounted at {}", config_dir.display()));
    let volume = pod.volume(str_at(mount, "/name"));
    assert_eq!(
        at(volume, "/configMap/name"),
        at(configmap, "/metadata/name"),
        "the sidecar's config volume is the ConfigMap"
    );
    let mut paths = BTreeSet::new();
    for item in array_at(volume, "/configMap/items") {
        let key = str_at(item, "/key");
        let content = configmap["data"][key]
            .as_str()
            .unwrap_or_else(|| panic!("the ConfigMap has no data key {key}"));
        let path = str_at(item, "/path");
        let content = if path.ends_with(".toml") {
            localize_image_paths(content)
        } else {
            content.to_owned()
        };
        write(dir, path, &content);
        paths.insert(path.to_owned());
    }
    let name = Path::new(IMAGE_CONFIG)
        .file_name()
        .and_then(|n| n.to_str())
        .expect("config file name");
    assert!(
        paths.contains(name),
        "the volume does not provide {IMAGE_CONFIG}"
    );
    dir.join(name)
}

#[test]
fn kubernetes_sidecar_is_hardened_and_probed_where_it_listens() {
    let docs = kubernetes_documents();
    let pod = Pod::of(the(&docs, "Deployment"));
    let dir = tempdir();
    let config = load_config(&materialize_sidecar_config(dir.path()));
    let sidecar = pod.container("sandgate");

    // A native sidecar: started before the application, kept running.
    assert_eq!(sidecar["restartPolicy"], "Always", "{sidecar:#}");
    assert!(
        array_at(&pod.spec, "/initContainers")
            .iter()
            .any(|c| c["name"] == "sandgate")
    );

    // Probes: /readyz (startup, readiness) and /healthz (liveness) on the
    // port the config listens on.
    for (probe, path) in [
        ("startupProbe", "/readyz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ] {
        let get = at(sidecar, &format!("/{probe}/httpGet"));
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(
            pod.port(sidecar, &get["port"]),
            config.server.listen.port(),
            "{probe} port"
        );
    }
    assert!(
        config.server.listen.ip().is_unspecified(),
        "the kubelet probes the pod's address: listen must not be loopback only"
    );

    // Every container: non-root, read-only root, no capabilities, no
    // escalation, requests and limits.
    assert_eq!(at(&pod.spec, "/securityContext/runAsNonRoot"), true);
    assert_eq!(
        at(&pod.spec, "/securityContext/seccompProfile/type"),
        "RuntimeDefault"
    );
    for (name, c) in &pod.containers {
        let sc = at(c, "/securityContext");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(sc["runAsNonRoot"], true, "{name}");
        assert_eq!(at(sc, "/capabilities/drop"), &serde_json::json!(["ALL"]));
        assert!(
            sc["capabilities"]["add"].is_null(),
            "{name} adds capabilities"
        );
        assert!(sc["privileged"] != true, "{name} is privileged");
        for kind in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                assert!(
                    at(c, &format!("/resources/{kind}/{resource}")).is_string(),
                    "{name} {kind} {resource}"
                );
            }
        }
    }
    assert_eq!(config.ebpf, sandgate::config::EbpfMode::Off);

    // The only writable place is the module cache: a private directory the
    // daemon creates in an emptyDir (which is world-writable, so the cache
    // would refuse it).
    let cache = array_at(sidecar, "/env")
        .iter()
        .find(|e| e["name"] == "SANDGATE_CACHE_DIR")
        .map(|e| str_at(e, "/value"))
        .expect("SANDGATE_CACHE_DIR");
    let mount = array_at(sidecar, "/volumeMounts")
        .iter()
        .find(|m| {
            m["mountPath"].as_str().map(std::path::Path::new)
                == std::path::Path::new(cache).parent()
        })
        .unwrap_or_else(|| panic!("nothing is mounted at {cache}"));
    assert!(mount["readOnly"] != true, "the cache must be writable");
    assert!(
        pod.volume(str_at(mount, "/name"))["emptyDir"].is_object(),
        "the cache is an emptyDir"
    );

    // The Service selects this pod and targets the application's port.
    let service = the(&docs, "Service");
    let selector: BTreeMap<String, String> =
        serde_json::from_value(at(service, "/spec/selector").clone()).expect("selector");
    assert!(
        selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v)),
        "the Service selects the pod: {selector:?} vs {:?}",
        pod.labels
    );
    let app = pod.container("orders");
    for port in array_at(service, "/spec/ports") {
        pod.port(app, &port["targetPort"]);
    }
}

#[tokio::test]
async fn kubernetes_configmap_config_passes_check_serves_the_probes_and_ext_authz() {
    let dir = tempdir();
    let config_dir = dir.path().join("etc-sandgate");
    let config = materialize_sidecar_config(&config_dir);
    let report = sandgate_check(&config, &dir.path().join("cache"));
    assert!(report.contains("policy orders"), "{report}");

    // Served as the pod would, on free loopback ports: the probes' paths
    // answer 200, and ext_authz without context_extensions (Istio sets none)
    // is decided by the config's only policy.
    let loaded = load_config(&config);
    assert_eq!(loaded.policies.len(), 1, "Istio cannot name a policy");
    let serving = write(&config_dir, "serve.toml", &on_free_ports(&read(&config)));
    let daemon = Daemon::start(&serving, &dir.path().join("cache"));
    let http = client();
    daemon.ready(&http).await;
    let docs = kubernetes_documents();
    let pod = Pod::of(the(&docs, "Deployment"));
    let sidecar = pod.container("sandgate");
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let path = str_at(sidecar, &format!("/{probe}/httpGet/path"));
        let status = http
            .get(daemon.url(path))
            .send()
            .await
            .expect("probe")
            .status();
        assert_eq!(status, 200, "{probe} {path}");
    }
    let grpc = daemon.grpc.expect("grpc_listen is configured");
    viewer_may_read_not_delete(grpc, &HashMap::new(), "/api/orders/7").await;
}

// ---- Istio -----------------------------------------------------------------------

/// Validates Istio resources with the pydantic models cloudcoil generates
/// from Istio's CRDs; a round trip through the model must give the document
/// back unchanged, so a field the CRD does not know (silently pruned by
/// pydantic) or a value it would coerce is an error too.
const ISTIO_VALIDATOR: &str = r#"
import sys, yaml
from cloudcoil.models.istio.networking import v1 as networking
from cloudcoil.models.istio.security import v1 as security

MODELS = {
    ("networking.istio.io/v1", "ServiceEntry"): networking.ServiceEntry,
    ("security.istio.io/v1", "AuthorizationPolicy"): security.AuthorizationPolicy,
}

def differences(path, want, got, out):
    if isinstance(want, dict) and isinstance(got, dict):
        for key in want:
            if key not in got:
                out.append(f"{path}.{key}: not in the schema")
            else:
                differences(f"{path}.{key}", want[key], got[key], out)
        for key in got:
            if key not in want:
                out.append(f"{path}.{key}: added by the schema")
    elif isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        for i, (w, g) in enumerate(zip(want, got)):
            differences(f"{path}[{i}]", w, g, out)
    elif want != got or type(want) is not type(got):
        out.append(f"{path}: {want!r} is read as {got!r}")

failed = False
for name in sys.argv[1:]:
    with open(name) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for doc in docs:
        kind = (doc.get("apiVersion"), doc.get("kind"))
        what = f"{name}: {kind[1]}/{doc.get('metadata', {}).get('name')}"
        model = MODELS.get(kind)
        if model is None:
            print(f"UNKNOWN {what} ({kind[0]})")
            failed = True
            continue
        try:
            parsed = model.model_validate(doc)
        except Exception as e:
            print(f"ERROR {what}: {e}")
            failed = True
            continue
        out = []
        differences(kind[1], doc, parsed.model_dump(mode="json", by_alias=True, exclude_unset=True), out)
        for problem in out:
            print(f"ERROR {what}: {problem}")
        failed = failed or bool(out)
        if not out:
            print(f"OK {what}")
sys.exit(1 if failed else 0)
"#;

fn istio_validate(files: &[PathBuf]) -> (bool, String) {
    let out = run(Command::new(venv_validator("python"))
        .arg("-c")
        .arg(ISTIO_VALIDATOR)
        .args(files));
    (out.status.success(), text(&out))
}

#[test]
fn istio_resources_pass_the_istio_crd_schemas() {
    let file = deploy("istio/ext-authz.yaml");
    let (ok, output) = istio_validate(std::slice::from_ref(&file));
    assert!(ok, "{output}");
    assert_eq!(
        output.lines().filter(|l| l.starts_with("OK ")).count(),
        yaml_documents(&file).len(),
        "{output}"
    );

    let dir = tempdir();
    let source = read(&file);
    for (what, from, to) in [
        ("unknown action", "action: CUSTOM", "action: EXTERNAL"),
        ("unknown field", "  provider:\n", "  providers:\n"),
        (
            "string for a port number",
            "number: 9191",
            "number: \"9191\"",
        ),
    ] {
        assert!(source.contains(from), "{from}");
        let broken = write(dir.path(), "ext-authz.yaml", &source.replacen(from, to, 1));
        let (ok, output) = istio_validate(&[broken]);
        assert!(
            !ok,
            "an AuthorizationPolicy with an {what} passed:\n{output}"
        );
    }
}

/// MeshConfig's `envoyExtAuthzGrpc` provider (istio.mesh.v1alpha1), the
/// fields it has.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EnvoyExtAuthzGrpc {
    service: String,
    port: u16,
    timeout: Option<String>,
    fail_open: Option<bool>,
    status_on_error: Option<String>,
    // Known so that a misspelling of them is refused; not otherwise checked.
    #[allow(dead_code)]
    clear_route_cache: Option<bool>,
    #[allow(dead_code)]
    include_request_body_in_check: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExtensionProvider {
    name: String,
    envoy_ext_authz_grpc: Option<EnvoyExtAuthzGrpc>,
}

/// "0.5s" → 500 ms.
fn mesh_duration(text: &str) -> Duration {
    let seconds: f64 = text
        .strip_suffix('s')
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{text} is not a duration in seconds"));
    Duration::from_secs_f64(seconds)
}

#[test]
fn istio_provider_reaches_the_sidecars_grpc_port_for_the_orders_workload() {
    let mesh = yaml_documents(&deploy("istio/mesh-config.yaml"));
    let operator = the(&mesh, "IstioOperator");
    assert_eq!(operator["apiVersion"], "install.istio.io/v1alpha1");
    let providers: Vec<ExtensionProvider> =
        serde_json::from_value(at(operator, "/spec/meshConfig/extensionProviders").clone())
            .expect("meshConfig.extensionProviders");
    let authz = yaml_documents(&deploy("istio/ext-authz.yaml"));
    let policy = the(&authz, "AuthorizationPolicy");
    let entry = the(&authz, "ServiceEntry");

    // The policy's provider is the mesh's ext_authz gRPC provider.
    assert_eq!(at(policy, "/spec/action"), "CUSTOM");
    let provider_name = str_at(policy, "/spec/provider/name");
    let provider = providers
        .iter()
        .find(|p| p.name == provider_name)
        .unwrap_or_else(|| panic!("no extension provider {provider_name} in the mesh config"));
    let grpc = provider
        .envoy_ext_authz_grpc
        .as_ref()
        .expect("the provider is envoyExtAuthzGrpc");
    assert_eq!(grpc.fail_open, Some(false), "fail closed");
    if let Some(status) = &grpc.status_on_error {
        let status: u16 = status.parse().expect("statusOnError is an HTTP status");
        assert!((400..600).contains(&status), "statusOnError {status}");
    }

    // Its host is the ServiceEntry's: the pod's loopback, on the port the
    // sidecar's grpc_listen uses.
    assert!(
        array_at(entry, "/spec/hosts")
            .iter()
            .any(|h| h == grpc.service.as_str()),
        "the ServiceEntry defines {}",
        grpc.service
    );
    assert_eq!(at(entry, "/spec/resolution"), "STATIC");
    assert_eq!(at(entry, "/spec/endpoints/0/address"), "127.0.0.1");
    let port = &array_at(entry, "/spec/ports")[0];
    assert_eq!(port["number"], grpc.port);
    assert_eq!(port["protocol"], "GRPC");
    let dir = tempdir();
    let config = load_config(&materialize_sidecar_config(dir.path()));
    let grpc_listen = config
        .server
        .grpc_listen
        .expect("the sidecar serves ext_authz");
    assert_eq!(grpc_listen.port(), grpc.port);
    assert!(grpc_listen.ip().is_loopback() || grpc_listen.ip().is_unspecified());
    let slowest = config
        .policies
        .iter()
        .map(|p| p.timeout)
        .max()
        .expect("a policy");
    let timeout = mesh_duration(grpc.timeout.as_deref().expect("a timeout"));
    assert!(
        timeout > slowest,
        "{timeout:?} leaves no time for {slowest:?}"
    );

    // The policy selects the Deployment's pods and covers the application's
    // port, not sandgate's own.
    let docs = kubernetes_documents();
    let pod = Pod::of(the(&docs, "Deployment"));
    let labels: BTreeMap<String, String> =
        serde_json::from_value(at(policy, "/spec/selector/matchLabels").clone())
            .expect("matchLabels");
    assert!(labels.iter().all(|(k, v)| pod.labels.get(k) == Some(v)));
    let ports: BTreeSet<String> = array_at(policy, "/spec/rules")
        .iter()
        .flat_map(|r| r["to"].as_array().cloned().unwrap_or_default())
        .flat_map(|t| {
            t["operation"]["ports"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|p| p.as_str().expect("port").to_owned())
        .collect();
    let app = pod.container("orders");
    assert!(ports.contains(&pod.port(app, &Value::from("http")).to_string()));
    assert!(!ports.contains(&config.server.listen.port().to_string()));
}

// ---- compose -----------------------------------------------------------------

fn compose_validate(file: &Path) -> (bool, String) {
    let out = run(Command::new(venv_validator("check-jsonschema"))
        .args(["--builtin-schema", "vendor.compose-spec"])
        .arg(file));
    (out.status.success(), text(&out))
}

#[test]
fn compose_file_passes_the_compose_spec_schema() {
    let file = deploy("compose/compose.yaml");
    let (ok, output) = compose_validate(&file);
    assert!(ok, "{output}");

    let dir = tempdir();
    let source = read(&file);
    let broken = write(
        dir.path(),
        "compose.yaml",
        &source.replacen("    depends_on:\n", "    depend_on:\n", 1),
    );
    let (ok, output) = compose_validate(&broken);
    assert!(!ok, "a service with an unknown key passed:\n{output}");
}

/// The `s/@NAME@/value/` substitutions of the nginx service's command.
fn sed_substitutions(command: &str) -> BTreeMap<String, String> {
    command
        .split("-e 's/")
        .skip(1)
        .map(|expr| {
            let expr = expr.split("/'").next().expect("closing quote");
            let (from, to) = expr.split_once('/').expect("s/FROM/TO/");
            (from.to_owned(), to.to_owned())
        })
        .collect()
}

/// `host:port` → (host, port).
fn host_port(addr: &str) -> (&str, u16) {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    (host, port.parse().expect("port"))
}

#[test]
fn compose_wires_nginx_sandgate_jaeger_and_the_backend() {
    let compose_dir = deploy("compose");
    let compose = &yaml_documents(&compose_dir.join("compose.yaml"))[0];
    let services = at(compose, "/services")
        .as_object()
        .expect("services")
        .clone();
    for name in ["jaeger", "sandgate", "nginx", "backend"] {
        assert!(services.contains_key(name), "service {name}");
    }

    // Jaeger takes OTLP and shows its UI.
    let jaeger = &services["jaeger"];
    assert!(str_at(jaeger, "/image").starts_with("jaegertracing/all-in-one:"));
    assert_eq!(at(jaeger, "/environment/COLLECTOR_OTLP_ENABLED"), "true");
    let published: Vec<&str> = array_at(jaeger, "/ports")
        .iter()
        .map(|p| p.as_str().expect("port"))
        .collect();
    assert!(published.contains(&"16686:16686") && published.contains(&"4317:4317"));

    // sandgate is built from the repository's Dockerfile and serves the
    // config beside the compose file, where the entrypoint reads it.
    let sandgate_service = &services["sandgate"];
    let context = compose_dir.join(str_at(sandgate_service, "/build/context"));
    assert!(
        context
            .join(str_at(sandgate_service, "/build/dockerfile"))
            .is_file(),
        "build context {}",
        context.display()
    );
    assert_eq!(
        context.canonicalize().expect("context"),
        repo_root().canonicalize().expect("root")
    );
    let mounted = array_at(sandgate_service, "/volumes")
        .iter()
        .map(|v| v.as_str().expect("short volume syntax"))
        .find(|v| v.split(':').nth(1) == Some(IMAGE_CONFIG))
        .unwrap_or_else(|| panic!("nothing is mounted at {IMAGE_CONFIG}"));
    let config_source = compose_dir.join(mounted.split(':').next().expect("source"));

    // The config: traces to Jaeger's OTLP/gRPC port, checked by sandgate.
    let dir = tempdir();
    let config_path = write(
        dir.path(),
        "sandgate.toml",
        &localize_image_paths(&read(&config_source)),
    );
    sandgate_check(&config_path, &dir.path().join("cache"));
    let config = load_config(&config_path);
    assert_eq!(
        config.telemetry.otlp_endpoint.as_deref(),
        Some("http://jaeger:4317")
    );
    assert_eq!(
        config.telemetry.otlp_protocol,
        sandgate::config::OtlpProtocol::Grpc
    );
    assert!(config.server.listen.ip().is_unspecified());

    // nginx runs deploy/nginx/sandgate.conf, every placeholder filled with a
    // service of this file.
    let nginx = &services["nginx"];
    let conf_mount = array_at(nginx, "/volumes")
        .iter()
        .map(|v| v.as_str().expect("short volume syntax"))
        .find(|v| {
            v.split(':')
                .next()
                .is_some_and(|s| s.ends_with("sandgate.conf"))
        })
        .expect("the nginx config is mounted");
    let mut parts = conf_mount.split(':');
    let conf_source = compose_dir.join(parts.next().expect("source"));
    let conf_target = parts.next().expect("target");
    assert_eq!(
        conf_source.canonicalize().expect("nginx config"),
        deploy("nginx/sandgate.conf")
            .canonicalize()
            .expect("deploy/nginx/sandgate.conf")
    );
    let command = array_at(nginx, "/command")
        .iter()
        .map(|c| c.as_str().expect("command word"))
        .collect::<Vec<_>>()
        .join(" ");
    assert!(command.contains(conf_target), "{command}");
    assert!(command.contains("exec nginx -g 'daemon off;'"), "{command}");
    let subs = sed_substitutions(&command);
    let mut rendered = read(&conf_source);
    for (from, to) in &subs {
        rendered = rendered.replace(from.as_str(), to);
    }
    let left: Vec<&str> = rendered
        .split('@')
        .skip(1)
        .step_by(2)
        .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_uppercase()))
        .collect();
    assert!(left.is_empty(), "placeholders left: {left:?}");
    let (host, port) = host_port(&subs["@SANDGATE@"]);
    assert!(services.contains_key(host), "{host} is a service");
    assert_eq!(host, "sandgate");
    assert_eq!(port, config.server.listen.port());
    assert!(policy_names(&config).contains(&subs["@POLICY@"]));
    let (backend, backend_port) = host_port(&subs["@BACKEND@"]);
    assert!(services.contains_key(backend), "{backend} is a service");
    let backend_command = array_at(&services[backend], "/command")
        .iter()
        .map(|c| c.as_str().expect("word"))
        .collect::<Vec<_>>();
    assert_eq!(
        backend_command,
        ["--port", backend_port.to_string().as_str()]
    );
    let (_, listen_port) = host_port(&subs["@LISTEN@"]);
    assert!(
        array_at(nginx, "/ports")
            .iter()
            .any(|p| p.as_str() == Some(&format!("{listen_port}:{listen_port}")))
    );
}

// ---- Dockerfile --------------------------------------------------------------------

#[test]
fn image_serves_its_default_config_and_exposes_its_ports() {
    let dockerfile = read(&repo_root().join("Dockerfile"));
    let lines: Vec<&str> = dockerfile.lines().map(str::trim).collect();
    let entrypoint = lines
        .iter()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .expect("ENTRYPOINT");
    let entrypoint: Vec<String> = serde_json::from_str(entrypoint).expect("exec-form ENTRYPOINT");
    assert_eq!(
        entrypoint,
        ["/usr/local/bin/sandgate", "serve", "--config", IMAGE_CONFIG]
    );
    let user = lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER");
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "{user}"
    );
    for copy in [
        format!("COPY --from=build /out/policies/ {IMAGE_POLICIES}"),
        format!("COPY examples/rbac/data/ {IMAGE_RBAC_DATA}/"),
        format!("COPY deploy/docker/sandgate.toml {IMAGE_CONFIG}"),
    ] {
        assert!(lines.contains(&copy.as_str()), "{copy}");
    }
    assert!(dockerfile.contains("rustup target add wasm32-wasip1"));
    assert!(dockerfile.contains("--target wasm32-wasip1"));
    assert!(
        read(&repo_root().join(".dockerignore"))
            .lines()
            .any(|l| l == "target/")
    );

    let dir = tempdir();
    let config_path = write(
        dir.path(),
        "sandgate.toml",
        &localize_image_paths(&read(&deploy("docker/sandgate.toml"))),
    );
    sandgate_check(&config_path, &dir.path().join("cache"));
    let config = load_config(&config_path);
    let exposed: BTreeSet<u16> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(|l| l.split_whitespace())
        .map(|p| p.parse().expect("port"))
        .collect();
    let mut listening = BTreeSet::from([config.server.listen.port()]);
    listening.extend(config.server.grpc_listen.map(|a| a.port()));
    assert_eq!(exposed, listening);
    assert!(config.server.listen.ip().is_unspecified());
}

// ---- Envoy -------------------------------------------------------------------------

/// Envoy's protobuf descriptors, as envoy-types ships them beside its
/// generated code (found through `cargo metadata`, resolved for the host
/// only: the build downloaded no other platform's packages, and the test
/// runs offline).
fn envoy_descriptors() -> DescriptorPool {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let rustc = run(Command::new("rustc").arg("-vV"));
    let host = String::from_utf8_lossy(&rustc.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .expect("rustc -vV names the host triple");
    let out = run(Command::new(cargo).current_dir(repo_root()).args([
        "metadata",
        "--format-version",
        "1",
        "--offline",
        "--filter-platform",
        &host,
    ]));
    assert!(out.status.success(), "cargo metadata:\n{}", text(&out));
    let metadata: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    let manifest = array_at(&metadata, "/packages")
        .iter()
        .find(|p| p["name"] == "envoy-types")
        .map(|p| PathBuf::from(str_at(p, "/manifest_path")))
        .expect("envoy-types is a dependency");
    let descriptors = manifest
        .parent()
        .expect("crate dir")
        .join("src/generated/types.bin");
    let bytes = std::fs::read(&descriptors)
        .unwrap_or_else(|e| panic!("envoy-types ships {}: {e}", descriptors.display()));
    DescriptorPool::decode(bytes.as_slice()).expect("a FileDescriptorSet")
}

/// Decodes an Envoy bootstrap in YAML the way Envoy reads it: proto3 JSON
/// mapping, unknown fields refused, every `typed_config` resolved by its
/// `@type` among Envoy's messages. Then into envoy-types' Bootstrap.
fn decode_bootstrap(pool: &DescriptorPool, yaml: &str) -> Result<Bootstrap, String> {
    let json: Value = serde_yaml_ng::from_str(yaml).map_err(|e| format!("YAML: {e}"))?;
    let descriptor = pool
        .get_message_by_name(Bootstrap::full_name().as_str())
        .ok_or("no Bootstrap descriptor")?;
    let message = DynamicMessage::deserialize(descriptor, json).map_err(|e| e.to_string())?;
    Bootstrap::decode(message.encode_to_vec().as_slice()).map_err(|e| e.to_string())
}

fn unpack<M: prost::Message + Name + Default>(any: &Any) -> M {
    assert_eq!(any.type_url, M::type_url(), "typed_config @type");
    M::decode(any.value.as_slice()).unwrap_or_else(|e| panic!("{}: {e}", M::full_name()))
}

fn cluster_port(cluster: &Cluster) -> u16 {
    let endpoint = cluster
        .load_assignment
        .as_ref()
        .and_then(|a| a.endpoints.first())
        .and_then(|e| e.lb_endpoints.first())
        .and_then(|e| e.host_identifier.as_ref());
    let Some(HostIdentifier::Endpoint(endpoint)) = endpoint else {
        panic!("cluster {} has no endpoint", cluster.name);
    };
    let address = endpoint.address.as_ref().and_then(|a| a.address.as_ref());
    let Some(address::Address::SocketAddress(socket)) = address else {
        panic!("cluster {} has no socket address", cluster.name);
    };
    match socket.port_specifier {
        Some(PortSpecifier::PortValue(port)) => u16::try_from(port).expect("port"),
        _ => panic!("cluster {} has no port_value", cluster.name),
    }
}

/// What the Envoy config says: the ext_authz filter's settings, the cluster
/// it calls, and each route's prefix with its per-route override.
struct EnvoyAuthz {
    filter: ExtAuthz,
    cluster: Cluster,
    routes: Vec<(String, Override)>,
    clusters: BTreeMap<String, Cluster>,
    routed_to: Vec<String>,
}

fn envoy_authz(bootstrap: &Bootstrap) -> EnvoyAuthz {
    let resources = bootstrap
        .static_resources
        .as_ref()
        .expect("static_resources");
    let clusters: BTreeMap<String, Cluster> = resources
        .clusters
        .iter()
        .map(|c| (c.name.clone(), c.clone()))
        .collect();
    let [listener] = resources.listeners.as_slice() else {
        panic!("one listener");
    };
    let hcm_filter = listener
        .filter_chains
        .iter()
        .flat_map(|c| &c.filters)
        .find(|f| f.name == ENVOY_HCM_FILTER)
        .expect("an http_connection_manager");
    let Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(any)) =
        &hcm_filter.config_type
    else {
        panic!("the http_connection_manager has no typed_config");
    };
    let hcm: HttpConnectionManager = unpack(any);

    // ext_authz runs before the router, which is last.
    let names: Vec<&str> = hcm.http_filters.iter().map(|f| f.name.as_str()).collect();
    let authz_at = names
        .iter()
        .position(|n| *n == ENVOY_EXT_AUTHZ_FILTER)
        .expect("the ext_authz filter");
    assert_eq!(names.last(), Some(&ENVOY_ROUTER_FILTER), "{names:?}");
    assert!(authz_at < names.len() - 1);
    let typed = |i: usize| match &hcm.http_filters[i].config_type {
        Some(ConfigType::TypedConfig(any)) => any.clone(),
        _ => panic!("{} has no typed_config", names[i]),
    };
    let filter: ExtAuthz = unpack(&typed(authz_at));
    let _: Router = unpack(&typed(names.len() - 1));

    let Some(Services::GrpcService(grpc)) = &filter.services else {
        panic!("ext_authz must call a gRPC service");
    };
    let Some(TargetSpecifier::EnvoyGrpc(envoy_grpc)) = &grpc.target_specifier else {
        panic!("ext_authz must use envoy_grpc");
    };
    let cluster = clusters
        .get(&envoy_grpc.cluster_name)
        .unwrap_or_else(|| panic!("no cluster {}", envoy_grpc.cluster_name))
        .clone();

    let Some(RouteSpecifier::RouteConfig(route_config)) = &hcm.route_specifier else {
        panic!("an inline route_config");
    };
    let mut routes = Vec::new();
    let mut routed_to = Vec::new();
    for route in route_config.virtual_hosts.iter().flat_map(|v| &v.routes) {
        let Some(PathSpecifier::Prefix(prefix)) = route
            .r#match
            .as_ref()
            .and_then(|m| m.path_specifier.clone())
        else {
            panic!("routes match by prefix");
        };
        let per_route = route
            .typed_per_filter_config
            .get(ENVOY_EXT_AUTHZ_FILTER)
            .unwrap_or_else(|| panic!("route {prefix} has no ext_authz per-route config"));
        let per_route: ExtAuthzPerRoute = unpack(per_route);
        routes.push((prefix, per_route.r#override.expect("an override")));
        if let Some(Action::Route(action)) = &route.action
            && let Some(ClusterSpecifier::Cluster(name)) = &action.cluster_specifier
        {
            routed_to.push(name.clone());
        }
    }
    EnvoyAuthz {
        filter,
        cluster,
        routes,
        clusters,
        routed_to,
    }
}

#[test]
fn envoy_bootstrap_decodes_into_envoys_own_types_and_asks_sandgate() {
    let pool = envoy_descriptors();
    let yaml = read(&deploy("envoy/envoy.yaml"));
    let bootstrap = decode_bootstrap(&pool, &yaml).unwrap_or_else(|e| panic!("envoy.yaml: {e}"));
    let authz = envoy_authz(&bootstrap);

    // Fail closed with 503, ext_authz v3.
    assert_eq!(authz.filter.transport_api_version, ApiVersion::V3 as i32);
    assert!(!authz.filter.failure_mode_allow);
    assert_eq!(
        authz.filter.status_on_error.as_ref().map(|s| s.code),
        Some(StatusCode::ServiceUnavailable as i32)
    );

    // The ext_authz cluster speaks HTTP/2 to sandgate's grpc_listen port.
    let options = authz
        .cluster
        .typed_extension_protocol_options
        .get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
        .expect("HttpProtocolOptions on the ext_authz cluster");
    let options: HttpProtocolOptions = unpack(options);
    let Some(UpstreamProtocolOptions::ExplicitHttpConfig(explicit)) =
        &options.upstream_protocol_options
    else {
        panic!("explicit_http_config");
    };
    assert!(matches!(
        explicit.protocol_config,
        Some(ProtocolConfig::Http2ProtocolOptions(_))
    ));
    guest("rbac");
    let config_path = deploy("envoy/sandgate.toml");
    let dir = tempdir();
    sandgate_check(&config_path, &dir.path().join("cache"));
    let config = load_config(&config_path);
    assert_eq!(
        Some(cluster_port(&authz.cluster)),
        config.server.grpc_listen.map(|a| a.port())
    );

    // Every route is either open on purpose or names a configured policy,
    // and goes to a defined cluster.
    let policies = policy_names(&config);
    let mut decided = 0;
    for (prefix, over) in &authz.routes {
        match over {
            Override::Disabled(disabled) => assert!(*disabled, "{prefix}"),
            Override::CheckSettings(settings) => {
                let policy = settings
                    .context_extensions
                    .get("policy")
                    .unwrap_or_else(|| panic!("route {prefix} names no policy"));
                assert!(policies.contains(policy), "route {prefix}: {policy}");
                decided += 1;
            }
        }
    }
    assert!(decided > 0, "some route is decided by sandgate");
    for cluster in &authz.routed_to {
        assert!(authz.clusters.contains_key(cluster), "{cluster}");
    }

    // A broken config does not decode: a misspelt field, an unknown filter
    // type, a bad enum value, a bad duration.
    for (what, from, to) in [
        (
            "misspelt field",
            "failure_mode_allow: false",
            "failure_mode_alow: false",
        ),
        (
            "unknown @type",
            "ext_authz.v3.ExtAuthz\n",
            "ext_authz.v3.ExtAuth\n",
        ),
        ("bad enum", "code: ServiceUnavailable", "code: Unavailable"),
        ("bad duration", "timeout: 0.5s", "timeout: half a second"),
    ] {
        assert!(yaml.contains(from), "{from}");
        assert!(
            decode_bootstrap(&pool, &yaml.replacen(from, to, 1)).is_err(),
            "envoy.yaml with a {what} decoded"
        );
    }
}

#[tokio::test]
async fn envoy_routes_are_decided_by_the_policies_they_name() {
    let pool = envoy_descriptors();
    let bootstrap = decode_bootstrap(&pool, &read(&deploy("envoy/envoy.yaml")))
        .unwrap_or_else(|e| panic!("envoy.yaml: {e}"));
    let authz = envoy_authz(&bootstrap);

    // deploy/envoy/sandgate.toml, served on free ports.
    guest("rbac");
    let dir = tempdir();
    let config = read(&deploy("envoy/sandgate.toml"))
        .replace("\"../../", &format!("\"{}/", repo_root().display()));
    let config = write(dir.path(), "sandgate.toml", &on_free_ports(&config));
    let daemon = Daemon::start(&config, &dir.path().join("cache"));
    daemon.ready(&client()).await;
    let grpc = daemon.grpc.expect("grpc_listen is configured");

    // Envoy takes the first route whose prefix matches; an order's path is
    // decided with that route's context_extensions.
    let path = "/api/orders/7";
    let (prefix, over) = authz
        .routes
        .iter()
        .find(|(prefix, _)| path.starts_with(prefix.as_str()))
        .unwrap_or_else(|| panic!("no route for {path}"));
    let Override::CheckSettings(settings) = over else {
        panic!("route {prefix} for {path} is not decided by sandgate");
    };
    viewer_may_read_not_delete(grpc, &settings.context_extensions, path).await;
}
