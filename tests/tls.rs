//! TLS against private servers with certificates made at test time: both Postgres connections
//! under every sslmode that matters, SCRAM channel binding, the pipeline streaming over
//! verify-full, and `rediss://` with `[redis] ca_file` (a certificate that does not verify
//! stops walsweep).
//!
//! The TLS Postgres servers reject every non-TLS connection (`hostnossl ... reject`), so a
//! successful connection there is a TLS one; `pg_stat_ssl` confirms it from the server side.
//! The channel binding server (`scram_postgres`) also takes plain SCRAM logins, to show what
//! `channel_binding=require` refuses.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::sync::mpsc;

use walsweep::config::{Config, MatroskaConfig, RedisConfig, SourceConfig};
use walsweep::pg::catalog;
use walsweep::pg::replication::{ConnectParams, ReplicationConnection};
use walsweep::pipeline;
use walsweep::plan::rules::EffectPlan;
use walsweep::plan::touched::{TouchedRows, TouchedRowsPlanner};
use walsweep::sink::redis::{redis_client, RedisSink};
use walsweep::sink::{Applied, Sink, SinkError};
use walsweep::stream::assembler::CommittedTxn;
use walsweep::telemetry::log::display_chain;

use support::scratch;
use support::{Postgres, PostgresOptions, Redis};

/// A CA, and files in a dir the server user can read.
struct Pki {
    dir: tempfile::TempDir,
    ca: Issuer<'static, KeyPair>,
}

impl Pki {
    /// A new CA; its certificate is written to `{name}.pem`.
    fn new(name: &str) -> Pki {
        let dir = scratch::instance_dir("tls-", true);
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("walsweep test {name}"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("ca key");
        let cert = params.self_signed(&key).expect("self-signed ca");
        let pki = Pki {
            dir,
            ca: Issuer::new(params, key),
        };
        pki.write(&format!("{name}.pem"), &cert.pem(), false);
        pki
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Writes a file owned by the server user (Postgres insists on owning a 0600 key).
    fn write(&self, file: &str, contents: &str, private: bool) -> PathBuf {
        let path = self.path(file);
        std::fs::write(&path, contents).expect("write pem");
        if private {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod key");
        }
        scratch::give_to_server_user(&path);
        path
    }

    /// A server certificate for `names` (IP addresses or DNS names) signed by this CA:
    /// `{stem}.crt` and `{stem}.key`.
    fn server_cert(&self, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "walsweep test server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &self.ca).expect("sign server cert");
        (
            self.write(&format!("{stem}.crt"), &cert.pem(), false),
            self.write(&format!("{stem}.key"), &key.serialize_pem(), true),
        )
    }
}

/// A client certificate for `user` signed by this CA: `{stem}.crt` and `{stem}.key`.
impl Pki {
    fn client_cert(&self, stem: &str, user: &str) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name.push(DnType::CommonName, user);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("client key");
        let cert = params.signed_by(&key, &self.ca).expect("sign client cert");
        (
            self.write(&format!("{stem}.crt"), &cert.pem(), false),
            self.write(&format!("{stem}.key"), &key.serialize_pem(), true),
        )
    }
}

/// A Postgres that speaks only TLS, with a certificate for 127.0.0.1 (not for `localhost`).
fn tls_postgres(pki: &Pki) -> Postgres {
    let (cert, key) = pki.server_cert("pg", &["127.0.0.1"]);
    Postgres::start_with(PostgresOptions {
        extra_settings: vec![
            ("ssl".into(), "on".into()),
            ("ssl_cert_file".into(), cert.display().to_string()),
            ("ssl_key_file".into(), key.display().to_string()),
        ],
        // Before the default trust lines, so every plain TCP connection is refused.
        hba_extra: vec![
            "hostnossl all all 127.0.0.1/32 reject".into(),
            "hostnossl replication all 127.0.0.1/32 reject".into(),
        ],
        ..Default::default()
    })
}

/// Percent-encodes a URL parameter value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn url(host: &str, pg: &Postgres, query: &str) -> String {
    format!("postgres://postgres@{host}:{}/postgres?{query}", pg.port())
}

/// `ConnectParams` the way the daemon gets them: from `source.url` through the config.
fn params(url: &str, application_name: &str) -> ConnectParams {
    let mut source = SourceConfig::new(url);
    source.application_name = Some(application_name.into());
    source
        .connect_params()
        .unwrap_or_else(|e| panic!("connect_params: {e}"))
}

fn verify_full(pg: &Postgres, ca: &Path) -> String {
    url(
        "127.0.0.1",
        pg,
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            encode(&ca.display().to_string())
        ),
    )
}

/// Whether the server sees the backend of `application_name` (one of walsweep's connections)
/// as TLS, asked over a separate verify-full SQL connection.
async fn backend_uses_tls(observer: &tokio_postgres::Client, application_name: &str) -> bool {
    let rows = observer
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = $1",
            &[&application_name],
        )
        .await
        .expect("pg_stat_ssl");
    assert_eq!(rows.len(), 1, "one backend named {application_name}");
    rows[0].get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_right_ca_encrypts_both_connections() {
    support::init_tracing();
    let pki = Pki::new("ca");
    let pg = tls_postgres(&pki);
    let good = params(&verify_full(&pg, &pki.path("ca.pem")), "tls-full");

    let mut repl = ReplicationConnection::connect(&good)
        .await
        .unwrap_or_else(|e| panic!("replication over verify-full: {}", display_chain(&e)));
    let system = repl
        .identify_system()
        .await
        .expect("IDENTIFY_SYSTEM over TLS");
    assert_eq!(system.dbname.as_deref(), Some("postgres"));

    let sql = catalog::connect(&good)
        .await
        .unwrap_or_else(|e| panic!("SQL over verify-full: {}", display_chain(&e)));
    let row = sql
        .query_one(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("own pg_stat_ssl row");
    assert!(row.get::<_, bool>(0), "the SQL connection is not TLS");
    assert!(row
        .get::<_, Option<String>>(1)
        .is_some_and(|v| v.starts_with("TLSv1.")));
    assert!(
        backend_uses_tls(&sql, "tls-full").await,
        "the replication connection is not TLS"
    );
    assert_eq!(catalog::wal_level(&sql).await.unwrap(), "logical");

    // The server really refuses plain connections, so the successes above needed TLS.
    let plain = params(&url("127.0.0.1", &pg, "sslmode=disable"), "tls-plain");
    let err = ReplicationConnection::connect(&plain)
        .await
        .err()
        .expect("plain refused");
    assert!(
        display_chain(&err).contains("no encryption"),
        "{}",
        display_chain(&err)
    );
    let err = catalog::connect(&plain)
        .await
        .expect_err("plain SQL refused");
    assert!(
        display_chain(&err).contains("no encryption"),
        "{}",
        display_chain(&err)
    );

    // require without sslrootcert encrypts without checking the certificate (as libpq) ...
    let unverified = params(&url("127.0.0.1", &pg, "sslmode=require"), "tls-require");
    let sql_unverified = catalog::connect(&unverified)
        .await
        .unwrap_or_else(|e| panic!("require: {}", display_chain(&e)));
    assert!(backend_uses_tls(&sql, "tls-require-catalog").await);
    drop(sql_unverified);
    // ... and so does the default (prefer) when the server offers TLS.
    let default = params(&url("127.0.0.1", &pg, "connect_timeout=10"), "tls-default");
    let mut repl_default = ReplicationConnection::connect(&default)
        .await
        .unwrap_or_else(|e| panic!("prefer: {}", display_chain(&e)));
    repl_default
        .identify_system()
        .await
        .expect("IDENTIFY_SYSTEM");
    assert!(backend_uses_tls(&sql, "tls-default").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_fails_with_a_clear_error_and_stops_the_pipeline() {
    support::init_tracing();
    let pki = Pki::new("ca");
    let other = Pki::new("other-ca");
    let pg = tls_postgres(&pki);
    let wrong_ca = other.path("other-ca.pem");
    let wrong = params(&verify_full(&pg, &wrong_ca), "tls-wrong");

    let err = ReplicationConnection::connect(&wrong)
        .await
        .err()
        .expect("a server certificate from another CA must be refused");
    let message = display_chain(&err);
    for needle in [
        "certificate verification failed",
        "not signed by a CA in sslrootcert",
        &wrong_ca.display().to_string(),
        "point sslrootcert at",
    ] {
        assert!(message.contains(needle), "missing {needle:?} in: {message}");
    }
    assert!(!err.is_retryable(), "a wrong CA does not fix itself");

    let err = catalog::connect(&wrong).await.expect_err("SQL refused too");
    let message = display_chain(&err);
    assert!(
        message.contains("certificate verification failed")
            && message.contains(&wrong_ca.display().to_string()),
        "{message}"
    );
    assert!(!err.is_retryable());

    // require with an sslrootcert checks the chain too (libpq: like verify-ca).
    let require = params(
        &url(
            "127.0.0.1",
            &pg,
            &format!(
                "sslmode=require&sslrootcert={}",
                encode(&wrong_ca.display().to_string())
            ),
        ),
        "tls-require-wrong",
    );
    let err = ReplicationConnection::connect(&require)
        .await
        .err()
        .expect("refused");
    assert!(
        display_chain(&err).contains("certificate verification failed"),
        "{}",
        display_chain(&err)
    );

    // The daemon stops with the message instead of retrying forever.
    let source = SourceConfig::new(verify_full(&pg, &wrong_ca));
    let (_shutdown, signal) = pipeline::shutdown_channel();
    let run = pipeline::run(
        &source,
        &[],
        TouchedRowsPlanner::default(),
        ChannelSink(mpsc::unbounded_channel().0),
        signal,
    );
    let err = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the pipeline kept retrying a certificate error")
        .expect_err("the pipeline must fail");
    assert!(
        display_chain(&err).contains("certificate verification failed"),
        "{}",
        display_chain(&err)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_checks_the_host_name_and_verify_ca_does_not() {
    support::init_tracing();
    let pki = Pki::new("ca");
    let pg = tls_postgres(&pki);
    let ca = encode(&pki.path("ca.pem").display().to_string());

    // The certificate names 127.0.0.1 only; localhost reaches the same server.
    let full = params(
        &url(
            "localhost",
            &pg,
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
        "tls-localhost-full",
    );
    let err = ReplicationConnection::connect(&full)
        .await
        .err()
        .expect("verify-full must compare the host name");
    let message = display_chain(&err);
    assert!(
        message.contains("certificate verification failed")
            && message.contains("not valid for host \"localhost\"")
            && message.contains("sslmode=verify-ca"),
        "{message}"
    );
    let err = catalog::connect(&full).await.expect_err("SQL refused too");
    assert!(
        display_chain(&err).contains("not valid for host \"localhost\""),
        "{}",
        display_chain(&err)
    );

    let ca_only = params(
        &url(
            "localhost",
            &pg,
            &format!("sslmode=verify-ca&sslrootcert={ca}"),
        ),
        "tls-localhost-ca",
    );
    let mut repl = ReplicationConnection::connect(&ca_only)
        .await
        .unwrap_or_else(|e| panic!("verify-ca: {}", display_chain(&e)));
    repl.identify_system().await.expect("IDENTIFY_SYSTEM");
    let sql = catalog::connect(&ca_only)
        .await
        .unwrap_or_else(|e| panic!("verify-ca SQL: {}", display_chain(&e)));
    assert!(backend_uses_tls(&sql, "tls-localhost-ca").await);

    // verify-ca still checks the chain.
    let other = Pki::new("other-ca");
    let wrong = params(
        &url(
            "localhost",
            &pg,
            &format!(
                "sslmode=verify-ca&sslrootcert={}",
                encode(&other.path("other-ca.pem").display().to_string())
            ),
        ),
        "tls-localhost-wrong",
    );
    let err = ReplicationConnection::connect(&wrong)
        .await
        .err()
        .expect("refused");
    assert!(
        display_chain(&err).contains("not signed by a CA"),
        "{}",
        display_chain(&err)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_tls_is_refused_by_require_and_used_plain_by_prefer() {
    support::init_tracing();
    let pg = Postgres::start();
    for mode in ["require", "verify-ca", "verify-full"] {
        let strict = params(&url("127.0.0.1", &pg, &format!("sslmode={mode}")), "strict");
        let err = ReplicationConnection::connect(&strict)
            .await
            .err()
            .unwrap_or_else(|| panic!("sslmode={mode} accepted a server without TLS"));
        let message = display_chain(&err);
        assert!(
            message.contains("does not accept TLS connections")
                && message.contains(&format!("sslmode={mode} requires TLS"))
                && message.contains("ssl = on"),
            "{message}"
        );
        assert!(!err.is_retryable());
        let err = catalog::connect(&strict).await.expect_err("SQL refused");
        assert!(
            display_chain(&err).contains("does not accept TLS connections"),
            "{}",
            display_chain(&err)
        );
    }

    let prefer = params(&url("127.0.0.1", &pg, "sslmode=prefer"), "tls-prefer");
    let mut repl = ReplicationConnection::connect(&prefer)
        .await
        .unwrap_or_else(|e| panic!("prefer: {}", display_chain(&e)));
    repl.identify_system().await.expect("IDENTIFY_SYSTEM");
    let sql = catalog::connect(&prefer).await.expect("prefer SQL");
    assert!(!backend_uses_tls(&sql, "tls-prefer").await);
    assert!(!backend_uses_tls(&sql, "tls-prefer-catalog").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_sent_with_sslcert_and_sslkey() {
    support::init_tracing();
    let pki = Pki::new("ca");
    let (cert, key) = pki.server_cert("pg", &["127.0.0.1"]);
    let ca = pki.path("ca.pem");
    // Only TLS with a client certificate of this CA whose CN is the user name gets in.
    let pg = Postgres::start_with(PostgresOptions {
        extra_settings: vec![
            ("ssl".into(), "on".into()),
            ("ssl_cert_file".into(), cert.display().to_string()),
            ("ssl_key_file".into(), key.display().to_string()),
            ("ssl_ca_file".into(), ca.display().to_string()),
        ],
        hba_extra: vec![
            "hostssl all all 127.0.0.1/32 cert".into(),
            "hostssl replication all 127.0.0.1/32 cert".into(),
            "host all all 127.0.0.1/32 reject".into(),
            "host replication all 127.0.0.1/32 reject".into(),
        ],
        ..Default::default()
    });
    let (client_cert, client_key) = pki.client_cert("client", "postgres");
    let base = verify_full(&pg, &ca);
    let with_cert = params(
        &format!(
            "{base}&sslcert={}&sslkey={}",
            encode(&client_cert.display().to_string()),
            encode(&client_key.display().to_string())
        ),
        "tls-client-cert",
    );
    let mut repl = ReplicationConnection::connect(&with_cert)
        .await
        .unwrap_or_else(|e| panic!("with a client certificate: {}", display_chain(&e)));
    repl.identify_system().await.expect("IDENTIFY_SYSTEM");
    let sql = catalog::connect(&with_cert)
        .await
        .unwrap_or_else(|e| panic!("SQL with a client certificate: {}", display_chain(&e)));
    let row = sql
        .query_one(
            "SELECT client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    assert_eq!(
        row.get::<_, Option<String>>(0).as_deref(),
        Some("/CN=postgres")
    );

    // Without one the server refuses the login.
    let without = params(&base, "tls-no-client-cert");
    let err = ReplicationConnection::connect(&without)
        .await
        .err()
        .expect("no client certificate, no login");
    let message = display_chain(&err);
    assert!(
        message.contains("requires a valid client certificate"),
        "{message}"
    );
}

/// A Postgres with TLS (certificate for 127.0.0.1) where `scram_user` logs in with SCRAM over
/// TLS or plain TCP, `md5_user` with an MD5 password, and `postgres` by trust.
fn scram_postgres(pki: &Pki) -> Postgres {
    let (cert, key) = pki.server_cert("pg", &["127.0.0.1"]);
    let pg = Postgres::start_with(PostgresOptions {
        extra_settings: vec![
            ("ssl".into(), "on".into()),
            ("ssl_cert_file".into(), cert.display().to_string()),
            ("ssl_key_file".into(), key.display().to_string()),
        ],
        hba_extra: vec![
            "hostssl all scram_user 127.0.0.1/32 scram-sha-256".into(),
            "host all scram_user 127.0.0.1/32 scram-sha-256".into(),
            "hostssl all md5_user 127.0.0.1/32 md5".into(),
        ],
        password_encryption: Some("scram-sha-256".into()),
    });
    pg.psql(
        "postgres",
        "CREATE ROLE scram_user LOGIN SUPERUSER REPLICATION PASSWORD 's3cret';
         SET password_encryption = 'md5';
         CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'md5pass';",
    );
    pg
}

fn scram_url(user: &str, password: &str, pg: &Postgres, query: &str) -> String {
    format!(
        "postgres://{user}:{password}@127.0.0.1:{}/postgres?{query}",
        pg.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_require_binds_scram_to_tls_and_streams() {
    support::init_tracing();
    let pki = Pki::new("ca");
    let pg = scram_postgres(&pki);
    pg.psql(
        "postgres",
        "CREATE TABLE items (id int PRIMARY KEY, name text);
         CREATE PUBLICATION pub FOR TABLE items;",
    );
    let ca = encode(&pki.path("ca.pem").display().to_string());
    let require = scram_url(
        "scram_user",
        "s3cret",
        &pg,
        &format!("sslmode=verify-full&sslrootcert={ca}&channel_binding=require"),
    );

    // Both connections log in: require refuses anything but SCRAM-SHA-256-PLUS over TLS (see
    // the refusals below), and the server checks the binding data against its certificate.
    let mut repl = ReplicationConnection::connect(&params(&require, "cb-require"))
        .await
        .unwrap_or_else(|e| panic!("replication with channel binding: {}", display_chain(&e)));
    repl.identify_system().await.expect("IDENTIFY_SYSTEM");
    let sql = catalog::connect(&params(&require, "cb-require"))
        .await
        .unwrap_or_else(|e| panic!("SQL with channel binding: {}", display_chain(&e)));
    assert!(backend_uses_tls(&sql, "cb-require").await);
    assert!(backend_uses_tls(&sql, "cb-require-catalog").await);
    drop(repl);

    // The daemon streams with it.
    let mut source = SourceConfig::new(require.clone());
    source.slot = "cb_slot".into();
    source.publication = "pub".into();
    source.application_name = Some("cb-pipeline".into());
    source.status_interval_ms = 200;
    let (tx, mut applied) = mpsc::unbounded_channel();
    let (shutdown, signal) = pipeline::shutdown_channel();
    let task = tokio::spawn(async move {
        pipeline::run(
            &source,
            &["public.items".to_string()],
            TouchedRowsPlanner::default(),
            ChannelSink(tx),
            signal,
        )
        .await
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while sql
        .query_opt(
            "SELECT 1 FROM pg_stat_replication WHERE application_name = 'cb-pipeline' \
             AND state = 'streaming' AND usename = 'scram_user'",
            &[],
        )
        .await
        .expect("pg_stat_replication")
        .is_none()
    {
        assert!(!task.is_finished(), "pipeline stopped: {:?}", task.await);
        assert!(Instant::now() < deadline, "never streaming");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pg.psql("postgres", "INSERT INTO items VALUES (7, 'bound')");
    let txn = tokio::time::timeout(Duration::from_secs(20), applied.recv())
        .await
        .expect("no transaction within 20s")
        .expect("pipeline stopped");
    assert_eq!(txn.plan.rows.len(), 1);
    shutdown.request();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("pipeline did not stop")
        .expect("pipeline panicked")
        .unwrap_or_else(|e| panic!("pipeline failed: {}", display_chain(&e)));

    // prefer and disable log in over TLS too, and prefer over plain TCP.
    for query in [
        format!("sslmode=verify-full&sslrootcert={ca}&channel_binding=prefer"),
        format!("sslmode=verify-full&sslrootcert={ca}&channel_binding=disable"),
        "sslmode=disable&channel_binding=prefer".to_string(),
        "sslmode=disable".to_string(),
    ] {
        let url = scram_url("scram_user", "s3cret", &pg, &query);
        let mut repl = ReplicationConnection::connect(&params(&url, "cb-other"))
            .await
            .unwrap_or_else(|e| panic!("{query}: {}", display_chain(&e)));
        repl.identify_system().await.expect("IDENTIFY_SYSTEM");
        catalog::connect(&params(&url, "cb-other"))
            .await
            .unwrap_or_else(|e| panic!("{query} SQL: {}", display_chain(&e)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_require_refuses_what_cannot_bind() {
    support::init_tracing();
    let pki = Pki::new("ca");
    let pg = scram_postgres(&pki);
    let ca = encode(&pki.path("ca.pem").display().to_string());
    let tls = format!("sslmode=verify-full&sslrootcert={ca}&channel_binding=require");
    for (url, says) in [
        // SCRAM, but without TLS there is nothing to bind to.
        (
            scram_url(
                "scram_user",
                "s3cret",
                &pg,
                "sslmode=disable&channel_binding=require",
            ),
            "not TLS",
        ),
        // TLS, but an MD5 password cannot bind.
        (scram_url("md5_user", "md5pass", &pg, &tls), "MD5"),
        // TLS, but trust lets walsweep in without any exchange to bind.
        (
            format!("postgres://postgres@127.0.0.1:{}/postgres?{tls}", pg.port()),
            "without a password",
        ),
    ] {
        let err = ReplicationConnection::connect(&params(&url, "cb-refused"))
            .await
            .err()
            .unwrap_or_else(|| panic!("{says}: channel_binding=require accepted"));
        let message = display_chain(&err);
        for needle in ["channel_binding=require", "SCRAM-SHA-256-PLUS", says] {
            assert!(message.contains(needle), "missing {needle:?} in: {message}");
        }
        assert!(!message.contains("s3cret") && !message.contains("md5pass"));
        assert!(!err.is_retryable(), "{message}");

        let err = catalog::connect(&params(&url, "cb-refused"))
            .await
            .expect_err("SQL refused too");
        let message = display_chain(&err);
        for needle in ["channel_binding=require", "SCRAM-SHA-256-PLUS"] {
            assert!(
                message.contains(needle),
                "missing {needle:?} in SQL: {message}"
            );
        }
        assert!(!err.is_retryable(), "{message}");
    }
}

/// Forwards applied transactions to the test.
struct ChannelSink(mpsc::UnboundedSender<CommittedTxn<TouchedRows>>);

impl Sink<TouchedRows> for ChannelSink {
    async fn reset(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    async fn apply(&mut self, batch: &[CommittedTxn<TouchedRows>]) -> Result<Applied, SinkError> {
        for txn in batch {
            let _ = self.0.send(txn.clone());
        }
        Ok(Applied::whole(batch))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_streams_over_verify_full() {
    support::init_tracing();
    let pki = Pki::new("ca");
    let pg = tls_postgres(&pki);
    pg.psql(
        "postgres",
        "CREATE TABLE items (id int PRIMARY KEY, name text);
         CREATE PUBLICATION pub FOR TABLE items;",
    );
    let mut source = SourceConfig::new(verify_full(&pg, &pki.path("ca.pem")));
    source.slot = "tls_slot".into();
    source.publication = "pub".into();
    source.application_name = Some("tls-pipeline".into());
    source.status_interval_ms = 200;
    let (tx, mut applied) = mpsc::unbounded_channel();
    let (shutdown, signal) = pipeline::shutdown_channel();
    let task = tokio::spawn(async move {
        pipeline::run(
            &source,
            &["public.items".to_string()],
            TouchedRowsPlanner::default(),
            ChannelSink(tx),
            signal,
        )
        .await
    });

    let observer = catalog::connect(&params(&verify_full(&pg, &pki.path("ca.pem")), "observer"))
        .await
        .expect("observer");
    // Streaming (so the insert below is after the slot's start) and over TLS.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let row = observer
            .query_opt(
                "SELECT s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid) \
                 WHERE r.application_name = 'tls-pipeline' AND r.state = 'streaming'",
                &[],
            )
            .await
            .expect("pg_stat_replication");
        if let Some(row) = row {
            assert!(
                row.get::<_, bool>(0),
                "the walsender's connection is not TLS"
            );
            break;
        }
        assert!(!task.is_finished(), "pipeline stopped: {:?}", task.await);
        assert!(Instant::now() < deadline, "never streaming");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    pg.psql("postgres", "INSERT INTO items VALUES (42, 'over tls')");
    let txn = tokio::time::timeout(Duration::from_secs(20), applied.recv())
        .await
        .expect("no transaction within 20s")
        .expect("pipeline stopped");
    let rows: BTreeSet<(String, Vec<Option<String>>)> = txn
        .plan
        .rows
        .iter()
        .map(|r| (r.table.to_string(), r.key.clone()))
        .collect();
    assert_eq!(
        rows,
        BTreeSet::from([("public.items".to_string(), vec![Some("42".to_string())])])
    );

    shutdown.request();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("pipeline did not stop")
        .expect("pipeline panicked")
        .unwrap_or_else(|e| panic!("pipeline failed: {}", display_chain(&e)));
}

fn redis_config(redis: &Redis, ca_file: Option<PathBuf>) -> RedisConfig {
    RedisConfig {
        url: redis.url(),
        timeout_ms: 2_000,
        ca_file,
        ..RedisConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_ca_file_applies_plans_and_a_wrong_ca_fails() {
    support::init_tracing();
    let pki = Pki::new("ca");
    let other = Pki::new("other-ca");
    let (cert, key) = pki.server_cert("redis", &["127.0.0.1"]);
    let redis = Redis::start_tls(&cert, &key, &pki.path("ca.pem"));
    assert!(redis.url().starts_with("rediss://"), "{}", redis.url());
    let good = redis_config(&redis, Some(pki.path("ca.pem")));

    let client = redis_client(&good).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("TLS connection with ca_file");
    ::redis::cmd("MSET")
        .arg(&["item:1", "a", "item:2", "b", "keep", "c"])
        .exec_async(&mut conn)
        .await
        .expect("MSET");

    let mut sink = RedisSink::new(&good, &MatroskaConfig::default()).expect("sink");
    let mut plan = EffectPlan::default();
    plan.keys
        .extend(["item:1".to_string(), "item:2".to_string()]);
    let applied = sink
        .apply_plans(std::iter::once(&plan))
        .await
        .unwrap_or_else(|e| panic!("apply over rediss: {}", display_chain(&e)));
    assert_eq!(applied.keys_unlinked, 2);
    let left: Vec<Option<String>> = ::redis::cmd("MGET")
        .arg(&["item:1", "item:2", "keep"])
        .query_async(&mut conn)
        .await
        .expect("MGET");
    assert_eq!(left, vec![None, None, Some("c".to_string())]);

    // Another CA, or the system store (no ca_file): a configuration error, not an outage,
    // naming the server, rustls' verdict and the setting to fix.
    let target = format!("127.0.0.1:{}", redis.port());
    for ca_file in [Some(other.path("other-ca.pem")), None] {
        let bad = redis_config(&redis, ca_file.clone());
        let mut sink = RedisSink::new(&bad, &MatroskaConfig::default()).expect("sink");
        let err = sink
            .apply_plans(std::iter::once(&plan))
            .await
            .err()
            .unwrap_or_else(|| panic!("ca_file {ca_file:?} accepted the server"));
        let message = display_chain(&err);
        for needle in [
            "certificate verification failed",
            &format!("Redis at {target}"),
            "invalid peer certificate: UnknownIssuer",
            "redis.ca_file",
        ] {
            assert!(message.contains(needle), "missing {needle:?} in: {message}");
        }
        assert!(!err.retryable, "a wrong CA does not fix itself: {message}");
    }

    // The readiness probe uses the same client: up with the right CA, down with a wrong one.
    walsweep::telemetry::health::set_redis_up(false);
    let probe = tokio::spawn(walsweep::sink::redis::probe::probe_redis(
        good.clone(),
        Duration::from_millis(50),
    ));
    wait_until(10, walsweep::telemetry::health::redis_up).await;
    probe.abort();
    let probe = tokio::spawn(walsweep::sink::redis::probe::probe_redis(
        redis_config(&redis, Some(other.path("other-ca.pem"))),
        Duration::from_millis(50),
    ));
    wait_until(10, || !walsweep::telemetry::health::redis_up()).await;
    probe.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_certificate_from_another_ca_stops_the_daemon_and_check_names_it() {
    support::init_tracing();
    let pki = Pki::new("ca");
    let other = Pki::new("other-ca");
    let (cert, key) = pki.server_cert("redis", &["127.0.0.1"]);
    let redis = Redis::start_tls(&cert, &key, &pki.path("ca.pem"));
    let pg = Postgres::start();
    pg.psql(
        "postgres",
        "CREATE TABLE items (id int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE items;",
    );
    let target = format!("127.0.0.1:{}", redis.port());
    let rest = format!(
        "ca_file = \"{}\"\n[[table]]\nname = \"public.items\"\nkeys = [\"item:{{id}}\"]\n",
        other.path("other-ca.pem").display()
    );
    let needles = [
        "certificate verification failed".to_string(),
        format!("Redis at {target}"),
        "invalid peer certificate: UnknownIssuer".to_string(),
        "redis.ca_file".to_string(),
    ];

    // The daemon stops with the message instead of retrying forever.
    let daemon = support::daemon::start(support::daemon::config(
        &pg,
        &redis,
        "postgres",
        "tls_redis",
        &rest,
    ));
    let Err(err) = tokio::time::timeout(Duration::from_secs(30), daemon.task)
        .await
        .expect("walsweep kept retrying a Redis certificate it cannot verify")
        .expect("no panic")
    else {
        panic!("walsweep must fail");
    };
    let message = display_chain(&err);
    for needle in &needles {
        assert!(
            message.contains(needle.as_str()),
            "missing {needle:?} in: {message}"
        );
    }

    // `walsweep check` says the same.
    let dir = scratch::instance_dir("check-", false);
    let path = dir.path().join("walsweep.toml");
    std::fs::write(
        &path,
        support::daemon::config_text(&pg, &redis.url(), "postgres", "tls_redis", &rest),
    )
    .expect("write config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walsweep"))
        .args(["check", "--config"])
        .arg(&path)
        .env_remove(walsweep::config::SOURCE_URL_ENV)
        .env_remove(walsweep::config::REDIS_URL_ENV)
        .output()
        .expect("run walsweep check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    for needle in &needles {
        assert!(
            text.contains(needle.as_str()),
            "missing {needle:?} in: {text}"
        );
    }
}

async fn wait_until(secs: u64, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "condition not met within {secs}s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn tls_settings_are_checked_with_the_config() {
    // sslmode values and TLS parameters tokio-postgres does not know are walsweep's to parse.
    let err =
        Config::parse("[source]\nurl = \"postgres://u:hunter2@h/db?sslmode=verify-everything\"\n")
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("config:2: source.url: sslmode=\"verify-everything\" is not a valid sslmode")
            && err.contains("disable, prefer, require, verify-ca, verify-full")
            && !err.contains("hunter2"),
        "{err}"
    );
    Config::parse(
        "[source]\nurl = \"host=h user=u sslmode=verify-full sslrootcert='/etc/ca.pem'\"\n",
    )
    .expect("key=value with TLS parameters");

    let missing = "/nonexistent/walsweep/ca.pem";
    let err = SourceConfig::new(format!(
        "postgres://u:hunter2@h/db?sslmode=verify-full&sslrootcert={missing}"
    ))
    .connect_params()
    .err()
    .expect("a missing sslrootcert is a config error");
    let err = display_chain(&err);
    assert!(
        err.starts_with("config: source.url: ")
            && err.contains(&format!("cannot read sslrootcert {missing}"))
            && err.contains("No such file")
            && !err.contains("hunter2"),
        "{err}"
    );

    let err = Config::parse(
        "[source]\nurl = \"postgres://u@h/db\"\n[redis]\nurl = \"redis://h:6379/0\"\nca_file = \"/ca.pem\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("config:5: redis.ca_file: only applies to TLS; use a rediss:// URL"),
        "{err}"
    );

    let err = redis_client(&RedisConfig {
        url: "rediss://h:6379/0".into(),
        ca_file: Some(missing.into()),
        ..RedisConfig::default()
    })
    .expect_err("a missing ca_file is an error");
    let err = display_chain(&err);
    assert!(
        err.contains(&format!("cannot read redis.ca_file {missing}"))
            && err.contains("No such file"),
        "{err}"
    );
}
