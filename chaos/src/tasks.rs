//! Background tasks that end with their owner: the relay's and the host
//! switch's forwarding loops and delayed sends.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::task::JoinHandle;

/// A shared set of spawned tasks. Clones share the set, so a task can add
/// the ones it spawns; the owner calls [`Tasks::abort_all`] when it drops.
#[derive(Debug, Clone, Default)]
pub struct Tasks(Arc<Mutex<Vec<JoinHandle<()>>>>);

impl Tasks {
    fn lock(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spawns `task` into the set, forgetting the ones that ended.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        let mut tasks = self.lock();
        tasks.retain(|t| !t.is_finished());
        tasks.push(handle);
    }

    /// Aborts every task in the set.
    pub fn abort_all(&self) {
        for task in self.lock().drain(..) {
            task.abort();
        }
    }
}
