//! The conventions every offline tool shares: exit codes, `--json` output
//! (pretty JSON on stdout, text otherwise), and how a metadata problem is
//! shown. Errors go to stderr through `main` (`cowsnap: ...`, exit 2).

use cowsnap_store::scan::Problem;
use serde::Serialize;

/// The tool did its work and found nothing wrong.
pub const EXIT_OK: u8 = 0;
/// The tool ran and found problems (`cow check`), or a command failed
/// (`io`).
pub const EXIT_PROBLEMS: u8 = 1;
// Exit code 2, "the tool could not do its work" (a device cannot be opened
// or read, the input is unusable), is what `main` returns for every error a
// tool returns, after printing it on stderr.

/// The `--json` flag of every tool that prints data.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct JsonArg {
    /// Print machine-readable JSON on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Makes an error's chain one message without repeats: the store's errors
/// print their source in their own message *and* expose it as the source,
/// so `main`'s `{:#}` would show it twice. Each cause is appended only when
/// the message does not already say it.
pub fn one_message(err: anyhow::Error) -> anyhow::Error {
    anyhow::Error::msg(one_line(&err))
}

/// The text of [`one_message`].
pub fn one_line(err: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if msg.is_empty() {
            msg = text;
        } else if !msg.contains(&text) {
            msg = format!("{msg}: {text}");
        }
    }
    msg
}

/// Lets a closed stdout end the process quietly, as it does other Unix
/// tools (`cowsnap cow dump | head`), instead of making `println!` panic.
pub fn restore_sigpipe() {
    // SAFETY: resetting a signal to its default disposition, before any
    // thread that could be writing starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A problem found in a COW device, as `check` and `dump` show it: the
/// kind and the numbers (area, record, chunks) plus a sentence for people.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    #[serde(flatten)]
    pub detail: serde_json::Value,
    pub message: String,
}

impl Finding {
    /// A problem the metadata scan found.
    pub fn from_problem(p: &Problem) -> Finding {
        Finding {
            detail: serde_json::to_value(p).unwrap_or(serde_json::Value::Null),
            message: p.to_string(),
        }
    }

    /// A problem with the device as a whole (header, geometry), with its
    /// `kind` and extra fields.
    pub fn other(kind: &str, fields: serde_json::Value, message: String) -> Finding {
        let mut detail = serde_json::json!({ "kind": kind });
        if let (Some(d), serde_json::Value::Object(f)) = (detail.as_object_mut(), fields) {
            d.extend(f);
        }
        Finding { detail, message }
    }
}
