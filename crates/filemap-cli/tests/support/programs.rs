//! What the tests of a volume's mount and of a pass-through mount ask of
//! the same unmodified programs, and how they check the result.

use std::path::{Path, PathBuf};

use super::run;

/// `stat -c FORMAT` of `path`, trimmed.
pub fn stat(format: &str, path: &str) -> String {
    run("stat", &["-c", format, path]).trim().to_owned()
}

/// `renameat2(2)` with `flags`: the error number, or 0.
pub fn renameat2(from: &str, to: &str, flags: libc::c_uint) -> i32 {
    let from = std::ffi::CString::new(from).unwrap();
    let to = std::ffi::CString::new(to).unwrap();
    // SAFETY: both paths are NUL-terminated strings that outlive the call.
    let done = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    match done {
        0 => 0,
        _ => std::io::Error::last_os_error().raw_os_error().unwrap(),
    }
}

/// The bytes of the direct copy: the first 16 MiB of the source.
pub const DIRECT_BYTES: &str = "16777216";

/// Writes 64 MiB of random bytes to `scratch/source` (off the mount); `cp`
/// copies it to `at("copy")` and `dd` with `oflag=direct` its first 16 MiB to
/// `at("direct")`, which `dd` with `iflag=direct` reads back to
/// `scratch/back`; `cmp` finds each equal. Returns the source's path.
pub fn copy_with_cp_and_direct_dd(scratch: &Path, at: impl Fn(&str) -> String) -> PathBuf {
    let source = scratch.join("source");
    let back = scratch.join("back");
    let (source_path, back_path) = (source.to_str().unwrap(), back.to_str().unwrap());
    run(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={source_path}"),
            "bs=1M",
            "count=64",
            "status=none",
        ],
    );
    run("cp", &[source_path, &at("copy")]);
    run("cmp", &[source_path, &at("copy")]);
    run(
        "dd",
        &[
            &format!("if={source_path}"),
            &format!("of={}", at("direct")),
            "bs=1M",
            "count=16",
            "oflag=direct",
            "status=none",
        ],
    );
    run(
        "dd",
        &[
            &format!("if={}", at("direct")),
            &format!("of={back_path}"),
            "bs=1M",
            "iflag=direct",
            "status=none",
        ],
    );
    run("cmp", &["-n", DIRECT_BYTES, source_path, back_path]);
    source
}

/// `source` equals `copy`, and its first 16 MiB `direct`.
pub fn compare_copies(source: &Path, copy: &str, direct: &str) {
    let source = source.to_str().unwrap();
    run("cmp", &[source, copy]);
    run("cmp", &["-n", DIRECT_BYTES, source, direct]);
}

/// Writes 256 KiB of random bytes to `file` with `dd`, then punches a hole
/// at 4 KiB for 8 KiB and zeroes 4 KiB at 64 KiB with `fallocate`, keeping
/// the size. Returns the file's bytes, checked by [`check_punched_and_zeroed`].
pub fn punch_and_zero_with_fallocate(file: &str) -> Vec<u8> {
    run(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={file}"),
            "bs=64K",
            "count=4",
            "status=none",
        ],
    );
    for (mode, offset, length) in [
        ("--punch-hole", "4096", "8192"),
        ("--zero-range", "65536", "4096"),
    ] {
        run(
            "fallocate",
            &[mode, "--offset", offset, "--length", length, file],
        );
    }
    check_punched_and_zeroed(std::fs::read(file).expect("read"))
}

/// `bytes` are those [`punch_and_zero_with_fallocate`] leaves.
pub fn check_punched_and_zeroed(bytes: Vec<u8>) -> Vec<u8> {
    assert_eq!(bytes.len(), 256 << 10, "the size stays");
    assert!(bytes[4096..12288].iter().all(|&b| b == 0), "punched");
    assert!(bytes[65536..69632].iter().all(|&b| b == 0), "zeroed");
    assert!(
        bytes[12288..65536].iter().any(|&b| b != 0),
        "the rest stays"
    );
    bytes
}

/// Python's `sqlite3` makes database `db`: a table of 5,000 rows, in 50
/// transactions; its count and `PRAGMA integrity_check` are checked.
pub fn sqlite_fill(db: &str) {
    let script = format!(
        "import sqlite3\n\
         c = sqlite3.connect({db:?})\n\
         c.execute('create table t(x integer, y text)')\n\
         for i in range(50):\n    \
             c.executemany('insert into t values(?, ?)', [(i * 100 + j, 'row %d' % j) for j in range(100)])\n    \
             c.commit()\n\
         print(c.execute('select count(*) from t').fetchone()[0], c.execute('pragma integrity_check').fetchone()[0])\n"
    );
    assert_eq!(run("python3", &["-c", &script]).trim(), "5000 ok");
}

/// Database `db`, made by [`sqlite_fill`], still has its 5,000 rows and
/// passes `PRAGMA integrity_check`.
pub fn sqlite_check(db: &str) {
    let check = format!(
        "import sqlite3\nc = sqlite3.connect({db:?})\nprint(c.execute('select count(*) from t').fetchone()[0], c.execute('pragma integrity_check').fetchone()[0])\n"
    );
    assert_eq!(run("python3", &["-c", &check]).trim(), "5000 ok");
}
