//! Long-running work (merge, restore, clone) as tasks named `tasks/ID`:
//! their live progress, waiting for them, and the copy loop restore and
//! clone share. The records are persisted with the worker state when a task
//! starts and ends; progress lives in memory (a restarted copy starts over,
//! a restarted merge resumes from what its COW device still holds).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cowsnap_store::{AlignedBuf, Origin, Target};
use futures::StreamExt;
use tokio::sync::watch;

use crate::state::TaskRec;

/// Done tasks kept (the oldest are forgotten).
const KEEP_DONE: usize = 256;

/// A task's record and a channel that ticks on every change.
///
/// A task that has succeeded on disk can be held back from its watchers
/// ([`TaskHandle::succeed_held`]) until the worker has finished making its
/// result usable (exports registered, devices released): whoever sees a
/// task done can use what it made.
pub struct TaskHandle {
    rec: Mutex<TaskRec>,
    held: std::sync::atomic::AtomicBool,
    changed: watch::Sender<u64>,
}

impl TaskHandle {
    pub fn new(rec: TaskRec) -> Arc<TaskHandle> {
        Arc::new(TaskHandle {
            rec: Mutex::new(rec),
            held: std::sync::atomic::AtomicBool::new(false),
            changed: watch::Sender::new(0),
        })
    }

    /// The record as clients see it: a held success still reads as
    /// running.
    pub fn get(&self) -> TaskRec {
        let mut r = self.record();
        if self.held.load(std::sync::atomic::Ordering::Acquire) {
            r.done = false;
        }
        r
    }

    /// The record as it is persisted.
    pub fn record(&self) -> TaskRec {
        self.rec.lock().expect("task").clone()
    }

    /// Marks the task succeeded for the next save, without telling its
    /// watchers until [`TaskHandle::announce`].
    pub fn succeed_held(&self) {
        self.held.store(true, std::sync::atomic::Ordering::Release);
        self.rec.lock().expect("task").succeed();
    }

    /// Shows a held success to the task's watchers.
    pub fn announce(&self) {
        self.held.store(false, std::sync::atomic::Ordering::Release);
        self.changed.send_modify(|n| *n += 1);
    }

    pub fn update(&self, f: impl FnOnce(&mut TaskRec)) {
        f(&mut self.rec.lock().expect("task"));
        self.changed.send_modify(|n| *n += 1);
    }

    pub fn progress(&self, done: u64, total: u64) {
        self.update(|r| {
            r.done_units = done;
            r.total_units = total;
        });
    }

    /// Waits until the task is done or `timeout` passes; returns its record.
    pub async fn wait(&self, timeout: Duration) -> TaskRec {
        let mut rx = self.changed.subscribe();
        let _ = tokio::time::timeout(timeout, async {
            loop {
                if self.get().done {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        self.get()
    }
}

/// Every task of the worker, by id.
#[derive(Default)]
pub struct Tasks {
    map: Mutex<BTreeMap<u64, Arc<TaskHandle>>>,
}

impl Tasks {
    pub fn insert(&self, rec: TaskRec) -> Arc<TaskHandle> {
        let id: u64 = rec.id.parse().expect("task ids are numbers");
        let h = TaskHandle::new(rec);
        let mut map = self.map.lock().expect("tasks");
        map.insert(id, h.clone());
        // Forget the oldest done tasks beyond the limit.
        let done: Vec<u64> = map
            .iter()
            .filter(|(_, t)| t.get().done)
            .map(|(k, _)| *k)
            .collect();
        for k in done.iter().take(done.len().saturating_sub(KEEP_DONE)) {
            map.remove(k);
        }
        h
    }

    pub fn get(&self, id: &str) -> Option<Arc<TaskHandle>> {
        let id: u64 = id.parse().ok()?;
        self.map.lock().expect("tasks").get(&id).cloned()
    }

    pub fn list(&self) -> Vec<TaskRec> {
        self.map
            .lock()
            .expect("tasks")
            .values()
            .map(|t| t.get())
            .collect()
    }

    /// The unfinished task of `kind` working on `target`, if any.
    pub fn running_for(&self, target: &str) -> Option<Arc<TaskHandle>> {
        self.map
            .lock()
            .expect("tasks")
            .values()
            .find(|t| {
                let r = t.get();
                !r.done && (r.target == target || r.source == target)
            })
            .cloned()
    }

    /// Records of the tasks to persist: every unfinished one and the most
    /// recent done ones.
    pub fn records(&self) -> BTreeMap<String, TaskRec> {
        self.map
            .lock()
            .expect("tasks")
            .values()
            .map(|t| t.record())
            .map(|r| (r.id.clone(), r))
            .collect()
    }
}

/// Bytes copied per request, and requests in flight, for restore and clone.
const COPY_STEP: u64 = 1 << 20;
const COPY_DEPTH: usize = 8;

/// Copies the content of `src` (the origin or a snapshot) into `dst` (a new
/// origin of the same size, all zeros), skipping zero pieces so a sparse
/// file stays sparse, then flushes `dst`.
pub async fn copy_volume(
    src: Arc<Origin>,
    target: Target,
    dst: Arc<Origin>,
    task: Arc<TaskHandle>,
) -> cowsnap_store::Result<()> {
    let size = src.target_size(target)?;
    let step = COPY_STEP.max(src.block_size());
    task.progress(0, size);
    let mut done = 0u64;
    let mut pieces = futures::stream::iter((0..size).step_by(step as usize))
        .map(|off| {
            let (src, dst) = (src.clone(), dst.clone());
            async move {
                let n = step.min(size - off);
                let buf: AlignedBuf = src.read(target, off, n).await?;
                if buf.iter().any(|&b| b != 0) {
                    dst.write(Target::Origin, off, buf, false).await?;
                }
                Ok::<u64, cowsnap_store::Error>(n)
            }
        })
        .buffer_unordered(COPY_DEPTH);
    while let Some(r) = pieces.next().await {
        done += r?;
        task.progress(done, size);
    }
    dst.flush().await
}
