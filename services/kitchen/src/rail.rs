//! Where a restaurant's rail lives: one ConfigMap per restaurant, read and
//! replaced with its resourceVersion as the precondition, so replicas take
//! turns instead of overwriting each other's tickets. Within a replica the
//! changes waiting for a rail are written together.

use std::collections::{BTreeMap, HashMap};
use std::sync::{LazyLock, Mutex};

use dishpatch_api::Restaurant;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, PostParams};
use kube::{Client, Resource, ResourceExt};

use crate::schedule::Rail;

/// The ConfigMap key holding the rail (JSON).
const KEY: &str = "rail";
/// Read-modify-write rounds before giving up (the caller retries later).
const ATTEMPTS: usize = 30;
/// A rail this long refuses new tickets (retried later): a ConfigMap holds
/// at most 1 MiB, and a ticket takes about 200 bytes.
pub const MAX_TICKETS: usize = 4000;

#[derive(Debug, thiserror::Error)]
pub enum RailError {
    #[error("the restaurant {0} has no uid")]
    NoUid(String),
    #[error("the rail {0} does not parse: {1}")]
    Invalid(String, serde_json::Error),
    #[error("the rail {0} kept changing under {ATTEMPTS} attempts")]
    Contended(String),
    #[error("writing the rail: {0}")]
    Batch(String),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// Changes waiting for a rail's committer, and whether one runs.
#[derive(Default)]
struct Queue {
    changes: Vec<Box<dyn Change>>,
    running: bool,
}

/// The changes this process makes to each rail go through one committer
/// per rail, which applies every change waiting at that moment in one read
/// and one write: bookings arriving together cost one rail write, not one
/// each, and never conflict with each other; only other replicas do.
static QUEUES: LazyLock<Mutex<HashMap<String, Queue>>> = LazyLock::new(Mutex::default);

fn queues() -> std::sync::MutexGuard<'static, HashMap<String, Queue>> {
    QUEUES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One caller's change, applied (again, after a conflict) to the rail as read.
trait Change: Send {
    /// Whether it changed the rail.
    fn apply(&mut self, rail: &mut Rail) -> bool;
    /// The restaurant, if the change may create the rail.
    fn owner(&self) -> Option<&Restaurant>;
    /// Hands the outcome of the batch back to the caller.
    fn finish(self: Box<Self>, written: Result<&Rail, &str>);
}

struct Pending<T, F> {
    change: F,
    owner: Option<Restaurant>,
    out: Option<T>,
    reply: tokio::sync::oneshot::Sender<Result<(Rail, T), RailError>>,
}

impl<T, F> Change for Pending<T, F>
where
    T: Send,
    F: FnMut(&mut Rail) -> (bool, T) + Send,
{
    fn apply(&mut self, rail: &mut Rail) -> bool {
        let (changed, out) = (self.change)(rail);
        self.out = Some(out);
        changed
    }

    fn owner(&self) -> Option<&Restaurant> {
        self.owner.as_ref()
    }

    fn finish(self: Box<Self>, written: Result<&Rail, &str>) {
        let result = match (written, self.out) {
            (Ok(rail), Some(out)) => Ok((rail.clone(), out)),
            (Ok(_), None) => Err(RailError::Batch("the change was never applied".into())),
            (Err(e), _) => Err(RailError::Batch(e.to_string())),
        };
        // The caller may have gone (its handler was cancelled): nothing to tell.
        let _ = self.reply.send(result);
    }
}

/// Which rail: the restaurant's namespace and uid, and its name for logs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RailKey {
    pub namespace: String,
    pub restaurant: String,
    pub uid: String,
}

impl RailKey {
    pub fn of(restaurant: &Restaurant) -> Result<Self, RailError> {
        Ok(Self {
            namespace: restaurant.namespace().unwrap_or_default(),
            restaurant: restaurant.name_any(),
            uid: restaurant
                .uid()
                .ok_or_else(|| RailError::NoUid(restaurant.name_any()))?,
        })
    }

    /// Named after the restaurant's uid: a recreated restaurant starts an
    /// empty rail, and the name fits whatever the restaurant is called.
    pub fn configmap(&self) -> String {
        format!("kitchen-{}", self.uid)
    }
}

/// The rail of one restaurant.
#[derive(Clone)]
pub struct Store {
    api: Api<ConfigMap>,
    key: RailKey,
}

impl Store {
    pub fn new(client: &Client, key: RailKey) -> Self {
        Self {
            api: Api::namespaced(client.clone(), &key.namespace),
            key,
        }
    }

    pub fn key(&self) -> &RailKey {
        &self.key
    }

    /// The rail as it is now (empty if it was never written or is gone).
    pub async fn read(&self) -> Result<Rail, RailError> {
        Ok(self.load().await?.1)
    }

    async fn load(&self) -> Result<(Option<ConfigMap>, Rail), RailError> {
        let name = self.key.configmap();
        let Some(cm) = self.api.get_opt(&name).await? else {
            return Ok((None, Rail::default()));
        };
        let rail = match cm.data.as_ref().and_then(|d| d.get(KEY)) {
            Some(text) => serde_json::from_str(text).map_err(|e| RailError::Invalid(name, e))?,
            None => Rail::default(),
        };
        Ok((Some(cm), rail))
    }

    /// Applies `change` to the rail as it is now and writes the result if
    /// `change` says it changed anything, starting over from a fresh read
    /// when another replica wrote first. A missing rail is created only when
    /// `owner` is given (booking); otherwise there is nothing to change.
    /// Returns the rail as written (or found) and `change`'s result.
    pub async fn update<T, F>(
        &self,
        owner: Option<&Restaurant>,
        change: F,
    ) -> Result<(Rail, T), RailError>
    where
        T: Send + 'static,
        F: FnMut(&mut Rail) -> (bool, T) + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let pending = Pending {
            change,
            owner: owner.cloned(),
            out: None,
            reply,
        };
        let id = format!("{}/{}", self.key.namespace, self.key.configmap());
        let start = {
            let mut queues = queues();
            let queue = queues.entry(id.clone()).or_default();
            queue.changes.push(Box::new(pending));
            !std::mem::replace(&mut queue.running, true)
        };
        if start {
            tokio::spawn(self.clone().commit_all(id));
        }
        answer
            .await
            .map_err(|_| RailError::Batch("the rail's committer stopped".into()))?
    }

    /// The committer: takes every waiting change, commits them together,
    /// and stops when none are left.
    async fn commit_all(self, id: String) {
        loop {
            let mut batch = {
                let mut queues = queues();
                let Some(queue) = queues.get_mut(&id) else {
                    return;
                };
                if queue.changes.is_empty() {
                    queues.remove(&id);
                    return;
                }
                std::mem::take(&mut queue.changes)
            };
            match self.commit(&mut batch).await {
                Ok(rail) => batch.into_iter().for_each(|c| c.finish(Ok(&rail))),
                Err(e) => {
                    let e = e.to_string();
                    batch.into_iter().for_each(|c| c.finish(Err(&e)));
                }
            }
        }
    }

    async fn commit(&self, batch: &mut [Box<dyn Change>]) -> Result<Rail, RailError> {
        let name = self.key.configmap();
        for _ in 0..ATTEMPTS {
            let (cm, mut rail) = self.load().await?;
            let mut changed = false;
            for c in batch.iter_mut() {
                changed |= c.apply(&mut rail);
            }
            let owner = batch.iter().find_map(|c| c.owner());
            if !changed || (cm.is_none() && owner.is_none()) {
                return Ok(rail);
            }
            let text =
                serde_json::to_string(&rail).map_err(|e| RailError::Invalid(name.clone(), e))?;
            let data = BTreeMap::from([(KEY.to_string(), text)]);
            let written = match (cm, owner) {
                // Replace carries the resourceVersion read: 409 if anyone wrote since.
                (Some(mut cm), _) => {
                    cm.data = Some(data);
                    self.api.replace(&name, &PostParams::default(), &cm).await
                }
                (None, Some(restaurant)) => {
                    let cm = self.new_rail(restaurant, data)?;
                    self.api.create(&PostParams::default(), &cm).await
                }
                (None, None) => return Ok(rail),
            };
            match written {
                Ok(_) => return Ok(rail),
                // 409: someone wrote since we read, or created it first.
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(RailError::Contended(name))
    }

    /// Owned by the restaurant, so it goes when the restaurant goes.
    fn new_rail(
        &self,
        restaurant: &Restaurant,
        data: BTreeMap<String, String>,
    ) -> Result<ConfigMap, RailError> {
        let owner = OwnerReference {
            api_version: Restaurant::api_version(&()).into_owned(),
            kind: Restaurant::kind(&()).into_owned(),
            name: restaurant.name_any(),
            uid: restaurant
                .uid()
                .ok_or_else(|| RailError::NoUid(restaurant.name_any()))?,
            ..OwnerReference::default()
        };
        Ok(ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.key.configmap()),
                labels: Some(BTreeMap::from([
                    ("app.kubernetes.io/name".into(), "dishpatch".into()),
                    ("app.kubernetes.io/component".into(), "kitchen-rail".into()),
                ])),
                annotations: Some(BTreeMap::from([(
                    "dishpatch.dev/restaurant".into(),
                    restaurant.name_any(),
                )])),
                owner_references: Some(vec![owner]),
                ..ObjectMeta::default()
            },
            data: Some(data),
            ..ConfigMap::default()
        })
    }
}
