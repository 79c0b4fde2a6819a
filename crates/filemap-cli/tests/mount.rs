//! `filemap mount`: unmodified programs on a mounted volume image. Each test
//! formats an image, mounts it with the `filemap` binary, runs programs on
//! it, unmounts it (SIGTERM or `umount`) and mounts it again to check what
//! was synced. A test that cannot mount fails with the server's words.

mod support;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use support::programs::{
    compare_copies, copy_with_cp_and_direct_dd, punch_and_zero_with_fallocate, renameat2,
    sqlite_check, sqlite_fill, stat,
};
use support::{filemap, run, umount, Image, Rng};

#[test]
fn cp_and_dd_direct_copies_compare_equal_after_a_remount() {
    let image = Image::new("512M");
    let server = image.mount();
    let source = copy_with_cp_and_direct_dd(image.dir.path(), |name| image.at(name));
    server.stop(Some("TERM"));

    let server = image.mount();
    compare_copies(&source, &image.at("copy"), &image.at("direct"));
    server.stop(None);
}

#[test]
fn fallocate_punch_and_zero_read_back_as_zeroes() {
    let image = Image::new("64M");
    let server = image.mount();
    punch_and_zero_with_fallocate(&image.at("f"));
    server.stop(Some("INT"));
}

#[test]
fn sqlite_writes_and_passes_its_integrity_check() {
    let image = Image::new("128M");
    let server = image.mount();
    sqlite_fill(&image.at("t.db"));
    server.stop(Some("TERM"));
    let server = image.mount();
    sqlite_check(&image.at("t.db"));
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

#[test]
fn a_source_tree_extracted_by_tar_diffs_equal_after_a_remount() {
    let image = Image::new("256M");
    let tree = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let archive = image.dir.path().join("tree.tar");
    run(
        "tar",
        &[
            "-C",
            tree,
            "-cf",
            archive.to_str().unwrap(),
            "--exclude=target",
            "filemap",
            "filemap-cli",
        ],
    );
    let server = image.mount();
    run(
        "tar",
        &[
            "-C",
            image.mnt().to_str().unwrap(),
            "-xf",
            archive.to_str().unwrap(),
        ],
    );
    for dir in ["filemap", "filemap-cli"] {
        run(
            "diff",
            &[
                "-r",
                "--no-dereference",
                &format!("{tree}/{dir}"),
                &image.at(dir),
            ],
        );
    }
    // `tar -d` compares every member's content, size, mode and
    // modification time (which the writeback of the files' pages, after tar
    // set the times, must not move).
    let compare = || {
        run(
            "tar",
            &[
                "-C",
                image.mnt().to_str().unwrap(),
                "-df",
                archive.to_str().unwrap(),
            ],
        )
    };
    compare();
    server.stop(Some("TERM"));
    let server = image.mount();
    compare();
    for dir in ["filemap", "filemap-cli"] {
        run(
            "diff",
            &[
                "-r",
                "--no-dereference",
                &format!("{tree}/{dir}"),
                &image.at(dir),
            ],
        );
    }
    // The archive made from the mount holds the same tree.
    let again = image.dir.path().join("again.tar");
    run(
        "tar",
        &[
            "-C",
            image.mnt().to_str().unwrap(),
            "-cf",
            again.to_str().unwrap(),
            "filemap",
        ],
    );
    let listed = |archive: &Path| {
        let mut names: Vec<String> = run("tar", &["-tf", archive.to_str().unwrap()])
            .lines()
            .filter(|name| name.starts_with("filemap/"))
            .map(str::to_owned)
            .collect();
        names.sort();
        names
    };
    assert_eq!(listed(&again), listed(&archive));
    server.stop(None);
}

#[test]
fn sqlite_writers_in_several_processes_keep_the_database_intact() {
    let image = Image::new("128M");
    let server = image.mount();
    let db = image.at("shared.db");
    let setup = format!(
        "import sqlite3\nc = sqlite3.connect({db:?})\nc.execute('create table t(writer integer, i integer)')\nc.commit()\n"
    );
    run("python3", &["-c", &setup]);
    // Each writer commits 200 single-row transactions, waiting for the
    // database lock as long as it takes.
    let writer = format!(
        "import sqlite3, sys\n\
         w = int(sys.argv[1])\n\
         c = sqlite3.connect({db:?}, timeout=60)\n\
         for i in range(200):\n    \
             c.execute('insert into t values(?, ?)', (w, i))\n    \
             c.commit()\n"
    );
    let writers: Vec<Child> = (0..4)
        .map(|w| {
            Command::new("python3")
                .args(["-c", &writer, &w.to_string()])
                .stderr(Stdio::piped())
                .spawn()
                .expect("python3 runs")
        })
        .collect();
    for child in writers {
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "a writer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let check = format!(
        "import sqlite3\nc = sqlite3.connect({db:?})\n\
         print(c.execute('select count(*), count(distinct writer * 1000 + i) from t').fetchone(), c.execute('pragma integrity_check').fetchone()[0])\n"
    );
    assert_eq!(run("python3", &["-c", &check]).trim(), "(800, 800) ok");
    server.stop(Some("TERM"));
    let server = image.mount();
    assert_eq!(run("python3", &["-c", &check]).trim(), "(800, 800) ok");
    server.stop(None);
}

#[test]
fn directories_links_renames_and_attributes_survive_a_remount() {
    let image = Image::new("64M");
    let server = image.mount();
    run("mkdir", &["-p", &image.at("a/b/c")]);
    std::fs::write(image.at("a/b/c/f"), "first").unwrap();
    std::fs::write(image.at("a/g"), "second").unwrap();
    run("ln", &[&image.at("a/b/c/f"), &image.at("a/hard")]);
    run("ln", &["-s", "b/c/f", &image.at("a/sym")]);
    assert_eq!(std::fs::read_to_string(image.at("a/sym")).unwrap(), "first");
    run("mv", &[&image.at("a/b"), &image.at("a/moved")]);
    run("chmod", &["640", &image.at("a/g")]);
    run("chown", &["123:456", &image.at("a/g")]);
    run(
        "touch",
        &["-m", "-d", "2001-02-03 04:05:06", &image.at("a/g")],
    );
    // Exchange swaps the two names; no-replace refuses an existing target.
    assert_eq!(
        renameat2(&image.at("a/g"), &image.at("a/hard"), libc::RENAME_EXCHANGE),
        0
    );
    assert_eq!(
        renameat2(
            &image.at("a/g"),
            &image.at("a/hard"),
            libc::RENAME_NOREPLACE
        ),
        libc::EEXIST
    );
    // A directory cannot move below itself, nor replace a file, and a full
    // one cannot be removed.
    assert!(std::fs::rename(image.at("a"), image.at("a/moved/inside")).is_err());
    assert_eq!(
        std::fs::remove_dir(image.at("a/moved"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENOTEMPTY)
    );
    let check = |image: &Image| {
        assert_eq!(std::fs::read_to_string(image.at("a/g")).unwrap(), "first");
        assert_eq!(
            std::fs::read_to_string(image.at("a/hard")).unwrap(),
            "second"
        );
        assert_eq!(stat("%a %u %g", &image.at("a/hard")), "640 123 456");
        assert_eq!(
            stat("%y", &image.at("a/hard")),
            "2001-02-03 04:05:06.000000000 +0000"
        );
        assert_eq!(stat("%h", &image.at("a/moved/c/f")), "2");
        assert_eq!(stat("%h", &image.at("a")), "3", "a holds one directory");
        assert_eq!(
            std::fs::read_link(image.at("a/sym")).unwrap(),
            Path::new("b/c/f")
        );
        assert!(
            std::fs::metadata(image.at("a/sym")).is_err(),
            "the link's target moved away"
        );
        let mut names: Vec<String> = std::fs::read_dir(image.at("a"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["g", "hard", "moved", "sym"]);
    };
    check(&image);
    server.stop(Some("TERM"));
    let server = image.mount();
    check(&image);
    server.stop(None);
}

#[test]
fn a_file_unlinked_while_open_lives_until_its_last_close() {
    let image = Image::new("64M");
    let server = image.mount();
    let path = image.at("doomed");
    let free_before = stat("%f", image.mnt().to_str().unwrap());
    let mut file = std::fs::OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    use std::io::{Read, Seek, Write};
    file.write_all(&vec![9; 8 << 20]).unwrap();
    file.sync_all().unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(!Path::new(&path).exists());
    // Still readable and writable through the open descriptor.
    file.write_all(b"tail").unwrap();
    file.seek(std::io::SeekFrom::Start(0)).unwrap();
    let mut back = Vec::new();
    file.read_to_end(&mut back).unwrap();
    assert_eq!(back.len(), (8 << 20) + 4);
    assert!(back[..8 << 20].iter().all(|&b| b == 9));
    drop(file);
    // Its blocks are free once it is closed (the volume frees them at once;
    // the count of free blocks is settled by the next commit).
    run("sync", &["-f", image.mnt().to_str().unwrap()]);
    assert_eq!(stat("%f", image.mnt().to_str().unwrap()), free_before);
    server.stop(None);
}

#[test]
fn seek_data_and_seek_hole_find_the_written_pages() {
    let image = Image::new("64M");
    let server = image.mount();
    let path = image.at("sparse");
    let script = format!(
        "import os\n\
         fd = os.open({path:?}, os.O_CREAT | os.O_RDWR)\n\
         os.ftruncate(fd, 1 << 20)\n\
         os.pwrite(fd, b'x' * 5000, 300000)\n\
         print(os.lseek(fd, 0, os.SEEK_DATA), os.lseek(fd, 0, os.SEEK_HOLE), os.lseek(fd, 300000, os.SEEK_HOLE), os.lseek(fd, 400000, os.SEEK_HOLE))\n\
         try:\n    os.lseek(fd, 400000, os.SEEK_DATA)\nexcept OSError as e:\n    print(e.errno)\n"
    );
    // Data is in whole pages: 299008..307200 (pages 73 and 74).
    assert_eq!(
        run("python3", &["-c", &script]).trim(),
        format!("299008 0 307200 400000\n{}", libc::ENXIO)
    );
    server.stop(None);
}

#[test]
fn a_busy_or_dead_mount_point_is_refused_naming_it() {
    let image = Image::new("16M");
    let other = Image::new("16M");
    let server = image.mount();
    // Mounting `other` on `image`'s mount point: refused, exit 2, naming it
    // and saying `why`.
    let refused = |why: &str| {
        let out = filemap()
            .args([
                "mount",
                other.image().to_str().unwrap(),
                image.mnt().to_str().unwrap(),
            ])
            .output()
            .expect("filemap runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(image.mnt().to_str().unwrap()), "{stderr}");
        assert!(stderr.contains(why), "{stderr}");
    };
    // Busy: something is mounted there already.
    refused("mounted there already");
    // Dead: the server was killed, and the mount is left without one.
    server.kill_leaving_a_dead_mount();
    refused("dead mount");
    umount(&image.mnt());
    // Cleared, the mount point takes the image again (it recovers from the
    // kill as from a crash).
    image.mount().stop(None);
}

/// `copy_file_range(2)` of `len` bytes from `offset_in` of `from` to
/// `offset_out` of `to`, repeated until all are copied.
fn copy_file_range(from: &File, offset_in: u64, to: &File, offset_out: u64, len: usize) {
    let (mut offset_in, mut offset_out) = (offset_in as i64, offset_out as i64);
    let mut left = len;
    while left > 0 {
        // SAFETY: both descriptors are open for the call, and the offsets
        // are this function's own variables, which outlive it.
        let copied = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                &mut offset_in,
                to.as_raw_fd(),
                &mut offset_out,
                left,
                0,
            )
        };
        assert!(
            copied > 0,
            "copy_file_range: {}",
            std::io::Error::last_os_error()
        );
        left -= copied as usize;
    }
}

#[test]
fn copy_file_range_copies_at_unaligned_offsets_within_and_across_files() {
    let image = Image::new("64M");
    let server = image.mount();
    let mut rng = Rng::new(7);
    let bytes: Vec<u8> = (0..(3 << 20) + 5).map(|_| rng.u64() as u8).collect();
    std::fs::write(image.at("a"), &bytes).unwrap();
    let open = |name: &str| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(image.at(name))
            .unwrap()
    };
    let (a, b) = (open("a"), open("b"));
    // Across files, into a new one past its end; within a file, forward.
    copy_file_range(&a, 4095, &b, 10_000, (2 << 20) + 77);
    copy_file_range(&a, 1, &a, (3 << 20) + 100, 5000);
    let mut want_b = vec![0; 10_000];
    want_b.extend_from_slice(&bytes[4095..4095 + (2 << 20) + 77]);
    let mut want_a = bytes.clone();
    want_a.resize((3 << 20) + 100, 0);
    want_a.extend_from_slice(&bytes[1..5001]);
    let check = |what: &str| {
        assert!(std::fs::read(image.at("b")).unwrap() == want_b, "{what}: b");
        assert!(std::fs::read(image.at("a")).unwrap() == want_a, "{what}: a");
    };
    check("through the mount");
    drop((a, b));
    server.stop(Some("TERM"));
    let server = image.mount();
    check("after a remount");
    server.stop(None);
}

/// Caught: an unmount right after a large write lost most of it. The cache's
/// background writeback held every file's mapping through its pass, so the
/// writeback of the file's last close ran there, after the unmount had
/// committed the volume, and the server ended under it ("everything synced"
/// all the same). The unmount now syncs every file of the cache itself.
#[test]
fn an_unmount_right_after_a_large_write_keeps_every_byte() {
    let image = Image::new("512M");
    let mut rng = Rng::new(16);
    let mut data = vec![0u8; 192 << 20];
    for round in 0..3 {
        rng.fill_nonzero(&mut data);
        let server = image.mount();
        std::fs::write(image.at("big"), &data).expect("write through the mount");
        server.stop(None);
        let server = image.mount();
        let back = std::fs::read(image.at("big")).expect("read after the remount");
        let first_lost = back.iter().zip(&data).position(|(got, want)| got != want);
        assert!(
            back.len() == data.len() && first_lost.is_none(),
            "round {round}: {} bytes back of {}, first wrong byte at {first_lost:?}",
            back.len(),
            data.len()
        );
        server.stop(None);
    }
}
