//! The archive against a real PostgreSQL (Debian's package, one server per test).

use dishpatch_api::Order;
use dishpatch_api::order::{OrderPhase, OrderStatus};
use dishpatch_archive::{Archive, Cursor, Filter};
use dishpatch_testkit::fixtures;
use dishpatch_testkit::postgres::Postgres;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

fn order(name: &str, customer: &str, restaurant: &str, created: &str, rv: &str) -> Order {
    let mut o = fixtures::order(name, restaurant, &[("margherita", 2)]);
    o.metadata.namespace = Some("shop".into());
    o.metadata.uid = Some(format!("uid-{name}-{created}"));
    o.metadata.resource_version = Some(rv.into());
    o.metadata.creation_timestamp = Some(Time(created.parse().unwrap_or_default()));
    o.spec.customer.id = customer.into();
    o.status = Some(OrderStatus {
        phase: Some(OrderPhase::Delivered),
        ..Default::default()
    });
    o
}

fn names(orders: &[Order]) -> Vec<String> {
    orders
        .iter()
        .map(|o| o.metadata.name.clone().unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn history_is_idempotent_paged_newest_first_and_filtered() -> anyhow::Result<()> {
    let pg = Postgres::start().await?;
    let archive = Archive::connect(&pg.url())?;
    // Before the writer has created the table, readers see empty history.
    assert!(archive.get("shop", "a").await?.is_none());
    assert!(
        archive
            .page("shop", &Filter::default(), None, 10)
            .await?
            .is_empty()
    );

    let a = order("a", "alice", "pizzeria", "2026-12-01T10:00:00Z", "1");
    let b = order("b", "bob", "pizzeria", "2026-12-01T11:00:00Z", "2");
    let c = order("c", "alice", "sushi", "2026-12-01T12:00:00Z", "3");
    for o in [&a, &b, &c] {
        archive.put(o).await?;
    }
    // Again, as after a crash between the insert and the delete: still one row each.
    archive.put(&a).await?;
    assert_eq!(archive.count("shop").await?, 3);
    assert_eq!(archive.count("elsewhere").await?, 0);

    // Every field comes back (managed fields aside).
    let got = archive
        .get("shop", "a")
        .await?
        .ok_or_else(|| anyhow::anyhow!("a is missing"))?;
    assert_eq!(serde_json::to_value(&got)?, serde_json::to_value(&a)?);

    let all = archive.page("shop", &Filter::default(), None, 10).await?;
    assert_eq!(names(&all), ["c", "b", "a"]);
    // One page after another, by cursor.
    let first = archive.page("shop", &Filter::default(), None, 2).await?;
    assert_eq!(names(&first), ["c", "b"]);
    let after = Cursor {
        created: "2026-12-01T11:00:00Z".parse()?,
        name: "b".into(),
    };
    assert_eq!(
        names(
            &archive
                .page("shop", &Filter::default(), Some(&after), 2)
                .await?
        ),
        ["a"]
    );

    let alice = Filter {
        customer: Some("alice".into()),
        ..Default::default()
    };
    assert_eq!(
        names(&archive.page("shop", &alice, None, 10).await?),
        ["c", "a"]
    );
    let pizzeria = Filter {
        restaurant: Some("pizzeria".into()),
        ..Default::default()
    };
    assert_eq!(
        names(&archive.page("shop", &pizzeria, None, 10).await?),
        ["b", "a"]
    );
    let window = Filter {
        created_from: Some("2026-12-01T10:30:00Z".parse()?),
        created_before: Some("2026-12-01T12:00:00Z".parse()?),
        ..Default::default()
    };
    assert_eq!(
        names(&archive.page("shop", &window, None, 10).await?),
        ["b"]
    );

    // A newer copy of the same order replaces the old one.
    let mut a2 = a.clone();
    a2.metadata.resource_version = Some("9".into());
    a2.metadata.labels = Some([("rated".to_string(), "yes".to_string())].into());
    archive.put(&a2).await?;
    assert_eq!(archive.count("shop").await?, 3);
    let got = archive
        .get("shop", "a")
        .await?
        .ok_or_else(|| anyhow::anyhow!("a is missing"))?;
    assert_eq!(got.metadata.resource_version.as_deref(), Some("9"));

    // The same name used again by a later order: GET finds the newest.
    let a_again = order("a", "alice", "pizzeria", "2026-12-02T10:00:00Z", "20");
    archive.put(&a_again).await?;
    let got = archive
        .get("shop", "a")
        .await?
        .ok_or_else(|| anyhow::anyhow!("a is missing"))?;
    assert_eq!(got.metadata.uid, a_again.metadata.uid);
    Ok(())
}

#[tokio::test]
async fn a_database_that_is_down_fails_the_write_and_a_restart_heals_it() -> anyhow::Result<()> {
    let pg = Postgres::start().await?;
    let archive = Archive::connect(&pg.url())?;
    archive
        .put(&order(
            "a",
            "alice",
            "pizzeria",
            "2026-12-01T10:00:00Z",
            "1",
        ))
        .await?;
    pg.stop().await?;
    let b = order("b", "alice", "pizzeria", "2026-12-01T11:00:00Z", "2");
    assert!(
        archive.put(&b).await.is_err(),
        "a write to a stopped database must fail"
    );
    pg.resume().await?;
    archive.put(&b).await?;
    assert_eq!(archive.count("shop").await?, 2);
    Ok(())
}
