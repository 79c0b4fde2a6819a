use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::format::{DIR_RECORD, ENTRY_RECORD, FILE_RECORD, MAX_NAME_LEN, META_HEADER, RUN_RECORD};
use super::*;
use crate::backend::Backend;
use crate::device::{Device, DeviceOp, FaultyDevice, MemDevice};
use crate::fault::{FaultRule, Injection, Trigger};
use crate::page::PAGE_SIZE;

fn volume(blocks: u64) -> Arc<Volume> {
    Volume::format(Arc::new(MemDevice::new(blocks * BLOCK))).unwrap()
}

fn errno<T: fmt::Debug>(result: io::Result<T>) -> i32 {
    crate::errno(&result.unwrap_err()).expect("an errno")
}

/// A new device holding the bytes of `device`: what a restart after a
/// crash finds, while the crashed volume (and its claim) is still alive
/// in the test.
fn after_crash(device: &dyn Device) -> Arc<dyn Device> {
    let mut image = vec![0; device.len() as usize];
    device.read_exact_at(&mut image, 0).unwrap();
    let copy = MemDevice::new(device.len());
    copy.write_all_at(&image, 0).unwrap();
    Arc::new(copy)
}

/// A page whose every byte is `fill`.
fn page(fill: u8) -> Vec<u8> {
    vec![fill; PAGE_SIZE]
}

fn read(file: &VolumeFile, index: u64, pages: usize) -> Vec<u8> {
    let mut buf = vec![0xAA; pages * PAGE_SIZE];
    file.read_pages(index, &mut buf).unwrap();
    buf
}

/// A file of `pages` pages, page i filled with byte `i + 1`.
fn filled(volume: &Arc<Volume>, name: &str, pages: u64) -> VolumeFile {
    let file = volume.create_file(name).unwrap();
    file.set_len(pages * BLOCK).unwrap();
    let data: Vec<u8> = (0..pages).flat_map(|i| page(i as u8 + 1)).collect();
    file.write_pages(0, &data).unwrap();
    file
}

#[test]
fn write_read_round_trip() {
    let volume = volume(64);
    let file = volume.create_file("a").unwrap();
    file.set_len(4 * BLOCK).unwrap();
    let data: Vec<u8> = (0..4 * PAGE_SIZE).map(|i| (i * 7 % 251) as u8).collect();
    file.write_pages(0, &data).unwrap();
    assert_eq!(read(&file, 0, 4), data);
    assert_eq!(read(&file, 1, 2), &data[PAGE_SIZE..3 * PAGE_SIZE]);
    assert_eq!(file.len().unwrap(), 4 * BLOCK);
    assert_eq!(file.allocated_blocks().unwrap(), 4);
    // Fresh allocations are physically contiguous: one run.
    let first = file.physical_block(0).unwrap();
    assert_eq!(file.physical_block(3), Some(first + 3));
    file.sync().unwrap();
    // Another handle sees the same data.
    let again = volume.open_file("a").unwrap();
    assert_eq!(read(&again, 0, 4), data);
    volume.check_invariants();
}

#[test]
fn holes_and_pages_past_eof_read_zero() {
    let volume = volume(64);
    let file = volume.create_file("a").unwrap();
    file.set_len(3 * BLOCK).unwrap();
    file.write_pages(0, &page(1)).unwrap();
    file.write_pages(2, &page(3)).unwrap();
    let data = read(&file, 0, 5);
    assert_eq!(&data[..PAGE_SIZE], page(1));
    assert_eq!(&data[PAGE_SIZE..2 * PAGE_SIZE], page(0));
    assert_eq!(&data[2 * PAGE_SIZE..3 * PAGE_SIZE], page(3));
    assert_eq!(&data[3 * PAGE_SIZE..], vec![0; 2 * PAGE_SIZE]);
    assert_eq!(file.physical_block(1), None);
    assert_eq!(read(&file, 1 << 30, 1), page(0));
    volume.check_invariants();
}

#[test]
fn bytes_past_eof_in_the_last_page_stay_zero() {
    let volume = volume(64);
    let file = volume.create_file("a").unwrap();
    file.set_len(100).unwrap();
    file.write_pages(0, &page(9)).unwrap();
    let data = read(&file, 0, 1);
    assert_eq!(&data[..100], &[9; 100]);
    assert!(data[100..].iter().all(|&b| b == 0));
    // Growing exposes zeroes, not what the page buffer held past the end.
    file.set_len(BLOCK).unwrap();
    assert!(read(&file, 0, 1)[100..].iter().all(|&b| b == 0));
    volume.check_invariants();
}

#[test]
fn writes_past_eof_and_bad_arguments_are_rejected() {
    let volume = volume(64);
    let file = volume.create_file("a").unwrap();
    assert_eq!(errno(file.write_pages(0, &page(1))), libc::EINVAL);
    file.set_len(BLOCK + 1).unwrap();
    assert_eq!(errno(file.write_pages(2, &page(1))), libc::EINVAL);
    let two: Vec<u8> = [page(1), page(2), page(3)].concat();
    assert_eq!(errno(file.write_pages(0, &two)), libc::EINVAL);
    assert_eq!(
        file.allocated_blocks().unwrap(),
        0,
        "a rejected write allocates nothing"
    );
    assert_eq!(errno(file.write_pages(0, &[1; 100])), libc::EINVAL);
    assert_eq!(errno(file.read_pages(0, &mut [0; 100])), libc::EINVAL);
    assert_eq!(errno(file.read_pages(u64::MAX, &mut page(0))), libc::EINVAL);
    assert_eq!(
        errno(file.read_pages(u64::MAX / BLOCK, &mut page(0))),
        libc::EINVAL
    );
    assert_eq!(errno(file.write_pages(u64::MAX, &page(0))), libc::EINVAL);
    assert_eq!(errno(file.punch_hole(u64::MAX, 2)), libc::EINVAL);
    assert_eq!(errno(file.zero_range(2, u64::MAX)), libc::EINVAL);
    assert_eq!(errno(file.set_len(MAX_FILE_SIZE + 1)), libc::EFBIG);
    assert_eq!(errno(file.set_len(u64::MAX)), libc::EFBIG);
    file.set_len(MAX_FILE_SIZE).unwrap();
    assert_eq!(file.max_file_size(), MAX_FILE_SIZE);
    assert_eq!(file.len().unwrap(), MAX_FILE_SIZE);
    volume.check_invariants();
}

#[test]
fn punch_whole_and_partial_blocks() {
    let volume = volume(64);
    let file = filled(&volume, "a", 4);
    let free = volume.free_blocks();
    // Whole block 1, plus the last 100 bytes of block 0 and the first 10 of block 2.
    file.punch_hole(BLOCK - 100, BLOCK + 110).unwrap();
    assert_eq!(file.physical_block(1), None);
    assert_eq!(volume.free_blocks(), free + 1);
    let data = read(&file, 0, 4);
    assert_eq!(&data[..PAGE_SIZE - 100], &page(1)[..PAGE_SIZE - 100]);
    assert!(data[PAGE_SIZE - 100..2 * PAGE_SIZE + 10]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(&data[2 * PAGE_SIZE + 10..3 * PAGE_SIZE], &page(3)[10..]);
    assert_eq!(&data[3 * PAGE_SIZE..], page(4));
    assert_eq!(file.len().unwrap(), 4 * BLOCK, "the size does not change");

    // Inside one block.
    file.punch_hole(3 * BLOCK + 5, 10).unwrap();
    let data = read(&file, 3, 1);
    assert_eq!(&data[..5], &[4; 5]);
    assert_eq!(&data[5..15], &[0; 10]);
    assert_eq!(&data[15..], &page(4)[15..]);
    assert!(file.physical_block(3).is_some());

    // A punch of a hole, of nothing, and past EOF changes nothing.
    file.punch_hole(BLOCK, BLOCK).unwrap();
    file.punch_hole(0, 0).unwrap();
    file.punch_hole(100 * BLOCK, u64::MAX - 100 * BLOCK)
        .unwrap();
    assert_eq!(read(&file, 3, 1), data);
    volume.check_invariants();
}

#[test]
fn punch_to_eof_frees_a_partial_last_block() {
    let volume = volume(64);
    let file = filled(&volume, "a", 2);
    file.set_len(BLOCK + 100).unwrap();
    file.punch_hole(BLOCK, 50).unwrap();
    assert!(
        file.physical_block(1).is_some(),
        "bytes 50..100 are still data"
    );
    file.punch_hole(BLOCK + 10, 1 << 40).unwrap();
    assert!(
        file.physical_block(1).is_some(),
        "bytes 0..10 are still data"
    );
    file.punch_hole(BLOCK, 1 << 40).unwrap();
    assert_eq!(file.physical_block(1), None);
    assert_eq!(read(&file, 1, 1), page(0));
    assert_eq!(read(&file, 0, 1), page(1));
    volume.check_invariants();
}

#[test]
fn huge_punch_of_a_sparse_file_is_instant() {
    let volume = volume(64);
    let file = volume.create_file("a").unwrap();
    file.set_len(MAX_FILE_SIZE).unwrap();
    for index in [0, 1 << 20, (MAX_FILE_SIZE / BLOCK) - 1] {
        file.write_pages(index, &page(5)).unwrap();
    }
    let start = Instant::now();
    file.punch_hole(0, MAX_FILE_SIZE).unwrap();
    file.zero_range(0, MAX_FILE_SIZE).unwrap();
    file.set_len(0).unwrap();
    // Generous: a per-block loop over 2^32 blocks would take minutes.
    assert!(start.elapsed().as_secs() < 5);
    assert_eq!(file.allocated_blocks().unwrap(), 0);
    volume.check_invariants();
}

#[test]
fn zero_range_keeps_blocks_and_leaves_holes() {
    let volume = volume(64);
    let file = filled(&volume, "a", 4);
    file.punch_hole(2 * BLOCK, BLOCK).unwrap();
    let blocks: Vec<_> = (0..4).map(|i| file.physical_block(i)).collect();
    let free = volume.free_blocks();
    // The last 10 bytes of block 0 up to the first 10 bytes of block 3.
    file.zero_range(BLOCK - 10, 2 * BLOCK + 20).unwrap();
    let after: Vec<_> = (0..4).map(|i| file.physical_block(i)).collect();
    assert_eq!(after, blocks, "zeroing neither frees nor allocates");
    assert_eq!(volume.free_blocks(), free);
    let data = read(&file, 0, 4);
    assert!(data[..PAGE_SIZE - 10] == page(1)[..PAGE_SIZE - 10]);
    assert!(data[PAGE_SIZE - 10..3 * PAGE_SIZE + 10]
        .iter()
        .all(|&b| b == 0));
    assert!(data[3 * PAGE_SIZE + 10..] == page(4)[10..]);
    assert_eq!(file.len().unwrap(), 4 * BLOCK);

    // Inside one block; other bytes survive.
    file.zero_range(3 * BLOCK + 20, 2).unwrap();
    let last = read(&file, 3, 1);
    assert_eq!(&last[..10], &[0; 10]);
    assert_eq!(&last[10..20], &[4; 10]);
    assert_eq!(&last[20..22], &[0; 2]);
    assert!(last[22..] == page(4)[22..]);

    // Zeroing to past EOF zeroes the whole last block and keeps it.
    file.zero_range(3 * BLOCK, u64::MAX - 3 * BLOCK).unwrap();
    assert_eq!(file.physical_block(3), blocks[3]);
    assert!(read(&file, 3, 1) == page(0));
    volume.check_invariants();
}

#[test]
fn collapse_removes_blocks_and_shifts_the_rest_down() {
    let volume = volume(64);
    let file = filled(&volume, "a", 6);
    file.set_len(6 * BLOCK - 100).unwrap();
    let freed = [file.physical_block(1), file.physical_block(2)];
    let free = volume.free_blocks();
    file.collapse_range(BLOCK, 2 * BLOCK).unwrap();
    assert_eq!(file.len().unwrap(), 4 * BLOCK - 100);
    assert_eq!(volume.free_blocks(), free + 2);
    assert_eq!(file.allocated_blocks().unwrap(), 4);
    let data = read(&file, 0, 5);
    for (i, fill) in [1u8, 4, 5].into_iter().enumerate() {
        assert_eq!(
            data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE],
            page(fill),
            "page {i}"
        );
    }
    assert_eq!(&data[3 * PAGE_SIZE..4 * PAGE_SIZE - 100], &page(6)[100..]);
    assert!(data[4 * PAGE_SIZE - 100..].iter().all(|&b| b == 0));
    volume.check_invariants();

    // The freed blocks go to the next allocation, LIFO as after a punch.
    let other = volume.create_file("b").unwrap();
    other.set_len(2 * BLOCK).unwrap();
    other.write_pages(0, &page(9)).unwrap();
    assert!(freed.contains(&other.physical_block(0)));
    volume.check_invariants();
}

#[test]
fn collapse_of_holes_and_a_merge_at_the_seam() {
    let volume = volume(64);
    let file = volume.create_file("a").unwrap();
    file.set_len(8 * BLOCK).unwrap();
    file.write_pages(0, &[page(1), page(2)].concat()).unwrap();
    file.write_pages(5, &page(6)).unwrap();
    file.write_pages(2, &page(3)).unwrap();
    // Pages 0, 1, 2 are physically contiguous; page 5 follows them on the device.
    let first = file.physical_block(0).unwrap();
    file.punch_hole(2 * BLOCK, BLOCK).unwrap();
    file.write_pages(5, &page(6)).unwrap();
    file.collapse_range(2 * BLOCK, 3 * BLOCK).unwrap();
    assert_eq!(file.len().unwrap(), 5 * BLOCK);
    let data = read(&file, 0, 5);
    assert_eq!(&data[..PAGE_SIZE], page(1));
    assert_eq!(&data[PAGE_SIZE..2 * PAGE_SIZE], page(2));
    assert_eq!(&data[2 * PAGE_SIZE..3 * PAGE_SIZE], page(6));
    assert!(data[3 * PAGE_SIZE..].iter().all(|&b| b == 0));
    assert_eq!(file.physical_block(0), Some(first));
    volume.check_invariants();
}

#[test]
fn insert_shifts_up_and_leaves_a_hole() {
    let volume = volume(64);
    let file = filled(&volume, "a", 3);
    file.set_len(3 * BLOCK - 10).unwrap();
    let blocks: Vec<_> = (0..3).map(|i| file.physical_block(i)).collect();
    let free = volume.free_blocks();
    file.insert_range(BLOCK, 2 * BLOCK).unwrap();
    assert_eq!(file.len().unwrap(), 5 * BLOCK - 10);
    assert_eq!(volume.free_blocks(), free, "an insert allocates nothing");
    let after: Vec<_> = [0, 3, 4].iter().map(|&i| file.physical_block(i)).collect();
    assert_eq!(after, blocks, "the data moved, not copied");
    let data = read(&file, 0, 5);
    assert_eq!(&data[..PAGE_SIZE], page(1));
    assert!(data[PAGE_SIZE..3 * PAGE_SIZE].iter().all(|&b| b == 0));
    assert_eq!(&data[3 * PAGE_SIZE..4 * PAGE_SIZE], page(2));
    assert_eq!(&data[4 * PAGE_SIZE..5 * PAGE_SIZE - 10], &page(3)[10..]);
    assert!(data[5 * PAGE_SIZE - 10..].iter().all(|&b| b == 0));
    // The hole takes writes; collapsing it again restores the original.
    file.write_pages(2, &page(7)).unwrap();
    assert_eq!(read(&file, 2, 1), page(7));
    file.collapse_range(BLOCK, 2 * BLOCK).unwrap();
    let data = read(&file, 0, 3);
    assert_eq!(&data[..2 * PAGE_SIZE], [page(1), page(2)].concat());
    assert_eq!(
        &data[2 * PAGE_SIZE..3 * PAGE_SIZE - 10],
        &page(3)[..PAGE_SIZE - 10]
    );
    assert_eq!(file.allocated_blocks().unwrap(), 3);
    volume.check_invariants();

    // Inserting at block 0 shifts everything.
    file.insert_range(0, BLOCK).unwrap();
    assert_eq!(read(&file, 0, 1), page(0));
    assert_eq!(read(&file, 1, 1), page(1));
    volume.check_invariants();
}

#[test]
fn collapse_and_insert_reject_bad_arguments_and_change_nothing() {
    let volume = volume(64);
    let file = filled(&volume, "a", 4);
    let before = read(&file, 0, 4);
    let size = 4 * BLOCK;
    for (offset, len) in [
        (1, BLOCK),
        (0, BLOCK + 1),
        (0, 0),
        (0, size),
        (BLOCK, 3 * BLOCK),
        (BLOCK, 4 * BLOCK),
        (size, BLOCK),
        (u64::MAX - BLOCK + 1, BLOCK),
        (BLOCK, u64::MAX - BLOCK + 1),
    ] {
        assert_eq!(
            errno(file.collapse_range(offset, len)),
            libc::EINVAL,
            "collapse {offset} {len}"
        );
    }
    for (offset, len) in [
        (1, BLOCK),
        (0, 1),
        (0, 0),
        (size, BLOCK),
        (8 * BLOCK, BLOCK),
        (u64::MAX - BLOCK + 1, BLOCK),
        (BLOCK, u64::MAX - BLOCK + 1),
    ] {
        assert_eq!(
            errno(file.insert_range(offset, len)),
            libc::EINVAL,
            "insert {offset} {len}"
        );
    }
    assert_eq!(
        errno(file.insert_range(0, MAX_FILE_SIZE - size + BLOCK)),
        libc::EFBIG
    );
    assert_eq!(
        errno(file.insert_range(0, u64::MAX - BLOCK * 2 + 1)),
        libc::EFBIG
    );
    assert_eq!(file.len().unwrap(), size);
    assert_eq!(read(&file, 0, 4), before);
    // Exactly the largest size is allowed.
    file.insert_range(0, MAX_FILE_SIZE - size).unwrap();
    assert_eq!(file.len().unwrap(), MAX_FILE_SIZE);
    assert_eq!(read(&file, (MAX_FILE_SIZE - size) / BLOCK, 4), before);
    file.remove().unwrap();
    assert_eq!(errno(file.collapse_range(0, BLOCK)), libc::ENOENT);
    assert_eq!(errno(file.insert_range(0, BLOCK)), libc::ENOENT);
    volume.check_invariants();
}

#[test]
fn huge_collapse_and_insert_of_a_sparse_file_are_instant() {
    let volume = volume(64);
    let file = volume.create_file("a").unwrap();
    file.set_len(MAX_FILE_SIZE / 2).unwrap();
    let last = MAX_FILE_SIZE / 2 / BLOCK - 1;
    for index in [0, 1 << 20, last] {
        file.write_pages(index, &page(5)).unwrap();
    }
    let start = Instant::now();
    file.insert_range(BLOCK, MAX_FILE_SIZE / 2).unwrap();
    assert_eq!(read(&file, last + MAX_FILE_SIZE / 2 / BLOCK, 1), page(5));
    file.collapse_range(BLOCK, MAX_FILE_SIZE / 2 - BLOCK)
        .unwrap();
    file.collapse_range(0, MAX_FILE_SIZE / 2).unwrap();
    assert!(start.elapsed().as_secs() < 5);
    assert_eq!(file.len().unwrap(), BLOCK);
    assert_eq!(read(&file, 0, 1), page(5));
    assert_eq!(file.allocated_blocks().unwrap(), 1);
    volume.check_invariants();
}

#[test]
fn truncate_inside_a_block_then_grow_reads_zero_tail() {
    let volume = volume(64);
    let file = filled(&volume, "a", 3);
    let free = volume.free_blocks();
    file.set_len(BLOCK + 123).unwrap();
    assert_eq!(file.len().unwrap(), BLOCK + 123);
    assert_eq!(volume.free_blocks(), free + 1);
    assert_eq!(file.physical_block(2), None);
    file.set_len(3 * BLOCK).unwrap();
    let data = read(&file, 0, 3);
    assert_eq!(&data[..PAGE_SIZE], page(1));
    assert_eq!(&data[PAGE_SIZE..PAGE_SIZE + 123], &[2; 123]);
    assert!(data[PAGE_SIZE + 123..].iter().all(|&b| b == 0));
    file.set_len(0).unwrap();
    assert_eq!(file.allocated_blocks().unwrap(), 0);
    volume.check_invariants();
}

#[test]
fn freed_blocks_are_reused_at_once_by_another_file() {
    let volume = volume(64);
    let a = filled(&volume, "a", 4);
    let b = volume.create_file("b").unwrap();
    b.set_len(4 * BLOCK).unwrap();

    let freed = a.physical_block(2).unwrap();
    a.punch_hole(2 * BLOCK, BLOCK).unwrap();
    b.write_pages(0, &page(0xBB)).unwrap();
    assert_eq!(
        b.physical_block(0),
        Some(freed),
        "LIFO: the block freed last comes first"
    );

    // Truncate frees too, and the stale block now holds b's data.
    let freed = a.physical_block(3).unwrap();
    a.set_len(3 * BLOCK).unwrap();
    b.write_pages(1, &page(0xBC)).unwrap();
    assert_eq!(b.physical_block(1), Some(freed));
    let mut raw = page(0);
    volume
        .device()
        .read_exact_at(&mut raw, freed * BLOCK)
        .unwrap();
    assert_eq!(raw, page(0xBC));

    // Removing a file frees all of its blocks.
    let remaining = [a.physical_block(0).unwrap(), a.physical_block(1).unwrap()];
    a.remove().unwrap();
    b.write_pages(2, &[page(1), page(2)].concat()).unwrap();
    let mut reused = [b.physical_block(2).unwrap(), b.physical_block(3).unwrap()];
    reused.sort();
    assert_eq!(reused, remaining);
    volume.check_invariants();
}

#[test]
fn enospc_changes_nothing() {
    // Superblocks and two metadata areas of 2 blocks take 6: 3 usable.
    let volume = volume(9);
    assert_eq!(volume.total_blocks(), 9);
    assert_eq!(volume.free_blocks(), 3);
    let file = volume.create_file("a").unwrap();
    file.set_len(8 * BLOCK).unwrap();
    file.write_pages(0, &page(1)).unwrap();
    let big: Vec<u8> = (0..3).flat_map(|i| page(i + 2)).collect();
    assert_eq!(errno(file.write_pages(1, &big)), libc::ENOSPC);
    assert_eq!(file.allocated_blocks().unwrap(), 1);
    assert_eq!(volume.free_blocks(), 2);
    file.write_pages(1, &big[..2 * PAGE_SIZE]).unwrap();
    assert_eq!(volume.free_blocks(), 0);
    assert_eq!(errno(file.write_pages(5, &page(1))), libc::ENOSPC);
    // Overwriting allocated blocks needs no space.
    file.write_pages(0, &page(7)).unwrap();
    assert_eq!(read(&file, 0, 1), page(7));
    volume.check_invariants();
}

#[test]
fn a_failed_write_unmaps_the_blocks_it_allocated() {
    let faulty = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(64 * BLOCK)), 1));
    let volume = Volume::format(faulty.clone()).unwrap();
    let a = filled(&volume, "a", 1);
    a.remove().unwrap(); // its block, full of 1s, is next in line
    let b = volume.create_file("b").unwrap();
    b.set_len(BLOCK).unwrap();
    faulty.fail_nth(DeviceOp::Write, 1, libc::EIO);
    assert_eq!(errno(b.write_pages(0, &page(2))), libc::EIO);
    assert_eq!(b.physical_block(0), None);
    assert_eq!(read(&b, 0, 1), page(0), "b must not see a's old data");
    volume.check_invariants();
}

#[test]
fn file_table_errors() {
    let volume = volume(16);
    let a = volume.create_file("a").unwrap();
    assert_eq!(errno(volume.create_file("a")), libc::EEXIST);
    assert_eq!(errno(volume.create_file("")), libc::EINVAL);
    assert_eq!(errno(volume.create_file("x/y")), libc::EINVAL);
    assert_eq!(errno(volume.create_file("x\0")), libc::EINVAL);
    assert_eq!(
        errno(volume.create_file(&"n".repeat(256))),
        libc::ENAMETOOLONG
    );
    volume.create_file(&"n".repeat(255)).unwrap();
    assert_eq!(errno(volume.open_file("missing")), libc::ENOENT);
    assert_eq!(errno(volume.remove_file("missing")), libc::ENOENT);

    // Busy while any handle, clone included, is alive.
    let clone = a.clone();
    assert_eq!(errno(volume.remove_file("a")), libc::EBUSY);
    drop(a);
    assert_eq!(errno(volume.remove_file("a")), libc::EBUSY);
    drop(clone);
    volume.remove_file("a").unwrap();
    assert_eq!(errno(volume.open_file("a")), libc::ENOENT);
    assert_eq!(volume.file_names(), ["n".repeat(255)]);

    // Removing through a handle: every handle of it fails afterwards.
    let b = filled(&volume, "b", 2);
    let other = volume.open_file("b").unwrap();
    let free = volume.free_blocks();
    b.remove().unwrap();
    assert_eq!(volume.free_blocks(), free + 2);
    for handle in [&b, &other] {
        assert_eq!(errno(handle.len()), libc::ENOENT);
        assert_eq!(errno(handle.read_pages(0, &mut page(0))), libc::ENOENT);
        assert_eq!(errno(handle.write_pages(0, &page(0))), libc::ENOENT);
        assert_eq!(errno(handle.set_len(0)), libc::ENOENT);
        assert_eq!(errno(handle.punch_hole(0, 1)), libc::ENOENT);
        assert_eq!(errno(handle.zero_range(0, 1)), libc::ENOENT);
        assert_eq!(errno(handle.sync()), libc::ENOENT);
        assert_eq!(errno(handle.remove()), libc::ENOENT);
    }
    // A new file of the same name is a different file.
    let c = volume.create_file("b").unwrap();
    assert_eq!(c.len().unwrap(), 0);
    assert_eq!(errno(b.len()), libc::ENOENT);
    volume.check_invariants();
}

#[test]
fn format_rejects_a_device_without_data_blocks() {
    for len in [BLOCK - 1, 6 * BLOCK, 7 * BLOCK - 1] {
        let device = Arc::new(MemDevice::new(len));
        assert_eq!(errno(Volume::format(device)), libc::EINVAL, "{len}");
    }
    let volume = volume(7);
    assert_eq!(volume.free_blocks(), 1);
}

/// Two files with holes, partial pages and several runs each.
fn populate(volume: &Arc<Volume>) -> Vec<(String, Vec<u8>)> {
    let a = filled(volume, "a", 6);
    a.punch_hole(2 * BLOCK, BLOCK).unwrap();
    a.set_len(6 * BLOCK - 100).unwrap();
    let b = volume.create_file("b").unwrap();
    b.set_len(20 * BLOCK).unwrap();
    b.write_pages(15, &page(7)).unwrap();
    b.write_pages(3, &[page(8), page(9)].concat()).unwrap();
    volume.create_file("empty").unwrap();
    let gone = filled(volume, "gone", 2);
    gone.remove().unwrap();
    [a, b]
        .iter()
        .map(|file| {
            let pages = file.len().unwrap().div_ceil(BLOCK) as usize;
            (file_name(volume, file), read(file, 0, pages))
        })
        .collect()
}

fn file_name(volume: &Volume, file: &VolumeFile) -> String {
    let state = volume.state.lock();
    let root = state.meta.inodes[&ROOT].dir().unwrap();
    let (name, _) = root.entries.iter().find(|(_, e)| e.ino == file.id).unwrap();
    name.clone()
}

fn assert_same_files(volume: &Arc<Volume>, expected: &[(String, Vec<u8>)]) {
    assert_eq!(volume.file_names(), ["a", "b", "empty"]);
    for (name, data) in expected {
        let file = volume.open_file(name).unwrap();
        let pages = data.len() / PAGE_SIZE;
        assert_eq!(read(&file, 0, pages), *data, "file {name}");
    }
    assert_eq!(volume.open_file("empty").unwrap().len().unwrap(), 0);
    volume.check_invariants();
}

#[test]
fn a_synced_volume_reopens_with_the_same_files_and_bytes() {
    let device: Arc<dyn Device> = Arc::new(MemDevice::new(256 * BLOCK));
    let volume = Volume::format(device.clone()).unwrap();
    let expected = populate(&volume);
    let a = volume.open_file("a").unwrap();
    let runs = volume
        .state
        .lock()
        .meta
        .file(a.id)
        .unwrap()
        .extents
        .run_count();
    assert!(runs >= 2, "the test wants several runs");
    let sizes: Vec<u64> = ["a", "b"]
        .iter()
        .map(|name| volume.open_file(name).unwrap().len().unwrap())
        .collect();
    a.sync().unwrap();
    let free = volume.free_blocks() + volume.pending_blocks();
    drop(a);
    drop(volume);

    let volume = Volume::open(device.clone()).unwrap();
    assert_same_files(&volume, &expected);
    for (name, size) in ["a", "b"].iter().zip(sizes) {
        assert_eq!(volume.open_file(name).unwrap().len().unwrap(), size);
    }
    assert_eq!(
        volume.free_blocks(),
        free,
        "every unmapped block is free again"
    );
    // The reopened volume keeps working and reopens again.
    let c = filled(&volume, "c", 3);
    volume.sync().unwrap();
    let data = read(&c, 0, 3);
    drop(c);
    drop(volume);
    let volume = Volume::open(device).unwrap();
    assert_eq!(read(&volume.open_file("c").unwrap(), 0, 3), data);
    volume.check_invariants();
}

#[test]
fn a_volume_on_a_file_device_reopens_after_sync() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("volume.img");
    let device = Arc::new(crate::device::FileDevice::create(&path, 4 << 20).unwrap());
    let volume = Volume::format(device).unwrap();
    let expected = populate(&volume);
    volume.sync().unwrap();
    drop(volume);
    let device = Arc::new(crate::device::FileDevice::open(&path).unwrap());
    assert_same_files(&Volume::open(device).unwrap(), &expected);
}

#[test]
fn changes_after_the_last_sync_are_not_in_a_reopened_volume() {
    let device: Arc<dyn Device> = Arc::new(MemDevice::new(256 * BLOCK));
    let volume = Volume::format(device.clone()).unwrap();
    let a = filled(&volume, "a", 2);
    volume.sync().unwrap();
    a.set_len(BLOCK).unwrap();
    volume.create_file("new").unwrap();
    drop(a);
    volume.remove_file("a").unwrap();
    let reopened = Volume::open(after_crash(device.as_ref())).unwrap();
    assert_eq!(reopened.file_names(), ["a"]);
    let a = reopened.open_file("a").unwrap();
    assert_eq!(read(&a, 0, 2), [page(1), page(2)].concat());
    reopened.check_invariants();
}

#[test]
fn committed_blocks_freed_wait_for_the_next_commit() {
    let volume = volume(64);
    let a = filled(&volume, "a", 4);
    a.sync().unwrap();
    let b = volume.create_file("b").unwrap();
    b.set_len(4 * BLOCK).unwrap();
    let freed = a.physical_block(1).unwrap();
    a.punch_hole(BLOCK, BLOCK).unwrap();
    assert_eq!(volume.pending_blocks(), 1);
    b.write_pages(0, &page(9)).unwrap();
    assert_ne!(b.physical_block(0), Some(freed), "reused before the commit");
    volume.check_invariants();
    // A block mapped and freed between two commits is reused at once.
    let unsynced = b.physical_block(0).unwrap();
    b.punch_hole(0, BLOCK).unwrap();
    b.write_pages(1, &page(9)).unwrap();
    assert_eq!(b.physical_block(1), Some(unsynced));
    b.sync().unwrap();
    assert_eq!(volume.pending_blocks(), 0);
    b.write_pages(2, &page(9)).unwrap();
    assert_eq!(b.physical_block(2), Some(freed), "released by the commit");
    volume.check_invariants();
}

#[test]
fn open_rejects_devices_without_a_volume() {
    assert_eq!(
        errno(Volume::open(Arc::new(MemDevice::new(BLOCK)))),
        libc::EINVAL
    );
    let blank: Arc<dyn Device> = Arc::new(MemDevice::new(64 * BLOCK));
    assert_eq!(errno(Volume::open(blank.clone())), libc::EINVAL);
    blank.write_all_at(&[0xAB; 2 * PAGE_SIZE], 0).unwrap();
    assert_eq!(errno(Volume::open(blank)), libc::EINVAL);

    // A volume on a device that shrank.
    let device: Arc<dyn Device> = Arc::new(MemDevice::new(64 * BLOCK));
    Volume::format(device.clone()).unwrap();
    let mut image = vec![0; 63 * PAGE_SIZE];
    device.read_exact_at(&mut image, 0).unwrap();
    let smaller: Arc<dyn Device> = Arc::new(MemDevice::new(63 * BLOCK));
    smaller.write_all_at(&image, 0).unwrap();
    assert_eq!(errno(Volume::open(smaller)), libc::EINVAL);
}

#[test]
fn a_corrupt_superblock_or_area_falls_back_to_the_commit_before() {
    let device: Arc<dyn Device> = Arc::new(MemDevice::new(64 * BLOCK));
    let volume = Volume::format(device.clone()).unwrap(); // generation 1
    let a = filled(&volume, "a", 1);
    a.sync().unwrap(); // 2
    a.write_pages(0, &page(5)).unwrap();
    volume.create_file("b").unwrap();
    a.sync().unwrap(); // 3: slot 1, area 1
    drop(a);
    let layout = volume.layout;
    drop(volume);
    let names = |device: &Arc<dyn Device>| Volume::open(device.clone()).map(|v| v.file_names());
    assert_eq!(names(&device).unwrap(), ["a", "b"]);

    // A flipped byte in the newest area (in file a's size, which would
    // still decode): generation 2 it is.
    let area = layout.area(3) * BLOCK;
    let size_byte = area + META_HEADER + 8 + 1;
    let mut byte = [0u8];
    device.read_exact_at(&mut byte, size_byte).unwrap();
    device.write_all_at(&[byte[0] ^ 1], size_byte).unwrap();
    assert_eq!(names(&device).unwrap(), ["a"]);
    device.write_all_at(&byte, size_byte).unwrap();
    assert_eq!(names(&device).unwrap(), ["a", "b"]);

    // A flipped byte in the newest superblock: the same.
    device.read_exact_at(&mut byte, BLOCK + 30).unwrap();
    device.write_all_at(&[byte[0] ^ 1], BLOCK + 30).unwrap();
    assert_eq!(names(&device).unwrap(), ["a"]);

    // Both superblocks corrupt: no volume.
    device.write_all_at(&[0xFF; 8], 0).unwrap();
    assert_eq!(errno(Volume::open(device.clone())), libc::EINVAL);
}

#[test]
fn a_failed_commit_keeps_its_frees_pending_and_is_retried() {
    let faulty = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(64 * BLOCK)), 1));
    let volume = Volume::format(faulty.clone()).unwrap();
    let a = filled(&volume, "a", 2);
    a.sync().unwrap();
    a.set_len(0).unwrap();
    assert_eq!(volume.pending_blocks(), 2);
    // The superblock write (the second write of a commit) fails.
    faulty.fail_nth(DeviceOp::Write, 2, libc::EIO);
    assert_eq!(errno(a.sync()), libc::EIO);
    assert_eq!(volume.pending_blocks(), 2);
    volume.check_invariants();
    a.sync().unwrap();
    assert_eq!(volume.pending_blocks(), 0);
    drop((a, volume));
    let reopened = Volume::open(faulty.inner().clone()).unwrap();
    assert_eq!(reopened.open_file("a").unwrap().len().unwrap(), 0);
    reopened.check_invariants();
}

/// Creates files until exactly `room` bytes of metadata area are left.
fn fill_metadata(volume: &Arc<Volume>, room: u64) {
    let left = |volume: &Volume| {
        let state = volume.state.lock();
        state.meta_capacity - state.meta_len - state.meta_reserved
    };
    // A file in the root takes its record, its entry and its name.
    let per_file = FILE_RECORD + ENTRY_RECORD;
    let mut serial = 0;
    while left(volume) > room {
        let consume = left(volume) - room;
        assert!(consume > per_file, "cannot leave exactly {room} bytes");
        let len = if consume - per_file <= MAX_NAME_LEN as u64 {
            consume - per_file
        } else {
            // Leave enough for one more file with a name of at least 9 bytes.
            (consume - 2 * per_file - 9).min(MAX_NAME_LEN as u64)
        };
        serial += 1;
        volume
            .create_file(&format!("{serial:0>width$}", width = len as usize))
            .unwrap();
    }
    assert_eq!(left(volume), room);
}

#[test]
fn a_write_into_holes_reserves_a_run_per_run_of_fresh_blocks() {
    let volume = volume(256);
    let file = volume.create_file("f").unwrap();
    file.set_len(64 * BLOCK).unwrap();
    fill_metadata(&volume, RUN_RECORD);
    // 32 fresh blocks in a row are one run.
    let data: Vec<u8> = (0..32).flat_map(|i| page(i + 1)).collect();
    file.write_pages(0, &data).unwrap();
    assert_eq!(read(&file, 0, 32), data);
    // A second run does not fit, and the failed write changes nothing.
    let free = volume.free_blocks();
    assert_eq!(errno(file.write_pages(40, &page(9))), libc::ENOSPC);
    assert_eq!(volume.free_blocks(), free);
    assert_eq!(file.allocated_blocks().unwrap(), 32);
    // Overwriting needs no metadata.
    file.write_pages(0, &page(9)).unwrap();
    volume.check_invariants();
}

#[test]
fn a_write_split_by_a_concurrent_fill_past_its_reservation_maps_nothing() {
    let faulty = Arc::new(FaultyDevice::new(Arc::new(MemDevice::new(256 * BLOCK)), 1));
    let volume = Volume::format(faulty.clone()).unwrap();
    let file = volume.create_file("f").unwrap();
    file.set_len(8 * BLOCK).unwrap();
    fill_metadata(&volume, 2 * RUN_RECORD);
    // The first write gets the next three blocks (one run, one reserved) and
    // is held in its device write while a second write fills its middle page.
    let first = volume.layout.data_start();
    faulty.add_rule(
        FaultRule::new(
            DeviceOp::Write,
            Trigger::Always,
            Injection::Delay {
                min: Duration::from_millis(500),
                max: Duration::from_millis(500),
            },
        )
        .on_bytes(first * BLOCK..(first + 3) * BLOCK),
    );
    let writer = {
        let file = file.clone();
        std::thread::spawn(move || file.write_pages(0, &[page(1), page(1), page(1)].concat()))
    };
    while faulty.injected() == 0 {
        std::thread::yield_now();
    }
    file.write_pages(1, &page(2)).unwrap();
    // Pages 0 and 2 apart from page 1 take two runs more: only one fits.
    assert_eq!(errno(writer.join().unwrap()), libc::ENOSPC);
    assert_eq!(file.physical_block(0), None);
    assert_eq!(file.physical_block(2), None);
    assert_eq!(read(&file, 0, 3), [page(0), page(2), page(0)].concat());
    volume.check_invariants();
}

#[test]
fn a_full_metadata_area_fails_with_enospc_and_changes_nothing() {
    let device: Arc<dyn Device> = Arc::new(MemDevice::new(64 * BLOCK));
    let volume = Volume::format(device.clone()).unwrap();
    let capacity = volume.layout.meta_capacity();
    let name = |i: usize| format!("{i:0>200}");
    let mut created = 0;
    let error = loop {
        match volume.create_file(&name(created)) {
            Ok(_) => created += 1,
            Err(error) => break error,
        }
    };
    assert_eq!(error.raw_os_error(), Some(libc::ENOSPC));
    assert_eq!(
        created as u64,
        (capacity - META_HEADER - DIR_RECORD) / (FILE_RECORD + ENTRY_RECORD + 200)
    );
    assert_eq!(volume.file_names().len(), created);
    volume.check_invariants();

    // Runs: a file that fills holes every other page needs a run per page.
    volume.remove_file(&name(0)).unwrap();
    volume.remove_file(&name(1)).unwrap();
    let f = volume.create_file("f").unwrap();
    f.set_len(64 * BLOCK).unwrap();
    let mut mapped = 0;
    let error = loop {
        match f.write_pages(2 * mapped, &page(1)) {
            Ok(()) => mapped += 1,
            Err(error) => break error,
        }
    };
    assert_eq!(error.raw_os_error(), Some(libc::ENOSPC));
    assert_eq!(f.allocated_blocks().unwrap(), mapped);
    assert!(volume.free_blocks() > 0, "the area ran out, not the blocks");
    volume.check_invariants();
    volume.sync().unwrap();
    drop((f, volume));
    let reopened = Volume::open(device).unwrap();
    let f = reopened.open_file("f").unwrap();
    assert_eq!(f.allocated_blocks().unwrap(), mapped);
    reopened.check_invariants();
}

#[test]
fn concurrent_files_never_share_blocks() {
    let volume = volume(256);
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let file = volume.create_file(&format!("f{t}")).unwrap();
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(t.into());
                file.set_len(32 * BLOCK).unwrap();
                for _ in 0..500 {
                    let index = rng.u64(0..32);
                    match rng.u8(0..4) {
                        0 | 1 => {
                            if index * BLOCK < file.len().unwrap() {
                                file.write_pages(index, &page(t)).unwrap();
                            }
                        }
                        2 => file
                            .punch_hole(index * BLOCK, rng.u64(1..4 * BLOCK))
                            .unwrap(),
                        _ => file.set_len(rng.u64(0..32 * BLOCK)).unwrap(),
                    }
                    // Every block this file maps holds its own pages only.
                    let mut buf = page(0);
                    file.read_pages(index, &mut buf).unwrap();
                    assert!(buf.iter().all(|&b| b == 0 || b == t));
                    file.volume().check_invariants();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    volume.check_invariants();
}

#[derive(Clone, Debug)]
enum FileOp {
    Write(u64, u8),
    Punch(u64, u64),
    Collapse(u64, u64),
    Insert(u64, u64),
    SetLen(u64),
}

fn file_op() -> impl Strategy<Value = FileOp> {
    prop_oneof![
        4 => (0u64..24, 1u8..255).prop_map(|(p, f)| FileOp::Write(p, f)),
        1 => (0u64..24, 1u64..6).prop_map(|(p, n)| FileOp::Punch(p, n)),
        2 => (0u64..24, 1u64..6).prop_map(|(p, n)| FileOp::Collapse(p, n)),
        2 => (0u64..24, 1u64..6).prop_map(|(p, n)| FileOp::Insert(p, n)),
        1 => (0u64..24).prop_map(FileOp::SetLen),
    ]
}

proptest! {
    /// Whole-page operations against a model holding one fill byte per page
    /// (0 for a hole), with a second file sharing the volume so that freed
    /// blocks are reused.
    #[test]
    fn collapse_and_insert_match_a_page_model(ops in proptest::collection::vec(file_op(), 0..60)) {
        let volume = volume(256);
        let file = volume.create_file("a").unwrap();
        let other = volume.create_file("b").unwrap();
        other.set_len(64 * BLOCK).unwrap();
        let mut model: Vec<u8> = vec![0; 8];
        file.set_len(8 * BLOCK).unwrap();
        for (step, op) in ops.into_iter().enumerate() {
            let pages = model.len() as u64;
            let (result, expect_ok) = match op {
                FileOp::Write(p, fill) => {
                    let ok = p < pages;
                    if ok {
                        model[p as usize] = fill;
                    }
                    (file.write_pages(p, &page(fill)), ok)
                }
                FileOp::Punch(p, n) => {
                    for slot in model.iter_mut().skip(p as usize).take(n as usize) {
                        *slot = 0;
                    }
                    (file.punch_hole(p * BLOCK, n * BLOCK), true)
                }
                FileOp::Collapse(p, n) => {
                    let ok = p + n < pages;
                    if ok {
                        model.drain(p as usize..(p + n) as usize);
                    }
                    (file.collapse_range(p * BLOCK, n * BLOCK), ok)
                }
                FileOp::Insert(p, n) => {
                    let ok = p < pages;
                    if ok {
                        model.splice(p as usize..p as usize, vec![0; n as usize]);
                    }
                    (file.insert_range(p * BLOCK, n * BLOCK), ok)
                }
                FileOp::SetLen(p) => {
                    model.resize(p as usize, 0);
                    (file.set_len(p * BLOCK), true)
                }
            };
            prop_assert_eq!(result.is_ok(), expect_ok, "{:?}", result);
            // Churn the other file so freed blocks are taken at once.
            other.write_pages(step as u64 % 64, &page(0xEE)).unwrap();
            prop_assert_eq!(file.len().unwrap(), model.len() as u64 * BLOCK);
            let data = read(&file, 0, model.len() + 1);
            for (i, &fill) in model.iter().enumerate() {
                prop_assert!(
                    data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].iter().all(|&b| b == fill),
                    "page {} should be all {}", i, fill
                );
            }
            prop_assert!(data[model.len() * PAGE_SIZE..].iter().all(|&b| b == 0));
            prop_assert_eq!(
                file.allocated_blocks().unwrap(),
                model.iter().filter(|&&fill| fill != 0).count() as u64
            );
            volume.check_invariants();
        }
    }
}
