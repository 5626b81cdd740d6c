//! Payment's stage: charge accepted orders, refund cancelled ones.

use std::sync::Arc;

use dishpatch_api::Order;
use dishpatch_api::events::{CloudEvent, EventType, OrderRef};
use dishpatch_api::lifecycle::{condition, find};
use dishpatch_api::order::{PaymentState, PaymentStatus};
use dishpatch_worker::{HandleError, Handler, OrderAccess};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::Api;

use crate::gateway::{ChargeOutcome, ChargeRequest, GatewayError, PaymentGateway, RefundRequest};

pub struct Payment {
    pub access: OrderAccess,
    pub gateway: Arc<dyn PaymentGateway>,
}

impl From<GatewayError> for HandleError {
    fn from(e: GatewayError) -> Self {
        match e {
            GatewayError::Retryable(m) => HandleError::Retryable(m),
            GatewayError::Permanent(m) => HandleError::Permanent(m),
        }
    }
}

fn is_true(order: &Order, type_: &str) -> bool {
    order
        .status
        .as_ref()
        .and_then(|s| find(&s.conditions, type_))
        .is_some_and(|c| c.status == "True")
}

impl Payment {
    /// The payment token: inline, or read from the referenced Secret.
    async fn token(&self, order: &Order) -> Result<Result<String, String>, HandleError> {
        if let Some(token) = &order.spec.payment.token {
            return Ok(Ok(token.clone()));
        }
        let Some(r) = &order.spec.payment.secret_ref else {
            return Ok(Err("the order has no payment method".into()));
        };
        let secrets: Api<Secret> = Api::namespaced(
            self.access.client.clone(),
            &order.namespace().unwrap_or_default(),
        );
        let Some(secret) = secrets.get_opt(&r.name).await? else {
            return Ok(Err(format!("payment secret {} does not exist", r.name)));
        };
        let value = secret
            .data
            .as_ref()
            .and_then(|d| d.get(&r.key))
            .map(|b| String::from_utf8_lossy(&b.0).trim().to_string());
        Ok(value.ok_or_else(|| format!("payment secret {} has no key {}", r.name, r.key)))
    }

    async fn fail(
        &self,
        order: &Order,
        r: &OrderRef,
        reason: String,
        traceparent: &str,
    ) -> Result<(), HandleError> {
        let status = PaymentStatus {
            state: PaymentState::Failed,
            provider: self.gateway.name().into(),
            payment_id: None,
            amount: None,
            charged_at: None,
            failure_reason: Some(reason.clone()),
            refund_id: None,
            refunded_at: None,
        };
        self.access
            .write(
                order,
                serde_json::to_value(&status).map_err(|e| HandleError::Permanent(e.to_string()))?,
            )
            .await?;
        self.access
            .publish(r, EventType::PaymentFailed, Some(reason), traceparent)
            .await
    }

    async fn charge(&self, r: &OrderRef, traceparent: &str) -> Result<(), HandleError> {
        let Some(order) = self.access.order(r).await? else {
            return Ok(()); // gone: nothing to charge
        };
        let status = order.status.clone().unwrap_or_default();
        if let Some(p) = &status.payment {
            // Already handled: the event may not have gone out before a crash.
            let kind = match p.state {
                PaymentState::Succeeded => EventType::PaymentSucceeded,
                PaymentState::Failed => EventType::PaymentFailed,
                PaymentState::Refunded => return Ok(()),
            };
            return self
                .access
                .publish(r, kind, p.failure_reason.clone(), traceparent)
                .await;
        }
        if order.metadata.deletion_timestamp.is_some() || is_true(&order, condition::CANCELLED) {
            return Ok(()); // cancelled before we got to it: don't charge
        }
        if !is_true(&order, condition::ACCEPTED) {
            return Err(HandleError::Retryable(
                "the order is not accepted yet".into(),
            ));
        }
        let Some(total) = status.total.clone() else {
            return Err(HandleError::Permanent(
                "an accepted order without a total".into(),
            ));
        };
        let token = match self.token(&order).await? {
            Ok(t) => t,
            Err(why) => return self.fail(&order, r, why, traceparent).await,
        };
        let req = ChargeRequest {
            idempotency_key: format!("{}:charge", r.uid),
            order_uid: r.uid.clone(),
            amount: total.amount,
            currency: total.currency.clone(),
            token,
            description: format!("dishpatch order {}/{}", r.namespace, r.name),
        };
        match self.gateway.charge(&req).await {
            Ok(ChargeOutcome::Succeeded { payment_id }) => {
                let status = PaymentStatus {
                    state: PaymentState::Succeeded,
                    provider: self.gateway.name().into(),
                    payment_id: Some(payment_id),
                    amount: Some(total),
                    charged_at: Some(Time(jiff::Timestamp::now())),
                    failure_reason: None,
                    refund_id: None,
                    refunded_at: None,
                };
                self.access
                    .write(
                        &order,
                        serde_json::to_value(&status)
                            .map_err(|e| HandleError::Permanent(e.to_string()))?,
                    )
                    .await?;
                self.access
                    .publish(r, EventType::PaymentSucceeded, None, traceparent)
                    .await
            }
            Ok(ChargeOutcome::Declined { reason }) => {
                self.fail(&order, r, reason, traceparent).await
            }
            Err(GatewayError::Permanent(why)) => self.fail(&order, r, why, traceparent).await,
            Err(e) => Err(e.into()),
        }
    }

    async fn refund(&self, r: &OrderRef, traceparent: &str) -> Result<(), HandleError> {
        let Some(order) = self.access.order(r).await? else {
            return Ok(());
        };
        let Some(mut payment) = order.status.as_ref().and_then(|s| s.payment.clone()) else {
            return Ok(()); // never charged
        };
        // Refund only what was really called off: a cancelled order, or one
        // deleted before it was delivered. A stray or late order.cancelled
        // must not refund a delivered order.
        let delivered = order
            .status
            .as_ref()
            .and_then(|s| s.delivery.as_ref())
            .is_some_and(|d| d.state == dishpatch_api::order::DeliveryState::Delivered);
        let called_off = is_true(&order, condition::CANCELLED)
            || (order.metadata.deletion_timestamp.is_some() && !delivered);
        if !called_off {
            if order.spec.cancellation.is_some() && !delivered {
                // The operator has not decided yet; ask again shortly.
                return Err(HandleError::Retryable(
                    "the cancellation is not decided yet".into(),
                ));
            }
            return Ok(());
        }
        match payment.state {
            PaymentState::Failed => return Ok(()),
            PaymentState::Refunded => {
                return self
                    .access
                    .publish(r, EventType::PaymentRefunded, None, traceparent)
                    .await;
            }
            PaymentState::Succeeded => {}
        }
        let (Some(payment_id), Some(amount)) = (payment.payment_id.clone(), payment.amount.clone())
        else {
            return Err(HandleError::Permanent(
                "a succeeded payment without id or amount".into(),
            ));
        };
        let refund_id = self
            .gateway
            .refund(&RefundRequest {
                idempotency_key: format!("{}:refund", r.uid),
                order_uid: r.uid.clone(),
                payment_id,
                amount: amount.amount,
                currency: amount.currency,
            })
            .await?;
        payment.state = PaymentState::Refunded;
        payment.refund_id = Some(refund_id);
        payment.refunded_at = Some(Time(jiff::Timestamp::now()));
        self.access
            .write(
                &order,
                serde_json::to_value(&payment)
                    .map_err(|e| HandleError::Permanent(e.to_string()))?,
            )
            .await?;
        self.access
            .publish(r, EventType::PaymentRefunded, None, traceparent)
            .await
    }
}

impl Handler for Payment {
    async fn handle(&self, event: CloudEvent, traceparent: String) -> Result<(), HandleError> {
        let kind = event
            .event_type()
            .map_err(|e| HandleError::Permanent(e.to_string()))?;
        match kind {
            EventType::OrderAccepted => self.charge(&event.data.order, &traceparent).await,
            EventType::OrderCancelled => self.refund(&event.data.order, &traceparent).await,
            // Not bound to this queue; nothing to do.
            _ => Ok(()),
        }
    }
}
