//! The volume's namespace: every call of it with its errors, hard links,
//! files unlinked while open, rename under each of its flags, directory
//! listings that stay stable while entries come and go, timestamps, and the
//! namespace as a reopen (and a crash) finds it.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::Arc;
use std::time::Duration;

use filemap::{
    Backend, Device, FileKind, MemDevice, RenameFlags, SetAttr, Timestamp, Volume, VolumeFile,
};

const BLOCK: u64 = 4096;
const ROOT: u64 = Volume::ROOT;

fn volume(blocks: u64) -> (Arc<dyn Device>, Arc<Volume>) {
    let device: Arc<dyn Device> = Arc::new(MemDevice::new(blocks * BLOCK));
    let volume = Volume::format(device.clone()).unwrap();
    (device, volume)
}

fn errno<T: std::fmt::Debug>(result: io::Result<T>) -> i32 {
    filemap::errno(&result.unwrap_err()).expect("an errno")
}

/// A new device holding the bytes of `device`, as a restart after a crash
/// finds them (the crashed volume keeps its claim on `device`).
fn after_crash(device: &dyn Device) -> Arc<dyn Device> {
    let mut image = vec![0; device.len() as usize];
    device.read_exact_at(&mut image, 0).unwrap();
    let copy = MemDevice::new(device.len());
    copy.write_all_at(&image, 0).unwrap();
    Arc::new(copy)
}

fn mkdir(volume: &Volume, parent: u64, name: &str) -> u64 {
    volume.mkdir(parent, name, 0o755, 0, 0).unwrap().ino
}

/// A file `name` in `parent` of `pages` pages, each filled with `fill`.
fn file(volume: &Arc<Volume>, parent: u64, name: &str, pages: u64, fill: u8) -> VolumeFile {
    let (_, file) = volume.create(parent, name, 0o644, 0, 0).unwrap();
    file.set_len(pages * BLOCK).unwrap();
    if pages > 0 {
        file.write_pages(0, &vec![fill; (pages * BLOCK) as usize])
            .unwrap();
    }
    file
}

fn first_byte(file: &VolumeFile, page: u64) -> u8 {
    let mut buf = vec![0; BLOCK as usize];
    file.read_pages(page, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == buf[0]),
        "page {page} is not uniform"
    );
    buf[0]
}

/// The names of directory `dir`, in listing order.
fn names(volume: &Volume, dir: u64) -> Vec<String> {
    let entries = volume.read_dir(dir, 0, usize::MAX).unwrap();
    entries.into_iter().map(|entry| entry.name).collect()
}

/// Every path of the volume with what a reopen must find at it: kind,
/// inode, link count, permissions, owner, size, times, cookie, and a
/// symbolic link's target.
fn dump(volume: &Volume) -> BTreeMap<String, String> {
    let mut paths = BTreeMap::new();
    let mut stack = vec![(String::new(), ROOT)];
    while let Some((path, dir)) = stack.pop() {
        for entry in volume.read_dir(dir, 0, usize::MAX).unwrap() {
            let path = format!("{path}/{}", entry.name);
            let attr = volume.attr(entry.ino).unwrap();
            assert_eq!(attr.kind, entry.kind, "{path}");
            let target = match entry.kind {
                FileKind::Symlink => volume.readlink(entry.ino).unwrap(),
                _ => String::new(),
            };
            if entry.kind == FileKind::Dir {
                assert_eq!(volume.parent(entry.ino).unwrap(), dir, "{path}");
                stack.push((path.clone(), entry.ino));
            }
            paths.insert(
                path,
                format!("{attr:?} cookie {} target {target:?}", entry.cookie),
            );
        }
    }
    paths
}

#[test]
fn lookup_and_attr_find_what_create_mkdir_and_symlink_made() {
    let (_, volume) = volume(256);
    let root = volume.attr(ROOT).unwrap();
    assert_eq!(
        (root.kind, root.nlink, root.perm, root.size),
        (FileKind::Dir, 2, 0o755, 0)
    );
    let (created, _file) = volume.create(ROOT, "f", 0o640, 7, 8).unwrap();
    assert_eq!(
        (created.kind, created.perm, created.uid, created.gid),
        (FileKind::File, 0o640, 7, 8)
    );
    assert_eq!((created.nlink, created.size, created.blocks), (1, 0, 0));
    assert_ne!(created.ino, ROOT);
    let dir = volume.mkdir(ROOT, "d", 0o700, 1, 2).unwrap();
    assert_eq!((dir.kind, dir.nlink, dir.perm), (FileKind::Dir, 2, 0o700));
    let link = volume.symlink(dir.ino, "l", "../f", 3, 4).unwrap();
    assert_eq!(
        (link.kind, link.size, link.perm, link.uid),
        (FileKind::Symlink, 4, 0o777, 3)
    );
    assert_eq!(volume.lookup(ROOT, "f").unwrap(), created);
    assert_eq!(volume.lookup(ROOT, "d").unwrap().ino, dir.ino);
    assert_eq!(volume.lookup(dir.ino, "l").unwrap().ino, link.ino);
    // The root counts its subdirectory; sizes count entries.
    let root = volume.attr(ROOT).unwrap();
    assert_eq!((root.nlink, root.size), (3, 2));
    assert_eq!(volume.attr(dir.ino).unwrap().size, 1);
    assert_eq!(volume.readlink(link.ino).unwrap(), "../f");

    assert_eq!(errno(volume.lookup(ROOT, "missing")), libc::ENOENT);
    assert_eq!(errno(volume.lookup(created.ino, "x")), libc::ENOTDIR);
    assert_eq!(errno(volume.lookup(999, "x")), libc::ENOENT);
    assert_eq!(errno(volume.attr(999)), libc::ENOENT);
    for bad in ["", ".", "..", "a/b", "a\0"] {
        assert_eq!(errno(volume.lookup(ROOT, bad)), libc::EINVAL, "{bad:?}");
        assert_eq!(errno(volume.mkdir(ROOT, bad, 0o755, 0, 0)), libc::EINVAL);
    }
    let long = "n".repeat(256);
    assert_eq!(errno(volume.lookup(ROOT, &long)), libc::ENAMETOOLONG);
    assert_eq!(
        errno(volume.create(ROOT, &long, 0o644, 0, 0)),
        libc::ENAMETOOLONG
    );
    volume.create(ROOT, &"n".repeat(255), 0o644, 0, 0).unwrap();
    volume.check_invariants();
}

#[test]
fn create_mkdir_and_symlink_refuse_what_linux_refuses() {
    let (_, volume) = volume(256);
    let (f, _file) = volume.create(ROOT, "f", 0o644, 0, 0).unwrap();
    let d = mkdir(&volume, ROOT, "d");
    assert_eq!(errno(volume.create(ROOT, "f", 0o644, 0, 0)), libc::EEXIST);
    assert_eq!(errno(volume.create(ROOT, "d", 0o644, 0, 0)), libc::EEXIST);
    assert_eq!(errno(volume.mkdir(ROOT, "f", 0o755, 0, 0)), libc::EEXIST);
    assert_eq!(errno(volume.symlink(ROOT, "d", "x", 0, 0)), libc::EEXIST);
    assert_eq!(errno(volume.create(999, "g", 0o644, 0, 0)), libc::ENOENT);
    assert_eq!(errno(volume.mkdir(999, "g", 0o755, 0, 0)), libc::ENOENT);
    assert_eq!(errno(volume.symlink(999, "g", "x", 0, 0)), libc::ENOENT);
    assert_eq!(errno(volume.create(f.ino, "g", 0o644, 0, 0)), libc::ENOTDIR);
    assert_eq!(errno(volume.mkdir(f.ino, "g", 0o755, 0, 0)), libc::ENOTDIR);
    assert_eq!(errno(volume.symlink(f.ino, "g", "x", 0, 0)), libc::ENOTDIR);
    assert_eq!(errno(volume.create(d, "g", 0o10000, 0, 0)), libc::EINVAL);
    assert_eq!(errno(volume.mkdir(d, "g", 0o10755, 0, 0)), libc::EINVAL);
    assert_eq!(errno(volume.symlink(d, "g", "", 0, 0)), libc::ENOENT);
    assert_eq!(
        errno(volume.symlink(d, "g", &"t".repeat(4096), 0, 0)),
        libc::ENAMETOOLONG
    );
    assert_eq!(errno(volume.symlink(d, "g", "a\0b", 0, 0)), libc::EINVAL);
    let long = volume.symlink(d, "g", &"t".repeat(4095), 0, 0).unwrap();
    assert_eq!(volume.readlink(long.ino).unwrap().len(), 4095);
    assert_eq!(errno(volume.readlink(f.ino)), libc::EINVAL);
    assert_eq!(errno(volume.readlink(d)), libc::EINVAL);
    assert_eq!(errno(volume.readlink(999)), libc::ENOENT);
    // Only regular files open.
    assert_eq!(errno(volume.open_ino(d)), libc::EISDIR);
    assert_eq!(errno(volume.open_ino(long.ino)), libc::ELOOP);
    assert_eq!(errno(volume.open_ino(999)), libc::ENOENT);
    assert_eq!(errno(volume.read_dir(f.ino, 0, 1)), libc::ENOTDIR);
    assert_eq!(errno(volume.read_dir(999, 0, 1)), libc::ENOENT);
    assert_eq!(errno(volume.parent(f.ino)), libc::ENOTDIR);
    assert_eq!(volume.parent(ROOT).unwrap(), ROOT);
    assert_eq!(volume.parent(d).unwrap(), ROOT);
    // Failed calls changed nothing.
    assert_eq!(names(&volume, ROOT), ["f", "d"]);
    assert_eq!(names(&volume, d), ["g"]);
    volume.check_invariants();
}

#[test]
fn rmdir_removes_only_empty_directories_and_unlink_only_non_directories() {
    let (_, volume) = volume(256);
    let d = mkdir(&volume, ROOT, "d");
    let e = mkdir(&volume, d, "e");
    drop(file(&volume, e, "f", 0, 0));
    volume.symlink(e, "l", "f", 0, 0).unwrap();
    assert_eq!(volume.attr(d).unwrap().nlink, 3);
    assert_eq!(errno(volume.rmdir(ROOT, "d")), libc::ENOTEMPTY);
    assert_eq!(errno(volume.rmdir(d, "e")), libc::ENOTEMPTY);
    assert_eq!(errno(volume.rmdir(e, "f")), libc::ENOTDIR);
    assert_eq!(errno(volume.rmdir(e, "missing")), libc::ENOENT);
    assert_eq!(errno(volume.unlink(ROOT, "d")), libc::EISDIR);
    assert_eq!(errno(volume.unlink(e, "missing")), libc::ENOENT);
    let f = volume.lookup(e, "f").unwrap().ino;
    assert_eq!(errno(volume.unlink(f, "x")), libc::ENOTDIR);
    assert_eq!(errno(volume.rmdir(f, "x")), libc::ENOTDIR);
    volume.unlink(e, "f").unwrap();
    volume.unlink(e, "l").unwrap();
    assert_eq!(errno(volume.attr(f)), libc::ENOENT);
    volume.rmdir(d, "e").unwrap();
    assert_eq!(errno(volume.attr(e)), libc::ENOENT);
    assert_eq!(volume.attr(d).unwrap().nlink, 2);
    volume.rmdir(ROOT, "d").unwrap();
    assert_eq!(volume.attr(ROOT).unwrap().nlink, 2);
    assert!(names(&volume, ROOT).is_empty());
    volume.check_invariants();
}

#[test]
fn hard_links_share_one_file_and_count_its_names() {
    let (_, volume) = volume(256);
    let free = volume.free_blocks();
    let d = mkdir(&volume, ROOT, "d");
    let a = file(&volume, ROOT, "a", 2, 1);
    let ino = volume.lookup(ROOT, "a").unwrap().ino;
    let linked = volume.link(ino, d, "b").unwrap();
    assert_eq!((linked.ino, linked.nlink), (ino, 2));
    assert_eq!(volume.lookup(d, "b").unwrap().nlink, 2);
    assert_eq!(volume.lookup(d, "b").unwrap().blocks, 16);
    // One file: a write through one name reads through the other.
    let b = volume.open_ino(volume.lookup(d, "b").unwrap().ino).unwrap();
    a.write_pages(1, &[9; BLOCK as usize]).unwrap();
    assert_eq!(first_byte(&b, 1), 9);
    assert_eq!(errno(volume.link(ino, d, "b")), libc::EEXIST);
    assert_eq!(errno(volume.link(ino, 999, "c")), libc::ENOENT);
    assert_eq!(errno(volume.link(ino, ino, "c")), libc::ENOTDIR);
    assert_eq!(errno(volume.link(999, d, "c")), libc::ENOENT);
    assert_eq!(errno(volume.link(d, ROOT, "c")), libc::EPERM);
    assert_eq!(errno(volume.link(ino, d, "")), libc::EINVAL);
    let link = volume.symlink(ROOT, "s", "a", 0, 0).unwrap();
    assert_eq!(volume.link(link.ino, d, "s2").unwrap().nlink, 2);
    drop((a, b));
    // Removing one name keeps the file; removing the last frees it.
    volume.unlink(ROOT, "a").unwrap();
    assert_eq!(volume.attr(ino).unwrap().nlink, 1);
    assert_eq!(first_byte(&volume.open_ino(ino).unwrap(), 1), 9);
    assert_eq!(volume.free_blocks(), free - 2);
    volume.unlink(d, "b").unwrap();
    assert_eq!(errno(volume.attr(ino)), libc::ENOENT);
    assert_eq!(volume.free_blocks(), free);
    volume.check_invariants();
}

#[test]
fn a_file_unlinked_while_open_lives_until_its_last_handle_drops() {
    let (_, volume) = volume(256);
    let free = volume.free_blocks();
    let a = file(&volume, ROOT, "a", 4, 3);
    let ino = volume.lookup(ROOT, "a").unwrap().ino;
    let clone = a.clone();
    volume.unlink(ROOT, "a").unwrap();
    assert_eq!(errno(volume.lookup(ROOT, "a")), libc::ENOENT);
    assert!(volume.file_names().is_empty());
    assert_eq!(volume.attr(ino).unwrap().nlink, 0);
    assert_eq!(errno(volume.link(ino, ROOT, "back")), libc::ENOENT);
    // Its data is still there, and it can still grow and be written.
    assert_eq!(first_byte(&a, 3), 3);
    a.set_len(6 * BLOCK).unwrap();
    a.write_pages(5, &[7; BLOCK as usize]).unwrap();
    assert_eq!(first_byte(&clone, 5), 7);
    assert_eq!(volume.free_blocks(), free - 5);
    volume.sync().unwrap();
    clone.sync().unwrap();
    volume.check_invariants();
    drop(a);
    assert_eq!(first_byte(&clone, 0), 3, "a handle is still open");
    assert_eq!(volume.free_blocks(), free - 5);
    drop(clone);
    assert_eq!(errno(volume.attr(ino)), libc::ENOENT);
    assert_eq!(volume.free_blocks(), free, "freed with the last handle");
    volume.check_invariants();
    // A new file reuses nothing of it but its blocks.
    let b = file(&volume, ROOT, "a", 1, 4);
    assert_ne!(volume.lookup(ROOT, "a").unwrap().ino, ino);
    assert_eq!(first_byte(&b, 0), 4);
}

#[test]
fn orphans_of_a_crash_are_freed_on_open() {
    let (device, volume) = volume(256);
    let empty = volume.free_blocks();
    let kept = file(&volume, ROOT, "kept", 2, 1);
    let orphan = file(&volume, ROOT, "orphan", 5, 2);
    volume.sync().unwrap();
    volume.unlink(ROOT, "orphan").unwrap();
    orphan.write_pages(4, &[6; BLOCK as usize]).unwrap();
    // The commit after the unlink holds no trace of the orphan.
    volume.sync().unwrap();
    let reopened = Volume::open(after_crash(device.as_ref())).unwrap();
    assert_eq!(reopened.file_names(), ["kept"]);
    assert_eq!(reopened.free_blocks(), empty - 2, "the orphan's blocks");
    reopened.check_invariants();
    // Before that commit, a crash brings the file back whole.
    drop((kept, orphan, volume, reopened));
    let (device, volume) = self::volume(256);
    let orphan = file(&volume, ROOT, "orphan", 5, 2);
    volume.sync().unwrap();
    volume.unlink(ROOT, "orphan").unwrap();
    let reopened = Volume::open(after_crash(device.as_ref())).unwrap();
    assert_eq!(reopened.file_names(), ["orphan"]);
    assert_eq!(first_byte(&reopened.open_file("orphan").unwrap(), 4), 2);
    drop(orphan);
}

#[test]
fn backend_remove_unlinks_every_name_of_the_file() {
    let (_, volume) = volume(256);
    let free = volume.free_blocks();
    let d = mkdir(&volume, ROOT, "d");
    let a = file(&volume, ROOT, "a", 3, 1);
    let ino = volume.lookup(ROOT, "a").unwrap().ino;
    volume.link(ino, d, "b").unwrap();
    volume.link(ino, d, "c").unwrap();
    let other = volume.open_ino(ino).unwrap();
    a.remove().unwrap();
    assert!(names(&volume, ROOT) == ["d"], "{:?}", names(&volume, ROOT));
    assert!(names(&volume, d).is_empty());
    assert_eq!(errno(volume.attr(ino)), libc::ENOENT);
    assert_eq!(errno(other.len()), libc::ENOENT);
    assert_eq!(volume.free_blocks(), free);
    volume.check_invariants();
}

#[test]
fn the_flat_calls_act_on_the_root_directory() {
    let (_, volume) = volume(256);
    let a = volume.create_file("a").unwrap();
    let attr = volume.lookup(ROOT, "a").unwrap();
    assert_eq!((attr.kind, attr.perm, attr.uid), (FileKind::File, 0o644, 0));
    // A handle's identity is its inode.
    let identity = a.identity().unwrap().unwrap();
    assert_eq!(identity.file as u64, attr.ino);
    mkdir(&volume, ROOT, "dir");
    volume.symlink(ROOT, "link", "a", 0, 0).unwrap();
    let d = mkdir(&volume, ROOT, "sub");
    drop(file(&volume, d, "nested", 0, 0));
    assert_eq!(volume.file_names(), ["a"]);
    assert_eq!(errno(volume.open_file("dir")), libc::EISDIR);
    assert_eq!(errno(volume.open_file("link")), libc::ELOOP);
    assert_eq!(errno(volume.open_file("nested")), libc::ENOENT);
    assert_eq!(errno(volume.remove_file("dir")), libc::EISDIR);
    assert_eq!(errno(volume.remove_file("a")), libc::EBUSY);
    drop(a);
    // Another name keeps the file.
    volume.link(attr.ino, d, "again").unwrap();
    volume.remove_file("a").unwrap();
    assert_eq!(volume.attr(attr.ino).unwrap().nlink, 1);
    volume.remove_file("link").unwrap();
    assert!(volume.file_names().is_empty());
    volume.check_invariants();
}

#[test]
fn rename_moves_and_replaces_as_linux_does() {
    let (_, volume) = volume(256);
    let free = volume.free_blocks();
    let none = RenameFlags::default();
    let d = mkdir(&volume, ROOT, "d");
    let e = mkdir(&volume, ROOT, "e");
    drop(file(&volume, ROOT, "a", 1, 1));
    let a = volume.lookup(ROOT, "a").unwrap().ino;
    // A move into another directory, and a rename in place.
    volume.rename(ROOT, "a", d, "b", none).unwrap();
    assert_eq!(volume.lookup(d, "b").unwrap().ino, a);
    assert_eq!(errno(volume.lookup(ROOT, "a")), libc::ENOENT);
    volume.rename(d, "b", d, "c", none).unwrap();
    assert_eq!(names(&volume, d), ["c"]);
    // A directory moves with its parent's link counts.
    volume.rename(ROOT, "e", d, "e", none).unwrap();
    assert_eq!(volume.parent(e).unwrap(), d);
    assert_eq!(volume.attr(ROOT).unwrap().nlink, 3);
    assert_eq!(volume.attr(d).unwrap().nlink, 3);
    // A file replaces a file, whose blocks go.
    drop(file(&volume, ROOT, "x", 2, 2));
    let x = volume.lookup(ROOT, "x").unwrap().ino;
    assert_eq!(volume.free_blocks(), free - 3);
    volume.rename(ROOT, "x", d, "c", none).unwrap();
    assert_eq!(volume.lookup(d, "c").unwrap().ino, x);
    assert_eq!(errno(volume.attr(a)), libc::ENOENT);
    assert_eq!(volume.free_blocks(), free - 2);
    // A replaced file that is open becomes an orphan.
    let open = volume.open_ino(x).unwrap();
    drop(file(&volume, ROOT, "y", 1, 3));
    volume.rename(ROOT, "y", d, "c", none).unwrap();
    assert_eq!(volume.attr(x).unwrap().nlink, 0);
    assert_eq!(first_byte(&open, 1), 2);
    drop(open);
    assert_eq!(errno(volume.attr(x)), libc::ENOENT);
    // Kinds must match; a directory replaces only an empty one.
    mkdir(&volume, ROOT, "empty");
    let full = mkdir(&volume, ROOT, "full");
    mkdir(&volume, full, "inside");
    drop(file(&volume, ROOT, "f", 0, 0));
    assert_eq!(
        errno(volume.rename(ROOT, "f", ROOT, "empty", none)),
        libc::EISDIR
    );
    assert_eq!(
        errno(volume.rename(ROOT, "empty", ROOT, "f", none)),
        libc::ENOTDIR
    );
    assert_eq!(
        errno(volume.rename(ROOT, "empty", ROOT, "full", none)),
        libc::ENOTEMPTY
    );
    let nlink = volume.attr(ROOT).unwrap().nlink;
    volume.rename(ROOT, "full", ROOT, "empty", none).unwrap();
    assert_eq!(volume.attr(ROOT).unwrap().nlink, nlink - 1);
    assert_eq!(volume.lookup(ROOT, "empty").unwrap().ino, full);
    // Not into itself or below itself; a target above it is not empty.
    let inside = volume.lookup(full, "inside").unwrap().ino;
    assert_eq!(
        errno(volume.rename(ROOT, "empty", full, "x", none)),
        libc::EINVAL
    );
    assert_eq!(
        errno(volume.rename(ROOT, "empty", inside, "x", none)),
        libc::EINVAL
    );
    assert_eq!(
        errno(volume.rename(full, "inside", ROOT, "empty", none)),
        libc::ENOTEMPTY
    );
    // Missing names and parents.
    assert_eq!(
        errno(volume.rename(ROOT, "nope", ROOT, "x", none)),
        libc::ENOENT
    );
    assert_eq!(
        errno(volume.rename(999, "f", ROOT, "x", none)),
        libc::ENOENT
    );
    assert_eq!(
        errno(volume.rename(ROOT, "f", 999, "x", none)),
        libc::ENOENT
    );
    let f = volume.lookup(ROOT, "f").unwrap().ino;
    assert_eq!(errno(volume.rename(ROOT, "f", f, "x", none)), libc::ENOTDIR);
    assert_eq!(
        errno(volume.rename(ROOT, "f", ROOT, "..", none)),
        libc::EINVAL
    );
    // Two names of one inode: nothing happens.
    volume.link(f, ROOT, "g").unwrap();
    volume.rename(ROOT, "f", ROOT, "g", none).unwrap();
    assert_eq!(volume.attr(f).unwrap().nlink, 2);
    assert!(volume.lookup(ROOT, "f").is_ok() && volume.lookup(ROOT, "g").is_ok());
    volume.check_invariants();
}

#[test]
fn rename_no_replace_and_exchange_follow_renameat2() {
    let (_, volume) = volume(256);
    let no_replace = RenameFlags {
        no_replace: true,
        exchange: false,
    };
    let exchange = RenameFlags {
        no_replace: false,
        exchange: true,
    };
    let both = RenameFlags {
        no_replace: true,
        exchange: true,
    };
    let d = mkdir(&volume, ROOT, "d");
    drop(file(&volume, ROOT, "a", 0, 0));
    drop(file(&volume, d, "b", 0, 0));
    let a = volume.lookup(ROOT, "a").unwrap().ino;
    let b = volume.lookup(d, "b").unwrap().ino;
    assert_eq!(errno(volume.rename(ROOT, "a", d, "b", both)), libc::EINVAL);
    assert_eq!(
        errno(volume.rename(ROOT, "a", d, "b", no_replace)),
        libc::EEXIST
    );
    // No replace of the same inode is still EEXIST.
    volume.link(a, ROOT, "a2").unwrap();
    assert_eq!(
        errno(volume.rename(ROOT, "a", ROOT, "a2", no_replace)),
        libc::EEXIST
    );
    volume.rename(ROOT, "a2", d, "new", no_replace).unwrap();
    assert_eq!(volume.lookup(d, "new").unwrap().ino, a);
    assert_eq!(
        errno(volume.rename(ROOT, "a", d, "missing", exchange)),
        libc::ENOENT
    );
    // An exchange keeps both entries and their cookies, and swaps inodes.
    let cookies = |dir| -> BTreeMap<String, u64> {
        let entries = volume.read_dir(dir, 0, usize::MAX).unwrap();
        entries.into_iter().map(|e| (e.name, e.cookie)).collect()
    };
    let (root_cookies, d_cookies) = (cookies(ROOT), cookies(d));
    volume.rename(ROOT, "a", d, "b", exchange).unwrap();
    assert_eq!(volume.lookup(ROOT, "a").unwrap().ino, b);
    assert_eq!(volume.lookup(d, "b").unwrap().ino, a);
    assert_eq!((cookies(ROOT), cookies(d)), (root_cookies, d_cookies));
    // A directory and a file across parents: link counts follow.
    let e = mkdir(&volume, ROOT, "e");
    let sub = mkdir(&volume, e, "sub");
    let (root_links, e_links) = (
        volume.attr(ROOT).unwrap().nlink,
        volume.attr(e).unwrap().nlink,
    );
    volume.rename(ROOT, "a", e, "sub", exchange).unwrap();
    assert_eq!(volume.lookup(ROOT, "a").unwrap().ino, sub);
    assert_eq!(volume.lookup(e, "sub").unwrap().ino, b);
    assert_eq!(volume.parent(sub).unwrap(), ROOT);
    assert_eq!(volume.attr(ROOT).unwrap().nlink, root_links + 1);
    assert_eq!(volume.attr(e).unwrap().nlink, e_links - 1);
    // Not a directory with one below it.
    let deep = mkdir(&volume, e, "deep");
    assert_eq!(
        errno(volume.rename(ROOT, "e", e, "deep", exchange)),
        libc::EINVAL
    );
    assert_eq!(
        errno(volume.rename(e, "deep", ROOT, "e", exchange)),
        libc::EINVAL
    );
    assert_eq!(volume.parent(deep).unwrap(), e);
    // The same inode under both names: nothing happens.
    volume.rename(d, "b", d, "new", exchange).unwrap();
    assert_eq!(volume.lookup(d, "b").unwrap().ino, a);
    volume.check_invariants();
}

/// A reader that lists a directory a few entries at a time, resuming at the
/// last cookie, while entries are linked, unlinked and renamed between its
/// calls, lists every entry that stays exactly once and none twice.
#[test]
fn read_dir_cookies_stay_stable_while_entries_come_and_go() {
    for seed in 0..20 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let (_, volume) = volume(1024);
        let dir = mkdir(&volume, ROOT, "d");
        let mut churn: BTreeSet<String> = BTreeSet::new();
        let mut stays = BTreeSet::new();
        let mut serial = 0;
        for _ in 0..60 {
            serial += 1;
            let name = format!("e{serial}");
            if rng.bool() {
                stays.insert(name.clone());
            } else {
                churn.insert(name.clone());
            }
            drop(file(&volume, dir, &name, 0, 0));
        }
        let mut seen: Vec<String> = Vec::new();
        let mut after = 0;
        loop {
            let page = volume.read_dir(dir, after, rng.usize(1..=8)).unwrap();
            let cookies: Vec<u64> = page.iter().map(|e| e.cookie).collect();
            assert!(
                cookies.windows(2).all(|w| w[0] < w[1]),
                "seed {seed}: order"
            );
            assert!(
                cookies.iter().all(|&c| c > after),
                "seed {seed}: at or before {after}"
            );
            let Some(taken) = page.get(..rng.usize(1..=5).min(page.len())) else {
                break;
            };
            if taken.is_empty() {
                break;
            }
            seen.extend(taken.iter().map(|e| e.name.clone()));
            after = taken.last().unwrap().cookie;
            // Churn between the reader's calls.
            for _ in 0..rng.usize(0..4) {
                match rng.u8(0..3) {
                    0 => {
                        serial += 1;
                        let name = format!("e{serial}");
                        drop(file(&volume, dir, &name, 0, 0));
                        churn.insert(name);
                    }
                    1 if !churn.is_empty() => {
                        let name = churn.iter().nth(rng.usize(..churn.len())).unwrap().clone();
                        volume.unlink(dir, &name).unwrap();
                        churn.remove(&name);
                    }
                    _ if !churn.is_empty() => {
                        let name = churn.iter().nth(rng.usize(..churn.len())).unwrap().clone();
                        serial += 1;
                        let new = format!("e{serial}");
                        volume
                            .rename(dir, &name, dir, &new, RenameFlags::default())
                            .unwrap();
                        churn.remove(&name);
                        churn.insert(new);
                    }
                    _ => {}
                }
            }
        }
        let unique: BTreeSet<&String> = seen.iter().collect();
        assert_eq!(
            unique.len(),
            seen.len(),
            "seed {seed}: an entry listed twice: {seen:?}"
        );
        for name in &stays {
            assert!(unique.contains(name), "seed {seed}: {name} was skipped");
        }
        volume.check_invariants();
    }
}

#[test]
fn timestamps_move_on_data_writes_and_on_attribute_changes() {
    let (_, volume) = volume(256);
    let (attr, file) = volume.create(ROOT, "f", 0o644, 0, 0).unwrap();
    let ino = attr.ino;
    let old = Timestamp {
        secs: 1000,
        nanos: 5,
    };
    let reset = || {
        let attr = volume
            .set_attr(
                ino,
                &SetAttr {
                    atime: Some(old),
                    mtime: Some(old),
                    ..SetAttr::default()
                },
            )
            .unwrap();
        assert_eq!((attr.atime, attr.mtime), (old, old));
        std::thread::sleep(Duration::from_millis(2));
        attr.ctime
    };
    type DataChange = fn(&VolumeFile);
    let changes: [(&str, DataChange); 5] = [
        ("set_len", |f| f.set_len(2 * BLOCK).unwrap()),
        ("write_pages", |f| {
            f.write_pages(0, &[1; BLOCK as usize]).unwrap()
        }),
        ("punch_hole", |f| f.punch_hole(0, 100).unwrap()),
        ("zero_range", |f| f.zero_range(0, 100).unwrap()),
        ("insert_range", |f| f.insert_range(0, BLOCK).unwrap()),
    ];
    for (what, change) in changes {
        let ctime = reset();
        change(&file);
        let attr = volume.attr(ino).unwrap();
        assert!(attr.mtime > old, "{what} kept the mtime");
        assert!(attr.ctime > ctime, "{what} kept the ctime");
        assert_eq!(attr.atime, old, "{what} moved the atime");
    }
    // An attribute change moves only the change time.
    let ctime = reset();
    let attr = volume
        .set_attr(
            ino,
            &SetAttr {
                perm: Some(0o600),
                uid: Some(5),
                gid: Some(6),
                ..SetAttr::default()
            },
        )
        .unwrap();
    assert_eq!(
        (attr.perm, attr.uid, attr.gid, attr.mtime),
        (0o600, 5, 6, old)
    );
    assert!(attr.ctime > ctime);
    let ctime = reset();
    volume.link(ino, ROOT, "g").unwrap();
    assert!(
        volume.attr(ino).unwrap().ctime > ctime,
        "link kept the ctime"
    );
    assert_eq!(volume.attr(ino).unwrap().mtime, old);
    // A directory's content is its entries.
    let dir = volume
        .set_attr(
            ROOT,
            &SetAttr {
                mtime: Some(old),
                ..SetAttr::default()
            },
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(2));
    mkdir(&volume, ROOT, "d");
    let root = volume.attr(ROOT).unwrap();
    assert!(root.mtime > old && root.ctime > dir.ctime);
    assert_eq!(
        errno(volume.set_attr(
            ino,
            &SetAttr {
                perm: Some(0o10000),
                ..SetAttr::default()
            }
        )),
        libc::EINVAL
    );
    let bad = Timestamp {
        secs: 0,
        nanos: 1_000_000_000,
    };
    assert_eq!(
        errno(volume.set_attr(
            ino,
            &SetAttr {
                mtime: Some(bad),
                ..SetAttr::default()
            }
        )),
        libc::EINVAL
    );
    assert_eq!(
        errno(volume.set_attr(999, &SetAttr::default())),
        libc::ENOENT
    );
    assert_eq!(
        volume.attr(ino).unwrap().perm,
        0o600,
        "a refused change kept"
    );
    volume.check_invariants();
}

#[test]
fn a_reopened_volume_finds_the_namespace_as_committed() {
    let (device, volume) = volume(256);
    let d = mkdir(&volume, ROOT, "d");
    let e = mkdir(&volume, d, "e");
    let a = file(&volume, ROOT, "a", 3, 5);
    let a_ino = volume.lookup(ROOT, "a").unwrap().ino;
    volume.link(a_ino, e, "a-again").unwrap();
    volume.symlink(e, "l", "../../a", 10, 20).unwrap();
    volume
        .set_attr(
            d,
            &SetAttr {
                perm: Some(0o711),
                uid: Some(3),
                ..SetAttr::default()
            },
        )
        .unwrap();
    for i in 0..10 {
        drop(file(&volume, d, &format!("gone{i}"), 0, 0));
    }
    for i in 0..10 {
        volume.unlink(d, &format!("gone{i}")).unwrap();
    }
    volume
        .rename(ROOT, "a", d, "moved", RenameFlags::default())
        .unwrap();
    a.sync().unwrap(); // a file's sync commits the namespace too
    let before = dump(&volume);
    let last_cookie = volume
        .read_dir(d, 0, usize::MAX)
        .unwrap()
        .last()
        .unwrap()
        .cookie;
    drop((a, volume));
    let volume = Volume::open(device).unwrap();
    assert_eq!(dump(&volume), before);
    volume.check_invariants();
    assert_eq!(first_byte(&volume.open_ino(a_ino).unwrap(), 2), 5);
    // Cookies go on from where they were, past the removed entries'.
    drop(file(&volume, d, "new", 0, 0));
    let new = volume.read_dir(d, last_cookie, usize::MAX).unwrap();
    assert_eq!(new.len(), 1);
    assert_eq!(new[0].name, "new");
    assert!(new[0].cookie > last_cookie);
}

#[test]
fn statfs_counts_blocks_and_inodes() {
    let (_, volume) = volume(256);
    let stat = volume.statfs();
    assert_eq!((stat.name_max, stat.block_size), (255, 4096));
    assert!(stat.blocks < volume.total_blocks());
    assert_eq!(stat.free_blocks, stat.blocks, "an empty volume");
    assert_eq!(stat.files, stat.free_files + 1, "the root");
    let f = file(&volume, ROOT, "f", 3, 1);
    let after = volume.statfs();
    assert_eq!(after.free_blocks, stat.free_blocks - 3);
    assert!(after.free_files < stat.free_files);
    assert_eq!(after.files - after.free_files, 2);
    drop(f);
}

/// Calls that grow the metadata fail with `ENOSPC` and change nothing once
/// the metadata area is full, and every byte is accounted for
/// (`check_invariants` compares the kept length with the encoding).
#[test]
fn a_full_metadata_area_refuses_namespace_growth_and_changes_nothing() {
    let (_, volume) = volume(64); // areas of 2 blocks
    let d = mkdir(&volume, ROOT, "d");
    drop(file(&volume, d, "f", 0, 0));
    let f = volume.lookup(d, "f").unwrap().ino;
    let mut made = 0;
    loop {
        let name = format!("{made:0>40}");
        let result = match made % 3 {
            0 => volume.mkdir(ROOT, &name, 0o755, 0, 0).map(drop),
            1 => volume.symlink(ROOT, &name, "target", 0, 0).map(drop),
            _ => volume.link(f, ROOT, &name).map(drop),
        };
        match result {
            Ok(()) => made += 1,
            Err(error) => {
                assert_eq!(filemap::errno(&error), Some(libc::ENOSPC));
                break;
            }
        }
        volume.check_invariants();
    }
    assert!(made > 10, "only {made} entries fit");
    let before = dump(&volume);
    let long = "x".repeat(200);
    assert_eq!(errno(volume.create(ROOT, &long, 0o644, 0, 0)), libc::ENOSPC);
    assert_eq!(errno(volume.mkdir(ROOT, &long, 0o755, 0, 0)), libc::ENOSPC);
    assert_eq!(errno(volume.symlink(ROOT, &long, "t", 0, 0)), libc::ENOSPC);
    assert_eq!(errno(volume.link(f, ROOT, &long)), libc::ENOSPC);
    assert_eq!(
        errno(volume.rename(d, "f", d, &long, RenameFlags::default())),
        libc::ENOSPC
    );
    assert_eq!(dump(&volume), before);
    // A shorter name fits; so does whatever an unlink makes room for.
    volume
        .rename(d, "f", d, "g", RenameFlags::default())
        .unwrap();
    volume.unlink(ROOT, &format!("{:0>40}", 2)).unwrap();
    volume.link(f, ROOT, "short").unwrap();
    volume.check_invariants();
    volume.sync().unwrap();
}

#[test]
fn writeback_keeps_the_times_and_a_write_into_a_cache_moves_them() {
    let (_, volume) = volume(256);
    let (attr, file) = volume.create(ROOT, "f", 0o644, 0, 0).unwrap();
    let old = Timestamp {
        secs: 1000,
        nanos: 5,
    };
    let set_old = || {
        let change = SetAttr {
            mtime: Some(old),
            ..SetAttr::default()
        };
        volume.set_attr(attr.ino, &change).unwrap();
    };
    file.set_len(2 * BLOCK).unwrap();
    set_old();
    // Writeback of pages written into a cache earlier: the times stay.
    file.write_back_pages(0, &[1; BLOCK as usize]).unwrap();
    assert_eq!(volume.attr(attr.ino).unwrap().mtime, old);
    // A write into the cache moves them, even right after they were set
    // (touches are limited to one a millisecond, but setting the times
    // starts that afresh).
    file.touch().unwrap();
    set_old();
    file.touch().unwrap();
    assert!(volume.attr(attr.ino).unwrap().mtime > old);
    // Through a cache: the write moves the time, its writeback does not.
    let cache = filemap::PageCache::builder().build().unwrap();
    let mapping = cache.open(Arc::new(file.clone())).unwrap();
    mapping.write_all_at(b"new", 10).unwrap();
    set_old();
    mapping.sync_all().unwrap();
    assert_eq!(volume.attr(attr.ino).unwrap().mtime, old);
    let mut back = [0; 3];
    mapping.read_exact_at(&mut back, 10).unwrap();
    assert_eq!(&back, b"new");
}
