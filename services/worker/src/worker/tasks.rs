//! The worker's tasks (merge, restore, clone): recording a new one,
//! running one in the background to its end (saved, with its error), and
//! the task calls: get, list, wait. The task table itself is
//! [`crate::tasks`].

use std::sync::Arc;
use std::time::Duration;

use cowsnap_proto::names;

use super::{Inner, Worker};
use crate::error::{Result, WorkerError};
use crate::state::{TaskKind, TaskRec, now};
use crate::tasks::TaskHandle;

impl Worker {
    /// A new task of `kind`, numbered after the last one.
    pub(super) fn new_task(
        &self,
        inner: &mut Inner,
        kind: TaskKind,
        target: String,
        source: String,
    ) -> Arc<TaskHandle> {
        inner.st.next_task += 1;
        self.tasks.insert(TaskRec {
            id: inner.st.next_task.to_string(),
            kind,
            target,
            source,
            done: false,
            error: None,
            done_units: 0,
            total_units: 0,
            create_time: now(),
        })
    }

    /// Runs `task` in the background; when it ends, saves it done (with
    /// its error, if it failed).
    pub(super) fn spawn_task(self: &Arc<Self>, task: Arc<TaskHandle>) {
        let w = self.clone();
        tokio::spawn(async move {
            let rec = task.get();
            let r = match rec.kind {
                TaskKind::Merge => w.run_merge(&task).await,
                TaskKind::Restore | TaskKind::Clone => w.run_copy(&task).await,
            };
            if let Err(e) = &r {
                tracing::error!(task = %rec.id, kind = rec.kind.as_str(), target = %rec.target, "task failed: {e}");
            }
            task.update(|t| {
                if !t.done {
                    t.done = true;
                    t.error = r.err().map(|e| e.client_message());
                }
            });
            let mut inner = w.inner.lock().await;
            if let Err(e) = w.save(&mut inner) {
                tracing::error!("cannot save the worker state: {e}");
            }
        });
    }

    fn task(&self, name: &str) -> Result<Arc<TaskHandle>> {
        let id = names::parse_in("tasks", name).map_err(|e| WorkerError::invalid("name", e))?;
        self.tasks
            .get(id)
            .ok_or_else(|| WorkerError::NotFound(format!("{name} not found")))
    }

    pub fn get_task(&self, name: &str) -> Result<TaskRec> {
        Ok(self.task(name)?.get())
    }

    pub fn list_tasks(&self) -> Vec<TaskRec> {
        self.tasks.list()
    }

    pub async fn wait_task(&self, name: &str, timeout: Duration) -> Result<TaskRec> {
        Ok(self.task(name)?.wait(timeout).await)
    }
}
