//! Where the JWT keys come from, and the loop that re-reads them so a
//! rotation needs no restart.
//!
//! The source is polled (`--jwt-key-poll-interval`) rather than watched
//! with inotify: the kubelet refreshes a mounted Secret only every minute
//! or so, so a watch would gain nothing measurable, while a poll needs no
//! care for the `..data` symlink swap, a file replaced by rename, inotify
//! limits, or file systems without inotify; and one loop serves files,
//! directories and Secrets read through the API alike. A read that finds
//! what the last one found costs a few small reads and no parsing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use crate::auth::{KeyError, KeySet, Keys, RawKeys};
use crate::metrics::{Metrics, ReloadLabels};

pub enum KeySource {
    /// `--jwt-key-file`: one key.
    File(PathBuf),
    /// `--jwt-key-dir`: one file per key, named by its kid (a Secret
    /// mounted as a volume).
    Dir(PathBuf),
    /// `--jwt-secret`: one data entry per key, named by its kid.
    Secret {
        api: Box<Api<Secret>>,
        name: String,
        timeout: Duration,
    },
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "key file {}", p.display()),
            Self::Dir(p) => write!(f, "key directory {}", p.display()),
            Self::Secret { name, .. } => write!(f, "Secret {name}"),
        }
    }
}

fn io_error(path: &Path, source: std::io::Error) -> KeyError {
    KeyError::Read {
        path: path.display().to_string(),
        source,
    }
}

/// The entries of a key directory. Hidden names are skipped (the kubelet's
/// `..data` link and timestamped directories), and so are subdirectories.
/// When `..data` exists, the directory it points to is read: that is one
/// consistent version of the Secret, while the visible links are made and
/// removed one by one after the kubelet's swap.
pub fn read_dir(dir: &Path) -> Result<RawKeys, KeyError> {
    let read = || -> Result<RawKeys, KeyError> {
        let base = match std::fs::canonicalize(dir.join("..data")) {
            Ok(target) => target,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => dir.to_path_buf(),
            Err(e) => return Err(io_error(dir, e)),
        };
        let mut entries = BTreeMap::new();
        for entry in std::fs::read_dir(&base).map_err(|e| io_error(&base, e))? {
            let entry = entry.map_err(|e| io_error(&base, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                return Err(KeyError::BadKid(name.to_string_lossy().into_owned()));
            };
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            // Follows symlinks, as reading does.
            if std::fs::metadata(&path)
                .map_err(|e| io_error(&path, e))?
                .is_dir()
            {
                continue;
            }
            let value = std::fs::read(&path).map_err(|e| io_error(&path, e))?;
            entries.insert(name.to_string(), value);
        }
        Ok(RawKeys::Set(entries))
    };
    match read() {
        // The kubelet removed the version just resolved (it deletes the old
        // one right after a swap): the next read finds the new one.
        Err(KeyError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            read()
        }
        other => other,
    }
}

impl KeySource {
    pub async fn read(&self) -> Result<RawKeys, KeyError> {
        match self {
            Self::File(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || crate::auth::read_key_file(&path))
                    .await
                    .unwrap_or_else(|e| Err(KeyError::Task(e.to_string())))
            }
            Self::Dir(dir) => {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || read_dir(&dir))
                    .await
                    .unwrap_or_else(|e| Err(KeyError::Task(e.to_string())))
            }
            Self::Secret { api, name, timeout } => {
                let secret = tokio::time::timeout(*timeout, api.get(name))
                    .await
                    .map_err(|_| KeyError::Secret(format!("{name}: timed out")))?
                    .map_err(|e| KeyError::Secret(format!("{name}: {e}")))?;
                Ok(RawKeys::Set(
                    secret
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0))
                        .collect(),
                ))
            }
        }
    }

    /// Reads and checks the keys once (at start: a failure stops the façade).
    pub async fn load(&self) -> Result<(RawKeys, KeySet), KeyError> {
        let raw = self.read().await?;
        let set = KeySet::parse(&raw)?;
        Ok((raw, set))
    }
}

/// Re-reads `source` every `interval` and swaps a changed, valid key set
/// into `keys`. A set that can't be read or is invalid keeps the last good
/// keys (the façade stays ready: it still verifies what it did), is logged
/// once per distinct failure, and counted in
/// `dishpatch_facade_jwt_key_reloads_total{result="error"}`.
pub async fn reload(
    source: KeySource,
    keys: Keys,
    metrics: Arc<Metrics>,
    interval: Duration,
    mut seen: RawKeys,
) {
    let mut failing: Option<String> = None;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let outcome = match source.read().await {
            Ok(raw) if raw == seen => None,
            Ok(raw) => {
                let parsed = KeySet::parse(&raw);
                seen = raw;
                Some(parsed)
            }
            Err(e) => Some(Err(e)),
        };
        match outcome {
            None => failing = None,
            Some(Ok(set)) => {
                failing = None;
                let kids = set.kids().join(",");
                let signer = set.signer().map(str::to_string);
                let change = keys.replace(set);
                metrics.key_reloads.get_or_create(&ReloadLabels::OK).inc();
                tracing::info!(
                    %source, keys = %kids, added = ?change.added, retired = ?change.retired,
                    ?signer, signer_changed = change.signer.is_some(), "reloaded the JWT keys"
                );
            }
            Some(Err(e)) => {
                let message = e.to_string();
                if failing.as_deref() != Some(message.as_str()) {
                    metrics
                        .key_reloads
                        .get_or_create(&ReloadLabels::ERROR)
                        .inc();
                    tracing::error!(
                        %source, error = %message,
                        "the JWT key set is unusable; keeping the last good keys"
                    );
                    failing = Some(message);
                }
            }
        }
        metrics
            .jwt_keys
            .set(i64::try_from(keys.accepted_at(Instant::now())).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_mounted_secret_is_read_through_its_data_link() {
        let dir = std::env::temp_dir().join(format!("keysource-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let version = dir.join("..2026_12_01_00_00_00.1");
        std::fs::create_dir_all(version.join("nested")).unwrap();
        std::fs::write(version.join("a"), "key-a-0123456789abcdef").unwrap();
        std::fs::write(version.join("current"), "a").unwrap();
        std::os::unix::fs::symlink("..2026_12_01_00_00_00.1", dir.join("..data")).unwrap();
        // A visible link the kubelet has not removed yet, to a key gone
        // from the version `..data` names: not part of the set.
        std::os::unix::fs::symlink("..data/old", dir.join("old")).unwrap();
        std::os::unix::fs::symlink("..data/a", dir.join("a")).unwrap();
        let RawKeys::Set(entries) = read_dir(&dir).unwrap() else {
            panic!("a directory is a set")
        };
        assert_eq!(
            entries.keys().collect::<Vec<_>>(),
            ["a", "current"],
            "hidden names and directories are not keys"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
