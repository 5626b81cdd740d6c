//! Payment gateways: where money actually moves.

use std::future::Future;
use std::pin::Pin;

/// A charge to make, once per idempotency key.
#[derive(Debug, Clone)]
pub struct ChargeRequest {
    /// Derived from the order's uid: the same order is never charged twice.
    pub idempotency_key: String,
    pub order_uid: String,
    /// The order, for the provider's metadata (its webhooks name it).
    pub order: dishpatch_api::events::OrderRef,
    pub amount: i64,
    pub currency: String,
    /// A provider token (`tok_…`, `pm_…`); never card data.
    pub token: String,
    pub description: String,
}

/// A refund of a charge, once per idempotency key.
#[derive(Debug, Clone)]
pub struct RefundRequest {
    pub idempotency_key: String,
    pub order_uid: String,
    pub payment_id: String,
    pub amount: i64,
    pub currency: String,
}

/// What a charge came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    Succeeded {
        payment_id: String,
    },
    /// The provider waits for the customer (3-D Secure): the outcome comes
    /// later, by webhook (or a later [`PaymentGateway::lookup`]).
    RequiresAction {
        payment_id: String,
        /// Where the customer completes it, when the provider gives a page.
        url: Option<String>,
    },
    /// The card was refused: a final answer, not an error.
    Declined {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// Try again later (network, 5xx, rate limit); the idempotency key makes it safe.
    #[error("retryable gateway error: {0}")]
    Retryable(String),
    /// The request itself is wrong; trying again won't help.
    #[error("gateway rejected the request: {0}")]
    Permanent(String),
}

pub type GatewayFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, GatewayError>> + Send + 'a>>;

pub trait PaymentGateway: Send + Sync {
    /// `simulated` or `stripe`, recorded in `status.payment.provider`.
    fn name(&self) -> &'static str;
    fn charge<'a>(&'a self, req: &'a ChargeRequest) -> GatewayFuture<'a, ChargeOutcome>;
    /// Returns the refund's id.
    fn refund<'a>(&'a self, req: &'a RefundRequest) -> GatewayFuture<'a, String>;
    /// Where a charge that waited for the customer stands now (`None`: still
    /// waiting). Gateways that never wait have nothing to look up.
    fn lookup<'a>(&'a self, _payment_id: &'a str) -> GatewayFuture<'a, Option<ChargeOutcome>> {
        Box::pin(async { Ok(None) })
    }
    /// Calls off a charge that still waits for the customer, so it can never
    /// complete.
    fn cancel<'a>(&'a self, _payment_id: &'a str) -> GatewayFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }
    /// Whether this replica can record money moving at all (`Err` says why
    /// not): a local ledger that can't be written is a fault of the replica,
    /// not of the order. A remote provider's errors are per request.
    fn probe(&self) -> Result<(), String> {
        Ok(())
    }
}
