//! A shared map of a mounted file read without pause while other processes
//! punch holes in the file, zero ranges of it and truncate it (the
//! `fallocate` and `truncate` commands) and the test rewrites parts of it.
//! Around each change the reader is told what may change (and how far it may
//! read: never past a size the file may shrink to); while the change runs,
//! every byte it loads must be what was there before or what the change
//! leaves, and once the change is reported done, exactly what it leaves:
//! zeroes where punched, zeroed or cut off (the rest of the last page
//! included), the new bytes where rewritten, and the rest untouched.

mod support;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};

use support::map::Map;
use support::{install_sigbus_report, run, Image, Note, Rng};

const PAGE: u64 = 4096;
/// The reader's map of the file, from offset 0; the file stays shorter.
const MAP_LEN: usize = 2 << 20;
/// Changes made in the test suite; `FILEMAP_MOUNT_RACE_CHANGES` sets another.
const CHANGES: u64 = 300;
/// Bytes the reader checks between two looks at its messages.
const SWEEP: usize = 64 << 10;

#[test]
fn a_map_read_while_other_processes_punch_zero_and_truncate_sees_each_change_once_done() {
    let changes = std::env::var("FILEMAP_MOUNT_RACE_CHANGES")
        .map(|n| {
            n.trim()
                .parse()
                .expect("FILEMAP_MOUNT_RACE_CHANGES: a number")
        })
        .unwrap_or(CHANGES);
    let image = Image::new("64M");
    let server = image.mount();
    let path = image.at("raced");
    let mut rng = Rng::new(0x7261_6365);
    let mut model = vec![0; (1 << 20) + 1234];
    rng.fill_nonzero(&mut model);
    let writer = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("create the file");
    writer.write_all_at(&model, 0).expect("write the file");
    writer.sync_all().expect("fsync");

    let (to_reader, from_test) = channel();
    let (to_test, from_reader) = channel();
    let reader = {
        let file = OpenOptions::new()
            .read(true)
            .open(&path)
            .expect("open for the map");
        let model = model.clone();
        std::thread::spawn(move || read_without_pause(file, model, from_test, to_test))
    };
    let ask = |message: ToReader, step: &str| {
        to_reader
            .send(message)
            .unwrap_or_else(|_| panic!("{step}: the reader has gone"));
        match from_reader.recv() {
            Ok(Ok(())) => {}
            Ok(Err(error)) => panic!("{step}: {error}"),
            Err(_) => panic!("{step}: the reader has gone"),
        }
    };

    for n in 0..changes {
        let size = model.len() as u64;
        let start = rng.below(size);
        let len = rng.within(1, 64 << 10).min(size - start);
        let change = match rng.below(100) {
            0..40 => Change::Punch,
            40..55 => Change::Zero,
            55..70 => {
                let mut data = vec![0; len as usize];
                rng.fill_nonzero(&mut data);
                Change::Write(data)
            }
            // Shrinks to half the size at most, grows up to 1.5 MiB: the file
            // stays longer than two pages and inside the map.
            70..85 if size > 2 * PAGE => Change::Truncate(rng.within(size / 2, size)),
            _ if size < 3 << 19 => Change::Truncate(rng.within(size + 1, (3 << 19) + PAGE)),
            _ => Change::Truncate(rng.within(size / 2, size)),
        };
        // What the change leaves from `start` on, and how far the reader may
        // read while it runs.
        let (step, start, after, limit, size_after) = match &change {
            Change::Punch => (
                format!("change {n}: fallocate --punch-hole {start}+{len}"),
                start,
                vec![0; len as usize],
                size,
                size,
            ),
            Change::Zero => (
                format!("change {n}: fallocate --zero-range --keep-size {start}+{len}"),
                start,
                vec![0; len as usize],
                size,
                size,
            ),
            Change::Write(data) => (
                format!("change {n}: pwrite {start}+{len}"),
                start,
                data.clone(),
                size,
                size,
            ),
            &Change::Truncate(to) => (
                format!("change {n}: truncate from {size} to {to}"),
                to.min(size),
                Vec::new(),
                to.min(size),
                to,
            ),
        };
        ask(
            ToReader::Begin {
                start,
                after: after.clone(),
                limit,
            },
            &format!("{step} (before it)"),
        );
        // The change: by another process, or for a pwrite by this one
        // through its own descriptor.
        let (offset, length) = (start.to_string(), len.to_string());
        match change {
            Change::Punch => {
                run(
                    "fallocate",
                    &[
                        "--punch-hole",
                        "--offset",
                        &offset,
                        "--length",
                        &length,
                        &path,
                    ],
                );
            }
            Change::Zero => {
                run(
                    "fallocate",
                    &[
                        "--zero-range",
                        "--keep-size",
                        "--offset",
                        &offset,
                        "--length",
                        &length,
                        &path,
                    ],
                );
            }
            Change::Write(data) => writer.write_all_at(&data, start).expect("pwrite"),
            Change::Truncate(to) => {
                run("truncate", &["--size", &to.to_string(), &path]);
            }
        }
        model.resize(size_after as usize, 0);
        model[start as usize..start as usize + after.len()].copy_from_slice(&after);
        ask(
            ToReader::Done { size: size_after },
            &format!("{step} (done)"),
        );
    }
    to_reader.send(ToReader::Stop).expect("the reader has gone");
    reader.join().expect("the reader panicked");
    drop(writer);
    let read = std::fs::read(&path).expect("read the file");
    assert!(read == model, "the file differs from the model at the end");
    server.stop(None);
}

/// A change made while the reader reads.
enum Change {
    Punch,
    Zero,
    Write(Vec<u8>),
    Truncate(u64),
}

/// What the test tells the reader.
enum ToReader {
    /// A change is about to start: while it runs, the bytes from `start`
    /// on may read as before or as `after`, and nothing at or past `limit`
    /// is loaded (the file may be cut there). Answered once the reader keeps
    /// to `limit`.
    Begin {
        start: u64,
        after: Vec<u8>,
        limit: u64,
    },
    /// The change has returned: the file is `size` long, with `after` in
    /// place. Answered with the check of the whole file through the map.
    Done {
        size: u64,
    },
    Stop,
}

/// The reader: loads the map of `file` without pause, checking every byte
/// against `model` and the change in flight.
fn read_without_pause(
    file: File,
    mut model: Vec<u8>,
    from_test: Receiver<ToReader>,
    to_test: Sender<Result<(), String>>,
) {
    install_sigbus_report();
    let mut note = Note::new();
    let map = Map::new(&file, MAP_LEN, false).expect("mmap");
    // The change in flight: its start and what it leaves.
    let mut pending: Option<(u64, Vec<u8>)> = None;
    let mut limit = model.len() as u64;
    let mut found: Option<String> = None;
    let mut at = 0_u64;
    let mut seen = vec![0; SWEEP];
    note.set("mount map race: the first sweep\n".to_owned());
    loop {
        let message = match from_test.try_recv() {
            Ok(message) => Some(message),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => return,
        };
        match message {
            Some(ToReader::Begin {
                start,
                after,
                limit: to,
            }) => {
                note.set(format!(
                    "mount map race: during a change of {} bytes at {start}, reading below {to}\n",
                    after.len()
                ));
                pending = Some((start, after));
                limit = to;
                // Past `limit` is not read from now on.
                if to_test.send(found.take().map_or(Ok(()), Err)).is_err() {
                    return;
                }
            }
            Some(ToReader::Done { size }) => {
                let (start, after) = pending.take().expect("a change in flight");
                model.resize(size as usize, 0);
                let start = start as usize;
                if !after.is_empty() {
                    model[start..start + after.len()].copy_from_slice(&after);
                }
                limit = size;
                note.set(format!(
                    "mount map race: checking the whole file ({size} bytes) after a change\n"
                ));
                let checked = found.take().map_or(Ok(()), Err).and_then(|()| {
                    check_whole(&map, &model)
                        .map_err(|error| format!("once the change was done: {error}"))
                });
                if to_test.send(checked).is_err() {
                    return;
                }
            }
            Some(ToReader::Stop) => return,
            None => {}
        }
        // One sweep of the map below the limit.
        if limit == 0 {
            continue;
        }
        if at >= limit {
            at = 0;
        }
        let len = (limit - at).min(SWEEP as u64) as usize;
        map.load(at as usize, &mut seen[..len]);
        if found.is_none() {
            found = check_during(&model, pending.as_ref(), at, &seen[..len]);
        }
        at += len as u64;
    }
}

/// Bytes `seen` at `at`, loaded while the change `pending` may run: each
/// is the model's or the change's.
fn check_during(
    model: &[u8],
    pending: Option<&(u64, Vec<u8>)>,
    at: u64,
    seen: &[u8],
) -> Option<String> {
    for (i, &byte) in seen.iter().enumerate() {
        let offset = at + i as u64;
        let before = model.get(offset as usize).copied().unwrap_or(0);
        if byte == before {
            continue;
        }
        let changed = pending.and_then(|(start, after)| {
            offset
                .checked_sub(*start)
                .and_then(|i| after.get(i as usize).copied())
        });
        if changed == Some(byte) {
            continue;
        }
        return Some(format!(
            "while a change ran, the map showed {byte:#04x} at {offset} (page {}), \
             where the file held {before:#04x}{}",
            offset / PAGE,
            match changed {
                Some(after) => format!(" and the change leaves {after:#04x}"),
                None => " and the change does not reach".to_owned(),
            }
        ));
    }
    None
}

/// The whole file through the map, and the rest of its last page (zero).
fn check_whole(map: &Map, model: &[u8]) -> Result<(), String> {
    let size = model.len() as u64;
    let end = size.next_multiple_of(PAGE) as usize;
    let mut seen = vec![0; end];
    map.load(0, &mut seen);
    let want = |offset: usize| model.get(offset).copied().unwrap_or(0);
    let Some(first) = (0..end).find(|&i| seen[i] != want(i)) else {
        return Ok(());
    };
    let run = (first..end).take_while(|&i| seen[i] != want(i)).count();
    let differ = (0..end).filter(|&i| seen[i] != want(i)).count();
    Err(format!(
        "the map of the {size}-byte file differs in {differ} bytes; the first run is \
         {first}..{} (page {}), {run} bytes{}: want {:#04x}, got {:#04x}{}",
        first + run,
        first as u64 / PAGE,
        match seen[first..first + run].iter().all(|&b| b == 0) {
            true => ", all zero",
            false => "",
        },
        want(first),
        seen[first],
        match first as u64 >= size {
            true => " (past the end of file, in its last page)",
            false => "",
        }
    ))
}
