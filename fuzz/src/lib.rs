//! The checks behind cowsnap's fuzz targets (see README.md): each takes
//! the bytes libFuzzer made and panics only when the code under test
//! misbehaves (a panic inside it, a hang, a wrong answer).
//!
//! - [`nbd`]: the NBD server's option haggling and request loop, driven
//!   with arbitrary client bytes over in-memory streams;
//! - [`cow`]: the COW header reader, the area scanner and the loader, on
//!   in-memory devices built from the input, then used and reloaded;
//! - [`names`]: resource-name parsers and formatters (round trips);
//! - [`list_requests`]: the control service's page tokens, filters and
//!   other request-field parsers;
//! - [`memdev`]: the in-memory device the engine runs on here;
//! - [`seeds`]: the starting corpus (`cargo run --example make_seeds`).

pub mod cow;
pub mod list_requests;
pub mod memdev;
pub mod names;
pub mod nbd;
pub mod seeds;

use std::cell::RefCell;

/// Runs `f` on this thread's runtime (one per thread, made once: building
/// a runtime per input would cost more than most checks).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    thread_local! {
        static RT: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
    }
    RT.with(|rt| {
        let mut rt = rt.borrow_mut();
        let rt = rt.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("tokio runtime")
        });
        rt.block_on(f)
    })
}
