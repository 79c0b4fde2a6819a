//! A virtual-disk server loop over a `HostFile`, in the manner of an NBD or
//! vhost-user-blk server: requests arrive on a queue, each is answered, and the
//! disk is one host file cached by filemap.
//!
//! | request | call |
//! |---|---|
//! | READ | `read_exact_at` |
//! | WRITE | `write_all_at` |
//! | TRIM | `punch_hole`: the range reads as zeroes and its host blocks go |
//! | FLUSH | `sync_all`: every completed write is on the host file |
//!
//! A client thread sends a scripted list of requests and checks every reply
//! against a model of the disk in memory; the server stops when the client
//! hangs up. After the FLUSH the host file itself is read back and must equal
//! the model.
//!
//! `cargo run -p filemap --release --example vdisk_server`

use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;

use filemap::{HostFile, Mapping, PageCache};

/// The disk's size: requests past it fail with `EINVAL`.
const DISK_BYTES: u64 = 1 << 20;

#[derive(Debug)]
enum Request {
    Read { offset: u64, len: usize },
    Write { offset: u64, data: Vec<u8> },
    Trim { offset: u64, len: u64 },
    Flush,
}

#[derive(Debug, PartialEq)]
enum Reply {
    Data(Vec<u8>),
    Done,
    /// The request failed with this errno.
    Error(i32),
}

impl Request {
    /// The request in a line, as a server log shows it.
    fn describe(&self) -> String {
        match self {
            Request::Read { offset, len } => format!("READ  {len:>6} bytes at {offset}"),
            Request::Write { offset, data } => {
                format!("WRITE {:>6} bytes at {offset}", data.len())
            }
            Request::Trim { offset, len } => format!("TRIM  {len:>6} bytes at {offset}"),
            Request::Flush => "FLUSH".to_owned(),
        }
    }
}

/// Serves requests until the client hangs up.
fn serve(disk: &Mapping, requests: mpsc::Receiver<(Request, mpsc::Sender<Reply>)>) {
    for (request, reply_to) in requests {
        let reply = handle(disk, request)
            .unwrap_or_else(|error| Reply::Error(filemap::errno(&error).unwrap_or(libc::EIO)));
        // A client that went away wants no answer.
        let _ = reply_to.send(reply);
    }
}

fn handle(disk: &Mapping, request: Request) -> io::Result<Reply> {
    let check = |offset: u64, len: u64| {
        if offset.checked_add(len).is_none_or(|end| end > DISK_BYTES) {
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        } else {
            Ok(())
        }
    };
    match request {
        Request::Read { offset, len } => {
            check(offset, len as u64)?;
            let mut data = vec![0; len];
            disk.read_exact_at(&mut data, offset)?;
            Ok(Reply::Data(data))
        }
        Request::Write { offset, data } => {
            check(offset, data.len() as u64)?;
            disk.write_all_at(&data, offset)?;
            Ok(Reply::Done)
        }
        Request::Trim { offset, len } => {
            check(offset, len)?;
            disk.punch_hole(offset, len)?;
            Ok(Reply::Done)
        }
        Request::Flush => {
            disk.sync_all()?;
            Ok(Reply::Done)
        }
    }
}

/// `len` bytes of a pattern that differs per `seed`, so no two writes look alike.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31) ^ (i as u8))
        .collect()
}

fn main() -> io::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("disk.raw");
    let cache = PageCache::builder().budget_bytes(8 << 20).build()?;
    let disk = cache.open(Arc::new(HostFile::create(&path)?))?;
    disk.set_len(DISK_BYTES)?;

    let script = vec![
        Request::Write {
            offset: 0,
            data: pattern(1, 64 << 10),
        },
        Request::Read {
            offset: 4096,
            len: 8192,
        },
        Request::Write {
            offset: 10_000, // unaligned: part of two pages
            data: pattern(2, 3000),
        },
        Request::Trim {
            offset: 16 << 10,
            len: 32 << 10,
        },
        Request::Read {
            offset: 8192,
            len: 48 << 10,
        },
        Request::Write {
            offset: DISK_BYTES - 100,
            data: pattern(3, 200), // runs past the end of the disk
        },
        Request::Flush,
        Request::Read {
            offset: 0,
            len: 64 << 10,
        },
    ];

    let (send, requests) = mpsc::channel();
    let client = thread::spawn(move || {
        let mut model = vec![0u8; DISK_BYTES as usize];
        for request in script {
            let what = request.describe();
            let expected = match &request {
                Request::Read { offset, len } => {
                    let at = *offset as usize;
                    Reply::Data(model[at..at + len].to_vec())
                }
                Request::Write { offset, data } if *offset + data.len() as u64 > DISK_BYTES => {
                    Reply::Error(libc::EINVAL)
                }
                Request::Write { offset, data } => {
                    let at = *offset as usize;
                    model[at..at + data.len()].copy_from_slice(data);
                    Reply::Done
                }
                Request::Trim { offset, len } => {
                    let at = *offset as usize;
                    model[at..at + *len as usize].fill(0);
                    Reply::Done
                }
                Request::Flush => Reply::Done,
            };
            let (reply_to, reply) = mpsc::channel();
            send.send((request, reply_to)).expect("the server is up");
            let reply = reply.recv().expect("the server answers");
            let shown = match &reply {
                Reply::Data(data) => format!("{} bytes, as the model says", data.len()),
                Reply::Error(errno) => format!("error: {}", io::Error::from_raw_os_error(*errno)),
                Reply::Done => "done".to_owned(),
            };
            assert_eq!(reply, expected, "{what}");
            println!("{what:<32} -> {shown}");
        }
        model
    });
    serve(&disk, requests);
    let model = client.join().expect("the client's checks hold");

    // FLUSH put every write on the host file: read it without the cache.
    let on_host = std::fs::read(&path)?;
    assert_eq!(on_host.len() as u64, DISK_BYTES);
    assert!(on_host == model, "the host file holds every flushed write");
    // 64 KiB were written and 32 KiB of them trimmed: the trimmed blocks went.
    let held = std::fs::metadata(&path)?.blocks() * 512;
    println!(
        "the host file equals the model after FLUSH, and holds {} KiB of blocks for a {} KiB disk",
        held / 1024,
        DISK_BYTES / 1024
    );
    assert!(held < 64 << 10, "TRIM gave the host file's blocks back");
    println!("ok");
    Ok(())
}
