//! `tenantry admin shard apply|list`: idempotent shard map as code.

use tenantry_testkit::{Schema, TestDb};
use uuid::Uuid;

use crate::{
    cli::tempdir,
    support::{run, tenantry},
};

fn map(shards: &[(&str, &TestDb, &str)], extra: &str) -> String {
    let mut s = String::from("environment = \"e2e\"\n");
    for (id, db, endpoint) in shards {
        s.push_str(&format!(
            "[[shard]]\nid = \"{id}\"\ndatabase_url = \"{}\"\nendpoints = [\"{endpoint}\"]\n{extra}\n",
            db.url
        ));
    }
    s
}

async fn outbox_rows(catalog: &TestDb) -> i64 {
    catalog
        .client()
        .await
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_second_apply_changes_nothing_whatever_order_the_catalog_sorts_endpoints_in() {
    // A catalog under a linguistic collation (en_US, the official Docker image's default)
    // sorts `http://10.0.0.1:8101` before `http://10.0.0.18:8101`; bytes sort it after. The
    // comparison used the catalog's order against the file's byte order, so every run
    // "updated" the endpoints, bumped the map's version and republished it to every gateway.
    let catalog = TestDb::new(Schema::Catalog).await;
    catalog
        .exec(r#"ALTER TABLE shard_endpoints ALTER COLUMN url TYPE text COLLATE "en-US-x-icu""#)
        .await;
    let shard = TestDb::reserve();
    let dir = tempdir();
    let file = dir.join("map.toml");
    std::fs::write(
        &file,
        format!(
            "environment = \"e2e\"\n[[shard]]\nid = \"shard-1\"\ndatabase_url = \"{}\"\n\
             endpoints = [\"http://10.0.0.1:8101\", \"http://10.0.0.18:8101\", \
             \"http://api-1:80\", \"http://api-10:80\"]\n",
            shard.url
        ),
    )
    .unwrap();
    let cat = [("TENANTRY_CATALOG__URL", catalog.url.clone())];
    let apply = || {
        run(tenantry()
            .args(["admin", "shard", "apply", "--create-databases"])
            .arg(&file)
            .envs(cat.clone()))
    };
    let (code, _, err) = apply();
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = apply();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("e2e: nothing to change"), "{out}");
    assert_eq!(
        outbox_rows(&catalog).await,
        1,
        "a no-op run publishes nothing"
    );
}

#[tokio::test]
async fn shard_apply_creates_migrates_and_is_idempotent() {
    let catalog = TestDb::new(Schema::Catalog).await;
    let (s1, s2) = (TestDb::reserve(), TestDb::reserve());
    let dir = tempdir();
    let file = dir.join("map.toml");
    std::fs::write(
        &file,
        map(
            &[
                ("shard-1", &s1, "http://127.0.0.1:8101"),
                ("shard-2", &s2, "http://127.0.0.1:8102"),
            ],
            "",
        ),
    )
    .unwrap();
    let cat = [("TENANTRY_CATALOG__URL", catalog.url.clone())];

    let (code, out, err) = run(tenantry()
        .args(["admin", "shard", "apply", "--create-databases"])
        .arg(&file)
        .envs(cat.clone()));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("shard shard-1: created database; applied 0001_identity_and_placements.sql"),
        "{out}"
    );
    assert!(out.contains("added to the catalog"), "{out}");
    assert!(s1.exists().await && s2.exists().await);
    assert_eq!(outbox_rows(&catalog).await, 2, "one outbox row per change");

    let (code, out, err) = run(tenantry()
        .args(["admin", "shard", "apply", "--create-databases"])
        .arg(&file)
        .envs(cat.clone()));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("shard shard-1: unchanged") && out.contains("e2e: nothing to change"),
        "{out}"
    );
    assert_eq!(
        outbox_rows(&catalog).await,
        2,
        "a no-op run publishes nothing"
    );

    let (code, out, _) = run(tenantry()
        .args(["admin", "shard", "list"])
        .envs(cat.clone()));
    assert_eq!(code, 0);
    assert!(out.starts_with("ID"), "{out}");
    let latest = tenantry_migrate::embedded(tenantry_migrate::Target::Shard)
        .last()
        .unwrap()
        .version;
    let row = format!("shard-1  active  yes        0        {latest}       http://127.0.0.1:8101");
    assert!(out.contains(&row), "{out}");
    assert!(
        !out.contains(&s1.name) || !out.contains("postgres://"),
        "no database URLs in the list"
    );

    // a change is applied and announced once
    std::fs::write(
        &file,
        map(
            &[
                ("shard-1", &s1, "http://127.0.0.1:8101"),
                ("shard-2", &s2, "http://127.0.0.1:8102"),
            ],
            "weight = 300",
        ),
    )
    .unwrap();
    let (code, out, _) = run(tenantry()
        .args(["admin", "shard", "apply"])
        .arg(&file)
        .envs(cat.clone()));
    assert_eq!(code, 0);
    assert!(out.contains("updated in the catalog (weight)"), "{out}");
    assert_eq!(outbox_rows(&catalog).await, 4);
    let (_, json, _) = run(tenantry()
        .args(["admin", "shard", "list", "--json"])
        .envs(cat.clone()));
    let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(rows[0]["version"], 2);

    // a shard left out of the file is reported, never removed
    std::fs::write(
        &file,
        map(&[("shard-1", &s1, "http://127.0.0.1:8101")], "weight = 300"),
    )
    .unwrap();
    let (code, out, _) = run(tenantry()
        .args(["admin", "shard", "apply"])
        .arg(&file)
        .envs(cat.clone()));
    assert_eq!(code, 0);
    assert!(
        out.contains("shard shard-2: in the catalog but not in"),
        "{out}"
    );
    let (_, json, _) = run(tenantry()
        .args(["admin", "shard", "list", "--json"])
        .envs(cat));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&json)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn concurrent_applies_of_the_same_map_create_each_shard_once() {
    let catalog = TestDb::new(Schema::Catalog).await;
    let s1 = TestDb::new(Schema::Empty).await;
    let dir = tempdir();
    let file = dir.join("map.toml");
    std::fs::write(&file, map(&[("shard-1", &s1, "http://127.0.0.1:8101")], "")).unwrap();
    let url = catalog.url.clone();
    let spawn = |file: std::path::PathBuf, url: String| {
        std::thread::spawn(move || {
            run(tenantry()
                .args(["admin", "shard", "apply"])
                .arg(&file)
                .env("TENANTRY_CATALOG__URL", url))
        })
    };
    let (a, b) = (spawn(file.clone(), url.clone()), spawn(file.clone(), url));
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    assert_eq!((a.0, b.0), (0, 0), "{a:?} {b:?}");
    assert_eq!(outbox_rows(&catalog).await, 1, "{a:?} {b:?}");
}

#[tokio::test]
async fn shard_apply_refuses_bad_maps_and_changes_nothing() {
    let catalog = TestDb::new(Schema::Catalog).await;
    let s1 = TestDb::new(Schema::Empty).await;
    let missing = TestDb::reserve();
    let dir = tempdir();
    let cat = [("TENANTRY_CATALOG__URL", catalog.url.clone())];
    let good = map(&[("shard-1", &s1, "http://127.0.0.1:8101")], "");
    let huge = format!("{good}# {}\n", "x".repeat(2 << 20));
    for (name, text, needle) in [
        ("syntax", "environment = \n".to_owned(), "not valid"),
        ("unknown", format!("{good}colour = \"red\"\n"), "colour"),
        (
            "bad-id",
            good.replace("shard-1", "shard_1; DROP TABLE shards"),
            "not a valid shard id",
        ),
        ("huge", huge, "limit"),
        ("empty", "environment = \"x\"\n".into(), "at least one"),
        (
            "missing-db",
            map(&[("shard-9", &missing, "http://127.0.0.1:1")], ""),
            "--create-databases",
        ),
        (
            "secret-in-a-syntax-error",
            "environment = \"x\"\n[[shard]]\nid = \"s\"\ndatabase_url = \"postgres://u:s3cret@h/db\n"
                .into(),
            "line 4",
        ),
        (
            "terminal-escape-in-url",
            good.replacen("\"\nendpoints", "\\u001b]0;owned\\u0007\"\nendpoints", 1),
            "control character",
        ),
    ] {
        let file = dir.join(format!("{name}.toml"));
        std::fs::write(&file, text).unwrap();
        let (code, out, err) = run(tenantry()
            .args(["admin", "shard", "apply"])
            .arg(&file)
            .envs(cat.clone()));
        assert_eq!(code, 1, "{name}: {out}");
        assert!(err.contains(needle), "{name}: {err}");
        assert!(
            !err.contains("s3cret") && !err.contains('\u{1b}'),
            "{name}: {err}"
        );
    }
    let (code, _, err) = run(tenantry()
        .args(["admin", "shard", "apply", "/no/such/map.toml"])
        .envs(cat.clone()));
    assert_eq!(code, 1);
    assert!(err.contains("cannot read"), "{err}");
    // A pipe reports no size up front: the read itself stops at the limit.
    let mut piped = tenantry()
        .args(["admin", "shard", "apply", "/dev/stdin"])
        .envs(cat.clone())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = piped.stdin.take().unwrap();
    let feed = format!("{good}# {}\n", "x".repeat(64 << 20));
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        stdin.write_all(feed.as_bytes()).is_ok()
    });
    let out = piped.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("over the limit"), "{err}");
    assert!(
        !writer.join().unwrap(),
        "the command stopped reading at the limit; the rest of 64 MiB met a closed pipe"
    );
    assert_eq!(outbox_rows(&catalog).await, 0);
    assert!(!missing.exists().await);
    // A failed first apply does not claim the catalog for its file's environment either,
    // also when what fails is the catalog's own update, after the shards were prepared.
    assert_eq!(
        catalog
            .scalar("SELECT count(*) FROM catalog_environment")
            .await,
        0
    );
    catalog
        .exec(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
                 $$BEGIN RAISE EXCEPTION 'the catalog refuses this shard'; END$$;
             CREATE TRIGGER refuse BEFORE INSERT ON shards FOR EACH ROW EXECUTE FUNCTION refuse();",
        )
        .await;
    let file = dir.join("good.toml");
    std::fs::write(&file, &good).unwrap();
    let (code, _, err) = run(tenantry()
        .args(["admin", "shard", "apply"])
        .arg(&file)
        .envs(cat.clone()));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("the catalog refuses this shard"), "{err}");
    assert_eq!(
        catalog
            .scalar("SELECT count(*) FROM catalog_environment")
            .await,
        0
    );
    catalog
        .exec("DROP TRIGGER refuse ON shards; DROP FUNCTION refuse();")
        .await;
    // The catalog itself refuses an endpoint the gateway cannot reach, also one written by hand.
    let c = catalog.client().await;
    c.execute(
        "INSERT INTO shards (id, database_url) VALUES ('s9', 'postgres://x/y')",
        &[],
    )
    .await
    .unwrap();
    let refused = c
        .execute(
            "INSERT INTO shard_endpoints (shard_id, url) VALUES ('s9', 'https://127.0.0.1:8101')",
            &[],
        )
        .await
        .unwrap_err();
    assert!(
        format!("{refused:?}").contains("shard_endpoints_plain_http"),
        "{refused:?}"
    );
    // A URL written into the catalog by hand reaches operators' terminals escaped.
    c.execute(
        "INSERT INTO shards (id, database_url)
         VALUES ('s8', 'postgres://postgres@127.0.0.1:1/x' || chr(27) || ']0;owned' || chr(7))",
        &[],
    )
    .await
    .unwrap();
    let (_, out, err) = run(tenantry()
        .args(["admin", "shard", "list"])
        .envs(cat.clone()));
    assert!(
        out.contains("s8") && !out.contains('\u{1b}') && !err.contains('\u{1b}'),
        "{out}\n{err}"
    );
}

#[tokio::test]
async fn a_database_already_claimed_by_another_shard_is_refused() {
    let catalog = TestDb::new(Schema::Catalog).await;
    let s1 = TestDb::new(Schema::Empty).await;
    let dir = tempdir();
    let cat = [("TENANTRY_CATALOG__URL", catalog.url.clone())];
    let file = dir.join("a.toml");
    std::fs::write(&file, map(&[("shard-1", &s1, "http://127.0.0.1:8101")], "")).unwrap();
    assert_eq!(
        run(tenantry()
            .args(["admin", "shard", "apply"])
            .arg(&file)
            .envs(cat.clone()))
        .0,
        0
    );
    std::fs::write(&file, map(&[("shard-7", &s1, "http://127.0.0.1:8107")], "")).unwrap();
    let (code, _, err) = run(tenantry()
        .args(["admin", "shard", "apply"])
        .arg(&file)
        .envs(cat));
    assert_eq!(code, 1);
    assert!(err.contains("already belongs to shard shard-1"), "{err}");
}

#[tokio::test]
async fn shard_apply_needs_a_migrated_catalog() {
    let catalog = TestDb::new(Schema::Empty).await;
    let s1 = TestDb::new(Schema::Empty).await;
    let dir = tempdir();
    let file = dir.join("a.toml");
    std::fs::write(&file, map(&[("shard-1", &s1, "http://127.0.0.1:8101")], "")).unwrap();
    let (code, _, err) = run(tenantry()
        .args(["admin", "shard", "apply"])
        .arg(&file)
        .env("TENANTRY_CATALOG__URL", &catalog.url));
    assert_eq!(code, 1);
    assert!(err.contains("migrate up"), "{err}");
}

#[tokio::test]
async fn a_map_for_another_environment_is_refused_before_anything_changes() {
    // The catalog records the environment of its first apply; a staging map applied to it by
    // mistake (a catalog URL left pointing at production, say) changes nothing.
    let catalog = TestDb::new(Schema::Catalog).await;
    let (s1, staging_db) = (TestDb::new(Schema::Empty).await, TestDb::reserve());
    let dir = tempdir();
    let cat = [("TENANTRY_CATALOG__URL", catalog.url.clone())];
    let apply = |name: &str, text: String| {
        let file = dir.join(name);
        std::fs::write(&file, text).unwrap();
        run(tenantry()
            .args(["admin", "shard", "apply", "--create-databases"])
            .arg(&file)
            .envs(cat.clone()))
    };
    let (code, _, err) = apply(
        "e2e.toml",
        map(&[("shard-1", &s1, "http://127.0.0.1:8101")], ""),
    );
    assert_eq!(code, 0, "{err}");
    let before = outbox_rows(&catalog).await;
    let staging = map(&[("shard-1", &staging_db, "http://10.0.0.9:8101")], "")
        .replace("environment = \"e2e\"", "environment = \"staging\"");
    let (code, out, err) = apply("staging.toml", staging);
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("serves environment \"e2e\"") && err.contains("for \"staging\""),
        "{err}"
    );
    assert_eq!(outbox_rows(&catalog).await, before);
    assert!(!staging_db.exists().await, "no database was created");
    let url: String = catalog
        .client()
        .await
        .query_one("SELECT database_url FROM shards WHERE id = 'shard-1'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(url, s1.url, "the shard still points at its own database");

    // A catalog from before the environment record (shards, no record): the staging map,
    // whose databases differ, does not get to claim it; the catalog's own map does.
    catalog.exec("DELETE FROM catalog_environment").await;
    let staging = map(&[("shard-1", &staging_db, "http://10.0.0.9:8101")], "")
        .replace("environment = \"e2e\"", "environment = \"staging\"");
    let (code, out, err) = apply("staging.toml", staging);
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("no environment recorded yet"), "{err}");
    let (code, _, err) = apply(
        "e2e.toml",
        map(&[("shard-1", &s1, "http://127.0.0.1:8101")], ""),
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        catalog
            .client()
            .await
            .query_one("SELECT environment FROM catalog_environment", &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        "e2e"
    );
}

#[tokio::test]
async fn a_shard_whose_database_is_down_can_still_be_taken_out_of_placement() {
    let catalog = TestDb::new(Schema::Catalog).await;
    let s1 = TestDb::new(Schema::Empty).await;
    let (proxy, through) = tenantry_testkit::proxy::TcpProxy::in_front_of(&s1.url).await;
    let dir = tempdir();
    let cat = [("TENANTRY_CATALOG__URL", catalog.url.clone())];
    let file = dir.join("map.toml");
    let declare = |accepting: bool| {
        let text = format!(
            "environment = \"e2e\"\n[[shard]]\nid = \"shard-1\"\ndatabase_url = \"{through}\"\n\
             endpoints = [\"http://127.0.0.1:8101\"]\naccepting = {accepting}\n"
        );
        std::fs::write(&file, text).unwrap();
    };
    let apply = |extra: &[&str]| {
        run(tenantry()
            .args(["admin", "shard", "apply"])
            .args(extra)
            .arg(&file)
            .envs(cat.clone()))
    };
    declare(true);
    let (code, _, err) = apply(&[]);
    assert_eq!(code, 0, "{err}");

    proxy.cut();
    declare(false);
    let (code, _, err) = apply(&[]);
    assert_eq!(code, 1);
    assert!(err.contains("--skip-unreachable"), "{err}");
    assert!(
        !err.contains("--create-databases"),
        "not a missing database: {err}"
    );
    let accepting = || async {
        catalog
            .client()
            .await
            .query_one("SELECT accepting FROM shards WHERE id = 'shard-1'", &[])
            .await
            .unwrap()
            .get::<_, bool>(0)
    };
    assert!(accepting().await, "nothing changed");

    let (code, out, err) = apply(&["--skip-unreachable"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("shard shard-1: database unreachable, skipped"),
        "{out}"
    );
    assert!(err.contains("warning: shard shard-1"), "{err}");
    assert!(!accepting().await, "the catalog fields were applied");
    // Again: the catalog has nothing left to change, but the database was not looked at.
    let (code, out, err) = apply(&["--skip-unreachable"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("e2e: nothing changed; 1 shard database(s) not checked")
            && !out.contains("nothing to change"),
        "{out}"
    );
    // In JSON, the schema version of a database not looked at is null, not 0 (a database
    // without a schema), as in `shard list --json`.
    let (code, out, err) = apply(&["--skip-unreachable", "--json"]);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let shard = &report["shards"][0];
    assert_eq!(shard["id"], "shard-1", "{out}");
    assert!(shard["skipped"].is_string(), "{out}");
    assert!(shard["schema_version"].is_null(), "{out}");
    // Never to put it back: companies would be created on a database nobody checked.
    declare(true);
    let (code, _, err) = apply(&["--skip-unreachable"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("puts it into placement") && err.contains("catalog was not changed"),
        "{err}"
    );
    assert!(!accepting().await, "still out of placement");
    catalog
        .exec("UPDATE shards SET state = 'retired' WHERE id = 'shard-1'")
        .await;
    declare(false);
    let (code, _, err) = apply(&["--skip-unreachable"]);
    assert_eq!(code, 1);
    assert!(err.contains("brings it back from retirement"), "{err}");
    catalog
        .exec("UPDATE shards SET state = 'active' WHERE id = 'shard-1'")
        .await;

    // A shard new to the catalog is never skipped: nothing would vouch for its database.
    let fresh = TestDb::reserve();
    let text = format!(
        "environment = \"e2e\"\n[[shard]]\nid = \"shard-2\"\n\
         database_url = \"postgres://postgres@{}/{}\"\nendpoints = [\"http://127.0.0.1:8102\"]\n",
        proxy.addr,
        fresh.url.rsplit('/').next().unwrap()
    );
    std::fs::write(&file, text).unwrap();
    let (code, _, err) = apply(&["--skip-unreachable"]);
    assert_eq!(code, 1);
    assert!(err.contains("must be reachable"), "{err}");
}

#[tokio::test]
async fn a_shard_with_companies_cannot_be_pointed_at_a_database_that_is_not_its_own() {
    // A typo in database_url, with --create-databases, would create, migrate and claim an empty
    // database, and the shard's companies would find nothing there.
    let catalog = TestDb::new(Schema::Catalog).await;
    let (s1, elsewhere, typo) = (
        TestDb::new(Schema::Empty).await,
        TestDb::new(Schema::Empty).await,
        TestDb::reserve(),
    );
    let dir = tempdir();
    let cat = [("TENANTRY_CATALOG__URL", catalog.url.clone())];
    let apply = |db: &TestDb| {
        let file = dir.join("map.toml");
        std::fs::write(&file, map(&[("shard-1", db, "http://127.0.0.1:8101")], "")).unwrap();
        run(tenantry()
            .args(["admin", "shard", "apply", "--create-databases"])
            .arg(&file)
            .envs(cat.clone()))
    };
    let (code, _, err) = apply(&s1);
    assert_eq!(code, 0, "{err}");
    let acme = Uuid::now_v7();
    catalog
        .exec(&format!(
            "INSERT INTO tenants (id, name, shard_id, state) VALUES ('{acme}', 'Acme', 'shard-1', 'active')"
        ))
        .await;
    s1.exec(&format!(
        "INSERT INTO placements (company_id, state) VALUES ('{acme}', 'owned')"
    ))
    .await;
    // A creation that stopped before its placement was written: not a company the shard's
    // database must hold.
    catalog
        .exec(&format!(
            "INSERT INTO tenants (id, name, shard_id, state) VALUES ('{}', 'Half', 'shard-1', 'provisioning')",
            Uuid::now_v7()
        ))
        .await;
    let url_of = || async {
        catalog
            .client()
            .await
            .query_one("SELECT database_url FROM shards WHERE id = 'shard-1'", &[])
            .await
            .unwrap()
            .get::<_, String>(0)
    };
    for target in [&typo, &elsewhere] {
        let (code, out, err) = apply(target);
        assert_eq!(code, 1, "{out}");
        assert!(
            err.contains("is not shard shard-1's (it records no shard)"),
            "{err}"
        );
        assert_eq!(url_of().await, s1.url);
    }
    assert!(!typo.exists().await, "no database was created for the typo");
    assert_eq!(
        elsewhere
            .scalar("SELECT count(*) FROM pg_tables WHERE tablename = 'shard_identity'")
            .await,
        0,
        "nothing was written to the wrong database"
    );
    // Another environment's shard-1 says it is shard-1 too, but does not hold its companies.
    let mut c = elsewhere.client().await;
    tenantry_migrate::up(
        &mut c,
        &tenantry_migrate::embedded(tenantry_migrate::Target::Shard),
        tenantry_migrate::Phase::Expand,
    )
    .await
    .unwrap();
    elsewhere
        .exec("INSERT INTO shard_identity (shard_id) VALUES ('shard-1')")
        .await;
    let (code, _, err) = apply(&elsewhere);
    assert_eq!(code, 1);
    assert!(err.contains("lacks 1 of the 1 active ones"), "{err}");
    assert_eq!(url_of().await, s1.url);
    // A copy that lacks one company of many, whichever its id (ids are the clients' choice):
    // here the lowest of 152, which a check of the newest 100 never looked at.
    let early = Uuid::from_u128(1);
    let many: Vec<Uuid> = (0..150).map(|_| Uuid::now_v7()).collect();
    for id in many.iter().chain([&early]) {
        catalog
            .exec(&format!(
                "INSERT INTO tenants (id, name, shard_id, state) VALUES ('{id}', 'Co', 'shard-1', 'active')"
            ))
            .await;
    }
    for id in many.iter().chain([&acme]) {
        elsewhere
            .exec(&format!(
                "INSERT INTO placements (company_id, state) VALUES ('{id}', 'owned')"
            ))
            .await;
    }
    let (code, _, err) = apply(&elsewhere);
    assert_eq!(code, 1);
    assert!(err.contains("lacks 1 of the 152 active ones"), "{err}");
    assert_eq!(url_of().await, s1.url);
    // The shard's own database, restored at the new place, is accepted.
    elsewhere
        .exec(&format!(
            "INSERT INTO placements (company_id, state) VALUES ('{early}', 'owned')"
        ))
        .await;
    let (code, _, err) = apply(&elsewhere);
    assert_eq!(code, 0, "{err}");
    assert_eq!(url_of().await, elsewhere.url);

    // Its database gone at its URL, a shard with companies gets no empty one in its place.
    let lost = TestDb::reserve();
    catalog
        .exec(&format!(
            "UPDATE shards SET database_url = '{}' WHERE id = 'shard-1'",
            lost.url
        ))
        .await;
    let (code, _, err) = apply(&lost);
    assert_eq!(code, 1);
    assert!(err.contains("it is never created empty"), "{err}");
    assert!(!lost.exists().await);
}

#[tokio::test]
async fn a_shard_that_still_holds_companies_is_not_retired() {
    // `migrate up` leaves retired shards out: a company left on one would be served from a
    // schema that falls behind.
    let catalog = TestDb::new(Schema::Catalog).await;
    let s1 = TestDb::new(Schema::Empty).await;
    let dir = tempdir();
    let file = dir.join("map.toml");
    let apply = |extra: &str| {
        std::fs::write(
            &file,
            map(&[("shard-1", &s1, "http://127.0.0.1:8101")], extra),
        )
        .unwrap();
        run(tenantry()
            .args(["admin", "shard", "apply"])
            .arg(&file)
            .env("TENANTRY_CATALOG__URL", &catalog.url))
    };
    let (code, _, err) = apply("");
    assert_eq!(code, 0, "{err}");
    for state in ["active", "provisioning", "deleted"] {
        catalog
            .exec(&format!(
                "INSERT INTO tenants (id, name, shard_id, state)
                 VALUES ('{}', '{state}', 'shard-1', '{state}')",
                Uuid::now_v7()
            ))
            .await;
    }
    let state = || async {
        catalog
            .client()
            .await
            .query_one("SELECT state FROM shards WHERE id = 'shard-1'", &[])
            .await
            .unwrap()
            .get::<_, String>(0)
    };
    let before = outbox_rows(&catalog).await;
    let retire = "state = \"retired\"\naccepting = false\n";
    let (code, out, err) = apply(retire);
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("shards to retire still hold companies: shard-1 (2)")
            && err.contains("the catalog's shards were not changed"),
        "{err}"
    );
    assert_eq!(state().await, "active");
    assert_eq!(outbox_rows(&catalog).await, before, "nothing was announced");
    // Once its companies are gone it can be retired, and a file that says so again is fine.
    catalog
        .exec("UPDATE tenants SET state = 'deleted' WHERE shard_id = 'shard-1'")
        .await;
    for _ in 0..2 {
        let (code, _, err) = apply(retire);
        assert_eq!(code, 0, "{err}");
        assert_eq!(state().await, "retired");
    }

    // A retired shard's database may be dropped while the shard stays in the file: later
    // applies leave it alone, and --create-databases does not bring back an empty one.
    tenantry_testkit::admin_client()
        .await
        .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", s1.name))
        .await
        .unwrap();
    std::fs::write(
        &file,
        map(&[("shard-1", &s1, "http://127.0.0.1:8101")], retire),
    )
    .unwrap();
    for extra in [&[][..], &["--create-databases"][..]] {
        let (code, out, err) = run(tenantry()
            .args(["admin", "shard", "apply"])
            .args(extra)
            .arg(&file)
            .env("TENANTRY_CATALOG__URL", &catalog.url));
        assert_eq!(code, 0, "{extra:?}: {err}");
        assert!(
            out.contains("shard shard-1: retired, database left alone")
                && out.contains("e2e: nothing to change"),
            "{out}"
        );
        assert!(
            !s1.exists().await,
            "{extra:?} created a retired shard's database"
        );
    }
}

#[tokio::test]
async fn a_shard_whose_database_is_gone_can_still_be_taken_out_of_placement() {
    // Its database lost, a shard with companies must stop getting new ones while it is
    // restored: --skip-unreachable applies its catalog fields and creates nothing.
    let catalog = TestDb::new(Schema::Catalog).await;
    let s1 = TestDb::new(Schema::Empty).await;
    let dir = tempdir();
    let file = dir.join("map.toml");
    let apply = |accepting: bool, extra: &[&str]| {
        std::fs::write(
            &file,
            map(
                &[("shard-1", &s1, "http://127.0.0.1:8101")],
                &format!("accepting = {accepting}\n"),
            ),
        )
        .unwrap();
        run(tenantry()
            .args(["admin", "shard", "apply"])
            .args(extra)
            .arg(&file)
            .env("TENANTRY_CATALOG__URL", &catalog.url))
    };
    let (code, _, err) = apply(true, &[]);
    assert_eq!(code, 0, "{err}");
    catalog
        .exec(&format!(
            "INSERT INTO tenants (id, name, shard_id, state) VALUES ('{}', 'Acme', 'shard-1', 'active')",
            Uuid::now_v7()
        ))
        .await;
    tenantry_testkit::admin_client()
        .await
        .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", s1.name))
        .await
        .unwrap();
    let accepting = || async {
        catalog
            .scalar("SELECT count(*) FROM shards WHERE accepting")
            .await
    };

    let (code, _, err) = apply(false, &["--create-databases"]);
    assert_eq!(code, 1);
    assert!(err.contains("restore it"), "{err}");
    assert_eq!(accepting().await, 1, "nothing changed");

    let (code, out, err) = apply(false, &["--skip-unreachable", "--create-databases"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("shard shard-1: database unreachable, skipped; updated in the catalog"),
        "{out}"
    );
    assert!(
        err.contains("warning: shard shard-1") && err.contains("does not exist"),
        "{err}"
    );
    assert_eq!(accepting().await, 0, "the catalog fields were applied");
    assert!(
        !s1.exists().await,
        "a shard with companies got an empty database"
    );
    // Without companies too: a shard already in the catalog whose database is gone is not
    // given a new empty database, and is not put back into placement without one.
    catalog
        .exec("UPDATE tenants SET state = 'deleted' WHERE shard_id = 'shard-1'")
        .await;
    let (code, _, err) = apply(true, &["--skip-unreachable", "--create-databases"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("puts it into placement") && err.contains("does not exist"),
        "{err}"
    );
    assert_eq!(accepting().await, 0);
    assert!(!s1.exists().await, "a skipped shard's database was created");
}

#[tokio::test]
async fn shard_apply_says_so_while_another_runner_holds_a_shards_migration_lock() {
    // Otherwise it looks hung for as long as that runner takes.
    let catalog = TestDb::new(Schema::Catalog).await;
    let s1 = TestDb::new(Schema::Empty).await;
    let dir = tempdir();
    let file = dir.join("map.toml");
    std::fs::write(&file, map(&[("shard-1", &s1, "http://127.0.0.1:8101")], "")).unwrap();
    let holder = s1.client().await;
    holder
        .execute("SELECT pg_advisory_lock(x'74656e616e747279'::int8)", &[])
        .await
        .unwrap();
    let mut child = tenantry()
        .args(["admin", "shard", "apply"])
        .arg(&file)
        .env("TENANTRY_CATALOG__URL", &catalog.url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (told, heard) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = told.send(line);
        }
    });
    let line = tokio::task::spawn_blocking(move || {
        heard
            .recv_timeout(std::time::Duration::from_secs(20))
            .map(|line| (line, heard))
    })
    .await
    .unwrap();
    let Ok((line, _rest)) = line else {
        let _ = child.kill();
        panic!("shard apply said nothing within 20 s while waiting for the lock");
    };
    assert!(
        line.contains("another migration runner holds this database's migration lock"),
        "{line}"
    );
    holder
        .execute("SELECT pg_advisory_unlock(x'74656e616e747279'::int8)", &[])
        .await
        .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn a_move_is_refused_when_companies_changed_since_its_new_database_was_checked() {
    // `shard apply` checks a moving shard's new database for the companies it counted, then
    // migrates every shard, then changes the catalog. A company created on the shard in between
    // has its placement in the old database alone: the catalog must not switch to the new one.
    let catalog = TestDb::new(Schema::Catalog).await;
    let (s1, s2) = (
        TestDb::new(Schema::Empty).await,
        TestDb::new(Schema::Empty).await,
    );
    let dir = tempdir();
    let file = dir.join("map.toml");
    std::fs::write(&file, map(&[("shard-1", &s1, "http://127.0.0.1:8101")], "")).unwrap();
    let (code, _, err) = run(tenantry()
        .args(["admin", "shard", "apply", "--create-databases"])
        .arg(&file)
        .env("TENANTRY_CATALOG__URL", &catalog.url));
    assert_eq!(code, 0, "{err}");
    use tenantry_shardmap::catalog::{companies_by_shard, upsert_shards};
    let mut c = catalog.client().await;
    let add = |name: &str| {
        format!(
            "INSERT INTO tenants (id, name, shard_id, state) VALUES ('{}', '{name}', 'shard-1', 'active')",
            Uuid::now_v7()
        )
    };
    let moved = tenantry_shardmap::ShardMapFile::parse(
        "map.toml",
        &map(&[("shard-1", &s2, "http://127.0.0.1:8101")], ""),
    )
    .unwrap();
    let url = || async {
        catalog
            .client()
            .await
            .query_one("SELECT database_url FROM shards WHERE id = 'shard-1'", &[])
            .await
            .unwrap()
            .get::<_, String>(0)
    };
    // Checked when it had no company, and one was created since: refused, nothing changed.
    let checked = companies_by_shard(&c, None).await.unwrap();
    catalog.exec(&add("Acme")).await;
    let refused = upsert_shards(&mut c, &moved.shards, Some("e2e"), &checked)
        .await
        .unwrap_err();
    assert_eq!(
        refused.to_string(),
        "companies were created on or removed from shards whose database_url changes while this \
         apply ran: shard-1 (0 companies when checked, 1 now)"
    );
    assert_eq!(
        url().await,
        s1.url,
        "the catalog still points at the old database"
    );
    // As many companies, but not the same ones (one deleted, another created): refused too.
    let checked = companies_by_shard(&c, None).await.unwrap();
    catalog
        .exec("UPDATE tenants SET state = 'deleted' WHERE name = 'Acme'")
        .await;
    catalog.exec(&add("Newco")).await;
    let refused = upsert_shards(&mut c, &moved.shards, Some("e2e"), &checked)
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("shard-1 (1 companies when checked, 1 now)"),
        "{refused}"
    );
    assert_eq!(url().await, s1.url);
    // Checked with the companies it has: the move goes ahead.
    let checked = companies_by_shard(&c, None).await.unwrap();
    upsert_shards(&mut c, &moved.shards, Some("e2e"), &checked)
        .await
        .unwrap();
    assert_eq!(url().await, s2.url);
}
