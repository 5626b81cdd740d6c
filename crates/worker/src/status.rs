//! Reading Orders and writing one stage section of their status.

use dishpatch_api::Order;
use dishpatch_api::events::{CloudEvent, EventType, OrderRef};
use dishpatch_api::lifecycle::next_phase;
use dishpatch_api::order::{OrderPhase, OrderStatus};
use dishpatch_messaging::Broker;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::consume::HandleError;
use crate::metrics::{EventLabel, WorkerMetrics};

/// How many times [`OrderAccess::write`] reads a changed order again before
/// it gives up (and the message is retried later).
const WRITE_ATTEMPTS: usize = 5;

/// The phase `order` is in once `section` replaces its stage section; `None`
/// while no phase is recorded (the operator records the first).
/// Every writer sends the phase on every apply, so none of them ever drops
/// it by leaving it out (server-side apply removes a field its last owner
/// stops sending).
fn phase_with(order: &Order, name: &str, section: &serde_json::Value) -> Option<OrderPhase> {
    let stored = order.status.as_ref().and_then(|s| s.phase)?;
    let after = serde_json::to_value(order.status.clone().unwrap_or_default())
        .ok()
        .and_then(|mut status| {
            status[name] = section.clone();
            serde_json::from_value::<OrderStatus>(status).ok()
        });
    Some(after.map_or(stored, |s| next_phase(&s)))
}

/// A worker's identity: its field manager and its status section.
#[derive(Debug, Clone, Copy)]
pub struct Stage {
    /// The service name (`payment`), the CloudEvents source.
    pub service: &'static str,
    /// The field manager (`dishpatch-payment`).
    pub manager: &'static str,
    /// The status section it owns (`payment`).
    pub section: &'static str,
}

/// How a worker reads Orders, writes its section, and announces outcomes.
#[derive(Clone)]
pub struct OrderAccess {
    pub client: Client,
    pub broker: std::sync::Arc<Broker>,
    pub stage: Stage,
    pub metrics: std::sync::Arc<WorkerMetrics>,
}

impl OrderAccess {
    /// The order an event is about, if it still exists and is the same
    /// object (a name can be reused; the uid can't).
    pub async fn order(&self, r: &OrderRef) -> Result<Option<Order>, HandleError> {
        let api: Api<Order> = Api::namespaced(self.client.clone(), &r.namespace);
        let order = api.get_opt(&r.name).await?;
        Ok(order.filter(|o| o.uid().as_deref() == Some(r.uid.as_str())))
    }

    /// Server-side applies this worker's section, and the phase it leads to
    /// (see [`next_phase`]), whatever else changed on the Order meanwhile.
    /// The apply carries the resourceVersion the phase was computed from; on
    /// 409 the order is read again and the same section applied over it, so
    /// the stored phase always summarises the stored facts.
    pub async fn write(
        &self,
        order: &Order,
        section: serde_json::Value,
    ) -> Result<Order, HandleError> {
        let mut current = order.clone();
        for _ in 0..WRITE_ATTEMPTS {
            match self.apply(&current, &section).await {
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                other => return Ok(other?),
            }
            let api = self.api(&current);
            let fresh = api.get_opt(&current.name_any()).await?;
            match fresh.filter(|o| o.uid() == current.uid()) {
                Some(o) => current = o,
                None => return Err(HandleError::Permanent("the order is gone".into())),
            }
        }
        Err(HandleError::Retryable(format!(
            "order {} changed under {WRITE_ATTEMPTS} writes in a row",
            current.name_any()
        )))
    }

    /// Like [`write`](Self::write), but only if the Order is still the object
    /// `order` was read as. `Ok(None)` means someone wrote in between (409)
    /// or the order is gone (404): read it again and decide again. For writes
    /// whose decision depends on what another writer may change at the same
    /// time (pick-up versus cancellation, a charge versus a deletion).
    pub async fn write_if_unchanged(
        &self,
        order: &Order,
        section: serde_json::Value,
    ) -> Result<Option<Order>, HandleError> {
        match self.apply(order, &section).await {
            Ok(written) => Ok(Some(written)),
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn api(&self, order: &Order) -> Api<Order> {
        Api::namespaced(self.client.clone(), &order.namespace().unwrap_or_default())
    }

    async fn apply(
        &self,
        order: &Order,
        section: &serde_json::Value,
    ) -> Result<Order, kube::Error> {
        let phase = phase_with(order, self.stage.section, section);
        let mut status = json!({ self.stage.section: section });
        if let Some(phase) = phase {
            status["phase"] = json!(phase);
        }
        // An apply that names a resourceVersion is refused with 409 unless the
        // object is still at it: optimistic concurrency for SSA.
        let mut patch = json!({
            "apiVersion": "dishpatch.dev/v1alpha1",
            "kind": "Order",
            "status": status,
        });
        if let Some(rv) = order.resource_version() {
            patch["metadata"] = json!({ "resourceVersion": rv });
        }
        self.api(order)
            .patch_status(
                &order.name_any(),
                &PatchParams::apply(self.stage.manager).force(),
                &Patch::Apply(&patch),
            )
            .await
    }
    /// Publishes an outcome event about the order and waits for the confirm.
    pub async fn publish(
        &self,
        order: &OrderRef,
        kind: EventType,
        reason: Option<String>,
        traceparent: &str,
    ) -> Result<(), HandleError> {
        let event = CloudEvent::new(
            kind,
            self.stage.service,
            order.clone(),
            reason,
            jiff::Timestamp::now().to_string(),
        );
        self.broker.publish(&event, traceparent).await?;
        self.metrics
            .published
            .get_or_create(&EventLabel {
                event: kind.routing_key().to_string(),
            })
            .inc();
        tracing::info!(order = %event.subject, event = %kind, %traceparent, "published");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(status: serde_json::Value) -> Order {
        serde_json::from_value(json!({
            "apiVersion": "dishpatch.dev/v1alpha1", "kind": "Order",
            "metadata": {"name": "o1", "namespace": "shop", "resourceVersion": "7"},
            "spec": {
                "restaurantRef": {"name": "roma"},
                "items": [{"menuItem": "pizza", "quantity": 1}],
                "customer": {"id": "c1", "name": "C", "contact": {"email": "c@example.com"}},
                "deliveryAddress": {"street": "S 1", "city": "Berlin", "postalCode": "10115", "country": "DE"},
                "payment": {"token": "tok_visa"}
            },
            "status": status
        }))
        .unwrap()
    }

    fn accepted(phase: &str, cancelled: bool) -> serde_json::Value {
        let cond = |t: &str| {
            json!({"type": t, "status": "True", "reason": "R", "message": "",
            "lastTransitionTime": "2026-12-01T00:00:00Z"})
        };
        let mut conditions = vec![cond("Accepted")];
        if cancelled {
            conditions.push(cond("Cancelled"));
        }
        json!({"phase": phase, "conditions": conditions,
            "payment": {"state": "Succeeded", "provider": "simulated"}})
    }

    #[test]
    fn a_stage_fact_carries_the_phase_it_leads_to() {
        let paid = order(accepted("Paid", false));
        let preparing = json!({"state": "Preparing", "ticket": 1});
        assert_eq!(
            phase_with(&paid, "kitchen", &preparing),
            Some(OrderPhase::Preparing)
        );
        // A fact that moves nothing keeps the recorded phase.
        let unchanged = json!({"state": "Succeeded", "provider": "simulated"});
        assert_eq!(
            phase_with(&paid, "payment", &unchanged),
            Some(OrderPhase::Paid)
        );
    }

    #[test]
    fn a_late_fact_never_moves_a_cancelled_order() {
        let cancelled = order(accepted("Cancelled", true));
        let ready = json!({"state": "Ready"});
        assert_eq!(
            phase_with(&cancelled, "kitchen", &ready),
            Some(OrderPhase::Cancelled)
        );
    }

    #[test]
    fn no_phase_is_sent_before_the_operator_records_one() {
        let undecided = order(json!({}));
        assert_eq!(
            phase_with(
                &undecided,
                "payment",
                &json!({"state": "Pending", "provider": "simulated"})
            ),
            None
        );
    }
}
