//! The fence on real PostgreSQL, step by step, with the relay's own connection settings and
//! statements: holder A (token 5) is frozen inside its batch's transaction, holding the
//! fence; holder B (token 9) takes over — PostgreSQL ends A's stalled session, B removes the
//! rows and commits — and A, thawed, commits nothing. Then a holder with an older token than
//! the last committed one finds no fence row at all.

use std::time::Duration;

use breakwater_harness::PostgresServer;
use breakwater_relay::{relay, run::Settings};

// The shared database setup; the rest of the module serves the other suites.
#[allow(dead_code)]
mod support;

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_holder_commits_nothing_after_a_newer_one() {
    let postgres = PostgresServer::shared();
    let (db, url) = support::database(postgres);
    support::insert(postgres, &db, 1, 10, 10);
    let spec = support::spec(serde_json::json!({"redisStream": {"stream": "events"}}), serde_json::json!({}));
    let mut relay = Settings::relay_of("shop/fence", &spec);
    relay.lease_ttl = Duration::from_millis(500);
    let ids = || -> Vec<String> {
        postgres.psql_in(&db, "SELECT id FROM outbox").lines().map(String::from).collect()
    };
    let rows = ids();

    // A holds the fence with token 5 and stops before it removes what it published.
    let (mut a, statements) = relay::connect(&url, &relay).await.expect("A connects");
    let a_tx = a.transaction().await.expect("A begins");
    assert!(a_tx.query_opt(&statements.fence, &[&relay.name, &5i64]).await.expect("fence").is_some());

    // B, with the newer token, waits for A's lock until PostgreSQL ends A's idle session
    // (2 TTLs), then commits its batch.
    let (mut b, _) = relay::connect(&url, &relay).await.expect("B connects");
    let b_took_over = async {
        loop {
            let tx = b.transaction().await.expect("B begins");
            match tx.query_opt(&statements.fence, &[&relay.name, &9i64]).await {
                Ok(Some(_)) => {
                    tx.execute(&statements.done, &[&rows]).await.expect("B removes");
                    tx.commit().await.expect("B commits");
                    return;
                }
                // lock_timeout: A still holds the fence; try again.
                Err(_) => continue,
                Ok(None) => panic!("B's newer token was refused"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), b_took_over).await.expect("B takes over within 10 s");

    // A thaws and tries to finish its batch: its session is gone, nothing commits.
    let finished = async {
        a_tx.execute(&statements.done, &[&rows]).await?;
        a_tx.commit().await
    };
    assert!(finished.await.is_err(), "the frozen holder committed after the newer one");
    assert!(ids().is_empty(), "B removed the rows");

    // A holder that comes back with its old token finds the fence above it.
    let (mut late, _) = relay::connect(&url, &relay).await.expect("A reconnects");
    let tx = late.transaction().await.expect("begins");
    assert!(tx.query_opt(&statements.fence, &[&relay.name, &5i64]).await.expect("fence").is_none());
}
