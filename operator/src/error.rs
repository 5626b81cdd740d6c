//! The operator's error type.

use dishpatch_messaging::PublishError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("publishing: {0}")]
    Publish(#[from] PublishError),
    #[error("encoding: {0}")]
    Json(#[from] serde_json::Error),
    #[error("finalizer: {0}")]
    Finalizer(Box<kube::runtime::finalizer::Error<Error>>),
    #[error("{0}")]
    Conflict(String),
    /// The order history database refused or could not be reached; the
    /// delete that waits for it is retried with backoff.
    #[error("{0}")]
    Archive(#[from] dishpatch_archive::Error),
    /// Not a failure: deletion waits for a worker to compensate; look again
    /// after the given time.
    #[error("waiting: {0}")]
    Waiting(String, std::time::Duration),
}

impl Error {
    /// Every [`kind`](Self::kind): the metrics start each at zero, so an
    /// error rate exists (as 0) before the first error.
    pub const KINDS: [&'static str; 7] = [
        "kube",
        "publish",
        "json",
        "finalizer",
        "conflict",
        "waiting",
        "archive",
    ];

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Publish(_) => "publish",
            Error::Json(_) => "json",
            Error::Finalizer(_) => "finalizer",
            Error::Conflict(_) => "conflict",
            Error::Waiting(..) => "waiting",
            Error::Archive(_) => "archive",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kinds_of_constructible_errors_are_listed() {
        let json = serde_json::from_str::<u8>("x").unwrap_err();
        let errors = [
            Error::Json(json),
            Error::Conflict("lost a race".into()),
            Error::Waiting("refund".into(), std::time::Duration::from_secs(1)),
            Error::Kube(kube::Error::LinesCodecMaxLineLengthExceeded),
            Error::Archive(dishpatch_archive::Error::Unarchivable("no uid".into())),
        ];
        for e in &errors {
            assert!(Error::KINDS.contains(&e.kind()), "{} not listed", e.kind());
        }
    }
}
