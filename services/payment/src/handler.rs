//! Payment's stage: charge accepted orders, refund cancelled ones.

use std::sync::Arc;

use dishpatch_api::events::{CloudEvent, EventType, OrderRef};
use dishpatch_api::lifecycle::{condition, find};
use dishpatch_api::order::{PaymentState, PaymentStatus};
use dishpatch_api::{Money, Order};
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
            failure_reason: Some(reason.clone()),
            ..PaymentStatus::new(PaymentState::Failed, self.gateway.name())
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

    /// The payment section for a charge's outcome.
    fn outcome_status(&self, total: &Money, outcome: &ChargeOutcome) -> PaymentStatus {
        match outcome {
            ChargeOutcome::Succeeded { payment_id } => PaymentStatus {
                payment_id: Some(payment_id.clone()),
                amount: Some(total.clone()),
                charged_at: Some(Time(jiff::Timestamp::now())),
                ..PaymentStatus::new(PaymentState::Succeeded, self.gateway.name())
            },
            ChargeOutcome::RequiresAction { payment_id, url } => PaymentStatus {
                payment_id: Some(payment_id.clone()),
                amount: Some(total.clone()),
                action_url: url.clone(),
                ..PaymentStatus::new(PaymentState::RequiresAction, self.gateway.name())
            },
            ChargeOutcome::Declined { reason } => PaymentStatus {
                failure_reason: Some(reason.clone()),
                ..PaymentStatus::new(PaymentState::Failed, self.gateway.name())
            },
        }
    }

    /// Calls the gateway for the order's one charge (the idempotency key
    /// makes a repeat return the first outcome) and records the outcome over
    /// the `Pending` intent. Returns the order as written, or `None` when
    /// someone else recorded the outcome first.
    async fn settle_charge(
        &self,
        order: Order,
        r: &OrderRef,
        total: &Money,
        token: String,
    ) -> Result<Option<(Order, PaymentStatus)>, HandleError> {
        let req = ChargeRequest {
            idempotency_key: format!("{}:charge", r.uid),
            order_uid: r.uid.clone(),
            order: r.clone(),
            amount: total.amount,
            currency: total.currency.clone(),
            token,
            description: format!("dishpatch order {}/{}", r.namespace, r.name),
        };
        let outcome = match self.gateway.charge(&req).await {
            Ok(outcome) => outcome,
            Err(GatewayError::Permanent(why)) => ChargeOutcome::Declined { reason: why },
            Err(e) => return Err(e.into()),
        };
        let status = self.outcome_status(total, &outcome);
        let section = to_value(&status)?;
        // Conditional, so an outcome never overwrites a refund recorded by a
        // concurrent resolution of the same intent.
        let mut current = order;
        loop {
            if let Some(written) = self
                .access
                .write_if_unchanged(&current, section.clone())
                .await?
            {
                return Ok(Some((written, status)));
            }
            match self.access.order(r).await? {
                Some(o) if payment_state(&o) == Some(PaymentState::Pending) => current = o,
                _ => return Ok(None),
            }
        }
    }

    async fn charge(&self, r: &OrderRef, traceparent: &str) -> Result<(), HandleError> {
        let Some(order) = self.access.order(r).await? else {
            return Ok(()); // gone: nothing to charge
        };
        let status = order.status.clone().unwrap_or_default();
        if let Some(p) = &status.payment {
            // Already handled: the event may not have gone out before a crash.
            let kind = match p.state {
                PaymentState::Pending => return self.resolve(order, r, traceparent).await,
                PaymentState::RequiresAction => {
                    return self.look_again(order, r, traceparent).await;
                }
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
        // Record the intent before money can move, on the object we decided
        // from: if the order was cancelled or deleted since we read it, the
        // write is refused and nothing is charged. Once it is there, deletion
        // and cancellation wait until the charge is settled.
        let pending = PaymentStatus {
            amount: Some(total.clone()),
            ..PaymentStatus::new(PaymentState::Pending, self.gateway.name())
        };
        let Some(order) = self
            .access
            .write_if_unchanged(&order, to_value(&pending)?)
            .await?
        else {
            return Err(HandleError::Retryable(
                "the order changed before the charge; deciding again".into(),
            ));
        };
        match self.settle_charge(order, r, &total, token).await? {
            Some((_, status)) => self.announce(r, &status, traceparent).await,
            None => Ok(()),
        }
    }

    /// Publishes what a recorded charge came to.
    async fn announce(
        &self,
        r: &OrderRef,
        status: &PaymentStatus,
        traceparent: &str,
    ) -> Result<(), HandleError> {
        let kind = match status.state {
            PaymentState::Succeeded => EventType::PaymentSucceeded,
            PaymentState::Failed => EventType::PaymentFailed,
            PaymentState::Pending | PaymentState::RequiresAction | PaymentState::Refunded => {
                return Ok(());
            }
        };
        self.access
            .publish(r, kind, status.failure_reason.clone(), traceparent)
            .await
    }

    /// A `Pending` intent whose charge may or may not have reached the
    /// provider (a crash in between): ask again with the same idempotency
    /// key, which returns the first outcome or makes the one charge now.
    async fn resolve(
        &self,
        order: Order,
        r: &OrderRef,
        traceparent: &str,
    ) -> Result<(), HandleError> {
        let Some(total) = order
            .status
            .as_ref()
            .and_then(|s| s.payment.as_ref())
            .and_then(|p| p.amount.clone())
        else {
            return Err(HandleError::Permanent(
                "a pending payment without an amount".into(),
            ));
        };
        let token = match self.token(&order).await? {
            Ok(t) => t,
            // The token is gone too: the provider never saw a charge we
            // could repeat, so record the failure.
            Err(why) => return self.fail(&order, r, why, traceparent).await,
        };
        match self.settle_charge(order, r, &total, token).await? {
            Some((_, status)) => self.announce(r, &status, traceparent).await,
            None => Ok(()),
        }
    }

    /// A charge that waits for the customer, when its order's event comes
    /// again (the payment deadline): the webhook may have been lost, so ask
    /// the provider where it stands, and record it if it settled.
    async fn look_again(
        &self,
        order: Order,
        r: &OrderRef,
        traceparent: &str,
    ) -> Result<(), HandleError> {
        let Some(payment) = order.status.as_ref().and_then(|s| s.payment.clone()) else {
            return Ok(());
        };
        let Some(payment_id) = payment.payment_id.clone() else {
            return Ok(());
        };
        let Some(outcome) = self.gateway.lookup(&payment_id).await? else {
            return Ok(()); // still waiting for the customer
        };
        let Some(total) = payment.amount.clone() else {
            return Err(HandleError::Permanent(
                "a waiting payment without an amount".into(),
            ));
        };
        let mut status = self.outcome_status(&total, &outcome);
        status.webhook_events = payment.webhook_events.clone();
        match self
            .access
            .write_if_unchanged(&order, to_value(&status)?)
            .await?
        {
            Some(_) => self.announce(r, &status, traceparent).await,
            None => Err(HandleError::Retryable(
                "the order changed while looking at its charge".into(),
            )),
        }
    }

    /// Calls off a charge that waits for the customer: the intent is
    /// cancelled at the provider, so it can never complete, and recorded
    /// as failed.
    async fn call_off(&self, order: &Order, payment: PaymentStatus) -> Result<(), HandleError> {
        if let Some(id) = &payment.payment_id {
            self.gateway.cancel(id).await?;
        }
        let status = PaymentStatus {
            state: PaymentState::Failed,
            action_url: None,
            failure_reason: Some(
                "called off while waiting for the customer; the payment intent was cancelled"
                    .into(),
            ),
            ..payment
        };
        match self
            .access
            .write_if_unchanged(order, to_value(&status)?)
            .await?
        {
            Some(_) => Ok(()),
            None => Err(HandleError::Retryable(
                "the order changed while calling off its charge".into(),
            )),
        }
    }

    async fn refund(&self, r: &OrderRef, traceparent: &str) -> Result<(), HandleError> {
        let Some(mut order) = self.access.order(r).await? else {
            // The operator's finalizer keeps a charged order until it is
            // refunded; an order gone is one that needed nothing.
            return Ok(());
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
        if payment_state(&order) == Some(PaymentState::Pending) {
            // Settle the charge first, then refund what it came to.
            self.resolve(order, r, traceparent).await?;
            let Some(fresh) = self.access.order(r).await? else {
                return Ok(());
            };
            order = fresh;
        }
        let Some(mut payment) = order.status.as_ref().and_then(|s| s.payment.clone()) else {
            return Ok(()); // never charged, and never will be: the intent comes first
        };
        match payment.state {
            PaymentState::Failed => return Ok(()),
            PaymentState::RequiresAction => return self.call_off(&order, payment).await,
            PaymentState::Pending => {
                return Err(HandleError::Retryable(
                    "the charge is not settled yet".into(),
                ));
            }
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
        self.access.write(&order, to_value(&payment)?).await?;
        self.access
            .publish(r, EventType::PaymentRefunded, None, traceparent)
            .await
    }
}

fn payment_state(order: &Order) -> Option<PaymentState> {
    order
        .status
        .as_ref()
        .and_then(|s| s.payment.as_ref())
        .map(|p| p.state)
}

fn to_value(status: &PaymentStatus) -> Result<serde_json::Value, HandleError> {
    serde_json::to_value(status).map_err(|e| HandleError::Permanent(e.to_string()))
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

    async fn probe(&self) -> Result<(), String> {
        self.gateway.probe()
    }
}
