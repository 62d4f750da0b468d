//! The fault-injecting layer for crash tests: real `O_DIRECT` files
//! underneath, and a volatile layer on top that models a disk's write cache.
//!
//! - A plain write lands in the volatile layer (a log of 512-byte sectors, in
//!   write order); reads see it.
//! - A flush moves everything volatile to the file (it is durable).
//! - A `dsync` write goes to the file at once, and supersedes what the
//!   volatile layer held for those sectors.
//! - A flush + write runs as its two steps, each an I/O: a cut can fall
//!   between them.
//! - A power cut (after a chosen number of I/Os) fails that I/O and every
//!   later one with EIO; [`FaultController::crash`] then writes a random
//!   subset of the volatile sectors to the files, in their order, and forgets
//!   the rest: what a power loss leaves behind, torn writes included.
//! - Rules fail chosen I/Os with EIO without a power cut.
//!
//! Requests run synchronously inside `submit`, which keeps a test that runs
//! on a current-thread runtime deterministic for its seed.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rand::Rng;

use super::{AlignedBuf, Device, DeviceIo, Op, Request, execute_sync, open_direct};
use crate::error::Result;

const SECTOR: usize = 512;

/// A rule that fails matching I/O with EIO: `skip` matching I/Os pass, then
/// `count` fail.
#[derive(Clone, Debug)]
pub struct FailRule {
    /// Matches devices whose path contains this string.
    pub device: String,
    /// Matches only this kind of I/O (`None`: any).
    pub op: Option<FaultOp>,
    pub skip: u64,
    pub count: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    Read,
    Write,
    Flush,
}

struct Volatile {
    file: Arc<File>,
    /// Sectors written since the last flush, oldest first.
    log: Vec<(u64, Box<[u8; SECTOR]>)>,
    /// Sector → index in `log` of its newest version.
    latest: HashMap<u64, usize>,
}

struct State {
    devices: HashMap<PathBuf, Volatile>,
    /// I/Os left before the power goes (`None`: never).
    ops_until_cut: Option<u64>,
    powered: bool,
    ops: u64,
    rules: Vec<FailRule>,
}

/// Shared by every device of one simulated machine.
#[derive(Clone)]
pub struct FaultController {
    state: Arc<Mutex<State>>,
}

impl Default for FaultController {
    fn default() -> Self {
        Self::new()
    }
}

impl FaultController {
    pub fn new() -> FaultController {
        FaultController {
            state: Arc::new(Mutex::new(State {
                devices: HashMap::new(),
                ops_until_cut: None,
                powered: true,
                ops: 0,
                rules: Vec::new(),
            })),
        }
    }

    /// Opens `path` (an existing file) through the volatile layer.
    pub fn open(&self, path: &Path) -> Result<Device> {
        let (file, size, block_size) = open_direct(path, true)?;
        let mut st = self.state.lock().expect("fault state");
        st.devices.insert(
            path.to_path_buf(),
            Volatile {
                file,
                log: Vec::new(),
                latest: HashMap::new(),
            },
        );
        drop(st);
        Ok(Device::new(
            path.display().to_string(),
            Box::new(FaultFile {
                path: path.to_path_buf(),
                ctl: self.clone(),
            }),
            size,
            block_size.max(SECTOR as u64),
            true,
        ))
    }

    /// Cuts the power after `n` more I/Os (that I/O and all later fail).
    pub fn cut_after(&self, n: u64) {
        self.state.lock().expect("fault state").ops_until_cut = Some(n);
    }

    /// Whether the power is off.
    pub fn is_cut(&self) -> bool {
        !self.state.lock().expect("fault state").powered
    }

    /// I/Os executed so far.
    pub fn ops(&self) -> u64 {
        self.state.lock().expect("fault state").ops
    }

    pub fn add_rule(&self, rule: FailRule) {
        self.state.lock().expect("fault state").rules.push(rule);
    }

    pub fn clear_rules(&self) {
        self.state.lock().expect("fault state").rules.clear();
    }

    /// The power loss itself: cuts the power now (if not already), keeps each
    /// volatile sector with probability one half (applied in write order) and
    /// forgets the rest. Returns (sectors kept, sectors dropped).
    pub fn crash(&self, rng: &mut impl Rng) -> io::Result<(u64, u64)> {
        let mut st = self.state.lock().expect("fault state");
        st.powered = false;
        let (mut kept, mut dropped) = (0, 0);
        for v in st.devices.values_mut() {
            // Later kept versions of a sector win, as on the disk.
            let mut survivors: BTreeMap<u64, Box<[u8; SECTOR]>> = BTreeMap::new();
            for (sector, data) in std::mem::take(&mut v.log) {
                if rng.random_bool(0.5) {
                    survivors.insert(sector, data);
                    kept += 1;
                } else {
                    dropped += 1;
                }
            }
            v.latest.clear();
            write_sectors(&v.file, survivors)?;
        }
        Ok((kept, dropped))
    }

    fn execute(&self, path: &Path, req: &mut Request) -> io::Result<()> {
        match req.op {
            // Two steps, each an I/O of its own: a power cut can land
            // between them (the flush done, the write never issued), as it
            // can between the halves of a linked pair on a real device, and
            // a rule can fail either half.
            Op::FlushWrite => {
                self.step(path, Op::Flush, req)?;
                self.step(path, Op::Write { dsync: true }, req)
            }
            op => self.step(path, op, req),
        }
    }

    /// One I/O `op` on `req`'s buffer and offset.
    fn step(&self, path: &Path, op: Op, req: &mut Request) -> io::Result<()> {
        let mut st = self.state.lock().expect("fault state");
        if !st.powered {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if let Some(n) = st.ops_until_cut.as_mut() {
            if *n == 0 {
                st.powered = false;
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            *n -= 1;
        }
        st.ops += 1;
        let kind = match op {
            Op::Read => FaultOp::Read,
            Op::Write { .. } => FaultOp::Write,
            Op::Flush => FaultOp::Flush,
            Op::FlushWrite => unreachable!("split into its two steps by execute"),
        };
        let path_str = path.to_string_lossy();
        for rule in st.rules.iter_mut() {
            if path_str.contains(&rule.device) && rule.op.is_none_or(|o| o == kind) {
                if rule.skip > 0 {
                    rule.skip -= 1;
                } else if rule.count > 0 {
                    rule.count -= 1;
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
            }
        }
        let v = st
            .devices
            .get_mut(path)
            .expect("device opened through this controller");
        match op {
            Op::Read => {
                let buf = req.buf.as_mut().expect("read buffer");
                execute_sync(&v.file, Op::Read, req.offset, Some(buf))?;
                let first = req.offset / SECTOR as u64;
                for (i, dst) in buf.chunks_exact_mut(SECTOR).enumerate() {
                    if let Some(&idx) = v.latest.get(&(first + i as u64)) {
                        dst.copy_from_slice(&v.log[idx].1[..]);
                    }
                }
                Ok(())
            }
            Op::Write { dsync: false } => {
                let buf = req.buf.as_ref().expect("write buffer");
                let first = req.offset / SECTOR as u64;
                for (i, src) in buf.chunks_exact(SECTOR).enumerate() {
                    let mut data = Box::new([0u8; SECTOR]);
                    data.copy_from_slice(src);
                    v.latest.insert(first + i as u64, v.log.len());
                    v.log.push((first + i as u64, data));
                }
                Ok(())
            }
            Op::Write { dsync: true } => {
                // Straight to stable storage (the file; see Flush).
                let buf = req.buf.as_mut().expect("write buffer");
                execute_sync(&v.file, Op::Write { dsync: false }, req.offset, Some(buf))?;
                let first = req.offset / SECTOR as u64;
                let end = first + (buf.len() / SECTOR) as u64;
                if v.log.iter().any(|(s, _)| (first..end).contains(s)) {
                    v.log.retain(|(s, _)| !(first..end).contains(s));
                    v.latest.clear();
                    for (i, (s, _)) in v.log.iter().enumerate() {
                        v.latest.insert(*s, i);
                    }
                }
                Ok(())
            }
            Op::FlushWrite => unreachable!("split into its two steps by execute"),
            Op::Flush => {
                // The file is the simulated disk's stable storage: moving the
                // volatile sectors there is the flush (the host's own
                // fdatasync would add nothing to the simulation).
                let latest: BTreeMap<u64, Box<[u8; SECTOR]>> =
                    std::mem::take(&mut v.log).into_iter().collect();
                v.latest.clear();
                write_sectors(&v.file, latest)
            }
        }
    }
}

/// Writes sectors to the file, one write per run of consecutive sectors.
fn write_sectors(file: &File, sectors: BTreeMap<u64, Box<[u8; SECTOR]>>) -> io::Result<()> {
    let mut run: Vec<u8> = Vec::new();
    let mut start = 0u64;
    let flush = |start: u64, run: &mut Vec<u8>| -> io::Result<()> {
        if !run.is_empty() {
            let mut b = AlignedBuf::from_slice(run);
            execute_sync(
                file,
                Op::Write { dsync: false },
                start * SECTOR as u64,
                Some(&mut b),
            )?;
            run.clear();
        }
        Ok(())
    };
    for (sector, data) in sectors {
        if run.is_empty() || start + (run.len() / SECTOR) as u64 != sector {
            flush(start, &mut run)?;
            start = sector;
        }
        run.extend_from_slice(&data[..]);
    }
    flush(start, &mut run)
}

struct FaultFile {
    path: PathBuf,
    ctl: FaultController,
}

impl DeviceIo for FaultFile {
    fn submit(&self, mut req: Request) {
        let r = self.ctl.execute(&self.path, &mut req);
        req.complete(r);
    }
}
