//! Reading Orders and writing one stage section of their status.

use dishpatch_api::Order;
use dishpatch_api::events::{CloudEvent, EventType, OrderRef};
use dishpatch_messaging::Broker;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::consume::HandleError;
use crate::metrics::{EventLabel, WorkerMetrics};

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

    /// Server-side applies this worker's section, and only it.
    pub async fn write(
        &self,
        order: &Order,
        section: serde_json::Value,
    ) -> Result<Order, HandleError> {
        Ok(self.apply(order, section, None).await?)
    }

    /// Like [`write`](Self::write), but only if the Order is still the object
    /// `order` was read as: the apply carries its resourceVersion as a
    /// precondition. `Ok(None)` means someone wrote in between (409) or the
    /// order is gone (404): read it again and decide again. For writes whose
    /// decision depends on what another writer may change at the same time
    /// (pick-up versus cancellation, a charge versus a deletion).
    pub async fn write_if_unchanged(
        &self,
        order: &Order,
        section: serde_json::Value,
    ) -> Result<Option<Order>, HandleError> {
        match self
            .apply(order, section, order.resource_version().as_deref())
            .await
        {
            Ok(written) => Ok(Some(written)),
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn apply(
        &self,
        order: &Order,
        section: serde_json::Value,
        resource_version: Option<&str>,
    ) -> Result<Order, kube::Error> {
        let api: Api<Order> =
            Api::namespaced(self.client.clone(), &order.namespace().unwrap_or_default());
        let mut patch = json!({
            "apiVersion": "dishpatch.dev/v1alpha1",
            "kind": "Order",
            "status": { self.stage.section: section },
        });
        if let Some(rv) = resource_version {
            // An apply that names a resourceVersion is refused with 409 unless
            // the object is still at it: optimistic concurrency for SSA.
            patch["metadata"] = json!({ "resourceVersion": rv });
        }
        api.patch_status(
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
