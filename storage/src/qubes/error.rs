//! Errors of the volume model. Each names the qube and volume concerned and what the user
//! can do about it, because the controller prints them as they are.

use thiserror::Error;

use super::QubeClass;
use crate::names::NameError;
use crate::pool::PoolError;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("qube {qube} does not exist; `qubes-ctl qube list` shows the qubes there are")]
    NoSuchQube { qube: String },
    #[error("qube {qube} already exists; choose another name, or remove it first with `qubes-ctl qube remove {qube}`")]
    QubeExists { qube: String },
    #[error("qube {qube} has no volume {volume}; its volumes are: {available}")]
    NoSuchVolume {
        qube: String,
        volume: String,
        available: String,
    },
    #[error("{class} {qube} needs a template: pass a {expected} with --template")]
    TemplateRequired {
        qube: String,
        class: QubeClass,
        expected: &'static str,
    },
    #[error("{class} {qube} takes no template; to copy qube {template}, use `qubes-ctl qube clone {template} {qube}`")]
    TemplateNotAllowed {
        qube: String,
        class: QubeClass,
        template: String,
    },
    #[error("{class} {qube} cannot be based on {template}: {template} is a {actual}, and a {expected} is needed")]
    WrongTemplateClass {
        qube: String,
        class: QubeClass,
        template: String,
        actual: QubeClass,
        expected: &'static str,
    },
    #[error("cannot {action}: qube {qube} is running (or was when the controller last stopped); shut it down first with `qubes-ctl qube shutdown {qube}`")]
    Running { qube: String, action: &'static str },
    #[error("qube {qube} is not running; nothing to stop")]
    NotRunning { qube: String },
    #[error("cannot remove qube {qube}: {users} use it as their template; remove them or give them another template first")]
    InUse { qube: String, users: String },
    #[error("volume {qube}:{volume} holds writes of a run that was not committed (qube {qube} runs, or the controller stopped while it ran); start and stop qube {qube} to commit them, or drop them with `qubes-ctl volume discard {qube}:{volume}`")]
    Dirty { qube: String, volume: String },
    #[error("an import into {qube}:{volume} is under way; wait for it to finish, then try again")]
    Busy { qube: String, volume: String },
    #[error("volume {qube}:{volume} has no revision to revert to (it keeps {keep}; raise it with `qubes-ctl volume config {qube}:{volume} revisions_to_keep N`)")]
    NoRevisions {
        qube: String,
        volume: String,
        keep: u32,
    },
    #[error("volume {qube}:{volume} has no revision {revision}; its revisions are: {available}")]
    NoSuchRevision {
        qube: String,
        volume: String,
        revision: String,
        available: String,
    },
    #[error("cannot {op} volume {qube}:{volume}: it is not saved at stop (it is recreated at each start){hint}")]
    NotPersistent {
        qube: String,
        volume: String,
        op: &'static str,
        hint: String,
    },
    #[error(
        "volume {qube}:{volume} is a snapshot of {from} taken at each start; resize {from} instead"
    )]
    FollowsSource {
        qube: String,
        volume: String,
        from: String,
    },
    #[error("volume {qube}:{volume} starts from {from}, which does not exist; recreate qube {qube} with an existing template")]
    SourceMissing {
        qube: String,
        volume: String,
        from: String,
    },
    #[error("volume {qube}:{volume} has no committed head in the pool (pool key {key} is missing); restore the newest revision with `qubes-ctl volume revert {qube}:{volume}`, or import an image with `qubes-ctl volume import {qube}:{volume}`")]
    HeadMissing {
        qube: String,
        volume: String,
        key: String,
    },
    #[error("the stored volume configuration of qube {qube} is unreadable: {reason}; run `qubes-ctl pool verify`")]
    BadConfig { qube: String, reason: String },
    #[error("{op} ({target}): {source}")]
    Pool {
        op: &'static str,
        target: String,
        #[source]
        source: Box<PoolError>,
    },
    #[error("{op} volume {qube}:{volume}: {source}")]
    Io {
        op: &'static str,
        qube: String,
        volume: String,
        #[source]
        source: std::io::Error,
    },
}

impl ModelError {
    /// The pool's own error underneath, if that is what failed (`Busy`, `NoSpace`, ...).
    pub fn pool_error(&self) -> Option<&PoolError> {
        match self {
            ModelError::Pool { source, .. } => Some(source),
            _ => None,
        }
    }

    /// Wraps a pool error with the operation and the qube or volume it was for.
    pub(crate) fn pool(
        op: &'static str,
        target: impl Into<String>,
    ) -> impl FnOnce(PoolError) -> ModelError {
        let target = target.into();
        move |source| ModelError::Pool {
            op,
            target,
            source: Box::new(source),
        }
    }
}
