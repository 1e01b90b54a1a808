//! The harness itself keeps its promises: private, cleaned-up databases and broker names.

use tenantry_testkit::{Schema, TestBroker, TestDb, admin_client};

#[tokio::test]
async fn test_databases_are_migrated_private_and_dropped() {
    let name;
    {
        let db = TestDb::new(Schema::Shard).await;
        name = db.name.clone();
        let n = db.scalar("SELECT count(*) FROM placements").await;
        assert_eq!(n, 0);
    }
    let left = admin_client()
        .await
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .unwrap();
    assert!(left.is_none(), "{name} was not dropped");
}

#[tokio::test]
async fn broker_names_are_private_and_deleted() {
    let broker = TestBroker::new().await;
    let x = broker.exchange("shardmap");
    assert!(x.starts_with("t.") && x.ends_with(".shardmap"));
    let ch = broker.conn.create_channel().await.unwrap();
    ch.exchange_declare(
        x.as_str().into(),
        lapin::ExchangeKind::Fanout,
        Default::default(),
        Default::default(),
    )
    .await
    .unwrap();
    assert!(broker.exchange_exists(&x).await);
    broker.cleanup().await;
    assert!(!broker.exchange_exists(&x).await);
}
