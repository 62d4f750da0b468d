//! An in-memory device for the engine: the bytes of a `Vec` behind a
//! mutex, every I/O done at once inside `submit`. Durable by nature, so a
//! flush has nothing to do. Fast, and shareable: the test keeps a handle
//! on the bytes to build, inspect and reopen images.

use std::sync::{Arc, Mutex};

use cowsnap_store::Device;
use cowsnap_store::io::{DeviceIo, Op, Request};

/// The bytes of an in-memory device.
pub type Image = Arc<Mutex<Vec<u8>>>;

struct MemIo(Image);

impl DeviceIo for MemIo {
    fn submit(&self, mut req: Request) {
        let off = req.offset as usize;
        let mut img = self.0.lock().expect("image");
        // Every op named: a new one must be taught here, not dropped.
        let result = match (req.op, req.buf.as_mut()) {
            (Op::Read, Some(buf)) => {
                let len = buf.len();
                buf.copy_from_slice(&img[off..off + len]);
                Ok(())
            }
            (Op::Write { .. } | Op::FlushWrite, Some(buf)) => {
                img[off..off + buf.len()].copy_from_slice(&buf[..]);
                Ok(())
            }
            (Op::Flush, _) => Ok(()),
            (op @ (Op::Read | Op::Write { .. } | Op::FlushWrite), None) => Err(
                std::io::Error::other(format!("{} without a buffer", op.name())),
            ),
        };
        drop(img);
        req.complete(result);
    }
}

/// A new image of `bytes` zero bytes.
pub fn image(bytes: usize) -> Image {
    Arc::new(Mutex::new(vec![0u8; bytes]))
}

/// A writable device over `img`, with 512-byte blocks. (The device checks
/// alignment and range before anything reaches `submit`.)
pub fn device(name: &str, img: &Image) -> Device {
    let size = img.lock().expect("image").len() as u64;
    Device::new(
        name.to_string(),
        Box::new(MemIo(img.clone())),
        size,
        512,
        true,
    )
}

/// A copy of `len` bytes of `img` at `off`.
pub fn bytes(img: &Image, off: u64, len: u64) -> Vec<u8> {
    img.lock().expect("image")[off as usize..(off + len) as usize].to_vec()
}
