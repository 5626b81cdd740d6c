//! Courier status writes with optimistic concurrency: every write carries the
//! resourceVersion it was computed from, so two replicas can never both
//! change the same courier on the strength of what they read.

use dishpatch_api::courier::{Courier, CourierStatus};
use dishpatch_worker::HandleError;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};

/// A status write's outcome.
#[derive(Debug)]
pub enum Cas {
    /// Written; the courier as stored now.
    Written(Box<Courier>),
    /// The change no longer applies to the courier as it is now.
    NotApplicable,
    /// No such courier.
    Gone,
}

/// Conflicts in a row before giving up for now (the caller retries later).
const MAX_CONFLICTS: u32 = 10;

#[derive(Clone)]
pub struct Couriers {
    pub client: Client,
    pub manager: &'static str,
}

impl Couriers {
    pub fn api(&self, namespace: &str) -> Api<Courier> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// Couriers of one zone (`spec.zone` is a selectable field, so the
    /// apiserver filters). Always a fresh read.
    pub async fn in_zone(&self, namespace: &str, zone: &str) -> Result<Vec<Courier>, kube::Error> {
        let list = self
            .api(namespace)
            .list(&ListParams::default().fields(&format!("spec.zone={zone}")))
            .await?;
        Ok(list.items)
    }

    /// Couriers in `namespace`, or everywhere.
    pub async fn all(&self, namespace: Option<&str>) -> Result<Vec<Courier>, kube::Error> {
        let api: Api<Courier> = match namespace {
            Some(ns) => self.api(ns),
            None => Api::all(self.client.clone()),
        };
        Ok(api.list(&ListParams::default()).await?.items)
    }

    /// Compare-and-swap on the courier's status: `change` computes the new
    /// status from the courier as read (`None`: it no longer applies), and
    /// the write carries that read's resourceVersion. On a conflict it reads
    /// again and asks `change` again. `seen` saves the first read.
    pub async fn update(
        &self,
        namespace: &str,
        name: &str,
        seen: Option<Courier>,
        change: impl Fn(&Courier) -> Option<CourierStatus>,
    ) -> Result<Cas, HandleError> {
        let api = self.api(namespace);
        let params = PostParams {
            field_manager: Some(self.manager.to_string()),
            ..Default::default()
        };
        let mut current = seen;
        for _ in 0..MAX_CONFLICTS {
            let mut courier = match current.take() {
                Some(c) => c,
                None => match api.get_opt(name).await? {
                    Some(c) => c,
                    None => return Ok(Cas::Gone),
                },
            };
            let Some(status) = change(&courier) else {
                return Ok(Cas::NotApplicable);
            };
            if courier.status.as_ref() == Some(&status) {
                return Ok(Cas::Written(Box::new(courier)));
            }
            courier.status = Some(status);
            // Managed fields would be rejected or misattributed on a replace.
            courier.metadata.managed_fields = None;
            match api.replace_status(name, &params, &courier).await {
                Ok(c) => return Ok(Cas::Written(Box::new(c))),
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    tracing::debug!(courier = %name, "courier changed under us; reading it again");
                }
                Err(kube::Error::Api(s)) if s.code == 404 => return Ok(Cas::Gone),
                Err(e) => return Err(e.into()),
            }
        }
        Err(HandleError::Retryable(format!(
            "courier {namespace}/{name} kept changing; giving up for now"
        )))
    }

    /// Removes a request annotation if it still says `value` (the
    /// resourceVersion in the patch makes it conditional).
    pub async fn clear_request(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
        value: &str,
    ) -> Result<(), HandleError> {
        let api = self.api(namespace);
        let params = PatchParams {
            field_manager: Some(self.manager.to_string()),
            ..Default::default()
        };
        for _ in 0..MAX_CONFLICTS {
            let Some(c) = api.get_opt(name).await? else {
                return Ok(());
            };
            if c.annotations().get(key).map(String::as_str) != Some(value) {
                return Ok(());
            }
            let patch = serde_json::json!({
                "metadata": {
                    "resourceVersion": c.resource_version(),
                    "annotations": { key: null },
                }
            });
            match api.patch(name, &params, &Patch::Merge(&patch)).await {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        Err(HandleError::Retryable(format!(
            "courier {namespace}/{name} kept changing; giving up for now"
        )))
    }

    /// Frees `courier` of `order` if (and only if) it still refers to it.
    pub async fn free(
        &self,
        namespace: &str,
        courier: &str,
        order: &str,
    ) -> Result<bool, HandleError> {
        let outcome = self
            .update(namespace, courier, None, |c| {
                crate::dispatch::freed(c.status.as_ref(), order, c.spec.on_shift)
            })
            .await?;
        let freed = matches!(outcome, Cas::Written(_));
        if freed {
            tracing::info!(courier = %format!("{namespace}/{courier}"), %order, "courier freed");
        }
        Ok(freed)
    }
}
