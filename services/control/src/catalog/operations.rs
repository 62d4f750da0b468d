//! Operation rows: every mutating call, recorded before its worker is
//! touched, with its state, the worker's task and its result.

use sqlx::SqliteConnection;

use crate::error::{ControlError, ErrorKind, Failure, Result};
use crate::model::{OpArgs, OpKind, OpResult, OpState, Operation, Resource};

struct Row {
    id: i64,
    kind: String,
    target: String,
    source: String,
    worker_id: String,
    args: String,
    state: String,
    worker_task: String,
    percent: f64,
    error_kind: String,
    error_field: String,
    error_message: String,
    result: String,
    create_time: i64,
    update_time: i64,
    end_time: Option<i64>,
}

fn bad(what: &str, e: impl std::fmt::Display) -> ControlError {
    ControlError::Internal(anyhow::anyhow!("bad {what} in the catalog: {e}"))
}

impl Row {
    fn into_op(self) -> Result<Operation> {
        Ok(Operation {
            id: self.id,
            kind: OpKind::parse(&self.kind).ok_or_else(|| bad("operation kind", &self.kind))?,
            target: Resource::parse(&self.target).map_err(|e| bad("target", e))?,
            source: if self.source.is_empty() {
                None
            } else {
                Some(Resource::parse(&self.source).map_err(|e| bad("source", e))?)
            },
            worker_id: self.worker_id,
            args: serde_json::from_str::<OpArgs>(&self.args).map_err(|e| bad("arguments", e))?,
            state: OpState::parse(&self.state)
                .ok_or_else(|| bad("operation state", &self.state))?,
            worker_task: self.worker_task,
            percent: self.percent,
            error: (!self.error_kind.is_empty()).then(|| Failure {
                kind: ErrorKind::parse(&self.error_kind),
                field: self.error_field,
                message: self.error_message,
            }),
            result: if self.result.is_empty() {
                None
            } else {
                Some(serde_json::from_str::<OpResult>(&self.result).map_err(|e| bad("result", e))?)
            },
            create_time: self.create_time,
            update_time: self.update_time,
            end_time: self.end_time,
        })
    }
}

/// What a new operation is about.
pub struct NewOp<'a> {
    pub kind: OpKind,
    pub target: &'a str,
    pub source: &'a str,
    pub volume_id: &'a str,
    pub worker_id: &'a str,
    pub args: &'a OpArgs,
}

/// Records a pending operation; returns its id.
pub async fn insert(c: &mut SqliteConnection, op: NewOp<'_>, now: i64) -> Result<Operation> {
    let (kind, args) = (
        op.kind.as_str(),
        serde_json::to_string(op.args).expect("arguments serialize"),
    );
    // The row as inserted comes back with it: no second statement reads it.
    let row = sqlx::query_as!(
        Row,
        r#"INSERT INTO operations (kind, target, source, volume_id, worker_id, args, state,
                                   create_time, update_time)
           VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)
           RETURNING id AS "id!: i64", kind, target, source, worker_id, args, state, worker_task,
                     percent, error_kind, error_field, error_message, result, create_time,
                     update_time, end_time"#,
        kind,
        op.target,
        op.source,
        op.volume_id,
        op.worker_id,
        args,
        now,
        now
    )
    .fetch_one(&mut *c)
    .await?;
    row.into_op()
}

pub async fn get(c: &mut SqliteConnection, id: i64) -> Result<Option<Operation>> {
    let row = sqlx::query_as!(
        Row,
        r#"SELECT id AS "id!: i64", kind, target, source, worker_id, args, state, worker_task,
                  percent, error_kind, error_field, error_message, result, create_time, update_time, end_time
           FROM operations WHERE id = ?"#,
        id
    )
    .fetch_optional(&mut *c)
    .await?;
    row.map(Row::into_op).transpose()
}

/// Operations with ids below `before`, newest first.
pub async fn list_before(c: &mut SqliteConnection, before: i64) -> Result<Vec<Operation>> {
    let rows = sqlx::query_as!(
        Row,
        r#"SELECT id AS "id!: i64", kind, target, source, worker_id, args, state, worker_task,
                  percent, error_kind, error_field, error_message, result, create_time, update_time, end_time
           FROM operations WHERE id < ? ORDER BY id DESC"#,
        before
    )
    .fetch_all(&mut *c)
    .await?;
    rows.into_iter().map(Row::into_op).collect()
}

/// Every unfinished operation, oldest first.
pub async fn active(c: &mut SqliteConnection) -> Result<Vec<Operation>> {
    let rows = sqlx::query_as!(
        Row,
        r#"SELECT id AS "id!: i64", kind, target, source, worker_id, args, state, worker_task,
                  percent, error_kind, error_field, error_message, result, create_time, update_time, end_time
           FROM operations WHERE state IN ('pending', 'running') ORDER BY id"#
    )
    .fetch_all(&mut *c)
    .await?;
    rows.into_iter().map(Row::into_op).collect()
}

/// The id of the newest operation recorded (0 when there is none).
pub async fn newest_id(c: &mut SqliteConnection) -> Result<i64> {
    Ok(
        sqlx::query_scalar!(r#"SELECT COALESCE(MAX(id), 0) AS "id!: i64" FROM operations"#)
            .fetch_one(&mut *c)
            .await?,
    )
}

/// Every operation recorded after operation `id` (finished or not),
/// oldest first.
pub async fn after(c: &mut SqliteConnection, id: i64) -> Result<Vec<Operation>> {
    let rows = sqlx::query_as!(
        Row,
        r#"SELECT id AS "id!: i64", kind, target, source, worker_id, args, state, worker_task,
                  percent, error_kind, error_field, error_message, result, create_time, update_time, end_time
           FROM operations WHERE id > ? ORDER BY id"#,
        id
    )
    .fetch_all(&mut *c)
    .await?;
    rows.into_iter().map(Row::into_op).collect()
}

/// The unfinished operations working on `target` or reading from it.
pub async fn active_on(c: &mut SqliteConnection, name: &str) -> Result<Vec<Operation>> {
    let rows = sqlx::query_as!(
        Row,
        r#"SELECT id AS "id!: i64", kind, target, source, worker_id, args, state, worker_task,
                  percent, error_kind, error_field, error_message, result, create_time, update_time, end_time
           FROM operations
           WHERE state IN ('pending', 'running') AND (target = ?1 OR source = ?1)
           ORDER BY id"#,
        name
    )
    .fetch_all(&mut *c)
    .await?;
    rows.into_iter().map(Row::into_op).collect()
}

/// The newest operation of `kind` on `target`.
pub async fn latest(
    c: &mut SqliteConnection,
    kind: OpKind,
    target: &str,
) -> Result<Option<Operation>> {
    let k = kind.as_str();
    let row = sqlx::query_as!(
        Row,
        r#"SELECT id AS "id!: i64", kind, target, source, worker_id, args, state, worker_task,
                  percent, error_kind, error_field, error_message, result, create_time, update_time, end_time
           FROM operations WHERE kind = ? AND target = ? ORDER BY id DESC LIMIT 1"#,
        k,
        target
    )
    .fetch_optional(&mut *c)
    .await?;
    row.map(Row::into_op).transpose()
}

/// The worker accepted a long-running operation as `task`.
pub async fn set_running(c: &mut SqliteConnection, id: i64, task: &str, now: i64) -> Result<()> {
    sqlx::query!(
        "UPDATE operations SET state = 'running', worker_task = ?, update_time = ?
         WHERE id = ? AND state IN ('pending', 'running')",
        task,
        now,
        id
    )
    .execute(&mut *c)
    .await?;
    Ok(())
}

pub async fn set_percent(c: &mut SqliteConnection, id: i64, percent: f64, now: i64) -> Result<()> {
    sqlx::query!(
        "UPDATE operations SET percent = ?, update_time = ? WHERE id = ? AND state = 'running'",
        percent,
        now,
        id
    )
    .execute(&mut *c)
    .await?;
    Ok(())
}

/// Ends an operation: succeeded with its result, or failed with an error.
/// Returns it as it is now, or `None` when it had ended already (nothing
/// changed).
pub async fn finish(
    c: &mut SqliteConnection,
    id: i64,
    outcome: std::result::Result<Option<&OpResult>, &Failure>,
    now: i64,
) -> Result<Option<Operation>> {
    let (state, percent, kind, field, message, result) = match outcome {
        Ok(r) => (
            OpState::Succeeded.as_str(),
            100.0,
            "",
            "",
            "",
            r.map(|r| serde_json::to_string(r).expect("result serializes"))
                .unwrap_or_default(),
        ),
        Err(f) => (
            OpState::Failed.as_str(),
            0.0,
            f.kind.as_str(),
            f.field.as_str(),
            f.message.as_str(),
            String::new(),
        ),
    };
    let row = sqlx::query_as!(
        Row,
        r#"UPDATE operations
         SET state = ?, percent = CASE WHEN ? = 100.0 THEN 100.0 ELSE percent END,
             error_kind = ?, error_field = ?, error_message = ?, result = ?, update_time = ?,
             end_time = ?
         WHERE id = ? AND state IN ('pending', 'running')
         RETURNING id AS "id!: i64", kind, target, source, worker_id, args, state, worker_task,
                   percent, error_kind, error_field, error_message, result, create_time,
                   update_time, end_time"#,
        state,
        percent,
        kind,
        field,
        message,
        result,
        now,
        now,
        id
    )
    .fetch_optional(&mut *c)
    .await?;
    row.map(Row::into_op).transpose()
}

/// How many operations there are of each kind and state.
pub async fn counts(c: &mut SqliteConnection) -> Result<Vec<(String, String, i64)>> {
    let rows = sqlx::query!(
        r#"SELECT kind, state, COUNT(*) AS "n!: i64" FROM operations GROUP BY kind, state"#
    )
    .fetch_all(&mut *c)
    .await?;
    Ok(rows.into_iter().map(|r| (r.kind, r.state, r.n)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;

    fn new_op<'a>(target: &'a str, args: &'a OpArgs) -> NewOp<'a> {
        NewOp {
            kind: OpKind::CreateVolume,
            target,
            source: "",
            volume_id: target.trim_start_matches("volumes/"),
            worker_id: "w1",
            args,
        }
    }

    #[tokio::test]
    async fn after_the_newest_id_come_exactly_the_operations_recorded_since_finished_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(&dir.path().join("catalog.db")).await.unwrap();
        let args = OpArgs::default();
        let mut c = cat.conn().await.unwrap();
        assert_eq!(newest_id(&mut c).await.unwrap(), 0, "an empty catalog");
        let old = insert(&mut c, new_op("volumes/old", &args), 1)
            .await
            .unwrap();
        let newest = newest_id(&mut c).await.unwrap();
        assert_eq!(newest, old.id);
        let done = insert(&mut c, new_op("volumes/done", &args), 2)
            .await
            .unwrap();
        finish(&mut c, done.id, Ok(None), 3).await.unwrap();
        let open = insert(&mut c, new_op("volumes/open", &args), 4)
            .await
            .unwrap();
        let since: Vec<(i64, OpState)> = after(&mut c, newest)
            .await
            .unwrap()
            .into_iter()
            .map(|o| (o.id, o.state))
            .collect();
        assert_eq!(
            since,
            [(done.id, OpState::Succeeded), (open.id, OpState::Pending)],
            "the finished one and the unfinished one, oldest first; not the one before"
        );
        assert!(after(&mut c, open.id).await.unwrap().is_empty());
    }
}
