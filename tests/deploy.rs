#![allow(clippy::unwrap_used)]
//! Static checks of what ships the service: the Dockerfile, docker-compose.yml, the Kubernetes manifests
//! in deploy/kubernetes and the IAM policies in deploy/. No container runtime or cluster is needed: the
//! files are parsed (YAML with serde_norway, JSON with serde_json) and held against the code itself: the
//! binary's `--help` (every variable set must be a real setting), the AWS calls in the source (the IAM
//! actions are exactly those), the alert rules in deploy/prometheus (the PrometheusRule carries them).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde::Deserialize;
use serde_norway::Value;

/// A file of the repository, found from where cargo runs the test (see `workspace_root`).
fn path(relative: &str) -> PathBuf {
    test_support::workspace_root().join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(path(relative)).unwrap_or_else(|err| panic!("cannot read {relative}: {err}"))
}

/// Every document of a YAML file (`---`-separated), with merge keys (`<<: *anchor`) applied as Compose
/// and Kubernetes tools apply them.
fn yaml_documents(relative: &str) -> Vec<Value> {
    let text = read(relative);
    serde_norway::Deserializer::from_str(&text)
        .map(|document| {
            let mut value = Value::deserialize(document).unwrap_or_else(|err| panic!("{relative}: {err}"));
            value.apply_merge().unwrap_or_else(|err| panic!("{relative}: merge keys: {err}"));
            value
        })
        .filter(|value| !value.is_null())
        .collect()
}

fn yaml(relative: &str) -> Value {
    let mut documents = yaml_documents(relative);
    assert_eq!(documents.len(), 1, "{relative} should hold one YAML document");
    documents.remove(0)
}

fn json(relative: &str) -> serde_json::Value {
    serde_json::from_str(&read(relative)).unwrap_or_else(|err| panic!("{relative}: {err}"))
}

/// The value at a `.`-separated path of mapping keys, or panics naming the path.
fn at<'a>(value: &'a Value, dotted: &str) -> &'a Value {
    dotted
        .split('.')
        .fold(value, |value, key| value.get(key).unwrap_or_else(|| panic!("missing `{dotted}` (at `{key}`)")))
}

fn text<'a>(value: &'a Value, dotted: &str) -> &'a str {
    at(value, dotted).as_str().unwrap_or_else(|| panic!("`{dotted}` is not a string"))
}

fn seq<'a>(value: &'a Value, dotted: &str) -> &'a Vec<Value> {
    at(value, dotted).as_sequence().unwrap_or_else(|| panic!("`{dotted}` is not a list"))
}

/// A scalar as Compose and Kubernetes read it (`"25"` and `25` are the same setting).
fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

/// The binary's `--help`, run with an empty environment so no variable of the test's own shows up.
fn help() -> &'static str {
    static HELP: OnceLock<String> = OnceLock::new();
    HELP.get_or_init(|| {
        let output = Command::new(env!("CARGO_BIN_EXE_dynamodb-stream-consumer")).arg("--help").env_clear().output();
        let output = output.unwrap();
        assert!(output.status.success(), "--help failed: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    })
}

/// Every environment variable `--help` names (`[env: NAME=…]`, or `[env: NAME]` for hidden values).
fn settings() -> BTreeSet<String> {
    let names: BTreeSet<String> =
        help().split("[env: ").skip(1).map(|rest| rest.split(['=', ']']).next().unwrap().to_owned()).collect();
    assert!(names.contains("DYNAMODB_TABLES") && names.contains("SHUTDOWN_TIMEOUT_SEC"), "{names:?}");
    names
}

/// The `[default: …]` of the flag backed by `variable`.
fn default_of(variable: &str) -> String {
    let marker = format!("[env: {variable}");
    let line = help().lines().find(|line| line.contains(&marker)).unwrap_or_else(|| panic!("{variable} not in --help"));
    let rest = line.split("[default: ").nth(1).unwrap_or_else(|| panic!("{variable} has no default"));
    rest.split(']').next().unwrap().to_owned()
}

/// Variables the service reads without declaring them: the AWS SDK's standard ones (credentials,
/// endpoints, IRSA's web identity) and `RUST_LOG`.
fn is_known_variable(name: &str, settings: &BTreeSet<String>) -> bool {
    settings.contains(name) || name.starts_with("AWS_") || name == "RUST_LOG"
}

fn assert_all_settings(place: &str, names: impl IntoIterator<Item = String>) {
    let settings = settings();
    let unknown: Vec<String> = names.into_iter().filter(|name| !is_known_variable(name, &settings)).collect();
    assert!(unknown.is_empty(), "{place} sets variables the service does not read: {unknown:?}");
}

/// A Compose `environment:`, as a mapping or as a `NAME=value` list.
fn compose_environment(service: &Value) -> BTreeMap<String, String> {
    match service.get("environment") {
        None => BTreeMap::new(),
        Some(Value::Mapping(map)) => map
            .iter()
            .map(|(k, v)| (k.as_str().unwrap().to_owned(), if v.is_null() { String::new() } else { scalar(v) }))
            .collect(),
        Some(Value::Sequence(list)) => list
            .iter()
            .map(|item| {
                let (name, value) = item.as_str().unwrap().split_once('=').unwrap();
                (name.to_owned(), value.to_owned())
            })
            .collect(),
        Some(other) => panic!("environment is neither a mapping nor a list: {other:?}"),
    }
}

#[test]
fn compose_runs_nats_moto_a_writer_three_replicas_and_monitoring() {
    let compose = yaml("docker-compose.yml");
    let services = at(&compose, "services").as_mapping().unwrap();
    let service = |name: &str| services.get(name).unwrap_or_else(|| panic!("no service {name}"));

    let nats = service("nats");
    assert!(text(nats, "image").starts_with("nats:2.1"), "nats image: {}", text(nats, "image"));
    let command: Vec<String> = seq(nats, "command").iter().map(scalar).collect();
    assert!(command.contains(&"-js".to_owned()), "JetStream must be on: {command:?}");
    let moto = service("moto");
    assert_eq!(text(moto, "image"), "motoserver/moto:5.2.5");
    for (name, dependency) in [("nats", nats), ("moto", moto)] {
        assert!(dependency.get("healthcheck").is_some(), "{name} needs a healthcheck for depends_on conditions");
    }

    let writer = service("demo-writer");
    let script = serde_norway::to_string(at(writer, "command")).unwrap();
    for needed in ["create-table", "demo.orders", "NEW_AND_OLD_IMAGES", "put-item", "http://moto:5000"] {
        let found = script.contains(needed) || compose_environment(writer).values().any(|v| v.contains(needed));
        assert!(found, "demo-writer should use {needed}");
    }

    let replicas: Vec<(&str, &Value)> = services
        .iter()
        .filter(|(_, s)| s.get("build").is_some())
        .map(|(name, s)| (name.as_str().unwrap(), s))
        .collect();
    assert_eq!(replicas.len(), 3, "three replicas built from the Dockerfile");
    let mut ids = BTreeSet::new();
    let mut targets = BTreeSet::new();
    for (name, replica) in &replicas {
        let build = at(replica, "build");
        let dockerfile = build.get("dockerfile").map_or("Dockerfile", |d| d.as_str().unwrap());
        assert_eq!(dockerfile, "Dockerfile", "{name}");
        let env = compose_environment(replica);
        assert_eq!(env["DYNAMODB_TABLES"], "demo.orders", "{name}");
        assert_eq!(env["AWS_ENDPOINT_URL"], "http://moto:5000", "{name}");
        assert_eq!(env["AWS_REGION"], "us-east-1", "{name}");
        assert_eq!(env["NATS_URL"], "nats://nats:4222", "{name}");
        assert_eq!(env["LOG_FORMAT"], "json", "{name}");
        assert!(env.contains_key("AWS_ACCESS_KEY_ID") && env.contains_key("AWS_SECRET_ACCESS_KEY"), "{name}");
        ids.insert(env["REPLICA_ID"].clone());
        assert_all_settings(&format!("docker-compose.yml service {name}"), env.keys().cloned());
        for dependency in ["nats", "moto"] {
            assert_eq!(
                text(replica, &format!("depends_on.{dependency}.condition")),
                "service_healthy",
                "{name} should wait for {dependency}"
            );
        }
        let port = env.get("PORT").cloned().unwrap_or_else(|| default_of("PORT"));
        targets.insert(format!("{name}:{port}"));
    }
    assert_eq!(ids, BTreeSet::from(["r1".to_owned(), "r2".to_owned(), "r3".to_owned()]));

    // Prometheus: the compose scrape configuration reaches every replica and loads the shared alert rules.
    let prometheus = service("prometheus");
    let mounts: BTreeMap<String, String> = seq(prometheus, "volumes")
        .iter()
        .map(|v| {
            let (source, target) = v.as_str().unwrap().split_once(':').unwrap();
            (target.trim_end_matches(":ro").to_owned(), source.to_owned())
        })
        .collect();
    assert_eq!(mounts["/etc/prometheus/alerts.yml"], "./deploy/prometheus/alerts.yml");
    let config_file = mounts["/etc/prometheus/prometheus.yml"].trim_start_matches("./").to_owned();
    let config = yaml(&config_file);
    let rule_files: Vec<&str> = seq(&config, "rule_files").iter().map(|r| r.as_str().unwrap()).collect();
    assert_eq!(rule_files, ["alerts.yml"], "rule files are found beside the mounted configuration");
    let scraped: BTreeSet<String> = seq(&config, "scrape_configs")
        .iter()
        .flat_map(|job| seq(job, "static_configs").iter())
        .flat_map(|group| seq(group, "targets").iter().map(|t| t.as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(scraped, targets, "{config_file} should scrape every replica");

    // Grafana gets the dashboard and a Prometheus data source.
    let grafana = service("grafana");
    let volumes: Vec<&str> = seq(grafana, "volumes").iter().map(|v| v.as_str().unwrap()).collect();
    assert!(volumes.iter().any(|v| v.starts_with("./deploy/grafana/dashboard.json:")), "{volumes:?}");

    // Every bind mount exists.
    for (name, s) in services {
        for volume in s.get("volumes").and_then(Value::as_sequence).into_iter().flatten() {
            let source = volume.as_str().unwrap().split(':').next().unwrap();
            if let Some(relative) = source.strip_prefix("./") {
                assert!(path(relative).exists(), "{name:?} mounts {source}, which does not exist");
            }
        }
    }
    let datasources = yaml("deploy/compose/grafana/provisioning/datasources/prometheus.yml");
    assert_eq!(text(&seq(&datasources, "datasources")[0], "type"), "prometheus");
    let dashboards = yaml("deploy/compose/grafana/provisioning/dashboards/dashboards.yml");
    assert!(seq(&dashboards, "providers").iter().any(|p| text(p, "options.path") == "/var/lib/grafana/dashboards"));
}

/// The manifests kustomization.yaml lists, by kind (each kind once).
fn manifests() -> BTreeMap<String, Value> {
    let kustomization = yaml("deploy/kubernetes/kustomization.yaml");
    let listed: BTreeSet<String> =
        seq(&kustomization, "resources").iter().map(|r| r.as_str().unwrap().to_owned()).collect();
    let present: BTreeSet<String> = std::fs::read_dir(path("deploy/kubernetes"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present, "kustomization.yaml should list every manifest");
    let mut by_kind = BTreeMap::new();
    for file in &listed {
        for document in yaml_documents(&format!("deploy/kubernetes/{file}")) {
            let kind = text(&document, "kind").to_owned();
            assert!(document.get("apiVersion").is_some(), "{file}: no apiVersion");
            assert!(by_kind.insert(kind.clone(), document).is_none(), "{kind} defined twice");
        }
    }
    by_kind
}

fn labels(value: &Value, dotted: &str) -> BTreeMap<String, String> {
    at(value, dotted).as_mapping().unwrap().iter().map(|(k, v)| (k.as_str().unwrap().to_owned(), scalar(v))).collect()
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn kubernetes_deployment_rolls_without_unavailability_and_runs_locked_down() {
    let manifests = manifests();
    let kind = |k: &str| manifests.get(k).unwrap_or_else(|| panic!("no {k} manifest"));
    let deployment = kind("Deployment");

    assert_eq!(at(deployment, "spec.replicas").as_u64(), Some(3));
    assert_eq!(text(deployment, "spec.strategy.type"), "RollingUpdate");
    assert_eq!(scalar(at(deployment, "spec.strategy.rollingUpdate.maxUnavailable")), "0");
    assert_eq!(scalar(at(deployment, "spec.strategy.rollingUpdate.maxSurge")), "1");

    let pod = at(deployment, "spec.template");
    let pod_labels = labels(pod, "metadata.labels");
    assert!(selects(&labels(deployment, "spec.selector.matchLabels"), &pod_labels));
    let spec = at(pod, "spec");
    let containers = seq(spec, "containers");
    assert_eq!(containers.len(), 1);
    let container = &containers[0];

    let env: BTreeMap<String, &Value> = seq(container, "env").iter().map(|e| (text(e, "name").to_owned(), e)).collect();
    assert_all_settings("deployment.yaml", env.keys().cloned());
    let value_of = |name: &str| env.get(name).and_then(|e| e.get("value")).map(scalar);

    // The pod outlives the graceful shutdown, which is set explicitly so the two cannot drift apart.
    let shutdown: u64 = value_of("SHUTDOWN_TIMEOUT_SEC").expect("SHUTDOWN_TIMEOUT_SEC set explicitly").parse().unwrap();
    let grace = at(spec, "terminationGracePeriodSeconds").as_u64().unwrap();
    assert!(grace > shutdown, "terminationGracePeriodSeconds {grace} should exceed SHUTDOWN_TIMEOUT_SEC {shutdown}");

    assert_eq!(text(env["REPLICA_ID"], "valueFrom.fieldRef.fieldPath"), "metadata.name");
    assert_eq!(value_of("LOG_FORMAT").as_deref(), Some("json"));

    // Probes on the named HTTP port, which is the service's PORT.
    let port = value_of("PORT").unwrap_or_else(|| default_of("PORT"));
    let http = seq(container, "ports").iter().find(|p| p.get("name").and_then(Value::as_str) == Some("http"));
    assert_eq!(scalar(at(http.expect("a port named http"), "containerPort")), port);
    for (probe, endpoint) in [("livenessProbe", "/livez"), ("readinessProbe", "/readyz")] {
        assert_eq!(text(container, &format!("{probe}.httpGet.path")), endpoint);
        let probe_port = scalar(at(container, &format!("{probe}.httpGet.port")));
        assert!(probe_port == "http" || probe_port == port, "{probe} port {probe_port}");
    }
    for (resource, what) in [("requests", "cpu"), ("requests", "memory"), ("limits", "memory")] {
        at(container, &format!("resources.{resource}.{what}"));
    }

    // Locked down: non-root, read-only root file system, no privileges, default seccomp.
    let pod_security = spec.get("securityContext");
    let non_root = |v: Option<&Value>| v.and_then(|s| s.get("runAsNonRoot")).and_then(Value::as_bool) == Some(true);
    assert!(non_root(container.get("securityContext")) || non_root(pod_security), "runAsNonRoot");
    assert_eq!(at(container, "securityContext.readOnlyRootFilesystem").as_bool(), Some(true));
    assert_eq!(at(container, "securityContext.allowPrivilegeEscalation").as_bool(), Some(false));
    let dropped: Vec<String> = seq(container, "securityContext.capabilities.drop").iter().map(scalar).collect();
    assert_eq!(dropped, ["ALL"]);
    let seccomp = |v: Option<&Value>| {
        v.and_then(|s| s.get("seccompProfile")).and_then(|p| p.get("type")).and_then(Value::as_str)
            == Some("RuntimeDefault")
    };
    assert!(seccomp(container.get("securityContext")) || seccomp(pod_security), "seccompProfile RuntimeDefault");

    // NATS credentials: a file from a Secret volume, named by NATS_CREDS_FILE.
    let creds = value_of("NATS_CREDS_FILE").expect("NATS_CREDS_FILE");
    let mount = seq(container, "volumeMounts")
        .iter()
        .find(|m| creds.starts_with(&format!("{}/", text(m, "mountPath").trim_end_matches('/'))))
        .unwrap_or_else(|| panic!("no volume mounted where NATS_CREDS_FILE ({creds}) points"));
    let volume = seq(spec, "volumes").iter().find(|v| text(v, "name") == text(mount, "name")).unwrap();
    assert!(!text(volume, "secret.secretName").is_empty(), "the credentials come from a Secret");
    assert_ne!(at(volume, "secret").get("optional").and_then(Value::as_bool), Some(true), "credentials are required");
    // Every file setting points into a mounted volume.
    for (name, _) in env.iter().filter(|(name, _)| name.ends_with("_FILE")) {
        let file = value_of(name).unwrap();
        assert!(
            seq(container, "volumeMounts").iter().any(|m| file.starts_with(text(m, "mountPath"))),
            "{name}={file} is not inside a mounted volume"
        );
    }

    // Replicas spread over nodes.
    let spread = spec
        .get("topologySpreadConstraints")
        .and_then(Value::as_sequence)
        .is_some_and(|constraints| constraints.iter().any(|c| text(c, "topologyKey") == "kubernetes.io/hostname"));
    let anti_affinity = spec.get("affinity").and_then(|a| a.get("podAntiAffinity")).is_some();
    assert!(spread || anti_affinity, "replicas should spread across nodes");

    // IRSA: the pods run as a service account that names an IAM role.
    let account = kind("ServiceAccount");
    assert_eq!(text(spec, "serviceAccountName"), text(account, "metadata.name"));
    let role = at(account, "metadata.annotations").get("eks.amazonaws.com/role-arn").and_then(Value::as_str);
    assert!(role.is_some_and(|arn| arn.starts_with("arn:aws:iam::")), "IRSA annotation: {role:?}");
}

#[test]
fn kubernetes_budget_service_monitor_and_rules_match_the_deployment() {
    let manifests = manifests();
    let kind = |k: &str| manifests.get(k).unwrap_or_else(|| panic!("no {k} manifest"));
    let deployment = kind("Deployment");
    let pod_labels = labels(deployment, "spec.template.metadata.labels");

    let budget = kind("PodDisruptionBudget");
    assert!(selects(&labels(budget, "spec.selector.matchLabels"), &pod_labels), "the budget covers the pods");
    let max_unavailable = budget.get("spec").and_then(|s| s.get("maxUnavailable")).map(scalar);
    let min_available = budget.get("spec").and_then(|s| s.get("minAvailable")).map(scalar);
    assert!(
        max_unavailable.as_deref() == Some("1") || min_available.as_deref() == Some("2"),
        "one replica at a time: maxUnavailable {max_unavailable:?}, minAvailable {min_available:?}"
    );

    let service = kind("Service");
    assert_eq!(service.get("spec").and_then(|s| s.get("type")).map_or("ClusterIP".to_owned(), scalar), "ClusterIP");
    assert!(selects(&labels(service, "spec.selector"), &pod_labels), "the Service selects the pods");
    let port = seq(service, "spec.ports").iter().find(|p| text(p, "name") == "http").expect("a port named http");
    assert_eq!(scalar(at(port, "port")), default_of("PORT"));

    let monitor = kind("ServiceMonitor");
    assert_eq!(text(monitor, "apiVersion"), "monitoring.coreos.com/v1");
    assert!(selects(&labels(monitor, "spec.selector.matchLabels"), &labels(service, "metadata.labels")));
    let endpoints = seq(monitor, "spec.endpoints");
    assert!(!endpoints.is_empty());
    for endpoint in endpoints {
        assert_eq!(text(endpoint, "path"), "/metrics");
        assert_eq!(text(endpoint, "port"), "http");
    }

    let rule = kind("PrometheusRule");
    assert_eq!(text(rule, "apiVersion"), "monitoring.coreos.com/v1");
    let alerts = yaml("deploy/prometheus/alerts.yml");
    assert_eq!(
        at(rule, "spec.groups"),
        at(&alerts, "groups"),
        "PrometheusRule should carry alerts.yml's groups exactly"
    );
}

/// True when the source names an AWS SDK client type (`aws_sdk_x::Client`, or `Client` in an
/// `aws_sdk_x::{…}` import), not only the SDK's data types.
fn holds_aws_client(source: &str) -> bool {
    let source: String = source.chars().filter(|c| !c.is_whitespace()).collect();
    source.match_indices("aws_sdk_").any(|(index, _)| {
        let rest = source[index..].trim_start_matches(|c: char| c.is_ascii_alphanumeric() || c == '_');
        let named =
            rest.strip_prefix("::Client").is_some_and(|after| !after.starts_with(|c: char| c.is_ascii_alphanumeric()));
        let imported = rest.strip_prefix("::{").is_some_and(|group| {
            group[..group.find('}').unwrap_or(group.len())].split([',', ':']).any(|item| item == "Client")
        });
        named || imported
    })
}

/// A unit-test module of its own file (`tests.rs`, `…_tests.rs`): compiled only for `cargo test`,
/// where clients against canned answers are no calls of the service.
fn is_test_module(file: &Path) -> bool {
    file.file_name()
        .and_then(|name| name.to_str())
        .is_some_and(|name| name == "tests.rs" || name.ends_with("_tests.rs"))
}

/// A file's source up to its unit tests (`#[cfg(test)] mod tests {`, by the convention of this code
/// base at the end).
fn without_tests(source: &str) -> &str {
    source.find("#[cfg(test)]\nmod tests {").map_or(source, |at| &source[..at])
}

/// The AWS operations the service calls, read from its source: every `.send()` on a client of an
/// `aws_sdk_*` crate, in the only two files that hold such clients (unit tests left out). Each operation is the SDK method
/// called on the client (`self.streams.describe_stream()`, `Client::new(..).get_caller_identity()`).
fn aws_operations() -> BTreeSet<(String, String)> {
    // No other file may talk to AWS, or this derivation would miss its calls.
    let mut files = Vec::new();
    let mut pending = vec![path("src")];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap().path();
            if entry.is_dir() {
                pending.push(entry);
            } else if entry.extension().is_some_and(|e| e == "rs") && !is_test_module(&entry) {
                let source = std::fs::read_to_string(&entry).unwrap();
                if holds_aws_client(without_tests(&source)) {
                    files.push(entry.strip_prefix(path("")).unwrap().to_string_lossy().into_owned());
                }
            }
        }
    }
    files.sort();
    assert_eq!(files, ["src/lib.rs", "src/source/api.rs"], "AWS clients outside the files this test reads");

    let mut operations = BTreeSet::new();
    for file in files {
        // Without whitespace, a call chain split over lines reads `self.streams.describe_stream()`.
        let source: String = without_tests(&read(&file)).chars().filter(|c| !c.is_whitespace()).collect();
        let identifier = |s: &str| s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
        // Struct fields holding clients: `streams:aws_sdk_dynamodbstreams::Client`.
        let mut receivers: Vec<(String, String)> = Vec::new();
        for (index, _) in source.match_indices(":aws_sdk_") {
            let crate_name = identifier(&source[index + ":aws_sdk_".len()..]);
            let after = &source[index + ":aws_sdk_".len() + crate_name.len()..];
            if after.starts_with("::Client") && !after.starts_with("::Client::") {
                let field: String = source[..index]
                    .chars()
                    .rev()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                receivers.push((format!("self.{field}."), crate_name));
            }
        }
        let mut calls = Vec::new();
        for (receiver, crate_name) in &receivers {
            for (index, _) in source.match_indices(receiver.as_str()) {
                calls.push((crate_name.clone(), identifier(&source[index + receiver.len()..])));
            }
        }
        // Clients made in place: `aws_sdk_sts::Client::new(&sdk).get_caller_identity()`.
        for (index, _) in source.match_indices("aws_sdk_") {
            let crate_name = identifier(&source[index + "aws_sdk_".len()..]);
            let rest = &source[index + "aws_sdk_".len() + crate_name.len()..];
            if let Some(arguments) = rest.strip_prefix("::Client::new(") {
                let close = arguments.find(')').unwrap();
                if let Some(call) = arguments[close + 1..].strip_prefix('.') {
                    calls.push((crate_name.clone(), identifier(call)));
                }
            }
        }
        assert_eq!(
            calls.len(),
            source.matches(".send()").count(),
            "{file}: every `.send()` should be an operation called on a client: {calls:?}"
        );
        operations.extend(calls);
        if source.contains("AssumeRoleProvider") {
            operations.insert(("sts".to_owned(), "assume_role".to_owned()));
        }
    }
    operations
}

fn pascal(snake: &str) -> String {
    snake
        .split('_')
        .map(|word| {
            let mut chars = word.chars();
            chars.next().map(|first| first.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
        })
        .collect()
}

fn policy_statements(relative: &str) -> Vec<serde_json::Value> {
    let policy = json(relative);
    assert_eq!(policy["Version"], "2012-10-17", "{relative}");
    policy["Statement"].as_array().unwrap().clone()
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    match value {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(items) => items.iter().map(|i| i.as_str().unwrap().to_owned()).collect(),
        other => panic!("neither a string nor a list: {other}"),
    }
}

#[test]
fn iam_policies_grant_exactly_the_aws_calls_the_code_makes() {
    let operations = aws_operations();
    // DynamoDB Streams' actions live under the `dynamodb:` prefix. GetCallerIdentity needs no permission:
    // IAM cannot deny it, so a policy would only pretend to control it.
    let needed: BTreeSet<String> = operations
        .iter()
        .filter(|(_, operation)| operation != "get_caller_identity")
        .map(|(crate_name, operation)| {
            let prefix = match crate_name.as_str() {
                "dynamodb" | "dynamodbstreams" => "dynamodb",
                "sts" => "sts",
                other => panic!("an AWS service this test does not know: {other}"),
            };
            format!("{prefix}:{}", pascal(operation))
        })
        .collect();
    assert_eq!(
        needed,
        [
            "dynamodb:DescribeTable",
            "dynamodb:DescribeStream",
            "dynamodb:GetShardIterator",
            "dynamodb:GetRecords",
            "dynamodb:Scan",
            "dynamodb:ListTables",
            "dynamodb:ListTagsOfResource",
            "sts:AssumeRole"
        ]
        .map(str::to_owned)
        .into(),
        "the calls found in the source: {operations:?}"
    );

    let mut granted = BTreeSet::new();
    for file in ["deploy/iam-policy.json", "deploy/iam-assume-role-policy.json"] {
        for statement in policy_statements(file) {
            assert_eq!(statement["Effect"], "Allow", "{file}");
            let actions = strings(&statement["Action"]);
            let resources = strings(&statement["Resource"]);
            for action in &actions {
                assert!(!action.contains('*'), "{file}: wildcard action {action}");
                for resource in &resources {
                    // ListTables names no resource: IAM grants it on `*` or not at all.
                    if action == "dynamodb:ListTables" {
                        assert_eq!(resource, "*", "{file}: {action} takes no resource");
                        continue;
                    }
                    assert!(resource.contains("ACCOUNT_ID"), "{file}: {resource} has no ACCOUNT_ID placeholder");
                    let expected_suffix = match action.as_str() {
                        "dynamodb:DescribeTable" | "dynamodb:Scan" | "dynamodb:ListTagsOfResource" => {
                            ":table/TABLE_NAME"
                        }
                        "sts:AssumeRole" => "",
                        _ => ":table/TABLE_NAME/stream/*",
                    };
                    assert!(resource.ends_with(expected_suffix), "{file}: {action} on {resource}");
                    if action.starts_with("dynamodb:") {
                        assert!(resource.starts_with("arn:aws:dynamodb:REGION:ACCOUNT_ID:"), "{file}: {resource}");
                    } else {
                        assert!(resource.starts_with("arn:aws:iam::ACCOUNT_ID:role/"), "{file}: {resource}");
                    }
                }
                assert!(granted.insert(action.clone()), "{file}: {action} granted twice");
            }
        }
    }
    assert_eq!(granted, needed, "the policies should grant exactly the actions the code needs");
    let assume: Vec<String> =
        policy_statements("deploy/iam-assume-role-policy.json").iter().flat_map(|s| strings(&s["Action"])).collect();
    assert_eq!(assume, ["sts:AssumeRole"], "the cross-account grant stands apart");
}

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn dockerfile() -> Vec<(String, String)> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in read("Dockerfile").lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => current.push_str(head),
            None => {
                current.push_str(line);
                let (keyword, rest) = current.split_once(' ').unwrap_or((&current, ""));
                instructions.push((keyword.to_ascii_uppercase(), rest.trim().to_owned()));
                current.clear();
            }
        }
    }
    instructions
}

#[test]
fn dockerfile_builds_with_a_dependency_layer_and_runs_the_binary_as_non_root_on_distroless() {
    let instructions = dockerfile();
    let stages: Vec<usize> = (0..instructions.len()).filter(|&i| instructions[i].0 == "FROM").collect();
    assert!(stages.len() >= 2, "multi-stage build");
    assert!(instructions[stages[0]].1.starts_with("rust:1.95-bookworm"), "builder: {}", instructions[stages[0]].1);
    let final_stage = &instructions[*stages.last().unwrap()..];
    let base = &final_stage[0].1;
    assert!(base.starts_with("gcr.io/distroless/cc-debian12:nonroot"), "final stage: {base}");

    // The dependency layer: a locked release build before the real sources are copied in.
    let builder = &instructions[stages[0]..stages[1]];
    let first_source_copy = builder.iter().position(|(k, rest)| k == "COPY" && rest.starts_with("src ")).unwrap();
    let first_build =
        builder.iter().position(|(k, rest)| k == "RUN" && rest.contains("cargo build --release --locked"));
    assert!(first_build.is_some_and(|b| b < first_source_copy), "dependencies should build before sources are copied");
    let manifests = builder.iter().position(|(k, rest)| k == "COPY" && rest.contains("Cargo.lock")).unwrap();
    assert!(manifests < first_source_copy);

    let user = final_stage.iter().rev().find(|(k, _)| k == "USER").map(|(_, u)| u.clone());
    let user = user.unwrap_or_else(|| "nonroot".to_owned());
    let name = user.split(':').next().unwrap();
    assert!(name == "nonroot" || name.parse::<u32>().is_ok_and(|uid| uid != 0), "USER {user}");

    let entrypoint = final_stage.iter().find(|(k, _)| k == "ENTRYPOINT").expect("ENTRYPOINT").1.clone();
    let entrypoint: Vec<String> = serde_json::from_str(&entrypoint).expect("exec-form ENTRYPOINT (no shell)");
    assert_eq!(entrypoint, ["/dynamodb-stream-consumer"]);
    assert!(
        final_stage.iter().any(|(k, rest)| k == "COPY"
            && rest.starts_with("--from=")
            && rest.ends_with(" /dynamodb-stream-consumer")),
        "the binary is copied to the entrypoint's path"
    );
    let exposed: Vec<&str> =
        final_stage.iter().filter(|(k, _)| k == "EXPOSE").flat_map(|(_, p)| p.split_whitespace()).collect();
    assert_eq!(exposed, [default_of("PORT").as_str()], "EXPOSE the default PORT");

    // Multi-arch: no instruction names an architecture.
    for (keyword, rest) in &instructions {
        for arch in ["amd64", "x86_64", "arm64", "aarch64"] {
            assert!(!rest.contains(arch), "{keyword} {rest} names {arch}");
        }
    }

    let dockerignore = read(".dockerignore");
    let ignored: BTreeSet<&str> = dockerignore.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();
    for needed in ["target", ".venv", ".git"] {
        assert!(ignored.contains(needed), ".dockerignore should exclude {needed}");
    }
    for kept in ["src", "Cargo.toml", "Cargo.lock", "coordination", "tests"] {
        assert!(!ignored.contains(kept), ".dockerignore must not exclude {kept}: the build needs it");
    }
}

/// `kubernetes-validate` (PyPI; bundles Kubernetes' OpenAPI schemas), installed into `.venv` by
/// `.ci/install-servers`.
fn kubernetes_validate() -> PathBuf {
    let installed = path(".venv/bin/kubernetes-validate");
    assert!(installed.exists(), "kubernetes-validate is missing: run .ci/install-servers (it installs it into .venv)");
    installed
}

#[test]
fn kubernetes_manifests_validate_against_the_kubernetes_schemas() {
    let kustomization = yaml("deploy/kubernetes/kustomization.yaml");
    let files: Vec<PathBuf> =
        seq(&kustomization, "resources").iter().map(|r| path("deploy/kubernetes").join(r.as_str().unwrap())).collect();
    // --strict also rejects fields the schema does not know (a misspelt or misplaced key). The
    // Prometheus Operator's kinds have no bundled schema: they are only warned about, and checked above.
    let output = Command::new(kubernetes_validate()).arg("--strict").arg("--no-warn").args(&files).output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "kubernetes-validate failed:\n{report}");
    for kind in ["deployment", "poddisruptionbudget", "service", "serviceaccount", "namespace"] {
        assert!(report.contains(&format!("passed for resource {kind}/")), "{kind} was not validated:\n{report}");
    }
}
