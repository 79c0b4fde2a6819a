//! Memory maps shared with the cache, and direct I/O whose buffer is a map of
//! the same file.
//!
//! What it shows, and asserts:
//! 1. a store through a read-write map is what `read_at` returns at once;
//! 2. a punch through the file shows through the map at once;
//! 3. `read_direct` into a map of the same file, and `write_direct` from one,
//!    neither deadlock nor fail (the buffer faults into the very mapping the
//!    direct I/O holds its coherence mode on), and move the right bytes;
//! 4. `MapRegion::flush` puts the map's stores on the backend.
//!
//! Maps need userfaultfd (see the README's Requirements): read-write maps fail
//! with `EOPNOTSUPP` on kernels without `MINOR_SHMEM` and `WP_ASYNC`.
//!
//! `cargo run -p filemap --release --example mapped_direct`

use std::io;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use filemap::page::PAGE;
use filemap::{MapAccess, MemDevice, PageCache, Volume, PAGE_SIZE};

/// Page `index` of the file as first written: every byte `index + 1`.
fn page(index: u8) -> Vec<u8> {
    vec![index + 1; PAGE_SIZE]
}

fn run() -> io::Result<()> {
    let volume = Volume::format(Arc::new(MemDevice::new(16 << 20)))?;
    let cache = PageCache::builder().build()?;
    let file = cache.open(Arc::new(volume.create_file("table")?))?;
    for index in 0..8 {
        file.write_all_at(&page(index), u64::from(index) * PAGE)?;
    }
    let map = file.map(0, 8 * PAGE_SIZE, MapAccess::ReadWrite)?;
    let mut buf = vec![0u8; PAGE_SIZE];

    // 1. A store through the map is the file's content at once.
    map.write(3 * PAGE_SIZE, b"stored through the map")?;
    file.read_exact_at(&mut buf[..22], 3 * PAGE)?;
    assert_eq!(&buf[..22], b"stored through the map");
    println!("1. a store through the map: read_at returns it at once");

    // 2. A punch shows through every map at once.
    file.punch_hole(PAGE, PAGE)?;
    map.read(PAGE_SIZE, &mut buf)?;
    assert!(buf.iter().all(|&b| b == 0));
    println!("2. punch_hole of page 1: the map shows zeroes there at once");

    // 3. Direct I/O through a buffer that is this file's own map. The map is
    // page-aligned, so it meets direct I/O's alignment.
    // SAFETY: nothing else touches pages 4..6 of the map while the slice
    // lives, and the map outlives it.
    let pages_4_to_6 =
        unsafe { std::slice::from_raw_parts_mut(map.as_ptr().add(4 * PAGE_SIZE), 2 * PAGE_SIZE) };
    // Reading file pages 6..8 into map pages 4..6 stores into file pages 4..6.
    assert_eq!(file.read_direct(pages_4_to_6, 6 * PAGE)?, 2 * PAGE_SIZE);
    file.read_exact_at(&mut buf, 4 * PAGE)?;
    assert_eq!(buf, page(6));
    // Writing map pages 4..6 (now copies of 6..8) over file pages 0..2.
    assert_eq!(file.write_direct(pages_4_to_6, 0)?, 2 * PAGE_SIZE);
    file.read_exact_at(&mut buf, PAGE)?;
    assert_eq!(buf, page(7));
    println!(
        "3. read_direct into, and write_direct from, a map of the same file: done, bytes right"
    );

    // 4. flush writes the map's stores back: the backend holds them.
    map.flush()?;
    let mut on_backend = vec![0u8; PAGE_SIZE];
    file.backend().read_pages(3, &mut on_backend)?;
    assert_eq!(&on_backend[..22], b"stored through the map");
    println!("4. MapRegion::flush: the backend holds the map's stores");
    Ok(())
}

fn main() -> io::Result<()> {
    // A deadlock would hang, not fail: give the run a deadline.
    let (done, finished) = mpsc::channel();
    let runner = thread::spawn(move || done.send(run()));
    match finished.recv_timeout(Duration::from_secs(60)) {
        Ok(result) => result?,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("the run took over 60 s: a deadlock"),
        // The run panicked: pass its panic on.
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = runner.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }
    println!("ok");
    Ok(())
}
