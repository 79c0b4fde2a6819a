//! An unprivileged process uses the cache: everything but memory maps works
//! without a userfaultfd, and `map()` fails with `EPERM` and a message that
//! says what would allow it.
//!
//! The test runs as root and re-runs its child half as the user `nobody`
//! (uid and gid 65534, no groups, no capabilities) through `setpriv`; on a
//! kernel that refuses unprivileged processes a userfaultfd
//! (`vm.unprivileged_userfaultfd=0`, the default of most distributions, with
//! `/dev/userfaultfd` root's only), that child may not create one. It fails,
//! with the reason, where it cannot set that up.

use std::io::ErrorKind;
use std::process::Command;
use std::sync::Arc;

use filemap::page::{PAGE, PAGE_SIZE};
use filemap::{AlignedBuf, HostFile, MapAccess, MemDevice, PageCache, Volume};

const CHILD: &str = "FILEMAP_UNPRIVILEGED_CHILD";
const NOBODY: &str = "65534";

/// The child's half of the test below: run by it only, as `nobody`.
#[test]
#[ignore = "a child process of the cache_works_without_privilege_and_map_says_what_it_needs test"]
fn unprivileged_child() {
    assert!(
        std::env::var_os(CHILD).is_some(),
        "run by its parent test only"
    );
    assert_ne!(
        rustix::process::geteuid().as_raw(),
        0,
        "the child must not be root"
    );
    let volume = Volume::format(Arc::new(MemDevice::new(16 << 20))).unwrap();
    let cache = PageCache::builder()
        .budget_bytes(16 * PAGE)
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let host = HostFile::create(dir.path().join("host")).unwrap();
    for backend in [
        Arc::new(volume.create_file("a").unwrap()) as Arc<dyn filemap::Backend>,
        Arc::new(host),
    ] {
        let file = cache.open(backend).unwrap();
        // Buffered I/O past the budget (evictions and writebacks), punch,
        // zero, truncate, collapse, insert, direct I/O, readahead, syncs.
        for page in 0..32u64 {
            file.write_all_at(&[page as u8 + 1; PAGE_SIZE], page * PAGE)
                .unwrap();
        }
        let mut buf = vec![0; PAGE_SIZE];
        file.read_exact_at(&mut buf, 3 * PAGE).unwrap();
        assert_eq!(buf, [4; PAGE_SIZE]);
        file.punch_hole(3 * PAGE, PAGE).unwrap();
        file.read_exact_at(&mut buf, 3 * PAGE).unwrap();
        assert_eq!(buf, [0; PAGE_SIZE], "a punched page reads zeroes");
        file.zero_range(4 * PAGE + 10, 20).unwrap();
        file.collapse_range(0, PAGE).unwrap();
        file.insert_range(0, PAGE).unwrap();
        file.set_len(20 * PAGE).unwrap();
        let mut direct = AlignedBuf::new(PAGE_SIZE, PAGE_SIZE);
        direct.fill(9);
        file.write_direct(&direct, 5 * PAGE).unwrap();
        file.read_exact_at(&mut buf, 5 * PAGE).unwrap();
        assert_eq!(buf, [9; PAGE_SIZE], "a buffered read sees the direct write");
        assert_eq!(file.read_direct(&mut direct, 6 * PAGE).unwrap(), PAGE_SIZE);
        assert_eq!(&direct[..], &[7; PAGE_SIZE][..]);
        file.readahead(0, 20 * PAGE).unwrap();
        file.read_at_nowait(&mut buf, 0).unwrap();
        file.sync_all().unwrap();
        assert!(file.fault_thread_names().is_empty(), "no fault thread runs");

        let error = file.map(0, PAGE_SIZE, MapAccess::Read).unwrap_err();
        assert_eq!(filemap::errno(&error), Some(libc::EPERM), "{error}");
        assert_eq!(error.kind(), ErrorKind::PermissionDenied);
        let message = error.to_string();
        assert!(
            message.contains("vm.unprivileged_userfaultfd") && message.contains("CAP_SYS_PTRACE"),
            "map's error says what would allow it: {message}"
        );
        // The refused map changed nothing.
        file.read_exact_at(&mut buf, 5 * PAGE).unwrap();
        assert_eq!(buf, [9; PAGE_SIZE]);
        file.remove().unwrap();
    }
}

#[test]
fn cache_works_without_privilege_and_map_says_what_it_needs() {
    assert_eq!(
        rustix::process::geteuid().as_raw(),
        0,
        "this test drops root's privileges to check what an unprivileged process \
         can do: run it as root"
    );
    let exe = std::env::current_exe().unwrap();
    let output = Command::new("setpriv")
        .args([
            "--reuid",
            NOBODY,
            "--regid",
            NOBODY,
            "--clear-groups",
            "--inh-caps=-all",
            "--",
        ])
        .arg(&exe)
        .args(["--exact", "unprivileged_child", "--ignored", "--nocapture"])
        .env(CHILD, "1")
        .env("TMPDIR", "/tmp")
        .output()
        .expect("setpriv (util-linux) runs the child as nobody: is it installed?");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && text.contains("1 passed"),
        "the unprivileged child failed ({}):\n{text}",
        output.status
    );
}
