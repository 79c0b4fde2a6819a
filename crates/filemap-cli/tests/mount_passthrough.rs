//! `filemap mount --passthrough`: unmodified programs on a host directory
//! served through the cache. Each test mounts a temporary directory with
//! the `filemap` binary, runs programs on the mount, and checks what the
//! host directory holds, most after the server ended. A test that cannot
//! mount fails with the server's words.

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use support::programs::{
    check_punched_and_zeroed, compare_copies, copy_with_cp_and_direct_dd,
    punch_and_zero_with_fallocate, renameat2, sqlite_check, sqlite_fill, stat,
};
use support::{filemap, is_mounted, run, HostDir, Server};

#[test]
fn cp_of_a_large_file_compares_equal_and_the_host_file_holds_it_after_unmount() {
    let host = HostDir::new();
    let server = host.mount();
    let source = copy_with_cp_and_direct_dd(host.dir.path(), |name| host.at(name));
    server.stop(Some("TERM"));
    compare_copies(&source, &host.host("copy"), &host.host("direct"));
    assert_eq!(
        std::fs::metadata(host.host("direct")).unwrap().len(),
        16 << 20
    );
}

#[test]
fn a_source_tree_extracted_by_tar_diffs_equal_and_keeps_its_times_on_the_host() {
    let host = HostDir::new();
    let tree = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let archive = host.dir.path().join("tree.tar");
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
    let server = host.mount();
    run(
        "tar",
        &[
            "-C",
            host.mnt().to_str().unwrap(),
            "-xf",
            archive.to_str().unwrap(),
        ],
    );
    let diff = |root: &Path| {
        for dir in ["filemap", "filemap-cli"] {
            run(
                "diff",
                &[
                    "-r",
                    "--no-dereference",
                    &format!("{tree}/{dir}"),
                    root.join(dir).to_str().unwrap(),
                ],
            );
        }
    };
    // `tar -d` compares every member's content, size, mode and
    // modification time (which the writeback of the files' pages to the
    // host, after tar set the times, must not move).
    let compare = |root: &Path| {
        run(
            "tar",
            &[
                "-C",
                root.to_str().unwrap(),
                "-df",
                archive.to_str().unwrap(),
            ],
        )
    };
    diff(&host.mnt());
    compare(&host.mnt());
    server.stop(Some("INT"));
    diff(&host.src());
    compare(&host.src());
}

#[test]
fn directories_links_renames_and_attributes_reach_the_host_directory() {
    let host = HostDir::new();
    let server = host.mount();
    run("mkdir", &["-p", &host.at("a/b/c")]);
    std::fs::write(host.at("a/b/c/f"), "first").unwrap();
    std::fs::write(host.at("a/g"), "second").unwrap();
    run("ln", &[&host.at("a/b/c/f"), &host.at("a/hard")]);
    run("ln", &["-s", "b/c/f", &host.at("a/sym")]);
    assert_eq!(std::fs::read_to_string(host.at("a/sym")).unwrap(), "first");
    assert_eq!(
        stat("%i", &host.at("a/hard")),
        stat("%i", &host.at("a/b/c/f")),
        "two names of one file are one inode"
    );
    run("mv", &[&host.at("a/b"), &host.at("a/moved")]);
    run("chmod", &["640", &host.at("a/g")]);
    run("chown", &["123:456", &host.at("a/g")]);
    run(
        "touch",
        &["-m", "-d", "2001-02-03 04:05:06", &host.at("a/g")],
    );
    // Exchange swaps the two names; no-replace refuses an existing target.
    assert_eq!(
        renameat2(&host.at("a/g"), &host.at("a/hard"), libc::RENAME_EXCHANGE),
        0
    );
    assert_eq!(
        renameat2(&host.at("a/g"), &host.at("a/hard"), libc::RENAME_NOREPLACE),
        libc::EEXIST
    );
    assert!(std::fs::rename(host.at("a"), host.at("a/moved/inside")).is_err());
    assert_eq!(
        std::fs::remove_dir(host.at("a/moved"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENOTEMPTY)
    );
    run("mkdir", &[&host.at("a/empty")]);
    run("rmdir", &[&host.at("a/empty")]);
    // What the mount shows and what the host directory holds agree.
    let check = |path: &dyn Fn(&str) -> String| {
        assert_eq!(std::fs::read_to_string(path("a/g")).unwrap(), "first");
        assert_eq!(std::fs::read_to_string(path("a/hard")).unwrap(), "second");
        assert_eq!(stat("%a %u %g", &path("a/hard")), "640 123 456");
        assert_eq!(
            stat("%y", &path("a/hard")),
            "2001-02-03 04:05:06.000000000 +0000"
        );
        assert_eq!(stat("%h", &path("a/moved/c/f")), "2");
        assert_eq!(stat("%h", &path("a")), "3", "a holds one directory");
        assert_eq!(
            std::fs::read_link(path("a/sym")).unwrap(),
            Path::new("b/c/f")
        );
        assert!(
            std::fs::metadata(path("a/sym")).is_err(),
            "the link's target moved away"
        );
        let mut names: Vec<String> = std::fs::read_dir(path("a"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["g", "hard", "moved", "sym"]);
    };
    check(&|name| host.at(name));
    check(&|name| host.host(name));
    // A new file and directory get the mode asked for, whatever the
    // server's umask.
    run("install", &["-m", "0666", "/dev/null", &host.at("open")]);
    run("mkdir", &["-m", "0777", &host.at("wide")]);
    assert_eq!(stat("%a", &host.host("open")), "666");
    assert_eq!(stat("%a", &host.host("wide")), "777");
    server.stop(None);
    check(&|name| host.host(name));
}

#[test]
fn an_open_file_and_directory_survive_their_renames_on_the_host() {
    let host = HostDir::new();
    std::fs::create_dir(host.src().join("a")).unwrap();
    std::fs::write(host.src().join("a/x"), "before").unwrap();
    let server = host.mount();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(host.at("a/x"))
        .unwrap();
    let dir = std::fs::File::open(host.at("a")).unwrap();
    // Renamed behind the mount's back: its inodes keep their files.
    std::fs::rename(host.src().join("a"), host.src().join("z")).unwrap();
    std::fs::rename(host.src().join("z/x"), host.src().join("z/y")).unwrap();
    file.write_all_at(b"AFTER!", 0).unwrap();
    assert_eq!(file.metadata().unwrap().len(), 6);
    // A name looked up in the directory held open finds its new entry.
    let entry = format!("/proc/self/fd/{}/y", dir.as_raw_fd());
    let mut text = String::new();
    std::fs::File::open(&entry)
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, "AFTER!");
    assert!(!Path::new(&host.at("a")).exists());
    // Unlinked through the mount while open: it lives until its last close.
    std::fs::remove_file(host.at("z/y")).unwrap();
    assert!(!host.src().join("z/y").exists());
    file.write_all_at(b"gone", 6).unwrap();
    let mut back = [0u8; 10];
    file.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(&back, b"AFTER!gone");
    assert_eq!(file.metadata().unwrap().nlink(), 0);
    drop((file, dir));
    server.stop(Some("TERM"));
    assert_eq!(std::fs::read_dir(host.src().join("z")).unwrap().count(), 0);
}

#[test]
fn a_listing_carries_on_by_the_hosts_cookies_while_entries_come_and_go() {
    let host = HostDir::new();
    let dir = host.src().join("d");
    std::fs::create_dir(&dir).unwrap();
    for i in 0..2000 {
        std::fs::write(dir.join(format!("keep-{i:04}")), "").unwrap();
    }
    for i in 0..1000 {
        std::fs::write(dir.join(format!("gone-{i:04}")), "").unwrap();
    }
    let server = host.mount();
    let mut seen: HashMap<String, u32> = HashMap::new();
    let (mut gone, mut made) = (0, 0);
    for (n, entry) in std::fs::read_dir(host.at("d")).unwrap().enumerate() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        *seen.entry(name).or_default() += 1;
        // Between the kernel's requests, the host removes and adds entries.
        if n % 50 == 49 && gone < 1000 {
            for _ in 0..40 {
                std::fs::remove_file(dir.join(format!("gone-{gone:04}"))).unwrap();
                std::fs::write(dir.join(format!("new-{made:04}")), "").unwrap();
                gone += 1;
                made += 1;
            }
        }
    }
    assert!(gone > 0, "the listing took more than one request");
    for i in 0..2000 {
        let name = format!("keep-{i:04}");
        assert_eq!(
            seen.get(&name),
            Some(&1),
            "{name} was listed {:?} times",
            seen.get(&name)
        );
    }
    let twice: Vec<_> = seen.iter().filter(|(_, &count)| count > 1).collect();
    assert!(twice.is_empty(), "listed twice: {twice:?}");
    server.stop(None);
}

/// Waits until server `pid` holds no descriptor of `path` but its inode's
/// `O_PATH` one: it took the kernel's release of the last close (which the
/// kernel sends without waiting), and the file's mapping closed.
fn wait_released(server: &Server, path: &Path) {
    let fds = format!("/proc/{}/fd", server.pid());
    let opened = || {
        std::fs::read_dir(&fds)
            .unwrap()
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let target = std::fs::read_link(entry.path()).ok()?;
                let info = format!(
                    "/proc/{}/fdinfo/{}",
                    server.pid(),
                    entry.file_name().to_str()?
                );
                let info = std::fs::read_to_string(info).ok()?;
                let flags = info.lines().find_map(|line| line.strip_prefix("flags:"))?;
                let flags = i32::from_str_radix(flags.trim(), 8).ok()?;
                (target == path && flags & libc::O_PATH == 0).then_some(())
            })
            .count()
    };
    let started = Instant::now();
    while opened() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the server still has {} open after 20 s",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_file_changed_on_the_host_while_closed_is_read_fresh_after_reopen() {
    let host = HostDir::new();
    let server = host.mount();
    let host_file = host.src().join("f");
    for round in 0..10u8 {
        let old = vec![round.wrapping_mul(2) | 1; 40_000];
        std::fs::write(host.at("f"), &old).unwrap();
        assert_eq!(std::fs::read(host.at("f")).unwrap(), old);
        wait_released(&server, &host_file);
        // Rewritten on the host, at once and in place: the same size.
        let new = vec![round.wrapping_mul(2).wrapping_add(2); old.len()];
        std::fs::OpenOptions::new()
            .write(true)
            .open(&host_file)
            .unwrap()
            .write_all_at(&new, 0)
            .unwrap();
        assert_eq!(std::fs::read(host.at("f")).unwrap(), new, "round {round}");
        wait_released(&server, &host_file);
        // Grown on the host: the mount's size follows.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&host_file)
            .unwrap()
            .write_all(b"tail")
            .unwrap();
        let grown = std::fs::read(host.at("f")).unwrap();
        assert_eq!(grown.len(), new.len() + 4, "round {round}");
        assert_eq!(&grown[new.len()..], b"tail");
        assert_eq!(
            std::fs::metadata(host.at("f")).unwrap().size(),
            new.len() as u64 + 4
        );
        wait_released(&server, &host_file);
    }
    server.stop(None);
}

#[test]
fn fallocate_punch_and_zero_read_back_as_zeroes_on_the_mount_and_the_host() {
    let host = HostDir::new();
    let server = host.mount();
    let through_mount = punch_and_zero_with_fallocate(&host.at("f"));
    server.stop(Some("TERM"));
    assert!(
        check_punched_and_zeroed(std::fs::read(host.host("f")).unwrap()) == through_mount,
        "the host file differs from what the mount read"
    );
}

#[test]
fn sqlite_writes_and_passes_its_integrity_check_on_the_mount_and_the_host() {
    let host = HostDir::new();
    let server = host.mount();
    sqlite_fill(&host.at("t.db"));
    server.stop(Some("TERM"));
    sqlite_check(&host.host("t.db"));
}

#[test]
fn bad_input_names_the_path_and_exits_2_changing_nothing() {
    let host = HostDir::new();
    std::fs::write(host.src().join("kept"), "kept").unwrap();
    let file = host.dir.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let src = host.src().display().to_string();
    let mnt = host.mnt().display().to_string();
    let inside = host.src().join("kept-mnt");
    std::fs::create_dir(&inside).unwrap();
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec!["/nonexistent/dir".into(), mnt.clone()],
            "/nonexistent/dir".into(),
        ),
        (
            vec![file.display().to_string(), mnt.clone()],
            file.display().to_string(),
        ),
        (
            vec![src.clone(), "/nonexistent/mnt".into()],
            "/nonexistent/mnt".into(),
        ),
        (
            vec![src.clone(), file.display().to_string()],
            file.display().to_string(),
        ),
        (
            vec![src.clone(), inside.display().to_string()],
            inside.display().to_string(),
        ),
        // The mount point is required with the flag.
        (vec![src.clone()], "MOUNTPOINT".into()),
    ];
    for (args, named) in cases {
        let out = filemap()
            .args(["mount", "--passthrough"])
            .args(&args)
            .output()
            .expect("filemap runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&named),
            "{args:?} does not name {named}: {stderr}"
        );
        assert!(!is_mounted(&host.mnt()) && !is_mounted(&inside));
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a directory");
    let mut names: Vec<_> = std::fs::read_dir(host.src())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["kept", "kept-mnt"]);
    assert_eq!(std::fs::read_dir(host.mnt()).unwrap().count(), 0);
    // Mounted already: the second server is refused, the first serves on.
    let server = host.mount();
    let out = filemap()
        .args(["mount", "--passthrough", &src, &mnt])
        .output()
        .expect("filemap runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&mnt), "{stderr}");
    assert_eq!(std::fs::read_to_string(host.at("kept")).unwrap(), "kept");
    server.stop(None);
}
