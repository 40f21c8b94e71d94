//! The NATS connection settings: server URLs, the one authentication mode, and TLS.
//!
//! At most one authentication mode is accepted (credentials file, NKey seed file, user and password,
//! token), as the server takes one identity per connection. Files are checked at start-up (they
//! exist, are readable, and hold a credentials file the client can parse, an NKey seed, PEM
//! certificates or a PEM key), so a bad mount fails validation rather than the first connection.
//! Only paths are kept; secrets never show in `Debug` or in a message.

use std::fmt;
use std::path::PathBuf;

use super::Args;
use super::checker::Checker;

/// A secret setting (password, token): its `Debug` never shows the value, so neither a logged
/// configuration nor logged flags can leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Takes the value exactly as given (surrounding blanks may be part of a password).
    pub(super) fn parse(text: &str) -> Result<Secret, std::convert::Infallible> {
        Ok(Secret(text.to_owned()))
    }

    /// The value, for the one place that hands it to the NATS client.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// NATS authentication: at most one mode, as the server accepts one identity per connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsAuth {
    /// No credentials (a server without authorization).
    None,
    /// `NATS_CREDS_FILE`: a user JWT and its NKey seed (decentralized, operator-mode auth).
    CredsFile(PathBuf),
    /// `NATS_NKEY_SEED_FILE`: a user NKey seed; the server lists the public key.
    NkeySeedFile(PathBuf),
    /// `NATS_USER` and `NATS_PASSWORD`.
    UserPassword { user: String, password: Secret },
    /// `NATS_TOKEN`.
    Token(Secret),
}

impl NatsAuth {
    /// The mode's name, for logs (never a secret).
    pub fn mode(&self) -> &'static str {
        match self {
            NatsAuth::None => "none",
            NatsAuth::CredsFile(_) => "credentials file",
            NatsAuth::NkeySeedFile(_) => "nkey",
            NatsAuth::UserPassword { .. } => "user and password",
            NatsAuth::Token(_) => "token",
        }
    }

    /// The variables that configure this mode, for messages that tell an operator what to fix.
    pub fn variables(&self) -> &'static str {
        match self {
            NatsAuth::None => {
                "no credentials are configured (set NATS_CREDS_FILE, NATS_NKEY_SEED_FILE, NATS_USER and NATS_PASSWORD, or NATS_TOKEN)"
            }
            NatsAuth::CredsFile(_) => "NATS_CREDS_FILE",
            NatsAuth::NkeySeedFile(_) => "NATS_NKEY_SEED_FILE",
            NatsAuth::UserPassword { .. } => "NATS_USER and NATS_PASSWORD",
            NatsAuth::Token(_) => "NATS_TOKEN",
        }
    }
}

/// TLS towards NATS. TLS is required as soon as a CA or a client certificate is configured (or a
/// URL uses the `tls://` scheme); without a CA file the system's trusted roots are used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsTls {
    /// `NATS_TLS_CA_FILE`: the only roots trusted for the servers' certificates.
    pub ca_file: Option<PathBuf>,
    /// `NATS_TLS_CERT_FILE` and `NATS_TLS_KEY_FILE`: the client certificate for mutual TLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl NatsTls {
    /// True when this configuration asks for TLS.
    pub fn required(&self) -> bool {
        self.ca_file.is_some() || self.client_cert.is_some()
    }
}

/// The comma-separated server URLs; each must parse as a NATS server address.
pub(super) fn nats_urls(check: &mut Checker, args: &Args) -> Vec<String> {
    let nats_urls: Vec<String> =
        args.nats_url.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_owned).collect();
    if nats_urls.is_empty() {
        check.fail("NATS_URL", "must name at least one server");
    }
    for url in &nats_urls {
        if url.parse::<async_nats::ServerAddr>().is_err() {
            check.fail("NATS_URL", format!("{url:?} is not a NATS server address"));
        }
    }
    nats_urls
}

/// The NATS authentication mode: at most one of credentials file, NKey seed file, user and password,
/// token (credentials in a `NATS_URL` count as one); a user needs a password and a password a user.
pub(super) fn nats_auth(check: &mut Checker, args: &Args, urls: &[String]) -> NatsAuth {
    let creds = check.file("NATS_CREDS_FILE", &args.nats_creds_file, check_creds);
    let seed = check.file("NATS_NKEY_SEED_FILE", &args.nats_nkey_seed_file, check_nkey_seed);
    let user = args.nats_user.trim();
    let (password, token) = (args.nats_password.expose(), args.nats_token.expose());
    if !user.is_empty() && password.is_empty() {
        check.fail("NATS_PASSWORD", "required with NATS_USER");
    }
    if user.is_empty() && !password.is_empty() {
        check.fail("NATS_USER", "required with NATS_PASSWORD");
    }
    let modes: Vec<&'static str> = [
        (!args.nats_creds_file.trim().is_empty()).then_some("NATS_CREDS_FILE"),
        (!args.nats_nkey_seed_file.trim().is_empty()).then_some("NATS_NKEY_SEED_FILE"),
        (!user.is_empty() || !password.is_empty()).then_some("NATS_USER/NATS_PASSWORD"),
        (!token.is_empty()).then_some("NATS_TOKEN"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if modes.len() > 1 {
        let variable = if modes[0] == "NATS_USER/NATS_PASSWORD" { "NATS_USER" } else { modes[0] };
        check.fail(
            variable,
            format!(
                "{} are set together; choose one NATS authentication mode (credentials file, NKey seed file, user and password, or token)",
                modes.join(", ")
            ),
        );
    }
    if !modes.is_empty() && urls.iter().any(|url| redact_url(url) != *url) {
        check.fail(
            "NATS_URL",
            format!("carries credentials (…@host) while {} is set; keep them in one place", modes[0]),
        );
    }
    if let Some(path) = creds {
        NatsAuth::CredsFile(path)
    } else if let Some(path) = seed {
        NatsAuth::NkeySeedFile(path)
    } else if !user.is_empty() && !password.is_empty() {
        NatsAuth::UserPassword { user: user.to_owned(), password: args.nats_password.clone() }
    } else if !token.is_empty() {
        NatsAuth::Token(args.nats_token.clone())
    } else {
        NatsAuth::None
    }
}

/// The TLS files: each must be a readable PEM file; a client certificate needs its key and a key
/// its certificate.
pub(super) fn nats_tls(check: &mut Checker, args: &Args) -> NatsTls {
    let ca_file = check.file("NATS_TLS_CA_FILE", &args.nats_tls_ca_file, check_certificates);
    let (cert_set, key_set) = (!args.nats_tls_cert_file.trim().is_empty(), !args.nats_tls_key_file.trim().is_empty());
    let cert = check.file("NATS_TLS_CERT_FILE", &args.nats_tls_cert_file, check_certificates);
    let key = check.file("NATS_TLS_KEY_FILE", &args.nats_tls_key_file, check_private_key);
    if cert_set && !key_set {
        check.fail("NATS_TLS_KEY_FILE", "required with NATS_TLS_CERT_FILE (the client certificate's private key)");
    }
    if key_set && !cert_set {
        check.fail("NATS_TLS_CERT_FILE", "required with NATS_TLS_KEY_FILE (the client certificate)");
    }
    NatsTls { ca_file, client_cert: cert.zip(key) }
}

/// A NATS URL fit for logs: `nats://user:secret@host` becomes `nats://***@host`.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (authority, path) = rest.split_once('/').map_or((rest, None), |(a, p)| (a, Some(p)));
    let Some((_, host)) = authority.rsplit_once('@') else { return url.to_owned() };
    let scheme = if scheme.is_empty() { String::new() } else { format!("{scheme}://") };
    let path = path.map(|p| format!("/{p}")).unwrap_or_default();
    format!("{scheme}***@{host}{path}")
}

/// A credentials file as `nsc` writes it, parsed as the client will parse it (JWT and seed).
fn check_creds(contents: &str) -> Result<(), String> {
    async_nats::ConnectOptions::with_credentials(contents)
        .map(drop)
        .map_err(|err| format!("not a NATS credentials file ({err})"))
}

/// One user NKey seed: `SU` and 56 more characters of base32 (58 in all). The checksum is checked
/// when the client signs the server's challenge, which then fails start-up with a clear message.
fn check_nkey_seed(contents: &str) -> Result<(), String> {
    let seed = contents.trim();
    let base32 = |c: char| c.is_ascii_uppercase() || ('2'..='7').contains(&c);
    if seed.len() == 58 && seed.starts_with("SU") && seed.chars().all(base32) {
        Ok(())
    } else {
        Err("does not hold a single user NKey seed (58 characters starting with `SU`)".to_owned())
    }
}

fn check_certificates(contents: &str) -> Result<(), String> {
    if contents.contains("-----BEGIN CERTIFICATE-----") {
        Ok(())
    } else {
        Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_owned())
    }
}

fn check_private_key(contents: &str) -> Result<(), String> {
    if contents.lines().any(|line| line.starts_with("-----BEGIN") && line.ends_with("PRIVATE KEY-----")) {
        Ok(())
    } else {
        Err("holds no PEM private key (-----BEGIN … PRIVATE KEY-----)".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::args;

    /// A file in `dir` with `contents`; returns its path as text.
    fn file_with(dir: &tempfile::TempDir, name: &str, contents: &str) -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).expect("write a test file");
        path.display().to_string()
    }

    /// A seed in the right shape (from async-nats' documentation; its checksum is valid).
    const SEED: &str = "SUAIO3FHUX5PNV2LQIIP7TZ3N4L7TX3W53MQGEIVYFIGA635OZCKEYHFLM";
    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n";

    fn creds(seed: &str) -> String {
        format!(
            "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.sig\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        )
    }

    #[test]
    fn each_nats_authentication_mode_is_accepted_and_secrets_stay_out_of_debug() {
        let dir = tempfile::tempdir().expect("temp dir");
        let with = |pairs: &[(&str, &str)]| {
            let mut all = vec![("dynamodb-tables", "orders")];
            all.extend_from_slice(pairs);
            args(&all).validate().expect("valid")
        };
        assert_eq!(with(&[]).nats_auth, NatsAuth::None);
        let config = with(&[("nats-user", "svc"), ("nats-password", "s3cret pass")]);
        let NatsAuth::UserPassword { user, password } = &config.nats_auth else { panic!("{:?}", config.nats_auth) };
        assert_eq!((user.as_str(), password.expose()), ("svc", "s3cret pass"));
        assert!(!format!("{config:?}").contains("s3cret"), "Debug shows the password");
        let config = with(&[("nats-token", "t0ken-value")]);
        assert_eq!(config.nats_auth, NatsAuth::Token(Secret("t0ken-value".into())));
        assert!(!format!("{config:?}").contains("t0ken-value"), "Debug shows the token");
        let flags = args(&[("nats-token", "t0ken-value"), ("nats-password", "s3cret")]);
        assert!(!format!("{flags:?}").contains("t0ken-value") && !format!("{flags:?}").contains("s3cret"));
        let seed = file_with(&dir, "user.nk", &format!("{SEED}\n"));
        assert_eq!(with(&[("nats-nkey-seed-file", &seed)]).nats_auth, NatsAuth::NkeySeedFile(seed.clone().into()));
        let creds = file_with(&dir, "user.creds", &creds(SEED));
        assert_eq!(with(&[("nats-creds-file", &creds)]).nats_auth, NatsAuth::CredsFile(creds.clone().into()));

        let (ca, cert, key) =
            (file_with(&dir, "ca.pem", CERT), file_with(&dir, "c.pem", CERT), file_with(&dir, "k.pem", KEY));
        let config = with(&[("nats-tls-ca-file", &ca), ("nats-tls-cert-file", &cert), ("nats-tls-key-file", &key)]);
        assert!(config.nats_tls.required());
        assert_eq!(config.nats_tls.ca_file, Some(ca.into()));
        assert_eq!(config.nats_tls.client_cert, Some((cert.into(), key.into())));
        assert!(!with(&[]).nats_tls.required());
    }

    #[test]
    fn contradictory_or_incomplete_nats_settings_name_their_variables() {
        let dir = tempfile::tempdir().expect("temp dir");
        let refuse = |pairs: &[(&str, &str)]| {
            let mut all = vec![("dynamodb-tables", "orders")];
            all.extend_from_slice(pairs);
            args(&all).validate().expect_err("invalid")
        };
        let error = refuse(&[("nats-user", "svc")]);
        assert_eq!(error.0[0].0, "NATS_PASSWORD", "{error}");
        let error = refuse(&[("nats-password", "pw")]);
        assert_eq!(error.0[0].0, "NATS_USER", "{error}");
        let error = refuse(&[("nats-user", "svc"), ("nats-password", "pw-9f3k"), ("nats-token", "tok-7q2z")]);
        let text = error.to_string();
        assert!(text.contains("NATS_USER/NATS_PASSWORD, NATS_TOKEN are set together"), "{text}");
        assert!(!text.contains("pw-9f3k") && !text.contains("tok-7q2z"), "a secret is in the message: {text}");
        let seed = file_with(&dir, "user.nk", SEED);
        let creds = file_with(&dir, "user.creds", &creds(SEED));
        let error = refuse(&[("nats-creds-file", &creds), ("nats-nkey-seed-file", &seed)]);
        assert_eq!(error.0[0].0, "NATS_CREDS_FILE", "{error}");
        assert!(error.to_string().contains("NATS_NKEY_SEED_FILE"), "{error}");
        let error = refuse(&[("nats-url", "nats://u:p@127.0.0.1:4222"), ("nats-token", "tok")]);
        assert_eq!(error.0[0].0, "NATS_URL", "{error}");

        let cert = file_with(&dir, "c.pem", CERT);
        let key = file_with(&dir, "k.pem", KEY);
        let error = refuse(&[("nats-tls-cert-file", &cert)]);
        assert_eq!(error.0[0].0, "NATS_TLS_KEY_FILE", "{error}");
        let error = refuse(&[("nats-tls-key-file", &key)]);
        assert_eq!(error.0[0].0, "NATS_TLS_CERT_FILE", "{error}");
    }

    #[test]
    fn nats_files_must_exist_be_readable_and_hold_what_they_should() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("absent.creds").display().to_string();
        let directory = dir.path().display().to_string();
        let not_a_seed = file_with(&dir, "bad.nk", "SUshort");
        let not_creds = file_with(&dir, "bad.creds", "user=svc");
        let bad_checksum = file_with(&dir, "crc.creds", &creds(&SEED.replace("SUA", "SUB")));
        let not_pem = file_with(&dir, "ca.txt", "not a certificate");
        let error = args(&[
            ("dynamodb-tables", "orders"),
            ("nats-creds-file", &missing),
            ("nats-tls-ca-file", &not_pem),
            ("nats-tls-cert-file", &directory),
            ("nats-tls-key-file", &not_pem),
        ])
        .validate()
        .expect_err("invalid");
        let named: Vec<&str> = error.0.iter().map(|(v, _)| *v).collect();
        assert_eq!(named, ["NATS_CREDS_FILE", "NATS_TLS_CA_FILE", "NATS_TLS_CERT_FILE", "NATS_TLS_KEY_FILE"]);
        let text = error.to_string();
        assert!(text.contains(&format!("{missing}: does not exist")), "{text}");
        assert!(text.contains("is not a regular file"), "{text}");
        assert!(text.contains("holds no PEM certificate"), "{text}");
        assert!(text.contains("holds no PEM private key"), "{text}");
        for (flag, path, expected) in [
            ("nats-nkey-seed-file", &not_a_seed, "does not hold a single user NKey seed"),
            ("nats-creds-file", &not_creds, "not a NATS credentials file"),
            ("nats-creds-file", &bad_checksum, "not a NATS credentials file"),
        ] {
            let error = args(&[("dynamodb-tables", "orders"), (flag, path)]).validate().expect_err("invalid");
            assert!(error.to_string().contains(expected), "{flag}: {error}");
        }
    }

    #[test]
    fn urls_lose_their_credentials_in_logs() {
        assert_eq!(redact_url("nats://u:p@127.0.0.1:4222"), "nats://***@127.0.0.1:4222");
        assert_eq!(redact_url("tls://token@nats.example.com:4222/x"), "tls://***@nats.example.com:4222/x");
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_url("u:p@host:4222"), "***@host:4222");
    }
}
