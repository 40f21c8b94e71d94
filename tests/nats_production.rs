//! Production NATS set-ups, each against real `nats-server` processes on loopback started from
//! config files written here: user and password, token, NKey, a credentials file (operator, account
//! and user JWTs signed here with NKeys, served by a memory resolver), TLS and mutual TLS with a CA
//! made here. In each, records flow end to end; a wrong secret or an untrusted certificate stops
//! start-up with exit 1 and a message naming the cause and the settings, never a retry loop; and no
//! secret reaches the log. Last, a 3-node JetStream cluster with an R3 stream and bucket loses the
//! bucket's leader node while two replicas publish: nothing is lost, nothing stored twice, and no shard
//! is ever held by both replicas.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::ConnectOptions;
use aws_sdk_dynamodb::types::{AttributeValue as Av, StreamViewType};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use test_support::cluster::Cluster;
use test_support::{Moto, NatsServer, ServiceProcess, fixtures, free_port, http_get, wait_for};

const STREAM: &str = "dynamodb_streams";
/// The stream behind the checkpoint bucket (where the leases live).
const KV_STREAM: &str = "KV_dynamodb-stream-checkpoints";
const DEADLINE: Duration = Duration::from_secs(60);

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dynamodb-stream-consumer"))
}

/// The service's environment: `urls` for NATS, moto at `aws` (any URL when start-up is expected to
/// stop at NATS), plus `extra`.
fn service_env(urls: &str, aws: &str, tables: &str, port: u16, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let base = [
        ("DYNAMODB_TABLES", tables),
        ("NATS_URL", urls),
        ("AWS_ENDPOINT_URL", aws),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", fixtures::REGION),
        ("BIND", "127.0.0.1"),
        ("POLL_INTERVAL_MS", "100"),
        ("SHARD_REFRESH_INTERVAL_SEC", "1"),
        ("SHUTDOWN_TIMEOUT_SEC", "10"),
        ("RUST_LOG", "info"),
    ];
    let port = port.to_string();
    base.iter().chain(extra).chain(&[("PORT", port.as_str())]).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// A `nats-server -js` on loopback that also reads `config` (authorization, TLS, operator).
async fn server_with(dir: &Path, name: &str, config: &str) -> NatsServer {
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, config).unwrap();
    NatsServer::start_with_args(&["-c", path.to_str().unwrap()]).await
}

fn write(dir: &Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path.display().to_string()
}

/// Runs one service with `auth` against `url`, writes three items to a fresh table, and checks that
/// they arrive in the stream (read by `client`, which must be allowed in), that `/status` reports
/// NATS connected, that the service stops cleanly, and that none of `secrets` is in its log.
async fn records_flow(url: &str, client: async_nats::Client, auth: &[(&str, &str)], secrets: &[&str]) {
    let moto = Moto::start().await;
    let ddb = fixtures::dynamodb(&moto).await;
    fixtures::create_table(&ddb, "orders", Some(StreamViewType::NewAndOldImages)).await;
    let port = fixtures::http_port();
    let env = service_env(url, &moto.endpoint(), "orders", port, auth);
    let service = ServiceProcess::start_ready(binary(), &env, port, DEADLINE).await;
    for pk in ["a", "b", "c"] {
        ddb.put_item().table_name("orders").item("pk", Av::S(pk.into())).send().await.unwrap();
    }
    let js = async_nats::jetstream::new(client);
    let messages = fixtures::wait_for_messages(&js, STREAM, 3, DEADLINE).await;
    let keys: BTreeSet<String> = messages.iter().map(|m| m.json()["keys"]["pk"].as_str().unwrap().to_owned()).collect();
    assert_eq!(keys, BTreeSet::from(["a".to_owned(), "b".to_owned(), "c".to_owned()]));
    let (_, status) = http_get(port, "/status").await.unwrap();
    assert!(status.contains("\"nats_connected\":true"), "{status}");
    let log = service.stop_gracefully(Duration::from_secs(15)).await;
    assert!(log.contains("connected to NATS"), "{log}");
    for secret in secrets {
        assert!(!log.contains(secret), "a secret is in the log:\n{log}");
    }
}

/// Starts a service that must not get past NATS: exit 1 within the deadline (no endless retry), with
/// each of `expected` in its log and none of `secrets`. Returns the log.
async fn refused(url: &str, auth: &[(&str, &str)], expected: &[&str], secrets: &[&str]) -> String {
    let port = fixtures::http_port();
    let env = service_env(url, &format!("http://127.0.0.1:{}", free_port()), "orders", port, auth);
    let mut service = ServiceProcess::start(binary(), &[], &env);
    let status = service.wait_exit(Duration::from_secs(30)).await;
    let log = service.log();
    assert_eq!(status.code(), Some(1), "a refused connection ends start-up with exit 1; log:\n{log}");
    assert!(!log.contains("NATS unreachable; retrying"), "a refusal must not be retried:\n{log}");
    for text in expected {
        assert!(log.contains(text), "the log must say {text:?}:\n{log}");
    }
    for secret in secrets {
        assert!(!log.contains(secret), "a secret is in the log:\n{log}");
    }
    println!("refused as expected: {}", log.lines().rfind(|line| line.starts_with("error:")).unwrap_or_default());
    log
}

#[tokio::test(flavor = "multi_thread")]
async fn user_and_password_let_records_through_and_a_wrong_password_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let nats = server_with(dir.path(), "userpass", r#"authorization { user: svc, password: "pw-Xq81 z!" }"#).await;
    let client =
        ConnectOptions::with_user_and_password("svc".into(), "pw-Xq81 z!".into()).connect(nats.url()).await.unwrap();
    records_flow(&nats.url(), client, &[("NATS_USER", "svc"), ("NATS_PASSWORD", "pw-Xq81 z!")], &["pw-Xq81"]).await;
    let auth = [("NATS_USER", "svc"), ("NATS_PASSWORD", "pw-wrong-55")];
    refused(&nats.url(), &auth, &["authorization violation", "NATS_USER and NATS_PASSWORD"], &["pw-wrong-55"]).await;
    refused(&nats.url(), &[], &["authorization violation", "no credentials are configured"], &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_lets_records_through_and_a_wrong_token_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let nats = server_with(dir.path(), "token", r#"authorization { token: "tok-Hn42vR" }"#).await;
    let client = ConnectOptions::with_token("tok-Hn42vR".into()).connect(nats.url()).await.unwrap();
    records_flow(&nats.url(), client, &[("NATS_TOKEN", "tok-Hn42vR")], &["tok-Hn42vR"]).await;
    refused(
        &nats.url(),
        &[("NATS_TOKEN", "tok-wrong-9")],
        &["authorization violation", "NATS_TOKEN"],
        &["tok-wrong-9"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_nkey_seed_lets_records_through_and_an_unknown_key_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let config = format!("authorization {{ users: [ {{ nkey: {} }} ] }}", user.public_key());
    let nats = server_with(dir.path(), "nkey", &config).await;
    let seed_file = write(dir.path(), "svc.nk", &format!("{seed}\n"));
    let client = ConnectOptions::with_nkey(seed.clone()).connect(nats.url()).await.unwrap();
    records_flow(&nats.url(), client, &[("NATS_NKEY_SEED_FILE", &seed_file)], &[&seed]).await;

    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    let stranger_file = write(dir.path(), "stranger.nk", &stranger);
    let expected = ["authorization violation", "NATS_NKEY_SEED_FILE"];
    refused(&nats.url(), &[("NATS_NKEY_SEED_FILE", &stranger_file)], &expected, &[&stranger]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn contradictory_or_missing_nats_settings_exit_2_naming_each_variable_and_help_hides_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.creds").display().to_string();
    let cert = write(dir.path(), "client.pem", "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n");
    let settings = [
        ("NATS_CREDS_FILE", missing.as_str()),
        ("NATS_TOKEN", "tok-Zr8"),
        ("NATS_USER", "svc"),
        ("NATS_TLS_CERT_FILE", cert.as_str()),
    ];
    let env = service_env("nats://127.0.0.1:4222", "http://127.0.0.1:1", "orders", free_port(), &settings);
    let mut service = ServiceProcess::start(binary(), &[], &env);
    let status = service.wait_exit(Duration::from_secs(10)).await;
    let log = service.log();
    assert_eq!(status.code(), Some(2), "invalid settings exit 2:\n{log}");
    for line in [
        format!("NATS_CREDS_FILE: {missing}: does not exist"),
        "NATS_PASSWORD: required with NATS_USER".to_owned(),
        "NATS_CREDS_FILE: NATS_CREDS_FILE, NATS_USER/NATS_PASSWORD, NATS_TOKEN are set together".to_owned(),
        "NATS_TLS_KEY_FILE: required with NATS_TLS_CERT_FILE".to_owned(),
    ] {
        assert!(log.contains(&line), "the message must say {line:?}:\n{log}");
    }
    assert!(!log.contains("tok-Zr8"), "a secret is in the message:\n{log}");

    let secrets = [("NATS_PASSWORD", "pw-Help-1"), ("NATS_TOKEN", "tok-Help-2")];
    let mut help = ServiceProcess::start(binary(), &["--help"], &service_env("", "", "", 0, &secrets));
    assert!(help.wait_exit(Duration::from_secs(10)).await.success());
    let text = help.log();
    assert!(text.contains("NATS_CREDS_FILE") && text.contains("NATS_TLS_KEY_FILE"), "{text}");
    assert!(!text.contains("pw-Help-1") && !text.contains("tok-Help-2"), "--help shows a secret:\n{text}");
}

/// A NATS JWT: `header.claims.signature`, each part base64url without padding, signed by `issuer`
/// with Ed25519 (the `ed25519-nkey` algorithm). The server checks the signature and the issuer chain;
/// the `jti` only has to be unique.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let claims = serde_json::json!({
        "jti": format!("{subject}-{}", free_port()),
        "iat": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let signed = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims.to_string()));
    let signature = URL_SAFE_NO_PAD.encode(issuer.sign(signed.as_bytes()).unwrap());
    format!("{signed}.{signature}")
}

/// An account JWT without limits; with JetStream when `jetstream` (the system account has none).
fn account_jwt(operator: &nkeys::KeyPair, account: &nkeys::KeyPair, jetstream: bool) -> String {
    let js = if jetstream { -1 } else { 0 };
    let limits = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true, "conn": -1,
        "leaf": -1, "mem_storage": js, "disk_storage": js, "streams": js, "consumer": js,
    });
    let nats = serde_json::json!({"limits": limits, "default_permissions": {"pub": {}, "sub": {}}, "type": "account", "version": 2});
    jwt(operator, &account.public_key(), "app", nats)
}

/// A `.creds` file for a new user of `account`, as `nsc` writes it.
fn creds_for(account: &nkeys::KeyPair) -> (String, String) {
    let user = nkeys::KeyPair::new_user();
    let nats =
        serde_json::json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2});
    let token = jwt(account, &user.public_key(), "svc", nats);
    let seed = user.seed().unwrap();
    let creds = format!(
        "-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    );
    (creds, seed)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_credentials_file_lets_records_through_and_a_user_of_an_unknown_account_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let operator = nkeys::KeyPair::new_operator();
    let (account, system) = (nkeys::KeyPair::new_account(), nkeys::KeyPair::new_account());
    // The operator names the system account, which JetStream needs for its internal subscriptions.
    let operator_nats = serde_json::json!({"type": "operator", "version": 2, "system_account": system.public_key()});
    let operator_jwt = jwt(&operator, &operator.public_key(), "test-operator", operator_nats);
    let config = format!(
        "operator: \"{operator_jwt}\"\nsystem_account: {sys}\nresolver: MEMORY\n\
         resolver_preload: {{\n  {app}: \"{app_jwt}\"\n  {sys}: \"{sys_jwt}\"\n}}\n",
        sys = system.public_key(),
        app = account.public_key(),
        app_jwt = account_jwt(&operator, &account, true),
        sys_jwt = account_jwt(&operator, &system, false),
    );
    let nats = server_with(dir.path(), "operator", &config).await;
    let (creds, seed) = creds_for(&account);
    let creds_file = write(dir.path(), "svc.creds", &creds);
    let client = ConnectOptions::with_credentials_file(&creds_file).await.unwrap().connect(nats.url()).await.unwrap();
    records_flow(&nats.url(), client, &[("NATS_CREDS_FILE", &creds_file)], &[&seed]).await;

    let (stranger, stranger_seed) = creds_for(&nkeys::KeyPair::new_account());
    let stranger_file = write(dir.path(), "stranger.creds", &stranger);
    let expected = ["authorization violation", "NATS_CREDS_FILE"];
    refused(&nats.url(), &[("NATS_CREDS_FILE", &stranger_file)], &expected, &[&stranger_seed]).await;
}

/// A CA and the PEM files of certificates it signs, all written into a directory.
struct Pki {
    dir: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// The CA certificate's file.
    ca_file: String,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let ca_file = write(dir, &format!("{name}-ca.pem"), &cert.pem());
        Pki { dir: dir.to_owned(), issuer: rcgen::Issuer::new(params, key), ca_file }
    }

    /// A certificate for `127.0.0.1` and `localhost`, usable by a server and a client; returns the
    /// certificate's and the key's files.
    fn issue(&self, name: &str) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (
            write(&self.dir, &format!("{name}.pem"), &cert.pem()),
            write(&self.dir, &format!("{name}-key.pem"), &key.serialize_pem()),
        )
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_with_the_servers_ca_lets_records_through_and_a_client_without_it_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "good");
    let (cert, key) = pki.issue("server");
    let nats = server_with(dir.path(), "tls", &format!("tls {{ cert_file: \"{cert}\", key_file: \"{key}\" }}")).await;
    let client = ConnectOptions::new()
        .add_root_certificates(pki.ca_file.clone().into())
        .require_tls(true)
        .connect(nats.url())
        .await
        .unwrap();
    records_flow(&nats.url(), client, &[("NATS_TLS_CA_FILE", &pki.ca_file)], &[]).await;

    let other = Pki::new(dir.path(), "other");
    let untrusted = ["the server's certificate is not trusted by NATS_TLS_CA_FILE", "UnknownIssuer"];
    refused(&nats.url(), &[("NATS_TLS_CA_FILE", &other.ca_file)], &untrusted, &[]).await;
    // Without a CA file the system's roots are used, and they do not know the test CA either.
    refused(&nats.url(), &[], &["not trusted by the system's trusted roots (NATS_TLS_CA_FILE is not set)"], &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_with_a_token_lets_records_through_and_a_client_without_a_trusted_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "good");
    let (server_cert, server_key) = pki.issue("server");
    let (client_cert, client_key) = pki.issue("client");
    let config = format!(
        "tls {{ cert_file: \"{server_cert}\", key_file: \"{server_key}\", ca_file: \"{}\", verify: true }}\n\
         authorization {{ token: \"tok-mtls-31\" }}",
        pki.ca_file
    );
    let nats = server_with(dir.path(), "mtls", &config).await;
    let client = ConnectOptions::with_token("tok-mtls-31".into())
        .add_root_certificates(pki.ca_file.clone().into())
        .add_client_certificate(client_cert.clone().into(), client_key.clone().into())
        .connect(nats.url())
        .await
        .unwrap();
    let auth = [
        ("NATS_TOKEN", "tok-mtls-31"),
        ("NATS_TLS_CA_FILE", pki.ca_file.as_str()),
        ("NATS_TLS_CERT_FILE", client_cert.as_str()),
        ("NATS_TLS_KEY_FILE", client_key.as_str()),
    ];
    records_flow(&nats.url(), client, &auth, &["tok-mtls-31"]).await;

    let expected = ["the server requires a client certificate", "NATS_TLS_CERT_FILE and NATS_TLS_KEY_FILE"];
    refused(&nats.url(), &auth[..2], &expected, &["tok-mtls-31"]).await;
    let other = Pki::new(dir.path(), "other");
    let (stranger_cert, stranger_key) = other.issue("stranger");
    let stranger = [auth[0], auth[1], ("NATS_TLS_CERT_FILE", &stranger_cert), ("NATS_TLS_KEY_FILE", &stranger_key)];
    refused(&nats.url(), &stranger, &["the server refused the client certificate of NATS_TLS_CERT_FILE"], &[]).await;
}

/// The cluster test's tables: moto gives each one shard, so two replicas hold two each.
const TABLES: [&str; 4] = ["tab0", "tab1", "tab2", "tab3"];

/// `(table, pk, version)` of one write.
type Item = (String, String, i64);

/// Writes `v = 1, 2, …` to five items per table, round robin, until stopped.
fn start_writer(ddb: aws_sdk_dynamodb::Client, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<Item>> {
    tokio::spawn(async move {
        let (mut written, mut versions) = (Vec::new(), BTreeMap::<(String, String), i64>::new());
        for n in 0.. {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let (table, pk) = (TABLES[n % TABLES.len()].to_owned(), format!("k{}", (n / TABLES.len()) % 5));
            let version = versions.entry((table.clone(), pk.clone())).or_default();
            *version += 1;
            let put = ddb.put_item().table_name(&table).item("pk", Av::S(pk.clone()));
            put.item("v", Av::N(version.to_string())).send().await.unwrap();
            written.push((table, pk, *version));
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        written
    })
}

/// The shard leases a replica reports holding (`None` when it does not answer).
async fn leases(port: u16) -> Option<BTreeSet<String>> {
    let (200, body) = http_get(port, "/status").await.ok()? else { return None };
    let status: serde_json::Value = serde_json::from_str(&body).ok()?;
    Some(status["leases"].as_array()?.iter().filter_map(|l| l.as_str().map(str::to_owned)).collect())
}

/// Samples both replicas' leases until stopped, as A, B, A again: a shard in all three samples was
/// held by both at once (two hand-overs between samples taken milliseconds apart are not a thing a
/// stable fleet does). Returns the number of samples and every overlap seen.
fn watch_overlaps(ports: [u16; 2], stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    tokio::spawn(async move {
        let (mut samples, mut overlaps) = (0, Vec::new());
        while !stop.load(Ordering::SeqCst) {
            if let (Some(a), Some(b), Some(a_again)) =
                (leases(ports[0]).await, leases(ports[1]).await, leases(ports[0]).await)
            {
                samples += 1;
                for shard in a.intersection(&b).filter(|shard| a_again.contains(*shard)) {
                    overlaps.push(shard.clone());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (samples, overlaps)
    })
}

/// The leader of stream `name` and whether every replica is current.
async fn stream_cluster(js: &async_nats::jetstream::Context, name: &str) -> Option<(String, bool)> {
    let info = js.get_stream(name).await.ok()?.info().await.ok()?.clone();
    let cluster = info.cluster?;
    let all_current = cluster.replicas.len() == 2 && cluster.replicas.iter().all(|peer| peer.current && !peer.offline);
    Some((cluster.leader?, all_current))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_three_node_cluster_losing_the_bucket_leader_loses_nothing_stores_nothing_twice_and_never_doubles_a_lease() {
    let mut cluster = Cluster::start(3).await;
    let urls = cluster.urls().join(",");
    let moto = Moto::start().await;
    let ddb = fixtures::dynamodb(&moto).await;
    for table in TABLES {
        fixtures::create_table(&ddb, table, Some(StreamViewType::NewAndOldImages)).await;
    }
    let client = ConnectOptions::new().connect(cluster.urls()).await.unwrap();
    // A short API timeout: while a stream has no leader its info requests go unanswered, and the
    // default 5 s would make every probe below that slow.
    let js = async_nats::jetstream::ContextBuilder::new().timeout(Duration::from_secs(1)).build(client);

    let stop_writing = Arc::new(AtomicBool::new(false));
    let writer = start_writer(ddb.clone(), Arc::clone(&stop_writing));
    let mut replicas = Vec::new();
    for id in ["r1", "r2"] {
        let port = fixtures::http_port();
        let extra = [
            ("REPLICA_ID", id),
            ("NATS_STREAM_REPLICAS", "3"),
            ("CHECKPOINT_BUCKET_REPLICAS", "3"),
            ("PUBLISH_TIMEOUT_MS", "2000"),
        ];
        let env = service_env(&urls, &moto.endpoint(), &TABLES.join(","), port, &extra);
        replicas.push((port, ServiceProcess::start_ready(binary(), &env, port, DEADLINE).await));
    }
    let ports = [replicas[0].0, replicas[1].0];
    wait_for("two replicas holding two shards each", DEADLINE, || async {
        let (a, b) = (leases(ports[0]).await?, leases(ports[1]).await?);
        (a.len() == 2 && b.len() == 2 && a.is_disjoint(&b)).then_some(())
    })
    .await;
    let stop_watching = Arc::new(AtomicBool::new(false));
    let watcher = watch_overlaps(ports, Arc::clone(&stop_watching));

    // The service created both with three replicas.
    let stream = js.get_stream(STREAM).await.unwrap().info().await.unwrap().config.num_replicas;
    let bucket = js.get_stream(KV_STREAM).await.unwrap().info().await.unwrap().config.num_replicas;
    assert_eq!((stream, bucket), (3, 3), "stream and bucket replicas");

    // Records flow, then a node is killed; they flow on through the other two.
    wait_for("40 records in the stream", DEADLINE, || async {
        (fixtures::message_count(&js, STREAM).await >= 40).then_some(())
    })
    .await;
    // The node killed is the leader of the checkpoint bucket (where the leases live), so the bucket's
    // leadership moves while both replicas renew; the event stream moves too when it led there.
    let (leader, _) = wait_for("the bucket's leader", DEADLINE, || stream_cluster(&js, KV_STREAM)).await;
    let victim = cluster.index_of(&leader).unwrap();
    let before = fixtures::message_count(&js, STREAM).await;
    let killed = tokio::time::Instant::now();
    cluster.kill(victim);
    let (new_leader, _) = wait_for("a new bucket leader", DEADLINE, || async {
        stream_cluster(&js, KV_STREAM).await.filter(|(new, _)| *new != leader)
    })
    .await;
    wait_for("40 more records with a node down", DEADLINE, || async {
        (fixtures::message_count(&js, STREAM).await >= before + 40).then_some(())
    })
    .await;
    let recovered = killed.elapsed();

    // The node comes back and catches up; records go on.
    cluster.restart(victim).await;
    wait_for("every stream replica current again", DEADLINE, || async {
        stream_cluster(&js, STREAM).await.filter(|(_, current)| *current)
    })
    .await;
    let before = fixtures::message_count(&js, STREAM).await;
    wait_for("20 more records after the restart", DEADLINE, || async {
        (fixtures::message_count(&js, STREAM).await >= before + 20).then_some(())
    })
    .await;

    stop_writing.store(true, Ordering::SeqCst);
    let written = writer.await.unwrap();
    let messages = fixtures::wait_for_messages(&js, STREAM, written.len() as u64, DEADLINE).await;
    stop_watching.store(true, Ordering::SeqCst);
    let (samples, overlaps) = watcher.await.unwrap();
    let mut publish_errors = 0.0;
    for (port, replica) in replicas {
        publish_errors += fixtures::metric(port, "dynamodb_stream_consumer_publish_errors_total{").await;
        replica.stop_gracefully(Duration::from_secs(15)).await;
    }

    assert!(samples >= 20, "the lease watcher took only {samples} samples");
    assert!(overlaps.is_empty(), "shards held by both replicas at once: {overlaps:?}");
    let ids: Vec<&str> = messages.iter().map(|m| m.header("Nats-Msg-Id")).collect();
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), ids.len(), "a Nats-Msg-Id is stored twice");
    let stored: Vec<Item> = messages
        .iter()
        .map(|m| {
            let json = m.json();
            let version = json["new_image"]["v"].as_i64().unwrap();
            (json["table_name"].as_str().unwrap().to_owned(), json["keys"]["pk"].as_str().unwrap().to_owned(), version)
        })
        .collect();
    assert_eq!(stored.len(), written.len(), "as many messages as writes: nothing missing, nothing twice");
    let mut last: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for (table, pk, version) in &stored {
        let previous = last.insert((table, pk), *version).unwrap_or(0);
        assert_eq!(*version, previous + 1, "{table}/{pk}: version {version} after {previous} (order per item)");
    }
    assert_eq!(stored.iter().collect::<BTreeSet<_>>(), written.iter().collect::<BTreeSet<_>>());
    println!(
        "cluster: {} records through a 3-node cluster; bucket leader {leader} killed, new leader {new_leader}, \
         40 more records stored {recovered:?} after the kill; {publish_errors} publish errors retried; \
         {samples} lease samples, no overlap",
        written.len()
    );
}
