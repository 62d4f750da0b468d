//! `cowsnap io`: a `qemu-io` for the engine. Opens an origin with its
//! snapshots (COW devices in the order given; an all-zero one becomes a new
//! snapshot of the origin as it is at that moment) and runs qemu-io style
//! commands, in order, against the origin or one snapshot, stopping at the
//! first that fails (exit 1):
//!
//! - `write [-P PATTERN | -z] OFFSET LENGTH` (default pattern 0xcd, as qemu-io)
//! - `read [-P PATTERN] OFFSET LENGTH` (with `-P`, fails at the first byte that differs)
//! - `discard OFFSET LENGTH` (the engine's validated hint)
//! - `flush`
//!
//! Sizes take binary suffixes (`4k` = 4096), patterns are decimal or `0x`
//! hex bytes. Offsets and lengths need not be aligned to the engine's block
//! size: the tool reads, modifies and writes the blocks at the edges.

use std::path::PathBuf;

use anyhow::{Context, bail};
use cowsnap_store::{AlignedBuf, Origin, SnapshotOptions, Target};
use serde::Serialize;

use crate::cow::devices::{Access, BackendArg, Devices};
use crate::cow::report::{self, EXIT_OK, EXIT_PROBLEMS, JsonArg};

/// Largest piece a command hands to the engine at once.
const STEP: u64 = 8 << 20;
/// qemu-io's default write pattern.
const DEFAULT_PATTERN: u8 = 0xcd;

/// The arguments of `cowsnap io`: the options, and the commands grouped by
/// `-c` occurrence (clap's derive cannot group values per occurrence, so
/// this reads them from the matches itself).
pub struct IoArgs {
    opts: IoOpts,
    commands: Vec<Vec<String>>,
}

#[derive(clap::Args)]
struct IoOpts {
    /// The origin device.
    #[arg(long, value_name = "ORIGIN")]
    origin: PathBuf,
    /// A COW device of the origin (repeat for several, oldest first). An all-zero one becomes a new snapshot.
    #[arg(long = "cow", value_name = "COW")]
    cows: Vec<PathBuf>,
    /// Run the commands against snapshot K (1-based, in --cow order) instead of the origin.
    #[arg(long, value_name = "K")]
    snapshot: Option<usize>,
    /// Chunk size in sectors for new (all-zero) COW devices [default: 32]; an existing header's wins.
    #[arg(long, value_name = "N")]
    chunk_sectors: Option<u32>,
    /// A command, as one quoted string (`-c 'write -P 0xab 0 4k'`) or as separate words; repeat -c for
    /// more. Put the other options before the first -c: every word after it belongs to the commands.
    #[arg(
        id = COMMANDS,
        short = 'c',
        long = "cmd",
        value_name = "CMD",
        required = true,
        num_args = 1..,
        allow_hyphen_values = true,
        action = clap::ArgAction::Append
    )]
    commands: Vec<String>,
    #[command(flatten)]
    backend: BackendArg,
    #[command(flatten)]
    out: JsonArg,
}

const COMMANDS: &str = "commands";

impl clap::FromArgMatches for IoArgs {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let opts = IoOpts::from_arg_matches(m)?;
        let commands = m
            .get_occurrences::<String>(COMMANDS)
            .map(|occ| occ.map(|words| words.cloned().collect()).collect())
            .unwrap_or_default();
        Ok(IoArgs { opts, commands })
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = IoArgs::from_arg_matches(m)?;
        Ok(())
    }
}

impl clap::Args for IoArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        IoOpts::augment_args(cmd)
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        IoOpts::augment_args_for_update(cmd)
    }
}

/// One parsed command.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Cmd {
    Write {
        offset: u64,
        length: u64,
        fill: Fill,
    },
    Read {
        offset: u64,
        length: u64,
        pattern: Option<u8>,
    },
    Discard {
        offset: u64,
        length: u64,
    },
    Flush,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fill {
    Pattern(u8),
    Zeroes,
}

/// What a command did, for `--json` (one object per line).
#[derive(Serialize)]
struct Outcome {
    command: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    length: Option<u64>,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub fn run(args: IoArgs) -> anyhow::Result<u8> {
    report::restore_sigpipe();
    run_commands(args).map_err(report::one_message)
}

fn run_commands(
    IoArgs {
        opts: args,
        commands,
    }: IoArgs,
) -> anyhow::Result<u8> {
    let cmds = split_commands(&commands)?
        .iter()
        .map(|words| parse_command(words).with_context(|| format!("command `{}`", words.join(" "))))
        .collect::<anyhow::Result<Vec<Cmd>>>()?;
    if let Some(k) = args.snapshot
        && (k == 0 || k > args.cows.len())
    {
        bail!(
            "--snapshot {k}: snapshots are numbered from 1 in --cow order, and {} COW device{} given",
            args.cows.len(),
            if args.cows.len() == 1 {
                " was"
            } else {
                "s were"
            }
        );
    }
    let devices = Devices::start(args.backend)?;
    let origin_dev = devices.open(&args.origin, Access::ReadWrite)?;
    let cows = args
        .cows
        .iter()
        .map(|p| devices.open(p, Access::ReadWrite))
        .collect::<anyhow::Result<Vec<_>>>()?;
    devices.block_on(async {
        let origin = Origin::new(origin_dev)?;
        let mut ids = Vec::new();
        for cow in cows {
            let added = origin
                .add_snapshot(
                    cow,
                    SnapshotOptions {
                        chunk_sectors: args.chunk_sectors,
                        merging: false,
                        size: None,
                    },
                )
                .await?;
            tracing::info!(
                snapshot = added.id,
                initialised = added.initialised,
                chunk_sectors = added.chunk_sectors,
                exceptions = added.exceptions,
                "snapshot attached"
            );
            ids.push(added.id);
        }
        let target = match args.snapshot {
            Some(k) => Target::Snapshot(ids[k - 1]),
            None => Target::Origin,
        };
        let mut code = EXIT_OK;
        for cmd in &cmds {
            let result = execute(&origin, target, cmd).await;
            report(cmd, &result, args.out.json);
            if result.is_err() {
                code = EXIT_PROBLEMS;
                break;
            }
        }
        // As qemu-io on close: everything written is durable when it exits.
        if let Err(e) = origin.flush().await {
            eprintln!("flush failed: {e}");
            code = EXIT_PROBLEMS;
        }
        Ok(code)
    })
}

/// Groups the words of the -c arguments into commands. Each -c value is
/// split like a shell would (so `-c 'write -P 0xab 0 4k'` works), and a
/// literal `-c` among the words starts a new command (so does
/// `-c write -P 0xab 0 4k -c flush`).
fn split_commands(groups: &[Vec<String>]) -> anyhow::Result<Vec<Vec<String>>> {
    let mut out = Vec::new();
    for group in groups {
        let mut cmd: Vec<String> = Vec::new();
        for arg in group {
            if arg == "-c" || arg == "--cmd" {
                if !cmd.is_empty() {
                    out.push(std::mem::take(&mut cmd));
                }
                continue;
            }
            cmd.extend(shell_words(arg)?);
        }
        if !cmd.is_empty() {
            out.push(cmd);
        }
    }
    if out.is_empty() {
        bail!("no command given with -c");
    }
    Ok(out)
}

/// Splits `s` into words on whitespace, honouring single and double quotes
/// and backslash escapes as a POSIX shell does.
fn shell_words(s: &str) -> anyhow::Result<Vec<String>> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => words.extend(word.take()),
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => bail!("unterminated ' in `{s}`"),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => w.push(c),
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => bail!("unterminated \" in `{s}`"),
                        },
                        Some(c) => w.push(c),
                        None => bail!("unterminated \" in `{s}`"),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(c) => word.get_or_insert_with(String::new).push(c),
                None => bail!("trailing \\ in `{s}`"),
            },
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Ok(words)
}

fn parse_command(words: &[String]) -> anyhow::Result<Cmd> {
    let (name, rest) = words.split_first().context("empty command")?;
    let mut pattern = None;
    let mut zero = false;
    let mut positional = Vec::new();
    let mut it = rest.iter();
    while let Some(w) = it.next() {
        match w.as_str() {
            "-P" => {
                let p = it.next().context("-P needs a pattern byte")?;
                pattern = Some(parse_pattern(p)?);
            }
            "-z" => zero = true,
            flag if flag.starts_with("--") => {
                bail!("unknown option {flag} (the options of `cowsnap io` go before the first -c)")
            }
            flag if flag.starts_with('-')
                && flag.len() > 1
                && !flag[1..].starts_with(|c: char| c.is_ascii_digit()) =>
            {
                bail!("unknown option {flag}")
            }
            _ => positional.push(w.as_str()),
        }
    }
    let range = |positional: &[&str]| -> anyhow::Result<(u64, u64)> {
        match positional {
            [o, l] => Ok((parse_size(o)?, parse_size(l)?)),
            _ => bail!("expected OFFSET LENGTH"),
        }
    };
    let cmd = match name.as_str() {
        "write" => {
            let (offset, length) = range(&positional)?;
            let fill = match (zero, pattern) {
                (true, Some(_)) => bail!("-z and -P cannot be combined"),
                (true, None) => Fill::Zeroes,
                (false, p) => Fill::Pattern(p.unwrap_or(DEFAULT_PATTERN)),
            };
            Cmd::Write {
                offset,
                length,
                fill,
            }
        }
        "read" => {
            if zero {
                bail!("read takes no -z");
            }
            let (offset, length) = range(&positional)?;
            Cmd::Read {
                offset,
                length,
                pattern,
            }
        }
        "discard" => {
            if zero || pattern.is_some() {
                bail!("discard takes no options");
            }
            let (offset, length) = range(&positional)?;
            Cmd::Discard { offset, length }
        }
        "flush" => {
            if zero || pattern.is_some() || !positional.is_empty() {
                bail!("flush takes no arguments");
            }
            Cmd::Flush
        }
        other => bail!("unknown command {other:?} (expected write, read, discard or flush)"),
    };
    Ok(cmd)
}

/// A size or offset: decimal (or `0x` hex) with an optional binary suffix
/// (b, k, m, g, t; `4k` = 4096).
fn parse_size(s: &str) -> anyhow::Result<u64> {
    let bad = || format!("bad size {s:?}: expected a number with an optional k, m, g or t suffix");
    let lower = s.to_ascii_lowercase();
    if let Some(hex) = lower.strip_prefix("0x") {
        return u64::from_str_radix(hex, 16).with_context(bad);
    }
    let (digits, shift) = match lower.char_indices().last() {
        Some((i, 'b')) => (&lower[..i], 0),
        Some((i, 'k')) => (&lower[..i], 10),
        Some((i, 'm')) => (&lower[..i], 20),
        Some((i, 'g')) => (&lower[..i], 30),
        Some((i, 't')) => (&lower[..i], 40),
        _ => (lower.as_str(), 0),
    };
    let n: u64 = digits.parse().with_context(bad)?;
    n.checked_mul(1 << shift).with_context(bad)
}

/// A pattern byte: decimal or `0x` hex, 0..=255.
fn parse_pattern(s: &str) -> anyhow::Result<u8> {
    let bad = || format!("bad pattern {s:?}: expected a byte, decimal or 0x hex");
    match s.to_ascii_lowercase().strip_prefix("0x") {
        Some(hex) => u8::from_str_radix(hex, 16).with_context(bad),
        None => s.parse().with_context(bad),
    }
}

fn report(cmd: &Cmd, result: &anyhow::Result<()>, json: bool) {
    let (command, range) = match *cmd {
        Cmd::Write { offset, length, .. } => ("write", Some((offset, length))),
        Cmd::Read { offset, length, .. } => ("read", Some((offset, length))),
        Cmd::Discard { offset, length } => ("discard", Some((offset, length))),
        Cmd::Flush => ("flush", None),
    };
    if json {
        let outcome = Outcome {
            command,
            offset: range.map(|r| r.0),
            length: range.map(|r| r.1),
            ok: result.is_ok(),
            error: result.as_ref().err().map(report::one_line),
        };
        println!("{}", serde_json::to_string(&outcome).unwrap_or_default());
    }
    match (result, range) {
        (Err(e), _) => eprintln!("{command} failed: {}", report::one_line(e)),
        (Ok(()), Some((off, len))) if !json => {
            let verb = match command {
                "write" => "wrote",
                other => other,
            };
            println!("{verb} {len}/{len} bytes at offset {off}");
        }
        _ => {}
    }
}

async fn execute(origin: &Origin, t: Target, cmd: &Cmd) -> anyhow::Result<()> {
    let check = |offset: u64, length: u64| -> anyhow::Result<()> {
        if offset
            .checked_add(length)
            .is_none_or(|end| end > origin.size())
        {
            bail!(
                "{}: offset {offset} length {length} is past the end ({} bytes)",
                origin.device().name(),
                origin.size()
            );
        }
        Ok(())
    };
    match *cmd {
        Cmd::Write {
            offset,
            length,
            fill,
        } => {
            check(offset, length)?;
            write(origin, t, offset, length, fill).await
        }
        Cmd::Read {
            offset,
            length,
            pattern,
        } => {
            check(offset, length)?;
            read(origin, t, offset, length, pattern).await
        }
        Cmd::Discard { offset, length } => {
            check(offset, length)?;
            // A hint: only the whole blocks inside the range can be discarded.
            let bs = origin.block_size();
            let (start, end) = (offset.next_multiple_of(bs), (offset + length) / bs * bs);
            if start < end {
                origin.discard(t, start, end - start).await?;
            }
            Ok(())
        }
        Cmd::Flush => Ok(origin.flush().await?),
    }
}

/// The block-aligned pieces (of at most [`STEP`]) that cover
/// `[offset, offset+length)`.
fn aligned_pieces(offset: u64, length: u64, bs: u64) -> impl Iterator<Item = (u64, u64)> {
    let start = offset / bs * bs;
    let end = (offset + length).next_multiple_of(bs);
    let step = STEP.next_multiple_of(bs);
    (start..end)
        .step_by(step as usize)
        .map(move |p| (p, (p + step).min(end)))
}

async fn write(
    origin: &Origin,
    t: Target,
    offset: u64,
    length: u64,
    fill: Fill,
) -> anyhow::Result<()> {
    if length == 0 {
        return Ok(());
    }
    let bs = origin.block_size();
    let end = offset + length;
    if fill == Fill::Zeroes && offset.is_multiple_of(bs) && length.is_multiple_of(bs) {
        return Ok(origin.write_zeroes(t, offset, length, false).await?);
    }
    let byte = match fill {
        Fill::Pattern(p) => p,
        Fill::Zeroes => 0,
    };
    for (ps, pe) in aligned_pieces(offset, length, bs) {
        let mut buf = AlignedBuf::zeroed((pe - ps) as usize);
        // Read-modify-write of the edge blocks the range covers partly.
        let head = ps < offset;
        if head {
            buf[..bs as usize].copy_from_slice(&origin.read(t, ps, bs).await?);
        }
        if pe > end && !(head && pe - bs == ps) {
            let at = (pe - bs - ps) as usize;
            buf[at..].copy_from_slice(&origin.read(t, pe - bs, bs).await?);
        }
        buf[(offset.max(ps) - ps) as usize..(end.min(pe) - ps) as usize].fill(byte);
        origin.write(t, ps, buf, false).await?;
    }
    Ok(())
}

async fn read(
    origin: &Origin,
    t: Target,
    offset: u64,
    length: u64,
    pattern: Option<u8>,
) -> anyhow::Result<()> {
    if length == 0 {
        return Ok(());
    }
    let end = offset + length;
    for (ps, pe) in aligned_pieces(offset, length, origin.block_size()) {
        let data = origin.read(t, ps, pe - ps).await?;
        let Some(p) = pattern else { continue };
        let lo = offset.max(ps);
        let wanted = &data[(lo - ps) as usize..(end.min(pe) - ps) as usize];
        if let Some(i) = wanted.iter().position(|&b| b != p) {
            let at = lo + i as u64;
            bail!(
                "Pattern verification failed at offset {at}, {} bytes: found {:#04x}, expected {p:#04x}",
                end - at,
                wanted[i]
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &[&str]) -> Vec<String> {
        s.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn sizes_and_patterns() {
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("0x1000").unwrap(), 4096);
        assert!(parse_size("4q").is_err() && parse_size("").is_err() && parse_size("-1").is_err());
        assert_eq!(parse_pattern("0xab").unwrap(), 0xab);
        assert_eq!(parse_pattern("17").unwrap(), 17);
        assert!(parse_pattern("256").is_err() && parse_pattern("0x100").is_err());
    }

    #[test]
    fn commands_as_one_string_or_words() {
        let cmds = split_commands(&[
            words(&["write -P 0xab 0 4k"]),
            words(&["read", "-P", "0xab", "0", "4k", "-c", "flush"]),
        ])
        .unwrap();
        assert_eq!(
            cmds,
            vec![
                words(&["write", "-P", "0xab", "0", "4k"]),
                words(&["read", "-P", "0xab", "0", "4k"]),
                words(&["flush"])
            ]
        );
        assert_eq!(
            parse_command(&cmds[0]).unwrap(),
            Cmd::Write {
                offset: 0,
                length: 4096,
                fill: Fill::Pattern(0xab)
            }
        );
        assert_eq!(
            parse_command(&words(&["write", "-z", "4k", "4k"])).unwrap(),
            Cmd::Write {
                offset: 4096,
                length: 4096,
                fill: Fill::Zeroes
            }
        );
        assert_eq!(
            shell_words(r#"a 'b c' "d\"e" f\ g"#).unwrap(),
            words(&["a", "b c", "d\"e", "f g"])
        );
        assert!(parse_command(&words(&["write", "0"])).is_err());
        assert!(parse_command(&words(&["frob", "0", "1"])).is_err());
        assert!(parse_command(&words(&["write", "-x", "0", "1"])).is_err());
    }

    #[test]
    fn pieces_cover_the_range_aligned() {
        let p: Vec<_> = aligned_pieces(100, 5000, 512).collect();
        assert_eq!(p, vec![(0, 5120)]);
        let p: Vec<_> = aligned_pieces(0, STEP + 1, 4096).collect();
        assert_eq!(p, vec![(0, STEP), (STEP, STEP + 4096)]);
    }
}
