//! `cowsnap operation get|list|wait`: the long-running work (merges,
//! restores, clones) and the history of every mutation.

use clap::Subcommand;
use cowsnap_proto::cowsnap::v1 as pb;

use super::{Api, Conn, Outcome, finish, operation_name, output, run, wait};

#[derive(clap::Args, Debug)]
pub struct OperationCommand {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show an operation (`7` or `operations/7`).
    Get { name: String },
    /// List operations, newest first.
    List {
        /// e.g. `done=false`, `kind=MERGE_SNAPSHOT`, `target=volumes/v1`,
        /// terms joined with ` AND `.
        #[arg(long, default_value = "")]
        filter: String,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Wait for an operation to end, showing progress; exit 1 if it failed.
    Wait { name: String },
}

pub fn run_command(c: OperationCommand) -> anyhow::Result<u8> {
    run(&c.conn, async move |api: &mut Api| -> Outcome {
        match c.cmd {
            Cmd::Get { name } => {
                let op = api
                    .operations
                    .get_operation(pb::GetOperationRequest {
                        name: operation_name(&name),
                    })
                    .await?
                    .into_inner();
                output::operation(api.json, &op)?;
            }
            Cmd::List { filter, limit } => {
                let mut all = Vec::new();
                let mut token = String::new();
                while all.len() < limit {
                    let page = api
                        .operations
                        .list_operations(pb::ListOperationsRequest {
                            page_size: (limit - all.len()).min(1000) as i32,
                            page_token: token,
                            filter: filter.clone(),
                        })
                        .await?
                        .into_inner();
                    all.extend(page.operations);
                    if page.next_page_token.is_empty() {
                        break;
                    }
                    token = page.next_page_token;
                }
                output::operations(api.json, &all)?;
            }
            Cmd::Wait { name } => {
                let name = operation_name(&name);
                let op = wait(api, &name, &name).await?;
                return finish(api, &op);
            }
        }
        Ok(0)
    })
}
