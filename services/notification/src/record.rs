//! Writing `status.notifications`: a compare-and-swap on that section alone.
//!
//! A JSON patch whose first operation `test`s the section against the value
//! read, and whose second replaces it. The apiserver applies the patch
//! atomically to the stored object, so of two replicas claiming from the
//! same read, one wins and the other's `test` fails (422). Unlike a
//! resourceVersion precondition, writes by the operator and the stage
//! workers to other fields don't make it fail: the Order changes most
//! exactly when its events are published.

use dishpatch_api::Order;
use dishpatch_api::order::NotificationRecord;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::{Value, json};

/// The field manager of the section.
pub const MANAGER: &str = "dishpatch-notification";

/// Why a compare-and-swap did not write.
#[derive(Debug, thiserror::Error)]
pub enum CasError {
    /// The section is no longer what it was read as: read again.
    #[error("status.notifications changed since it was read")]
    Changed,
    /// The order is gone.
    #[error("the order is gone")]
    Gone,
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("encoding the patch: {0}")]
    Encode(#[from] serde_json::Error),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    /// `written`, `changed` (lost a race, read again) or `gone`.
    pub outcome: String,
}

/// The JSON patch that replaces the section `before` (as read from an
/// Order whose status `had_status`) with `after`, only if it is still `before`.
pub fn patch(
    had_status: bool,
    before: &[NotificationRecord],
    after: &[NotificationRecord],
) -> Result<Value, serde_json::Error> {
    let after_value = serde_json::to_value(after)?;
    Ok(if !had_status {
        json!([
            {"op": "test", "path": "/status", "value": null},
            {"op": "add", "path": "/status", "value": {"notifications": after_value}},
        ])
    } else {
        // An empty list is never stored (the field is left out), and `test`
        // with null passes on a missing field.
        let before_value = if before.is_empty() {
            Value::Null
        } else {
            serde_json::to_value(before)?
        };
        let write = if after.is_empty() {
            json!({"op": "remove", "path": "/status/notifications"})
        } else {
            json!({"op": "add", "path": "/status/notifications", "value": after_value})
        };
        json!([{"op": "test", "path": "/status/notifications", "value": before_value}, write])
    })
}

/// Replaces `order`'s `status.notifications` (as `order` holds it) with
/// `after`, unless it changed in between. Returns the Order as written.
pub async fn swap(
    client: &Client,
    order: &Order,
    after: &[NotificationRecord],
    writes: &Family<WriteLabels, Counter>,
) -> Result<Order, CasError> {
    let before = order
        .status
        .as_ref()
        .map(|s| s.notifications.as_slice())
        .unwrap_or_default();
    let ops = patch(order.status.is_some(), before, after)?;
    let ops: json_patch::Patch = serde_json::from_value(ops)?;
    let api: Api<Order> = Api::namespaced(client.clone(), &order.namespace().unwrap_or_default());
    let result = api
        .patch_status(
            &order.name_any(),
            &PatchParams {
                field_manager: Some(MANAGER.to_string()),
                ..Default::default()
            },
            &Patch::<()>::Json(ops),
        )
        .await;
    let (outcome, result) = match result {
        Ok(written) => ("written", Ok(written)),
        // A failed `test` is 422 Invalid with no field causes; a schema
        // failure would be 422 too and would keep failing, which the
        // caller's bounded retries turn into an error.
        Err(kube::Error::Api(e)) if e.code == 422 => ("changed", Err(CasError::Changed)),
        Err(kube::Error::Api(e)) if e.code == 404 => ("gone", Err(CasError::Gone)),
        Err(e) => ("failed", Err(e.into())),
    };
    writes
        .get_or_create(&WriteLabels {
            outcome: outcome.to_string(),
        })
        .inc();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use dishpatch_api::order::{NotificationChannel, NotificationState};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn record() -> NotificationRecord {
        NotificationRecord {
            event: "u.order.accepted".into(),
            channel: NotificationChannel::Email,
            state: NotificationState::Claimed,
            holder: "pod-a/1-1".into(),
            at: Time(jiff::Timestamp::from_second(1_800_000_000).unwrap()),
        }
    }

    #[test]
    fn patches_test_the_section_then_write_it() {
        let r = record();
        let rv = serde_json::to_value([&r]).unwrap();
        assert_eq!(
            patch(true, &[], std::slice::from_ref(&r)).unwrap(),
            json!([
                {"op": "test", "path": "/status/notifications", "value": null},
                {"op": "add", "path": "/status/notifications", "value": rv},
            ])
        );
        assert_eq!(
            patch(true, std::slice::from_ref(&r), &[]).unwrap(),
            json!([
                {"op": "test", "path": "/status/notifications", "value": rv},
                {"op": "remove", "path": "/status/notifications"},
            ])
        );
        assert_eq!(
            patch(false, &[], std::slice::from_ref(&r)).unwrap(),
            json!([
                {"op": "test", "path": "/status", "value": null},
                {"op": "add", "path": "/status", "value": {"notifications": rv}},
            ])
        );
        // It parses as the JSON patch kube sends.
        let ops: json_patch::Patch = serde_json::from_value(
            patch(true, std::slice::from_ref(&r), std::slice::from_ref(&r)).unwrap(),
        )
        .unwrap();
        assert_eq!(ops.0.len(), 2);
    }
}
