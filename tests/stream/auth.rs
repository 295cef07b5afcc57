use walsweep::pg::replication::{ConnectParams, ReplicationConnection, ReplicationError};
use walsweep::telemetry::log::display_chain;

use crate::support::{self, Postgres, PostgresOptions};

fn params(url: &str) -> ConnectParams {
    ConnectParams {
        config: url.parse().expect("url"),
        application_name: "walsweep-test".into(),
        tls: Default::default(),
        passfile: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_and_md5_users_connect_and_a_wrong_password_is_clear() {
    support::init_tracing();
    let pg = Postgres::start_with(PostgresOptions {
        hba_extra: vec![
            "host all scram_user 127.0.0.1/32 scram-sha-256".into(),
            "host all md5_user 127.0.0.1/32 md5".into(),
            "host all clear_user 127.0.0.1/32 password".into(),
        ],
        ..Default::default()
    });
    pg.psql(
        "postgres",
        "SET password_encryption = 'scram-sha-256';
         CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 's3cret';
         CREATE ROLE clear_user LOGIN REPLICATION PASSWORD 'plain';
         SET password_encryption = 'md5';
         CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'md5pass';",
    );

    for (user, password) in [
        ("scram_user", "s3cret"),
        ("md5_user", "md5pass"),
        ("clear_user", "plain"),
    ] {
        let mut conn =
            ReplicationConnection::connect(&params(&pg.url_as(user, password, "postgres")))
                .await
                .unwrap_or_else(|e| panic!("{user} cannot connect: {e}"));
        let system = conn.identify_system().await.expect("IDENTIFY_SYSTEM");
        assert_eq!(system.dbname.as_deref(), Some("postgres"), "{user}");
        assert!(conn.server_version_num().unwrap() >= 100_000);
    }

    for user in ["scram_user", "md5_user"] {
        let err = ReplicationConnection::connect(&params(&pg.url_as(user, "wrong", "postgres")))
            .await
            .err()
            .expect("wrong password must fail");
        assert!(matches!(err, ReplicationError::Auth { .. }), "{err:?}");
        assert!(!err.is_retryable());
        let text = display_chain(&err);
        assert!(text.contains(user), "{text}");
        assert!(text.contains("password authentication failed"), "{text}");
        assert!(text.contains("check the user and password"), "{text}");
    }

    let err = ReplicationConnection::connect(&params(&format!(
        "postgres://scram_user@127.0.0.1:{}/postgres",
        pg.port()
    )))
    .await
    .err()
    .expect("missing password must fail");
    assert!(err.to_string().contains("none was given"), "{err}");
    assert!(display_chain(&err).contains("set PGPASSWORD"), "{err}");
}
