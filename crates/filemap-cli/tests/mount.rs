//! `filemap mount`: unmodified programs on a mounted volume image. Each test
//! formats an image, mounts it with the `filemap` binary, runs programs on
//! it, unmounts it (SIGTERM or `umount`) and mounts it again to check what
//! was synced. A test that cannot mount fails with the server's words.

mod support;

use support::{filemap, run, Image};

#[test]
fn cp_and_dd_direct_copies_compare_equal_after_a_remount() {
    let image = Image::new("512M");
    let source = image.dir.path().join("source");
    run(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", source.display()),
            "bs=1M",
            "count=64",
            "status=none",
        ],
    );
    let server = image.mount();
    run("cp", &[source.to_str().unwrap(), &image.at("copy")]);
    run("cmp", &[source.to_str().unwrap(), &image.at("copy")]);
    run(
        "dd",
        &[
            &format!("if={}", source.display()),
            &format!("of={}", image.at("direct")),
            "bs=1M",
            "count=16",
            "oflag=direct",
            "status=none",
        ],
    );
    let back = image.dir.path().join("back");
    run(
        "dd",
        &[
            &format!("if={}", image.at("direct")),
            &format!("of={}", back.display()),
            "bs=1M",
            "iflag=direct",
            "status=none",
        ],
    );
    run(
        "cmp",
        &[
            "-n",
            "16777216",
            source.to_str().unwrap(),
            back.to_str().unwrap(),
        ],
    );
    server.stop(Some("TERM"));

    let server = image.mount();
    run("cmp", &[source.to_str().unwrap(), &image.at("copy")]);
    run(
        "cmp",
        &[
            "-n",
            "16777216",
            source.to_str().unwrap(),
            &image.at("direct"),
        ],
    );
    server.stop(None);
}

#[test]
fn fallocate_punch_and_zero_read_back_as_zeroes() {
    let image = Image::new("64M");
    let server = image.mount();
    let file = image.at("f");
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
    run(
        "fallocate",
        &[
            "--punch-hole",
            "--offset",
            "4096",
            "--length",
            "8192",
            &file,
        ],
    );
    run(
        "fallocate",
        &[
            "--zero-range",
            "--offset",
            "65536",
            "--length",
            "4096",
            &file,
        ],
    );
    let bytes = std::fs::read(&file).expect("read");
    assert_eq!(bytes.len(), 256 << 10, "the size stays");
    assert!(bytes[4096..12288].iter().all(|&b| b == 0), "punched");
    assert!(bytes[65536..69632].iter().all(|&b| b == 0), "zeroed");
    assert!(
        bytes[12288..65536].iter().any(|&b| b != 0),
        "the rest stays"
    );
    server.stop(Some("INT"));
}

#[test]
fn sqlite_writes_and_passes_its_integrity_check() {
    let image = Image::new("128M");
    let server = image.mount();
    let db = image.at("t.db");
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
    server.stop(Some("TERM"));
    let server = image.mount();
    let check = format!(
        "import sqlite3\nc = sqlite3.connect({db:?})\nprint(c.execute('select count(*) from t').fetchone()[0], c.execute('pragma integrity_check').fetchone()[0])\n"
    );
    assert_eq!(run("python3", &["-c", &check]).trim(), "5000 ok");
    server.stop(None);
}

#[test]
fn bad_input_names_the_path_and_exits_2_writing_nothing() {
    let image = Image::new("16M");
    let before = std::fs::read(image.image()).expect("image");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "mount".into(),
                image.image().display().to_string(),
                "/nonexistent/mnt".into(),
            ],
            "/nonexistent/mnt",
        ),
        (
            vec![
                "mount".into(),
                "/nonexistent/img".into(),
                image.mnt().display().to_string(),
            ],
            "/nonexistent/img",
        ),
        (
            vec![
                "format".into(),
                image.image().display().to_string(),
                "--size".into(),
                "16M".into(),
            ],
            "volume.img",
        ),
    ];
    for (args, named) in cases {
        let out = filemap().args(&args).output().expect("filemap runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(named),
            "{args:?} does not name {named}: {stderr}"
        );
    }
    // Not a volume: the message says how to make one.
    let junk = image.dir.path().join("junk");
    std::fs::write(&junk, vec![7; 1 << 20]).expect("junk");
    let out = filemap()
        .args([
            "mount",
            junk.to_str().unwrap(),
            image.mnt().to_str().unwrap(),
        ])
        .output()
        .expect("filemap runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("filemap format"));
    assert_eq!(
        std::fs::read(&junk).expect("junk"),
        vec![7; 1 << 20],
        "junk untouched"
    );
    assert!(
        std::fs::read(image.image()).expect("image") == before,
        "a refused call wrote to the image"
    );
    // Mounted already: the second server is refused (EBUSY), the first serves on.
    let server = image.mount();
    let second = image.dir.path().join("mnt2");
    std::fs::create_dir(&second).expect("second mount point");
    let out = filemap()
        .args([
            "mount",
            image.image().to_str().unwrap(),
            second.to_str().unwrap(),
        ])
        .output()
        .expect("filemap runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    server.stop(None);
}
