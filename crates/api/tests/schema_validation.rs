//! The apiserver itself rejects bad manifests, through the CRD schema and its
//! CEL rules. Runs real `kubectl apply` against the real local control plane.

use dishpatch_testkit::{TestNamespace, client, ensure_crds, kubectl};

const ORDER: &str = r#"
apiVersion: dishpatch.dev/v1alpha1
kind: Order
metadata:
  name: NAME
spec:
  customer:
    id: cust-1
    name: Jane Doe
    contact:
      email: jane@example.com
  restaurantRef:
    name: trattoria-roma
  items:
    - menuItem: margherita
      quantity: 2
  deliveryAddress:
    street: Torstraße 1
    city: Berlin
    postalCode: "10119"
    country: DE
  payment:
    token: tok_visa
"#;

const RESTAURANT: &str = r#"
apiVersion: dishpatch.dev/v1alpha1
kind: Restaurant
metadata:
  name: NAME
spec:
  displayName: Trattoria
  zone: mitte
  open: true
  currency: EUR
  kitchen:
    capacity: 2
  menu:
    - id: margherita
      name: Pizza Margherita
      price: 950
      prepTimeSeconds: 600
      stock: 5
"#;

const COURIER: &str = r#"
apiVersion: dishpatch.dev/v1alpha1
kind: Courier
metadata:
  name: NAME
spec:
  displayName: Ada
  zone: mitte
  onShift: true
  vehicle: Bicycle
"#;

fn replace(doc: &str, from: &str, to: &str) -> String {
    assert!(doc.contains(from), "fixture lacks {from:?}");
    doc.replacen(from, to, 1)
}

/// One bad manifest and what the rejection must say: the field's path and a
/// fragment of the reason.
struct Case {
    name: &'static str,
    manifest: String,
    field: &'static str,
    reason: &'static str,
}

fn cases() -> Vec<Case> {
    let many_items: String = (0..51)
        .map(|i| format!("    - menuItem: dish-{i}\n      quantity: 1\n"))
        .collect();
    vec![
        Case {
            name: "empty items",
            manifest: replace(
                ORDER,
                "    - menuItem: margherita\n      quantity: 2\n",
                "    []\n",
            ),
            field: "spec.items",
            reason: "should have at least 1 items",
        },
        Case {
            name: "51 items",
            manifest: replace(
                ORDER,
                "    - menuItem: margherita\n      quantity: 2\n",
                &many_items,
            ),
            field: "spec.items",
            reason: "must have at most 50 items",
        },
        Case {
            name: "quantity zero",
            manifest: replace(ORDER, "quantity: 2", "quantity: 0"),
            field: "spec.items[0].quantity",
            reason: "greater than or equal to 1",
        },
        Case {
            name: "quantity 100",
            manifest: replace(ORDER, "quantity: 2", "quantity: 100"),
            field: "spec.items[0].quantity",
            reason: "less than or equal to 99",
        },
        Case {
            name: "duplicate menu item",
            manifest: replace(
                ORDER,
                "      quantity: 2\n",
                "      quantity: 2\n    - menuItem: margherita\n      quantity: 1\n",
            ),
            field: "spec.items",
            reason: "each menu item may appear only once",
        },
        Case {
            name: "missing customer",
            manifest: replace(
                ORDER,
                "  customer:\n    id: cust-1\n    name: Jane Doe\n    contact:\n      email: jane@example.com\n",
                "",
            ),
            field: "spec.customer",
            reason: "Required value",
        },
        Case {
            name: "no way to contact the customer",
            manifest: replace(
                ORDER,
                "    contact:\n      email: jane@example.com\n",
                "    contact: {}\n",
            ),
            field: "spec.customer.contact",
            reason: "contact needs an email or a phone",
        },
        Case {
            name: "malformed e-mail",
            manifest: replace(ORDER, "jane@example.com", "jane-at-example"),
            field: "spec.customer.contact.email",
            reason: "email",
        },
        Case {
            name: "card number instead of a token",
            manifest: replace(ORDER, "token: tok_visa", "token: \"4242424242424242\""),
            field: "spec.payment.token",
            reason: "should match",
        },
        Case {
            name: "card number smuggled into a token",
            manifest: replace(ORDER, "token: tok_visa", "token: tok_4242424242424242"),
            field: "spec.payment.token",
            reason: "card number",
        },
        Case {
            name: "card number inside a payment-method token",
            manifest: replace(ORDER, "token: tok_visa", "token: pm_card_4000056655665556"),
            field: "spec.payment.token",
            reason: "card number",
        },
        Case {
            name: "token and secretRef both set",
            manifest: replace(
                ORDER,
                "    token: tok_visa\n",
                "    token: tok_visa\n    secretRef:\n      name: wallet\n      key: token\n",
            ),
            field: "spec.payment",
            reason: "set exactly one of payment.token or payment.secretRef",
        },
        Case {
            name: "country not ISO 3166 alpha-2",
            manifest: replace(ORDER, "country: DE", "country: Germany"),
            field: "spec.deliveryAddress.country",
            reason: "should match",
        },
        Case {
            name: "unknown field",
            manifest: replace(ORDER, "  payment:\n", "  tip: 500\n  payment:\n"),
            field: "spec.tip",
            reason: "unknown field",
        },
        Case {
            name: "restaurant with a negative price",
            manifest: replace(RESTAURANT, "price: 950", "price: -1"),
            field: "spec.menu[0].price",
            reason: "greater than or equal to 0",
        },
        Case {
            name: "restaurant with a currency that is not ISO 4217",
            manifest: replace(RESTAURANT, "currency: EUR", "currency: euro"),
            field: "spec.currency",
            reason: "should match",
        },
        Case {
            name: "restaurant with a duplicate menu id",
            manifest: replace(
                RESTAURANT,
                "      stock: 5\n",
                "      stock: 5\n    - id: margherita\n      name: Again\n      price: 1\n      prepTimeSeconds: 1\n",
            ),
            field: "spec.menu[1]",
            reason: "Duplicate value",
        },
        Case {
            name: "kitchen without capacity",
            manifest: replace(RESTAURANT, "capacity: 2", "capacity: 0"),
            field: "spec.kitchen.capacity",
            reason: "greater than or equal to 1",
        },
        Case {
            name: "courier with an unknown vehicle",
            manifest: replace(COURIER, "vehicle: Bicycle", "vehicle: Rocket"),
            field: "spec.vehicle",
            reason: "Unsupported value",
        },
    ]
}

#[tokio::test]
async fn apiserver_rejects_bad_manifests_naming_the_field() {
    let client = client().await.unwrap();
    ensure_crds(&client).await.unwrap();
    let ns = TestNamespace::create(&client, "schema").await.unwrap();

    // Positive control: the unmodified fixtures are accepted, so every
    // rejection below is due to the one change in it.
    for (i, good) in [ORDER, RESTAURANT, COURIER].iter().enumerate() {
        let manifest = good.replace("NAME", &format!("good-{i}"));
        let out = kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(&manifest))
            .await
            .unwrap();
        assert!(out.success, "valid fixture {i} rejected: {}", out.stderr);
    }

    let cases = cases();
    assert!(cases.len() >= 10);
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let manifest = case.manifest.replace("NAME", &format!("bad-{i}"));
        let out = kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(&manifest))
            .await
            .unwrap();
        if out.success {
            failures.push(format!("{}: accepted, should be rejected", case.name));
        } else if !out.stderr.contains(case.field) || !out.stderr.contains(case.reason) {
            failures.push(format!(
                "{}: rejected, but the message does not name {:?} with {:?}:\n  {}",
                case.name,
                case.field,
                case.reason,
                out.stderr.trim()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn order_spec_is_immutable_except_for_cancellation() {
    let client = client().await.unwrap();
    ensure_crds(&client).await.unwrap();
    let ns = TestNamespace::create(&client, "immutable").await.unwrap();
    let apply = |manifest: String| {
        let ns = ns.name.clone();
        async move {
            kubectl(&["apply", "-n", &ns, "-f", "-"], Some(&manifest))
                .await
                .unwrap()
        }
    };
    let order = ORDER.replace("NAME", "o1");
    let placed = apply(order.clone()).await;
    assert!(placed.success, "{}", placed.stderr);

    let more = apply(replace(&order, "quantity: 2", "quantity: 3")).await;
    assert!(!more.success, "changing items must be rejected");
    assert!(
        more.stderr.contains("spec.items") && more.stderr.contains("items are immutable"),
        "{}",
        more.stderr
    );

    let moved = apply(replace(&order, "city: Berlin", "city: Potsdam")).await;
    assert!(!moved.success, "changing the address must be rejected");
    assert!(
        moved.stderr.contains("spec.deliveryAddress") && moved.stderr.contains("immutable"),
        "{}",
        moved.stderr
    );

    let cancelled = format!("{order}  cancellation:\n    reason: changed my mind\n");
    let cancel = apply(cancelled.clone()).await;
    assert!(
        cancel.success,
        "requesting cancellation is allowed: {}",
        cancel.stderr
    );

    let withdraw = apply(order.clone()).await;
    assert!(
        !withdraw.success,
        "withdrawing a cancellation must be rejected"
    );
    assert!(
        withdraw.stderr.contains("spec.cancellation")
            && withdraw.stderr.contains("cannot be withdrawn"),
        "{}",
        withdraw.stderr
    );

    let reworded = apply(replace(&cancelled, "changed my mind", "too slow")).await;
    assert!(
        !reworded.success,
        "changing the cancellation reason must be rejected"
    );
}
