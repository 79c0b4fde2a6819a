//! Fixtures shared by the integration tests.

use std::sync::Arc;

use filemap::{Backend, HostFile, MemDevice, Volume};

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
