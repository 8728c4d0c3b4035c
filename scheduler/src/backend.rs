//! What a host stores jobs in: the [`JobsBackend`] trait (create, read, delete), implemented by
//! the embedded scheduler ([`SchedulerHandle`], standalone mode) and by the remote client
//! ([`crate::client::Client`], `--scheduler-host-address`). The host's Jobs API and reminder
//! routes are written once, against this trait.

use async_trait::async_trait;

use crate::engine::SchedulerHandle;
use crate::job::{Job, JobKey};
use crate::store::{PutOutcome, StoreError};

/// What a create did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// Stored, replacing an older job of that key if `replaced`.
    Stored { replaced: bool },
    /// `overwrite` was false and a job with that key exists; nothing was written.
    AlreadyExists,
    /// The job has no tick to fire; nothing was stored (an older job of that key was removed).
    NeverFires { replaced: bool },
}

impl From<PutOutcome> for Created {
    fn from(p: PutOutcome) -> Self {
        match p {
            PutOutcome::Stored { replaced, .. } => Created::Stored { replaced },
            PutOutcome::AlreadyExists => Created::AlreadyExists,
            PutOutcome::NeverFires { replaced } => Created::NeverFires { replaced },
        }
    }
}

/// Why a backend call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No scheduler replica answered (all down, or no leader yet).
    #[error("scheduler unavailable: {0}")]
    Unavailable(String),
    /// A replica answered with an error.
    #[error("scheduler: {0}")]
    Remote(String),
}

/// Create, read and delete jobs. Creates and deletes return once durable.
#[async_trait]
pub trait JobsBackend: Send + Sync + 'static {
    async fn create(&self, job: Job, overwrite: bool) -> Result<Created, BackendError>;
    async fn get(&self, key: &JobKey) -> Result<Option<Job>, BackendError>;
    /// After it returns, the only tick of the job that can still arrive is one already sent.
    async fn delete(&self, key: &JobKey) -> Result<bool, BackendError>;
}

#[async_trait]
impl JobsBackend for SchedulerHandle {
    async fn create(&self, job: Job, overwrite: bool) -> Result<Created, BackendError> {
        Ok(SchedulerHandle::create(self, job, overwrite).await?.into())
    }

    async fn get(&self, key: &JobKey) -> Result<Option<Job>, BackendError> {
        Ok(SchedulerHandle::get(self, key)?.map(|s| s.job))
    }

    async fn delete(&self, key: &JobKey) -> Result<bool, BackendError> {
        Ok(SchedulerHandle::delete(self, key).await?)
    }
}
