//! The on-disk format of a COW device: the Linux kernel's persistent exception
//! store (dm-snapshot `P`, on-disk version 1), byte for byte.
//!
//! ```text
//!  chunk 0        chunk 1      chunks 2 ..= E+1        chunk E+2    chunks E+3 ..
//! +-------------+------------+----------------------+------------+-------------
//! | header      | area 0     | data chunks of       | area 1     | data chunks
//! | magic valid | E records  | area 0 (E of them)   | E records  | of area 1 ...
//! | version     | {old,new}  |                      |            |
//! | chunk_size  |            |                      |            |
//! +-------------+------------+----------------------+------------+-------------
//!
//!  header:  le32 magic = 0x70416e53 ("SnAp"), le32 valid, le32 version = 1,
//!           le32 chunk_size (sectors); the rest of chunk 0 is zero.
//!  area i:  one chunk at chunk 1 + i * (E + 1), E = chunk_size * 512 / 16 records
//!           of { le64 old_chunk (origin), le64 new_chunk (COW) }.
//! ```
//!
//! The list of exceptions ends at the first record whose `new_chunk` is 0 (it
//! would point at the header). Before an area that has just filled is committed,
//! the next area is zeroed on disk, so a reader always finds the end. Records may
//! point at data chunks in any order (commits complete out of order), so the
//! allocator's `next_free` is only a high-water mark: after loading it is
//! `max(new_chunk) + 1`, moved past a metadata chunk if it lands on one (the
//! current kernel's `skip_metadata`; the 2.6.37 seed lacked it and would hand
//! out a metadata chunk as data after a reload of an exactly full area).
//!
//! A header whose magic is 0 marks a new COW device; any other magic is not a
//! COW device. `valid = 0` marks a snapshot the kernel (or we) invalidated: it
//! loads, but its I/O fails.

use crate::error::FormatError;

/// Bytes per sector, the unit of `chunk_size` and of `dmsetup status`.
pub const SECTOR_SIZE: u64 = 512;
/// `"SnAp"` read as a little-endian u32.
pub const SNAP_MAGIC: u32 = 0x7041_6e53;
/// The only on-disk version the kernel has ever written.
pub const DISK_VERSION: u32 = 1;
/// Bytes in one `{old_chunk, new_chunk}` record.
pub const RECORD_SIZE: usize = 16;
/// Bytes of the header that carry information; the rest of chunk 0 is zero.
pub const HEADER_SIZE: usize = 16;
/// Smallest chunk size we accept (4 KiB: the page size, and the largest
/// logical block size a device may have).
pub const MIN_CHUNK_SECTORS: u32 = 8;
/// Largest chunk size we accept (512 KiB).
pub const MAX_CHUNK_SECTORS: u32 = 1024;
/// The kernel's default chunk size (16 KiB).
pub const DEFAULT_CHUNK_SECTORS: u32 = 32;

/// The decoded first chunk of a COW device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderState {
    /// Magic 0: a new COW device, to be initialised on first activation.
    New,
    /// A header with the right magic. `version` and `chunk_sectors` are not
    /// checked here: see [`Header::check`].
    Existing(Header),
}

/// The 16 meaningful bytes of chunk 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Header {
    pub valid: bool,
    pub version: u32,
    pub chunk_sectors: u32,
}

impl Header {
    /// Decodes the first sector of a COW device. A wrong magic is an error: it
    /// is not a COW device, and we never reformat what we do not recognise.
    pub fn decode(sector: &[u8]) -> Result<HeaderState, FormatError> {
        let magic = le32(&sector[0..4]);
        if magic == 0 {
            return Ok(HeaderState::New);
        }
        if magic != SNAP_MAGIC {
            return Err(FormatError::BadMagic(magic));
        }
        Ok(HeaderState::Existing(Header {
            valid: le32(&sector[4..8]) != 0,
            version: le32(&sector[8..12]),
            chunk_sectors: le32(&sector[12..16]),
        }))
    }

    /// Checks what the kernel checks before it reads the exceptions: the
    /// version, and that the chunk size is one we can use.
    pub fn check(&self) -> Result<Layout, FormatError> {
        if self.version != DISK_VERSION {
            return Err(FormatError::UnsupportedVersion(self.version));
        }
        Layout::new(self.chunk_sectors)
    }

    /// Writes the header into `chunk` (a whole chunk: the rest is zeroed, as
    /// the kernel's `write_header` does).
    pub fn encode(&self, chunk: &mut [u8]) {
        chunk.fill(0);
        chunk[0..4].copy_from_slice(&SNAP_MAGIC.to_le_bytes());
        chunk[4..8].copy_from_slice(&u32::from(self.valid).to_le_bytes());
        chunk[8..12].copy_from_slice(&self.version.to_le_bytes());
        chunk[12..16].copy_from_slice(&self.chunk_sectors.to_le_bytes());
    }
}

/// One exception: origin chunk `old` lives in COW chunk `new`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Record {
    pub old: u64,
    pub new: u64,
}

impl Record {
    /// The terminator of the exception list (`new_chunk == 0`).
    pub fn is_end(&self) -> bool {
        self.new == 0
    }

    pub fn decode(bytes: &[u8]) -> Record {
        Record {
            old: le64(&bytes[0..8]),
            new: le64(&bytes[8..16]),
        }
    }

    pub fn encode(&self, bytes: &mut [u8]) {
        bytes[0..8].copy_from_slice(&self.old.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.new.to_le_bytes());
    }
}

/// The geometry that follows from a chunk size: where areas sit, which chunks
/// are metadata, how allocation skips them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    chunk_sectors: u32,
}

impl Layout {
    /// A layout for `chunk_sectors`, which must be a power of two from 8 to 1024.
    pub fn new(chunk_sectors: u32) -> Result<Layout, FormatError> {
        if !chunk_sectors.is_power_of_two()
            || !(MIN_CHUNK_SECTORS..=MAX_CHUNK_SECTORS).contains(&chunk_sectors)
        {
            return Err(FormatError::ChunkSize(chunk_sectors));
        }
        Ok(Layout { chunk_sectors })
    }

    pub fn chunk_sectors(&self) -> u32 {
        self.chunk_sectors
    }

    pub fn chunk_bytes(&self) -> u64 {
        u64::from(self.chunk_sectors) * SECTOR_SIZE
    }

    /// log2 of the chunk size in bytes.
    pub fn chunk_shift(&self) -> u32 {
        self.chunk_bytes().trailing_zeros()
    }

    /// Records per metadata area (`E` in the picture above).
    pub fn exceptions_per_area(&self) -> u64 {
        self.chunk_bytes() / RECORD_SIZE as u64
    }

    /// Distance in chunks from one area to the next.
    fn stride(&self) -> u64 {
        self.exceptions_per_area() + 1
    }

    /// The chunk holding metadata area `area`.
    pub fn area_location(&self, area: u64) -> u64 {
        1 + area * self.stride()
    }

    /// The byte offset of metadata area `area`.
    pub fn area_offset(&self, area: u64) -> u64 {
        self.area_location(area) * self.chunk_bytes()
    }

    /// The area whose data chunks include `chunk` (a data chunk).
    pub fn area_of_data_chunk(&self, chunk: u64) -> u64 {
        (chunk - 1) / self.stride()
    }

    /// Whether `chunk` holds the header or a metadata area.
    pub fn is_metadata(&self, chunk: u64) -> bool {
        chunk == 0 || chunk % self.stride() == 1
    }

    /// The first free chunk of a new store: after the header and area 0.
    pub fn first_data_chunk(&self) -> u64 {
        2
    }

    /// The allocation step: the chunk after `chunk`, skipping a metadata chunk
    /// (the kernel's `persistent_prepare_exception`).
    pub fn next_data_chunk(&self, chunk: u64) -> u64 {
        self.skip_metadata(chunk + 1)
    }

    /// Moves `next_free` past a metadata chunk if it lands on one (the
    /// current kernel's `skip_metadata`, applied after loading).
    pub fn skip_metadata(&self, next_free: u64) -> u64 {
        if next_free % self.stride() == 1 {
            next_free + 1
        } else {
            next_free
        }
    }

    /// Whether a COW device of `device_bytes` has room to allocate `chunk`
    /// (the kernel's `size < (next_free + 1) * chunk_size` test, inverted).
    pub fn fits(&self, chunk: u64, device_bytes: u64) -> bool {
        (chunk + 1)
            .checked_mul(self.chunk_bytes())
            .is_some_and(|end| end <= device_bytes)
    }

    /// The smallest COW device that can hold a header, one area and one data
    /// chunk.
    pub fn min_device_bytes(&self) -> u64 {
        3 * self.chunk_bytes()
    }

    /// How many exceptions a COW device of `device_bytes` can hold: the data
    /// chunks the allocator hands out before the device is full. An area that
    /// fills exactly needs the next area on the device to be zeroed; when that
    /// area lies past the end the commit fails, as it does in the kernel, so
    /// the last chunk of such an area is not counted.
    pub fn capacity(&self, device_bytes: u64) -> u64 {
        let chunks = device_bytes / self.chunk_bytes();
        if chunks <= 2 {
            return 0;
        }
        let full_areas = (chunks - 1) / self.stride();
        let rest = (chunks - 1) % self.stride();
        // `rest` chunks after the last whole stride: its area chunk plus data.
        let mut n = full_areas * self.exceptions_per_area() + rest.saturating_sub(1);
        if rest == 0 && full_areas > 0 {
            // The last area is exactly full and the next area does not fit.
            n -= 1;
        }
        n
    }

    /// Sectors a metadata area (or the header) takes, as `dmsetup status`
    /// counts them.
    pub fn metadata_sectors(&self, current_area: u64) -> u64 {
        (current_area + 2) * u64::from(self.chunk_sectors)
    }
}

/// Decodes up to one area's worth of records, stopping at the terminator.
/// Returns the records and whether the area was full (no terminator).
pub fn decode_area(area: &[u8]) -> (Vec<Record>, bool) {
    let mut out = Vec::new();
    for rec in area.chunks_exact(RECORD_SIZE) {
        let r = Record::decode(rec);
        if r.is_end() {
            return (out, false);
        }
        out.push(r);
    }
    (out, true)
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().expect("4 bytes"))
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_powers_of_two_8_to_1024_only() {
        for cs in [8, 16, 32, 64, 128, 256, 512, 1024] {
            assert!(Layout::new(cs).is_ok(), "{cs}");
        }
        for cs in [0, 1, 4, 7, 12, 24, 2048, 4096, 1000] {
            assert!(Layout::new(cs).is_err(), "{cs}");
        }
    }

    #[test]
    fn areas_and_metadata_chunks() {
        let l = Layout::new(8).unwrap();
        assert_eq!(l.exceptions_per_area(), 256);
        assert_eq!(l.area_location(0), 1);
        assert_eq!(l.area_location(1), 258);
        assert!(l.is_metadata(0) && l.is_metadata(1) && l.is_metadata(258));
        assert!(!l.is_metadata(2) && !l.is_metadata(257) && !l.is_metadata(259));
        assert_eq!(l.next_data_chunk(256), 257);
        assert_eq!(l.next_data_chunk(257), 259);
        assert_eq!(l.area_of_data_chunk(257), 0);
        assert_eq!(l.area_of_data_chunk(259), 1);
    }

    #[test]
    fn skip_metadata_after_reload_matches_kernel() {
        // The kernel README observation: 768 records at chunk 8 give 773.
        let l = Layout::new(8).unwrap();
        let mut c = l.first_data_chunk();
        for _ in 0..767 {
            c = l.next_data_chunk(c);
        }
        // c is the 768th allocated chunk; a reload sees max(new) = c.
        assert_eq!(l.skip_metadata(c + 1), 773);
    }

    #[test]
    fn capacity_matches_allocation_walk() {
        for cs in [8u32, 16] {
            let l = Layout::new(cs).unwrap();
            for chunks in 0..1200u64 {
                let bytes = chunks * l.chunk_bytes();
                // Walk the allocator as the kernel does.
                let mut next = l.first_data_chunk();
                let mut n = 0u64;
                while l.fits(next, bytes) {
                    n += 1;
                    let area = l.area_of_data_chunk(next);
                    let fills = n.is_multiple_of(l.exceptions_per_area());
                    if fills && !l.fits(l.area_location(area + 1), bytes) {
                        n -= 1; // the commit that zeroes the next area fails
                        break;
                    }
                    next = l.next_data_chunk(next);
                }
                assert_eq!(l.capacity(bytes), n, "chunk {cs} device {chunks} chunks");
            }
        }
    }

    #[test]
    fn header_roundtrip_and_refusals() {
        let mut chunk = vec![0xaau8; 4096];
        let h = Header {
            valid: true,
            version: 1,
            chunk_sectors: 8,
        };
        h.encode(&mut chunk);
        assert_eq!(&chunk[0..4], b"SnAp");
        assert!(chunk[16..].iter().all(|&b| b == 0));
        assert_eq!(Header::decode(&chunk).unwrap(), HeaderState::Existing(h));
        assert_eq!(Header::decode(&[0u8; 512]).unwrap(), HeaderState::New);
        let mut bad = chunk.clone();
        bad[0] = b'X';
        assert!(matches!(
            Header::decode(&bad),
            Err(FormatError::BadMagic(_))
        ));
        let v2 = Header { version: 2, ..h };
        assert!(matches!(
            v2.check(),
            Err(FormatError::UnsupportedVersion(2))
        ));
    }
}
