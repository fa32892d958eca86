//! CPU-heavy request work (parsing a JSON body, rendering the chat template, tokenizing) runs
//! here, on tokio's blocking pool, never on the async workers: one large request must not
//! stall `/health` or the streams of others. At most `permits` jobs run at once (the machine's
//! cores); the others wait their turn without holding a thread.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::openai::error::ApiError;

#[derive(Debug, Clone)]
pub struct CpuPool {
    permits: Arc<Semaphore>,
}

impl CpuPool {
    pub fn new(permits: usize) -> Self {
        CpuPool {
            permits: Arc::new(Semaphore::new(permits.max(1))),
        }
    }

    /// A pool as wide as the machine.
    pub fn per_core() -> Self {
        Self::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
    }

    /// Runs `job` on the blocking pool once a permit is free.
    pub async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::internal("the request worker pool is shut down"))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            job()
        })
        .await
        .map_err(|_| ApiError::internal("internal error while preparing the request"))
    }
}
