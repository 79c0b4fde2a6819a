//! [`MountOptions::direct_reads`]: a sequential read through the mount fills
//! filemap's cache without a second copy of the file in the host's page
//! cache of the image, and reads back what was written. Every test mounts a
//! temporary image in this process; one that cannot mount fails with the
//! reason.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use filemap_fuse::{format, mount, MountOptions};

const FILE_BYTES: usize = 16 << 20;
const IMAGE_BYTES: u64 = 64 << 20;
const PAGE: usize = 4096;

/// The byte at `at` of the test file.
fn pattern(at: usize) -> u8 {
    (at / PAGE * 7 + at % 251) as u8
}

/// How many bytes of `path` the host's page cache holds.
fn host_cached_bytes(path: &Path) -> usize {
    let file = File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    filemap::bench_support::host_cached_pages(&file, 0, len).unwrap() * PAGE
}

/// Syncs the image and drops it from the host's page cache; fails loudly on
/// a file system that keeps its pages anyway (tmpfs), where the test would
/// prove nothing.
fn drop_host_cache(image: &Path) {
    filemap::bench_support::drop_host_cache(&File::open(image).unwrap()).unwrap();
    let left = host_cached_bytes(image);
    assert!(
        left < 1 << 20,
        "{left} bytes of the image stayed in the host's page cache after it was dropped: \
         the temporary directory's file system keeps them (tmpfs?); set TMPDIR to a disk's"
    );
}

/// Writes the file through a mount of a new image with `direct_reads`,
/// remounts it with nothing cached, reads it back in 1 MiB reads, and
/// returns how many bytes of the image the host's page cache then holds.
fn image_cached_after_a_sequential_read(direct_reads: bool) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let (image, mnt) = (dir.path().join("img"), dir.path().join("mnt"));
    std::fs::create_dir(&mnt).unwrap();
    format(&image, IMAGE_BYTES).unwrap();
    let options = MountOptions {
        direct_reads,
        ..MountOptions::default()
    };
    let mounted =
        mount(&image, &mnt, &options).unwrap_or_else(|error| panic!("cannot mount here: {error}"));
    let data: Vec<u8> = (0..FILE_BYTES).map(pattern).collect();
    File::create(mnt.join("f"))
        .unwrap()
        .write_all(&data)
        .unwrap();
    mounted.unmount().unwrap();
    drop_host_cache(&image);

    let mounted = mount(&image, &mnt, &options).unwrap();
    let mut file = File::open(mnt.join("f")).unwrap();
    let mut chunk = vec![0u8; 1 << 20];
    for at in (0..FILE_BYTES).step_by(chunk.len()) {
        file.read_exact(&mut chunk).unwrap();
        if let Some(wrong) = (0..chunk.len()).find(|&i| chunk[i] != pattern(at + i)) {
            panic!("byte {} read back wrong", at + wrong);
        }
    }
    drop(file);
    let cached = host_cached_bytes(&image);
    mounted.unmount().unwrap();
    cached
}

#[test]
fn a_sequential_read_with_direct_reads_leaves_the_image_out_of_the_host_cache() {
    let direct = image_cached_after_a_sequential_read(true);
    assert!(
        direct < FILE_BYTES / 8,
        "{direct} bytes of the image in the host's page cache after reading {FILE_BYTES} with direct reads"
    );
    // The same read without them fills the host's cache too: the measure
    // above tells the two apart.
    let buffered = image_cached_after_a_sequential_read(false);
    assert!(
        buffered >= FILE_BYTES,
        "only {buffered} bytes of the image in the host's page cache after reading {FILE_BYTES} through it"
    );
}
