//! Fixtures shared by the integration tests.

// Each test program uses its part.
#![allow(dead_code)]

use std::sync::Arc;

use filemap::{Backend, HostFile, Mapping, MemDevice, PageCache, Volume, PAGE_SIZE};

/// Every backend, each a fresh empty file, with the directory that keeps a
/// host file alive.
pub fn backends() -> Vec<(&'static str, Arc<dyn Backend>, Option<tempfile::TempDir>)> {
    let volume = Volume::format(Arc::new(MemDevice::new(8 << 20))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let host = HostFile::create(dir.path().join("file")).unwrap();
    vec![
        (
            "volume",
            Arc::new(volume.create_file("file").unwrap()),
            None,
        ),
        ("hostfile", Arc::new(host), Some(dir)),
    ]
}

/// A file of a fresh volume over memory holding `bytes`, in a cache of
/// `budget_pages` pages.
pub fn cached_file(bytes: &[u8], budget_pages: u64) -> (Arc<PageCache>, Arc<Mapping>) {
    let volume = Volume::format(Arc::new(MemDevice::new(64 << 20))).unwrap();
    let cache = Arc::new(
        PageCache::builder()
            .budget_bytes(budget_pages * PAGE_SIZE as u64)
            .build()
            .unwrap(),
    );
    let mapping = cache
        .open(Arc::new(volume.create_file("f").unwrap()))
        .unwrap();
    mapping.write_all_at(bytes, 0).unwrap();
    (cache, mapping)
}
