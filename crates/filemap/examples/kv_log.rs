//! A minimal key-value log over a `Volume` on a `FileDevice`, and what a crash
//! leaves of it.
//!
//! Records are appended at the end of one file; the index is rebuilt by
//! scanning the file when it is opened. A compaction copies the live records
//! to a fresh page at the end, syncs, and punches every page before it, which
//! gives their blocks back to the volume. A crash is simulated as
//! `tests/crash.rs` does: the device sits behind a `FaultyDevice` that, once
//! the "process stops", discards every later write, as a power cut would.
//!
//! What it shows, and asserts:
//! 1. records appended after the last sync are gone after a crash, and every
//!    record synced before it is there;
//! 2. a compaction that was synced survives a crash: the live records read
//!    back, and the punched pages are holes that hold no block.
//!
//! `cargo run -p filemap --release --example kv_log`

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Arc;

use filemap::device::{DeviceOp, Injection, Trigger};
use filemap::page::PAGE;
use filemap::{FaultRule, FaultyDevice, FileDevice, Mapping, PageCache, Volume, VolumeFile};

/// The first byte of every record. A zero where a record should start is
/// padding: the next record starts on the next page.
const RECORD: u8 = 1;
/// A record's header: [`RECORD`], key length (u8), value length (u16, LE).
const HEADER: usize = 4;

/// The log: one file of the volume, and an index of its newest values.
struct KvLog {
    file: Arc<Mapping>,
    /// Kept to count the file's blocks.
    volume_file: VolumeFile,
    /// Per key, the newest value and where its record starts.
    index: BTreeMap<String, (Vec<u8>, u64)>,
    /// Where the next record goes.
    tail: u64,
}

impl KvLog {
    /// Opens the log file of `volume` in `cache` (creating it if `create`) and
    /// rebuilds the index by scanning every record up to the end of file.
    fn open(cache: &PageCache, volume: &Arc<Volume>, create: bool) -> io::Result<KvLog> {
        let volume_file = if create {
            volume.create_file("log")?
        } else {
            volume.open_file("log")?
        };
        let file = cache.open(Arc::new(volume_file.clone()))?;
        let mut log = KvLog {
            file,
            volume_file,
            index: BTreeMap::new(),
            tail: 0,
        };
        let len = log.file.len();
        while log.tail < len {
            let mut header = [0u8; HEADER];
            log.file.read_exact_at(&mut header, log.tail)?;
            if header[0] != RECORD {
                // Padding, or a page a compaction punched.
                log.tail = (log.tail / PAGE + 1) * PAGE;
                continue;
            }
            let key_len = usize::from(header[1]);
            let value_len = usize::from(u16::from_le_bytes([header[2], header[3]]));
            let mut body = vec![0u8; key_len + value_len];
            log.file
                .read_exact_at(&mut body, log.tail + HEADER as u64)?;
            let value = body.split_off(key_len);
            let key = String::from_utf8(body).map_err(io::Error::other)?;
            log.index.insert(key, (value, log.tail));
            log.tail += (HEADER + key_len + value_len) as u64;
        }
        Ok(log)
    }

    /// Appends a record; it is durable once [`KvLog::sync`] returns.
    fn put(&mut self, key: &str, value: &[u8]) -> io::Result<()> {
        let mut record = vec![RECORD, key.len() as u8];
        record.extend_from_slice(&(value.len() as u16).to_le_bytes());
        record.extend_from_slice(key.as_bytes());
        record.extend_from_slice(value);
        self.file.write_all_at(&record, self.tail)?;
        self.index
            .insert(key.to_owned(), (value.to_vec(), self.tail));
        self.tail += record.len() as u64;
        Ok(())
    }

    fn get(&self, key: &str) -> Option<&[u8]> {
        self.index.get(key).map(|(value, _)| value.as_slice())
    }

    /// Commits every record appended so far (and the volume's metadata).
    fn sync(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    /// Copies the live records to a fresh page at the end, makes the copies
    /// durable, then punches every page before them.
    fn compact(&mut self) -> io::Result<()> {
        let cut = self.tail.next_multiple_of(PAGE);
        self.tail = cut;
        let live: Vec<(String, Vec<u8>)> = self
            .index
            .iter()
            .map(|(key, (value, _))| (key.clone(), value.clone()))
            .collect();
        for (key, value) in &live {
            self.put(key, value)?;
        }
        // The copies must be durable before the originals go.
        self.sync()?;
        self.file.punch_hole(0, cut)?;
        self.sync()
    }

    /// Blocks of the volume the log holds.
    fn blocks(&self) -> io::Result<u64> {
        self.volume_file.allocated_blocks()
    }
}

/// A volume on the image at `path` (formatted anew if `format`), behind a
/// `FaultyDevice` that can simulate the process stopping.
fn mount(path: &Path, format: bool) -> io::Result<(Arc<FaultyDevice>, Arc<Volume>)> {
    let device = if format {
        FileDevice::create(path, 16 << 20)?
    } else {
        FileDevice::open(path)?
    };
    let faulty = Arc::new(FaultyDevice::new(Arc::new(device), 1));
    let volume = if format {
        Volume::format(faulty.clone())?
    } else {
        Volume::open(faulty.clone())?
    };
    Ok((faulty, volume))
}

/// The process stops here: no write from now on reaches the disk (the
/// mapping's writeback of its dirty pages on drop included), and everything
/// in memory is lost.
fn crash(faulty: Arc<FaultyDevice>, volume: Arc<Volume>, log: KvLog, cache: PageCache) {
    faulty.add_rule(FaultRule::new(
        DeviceOp::Write,
        Trigger::Always,
        Injection::Discard,
    ));
    drop((log, cache, volume, faulty));
}

fn new_cache() -> io::Result<PageCache> {
    PageCache::builder().budget_bytes(4 << 20).build()
}

fn main() -> io::Result<()> {
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("kv.img");

    println!("1. A crash loses what was appended after the last sync, and only that.");
    let (faulty, volume) = mount(&image, true)?;
    let cache = new_cache()?;
    let mut log = KvLog::open(&cache, &volume, true)?;
    log.put("alice", b"10")?;
    log.put("bob", b"20")?;
    log.put("carol", b"30")?;
    log.sync()?;
    println!("   put alice=10 bob=20 carol=30, sync");
    log.put("alice", b"11")?;
    log.put("dave", b"40")?;
    println!("   put alice=11 dave=40, no sync; crash");
    crash(faulty, volume, log, cache);

    let (faulty, volume) = mount(&image, false)?;
    let cache = new_cache()?;
    let mut log = KvLog::open(&cache, &volume, false)?;
    println!(
        "   reopened: alice={:?} bob={:?} carol={:?} dave={:?}",
        log.get("alice").map(String::from_utf8_lossy),
        log.get("bob").map(String::from_utf8_lossy),
        log.get("carol").map(String::from_utf8_lossy),
        log.get("dave").map(String::from_utf8_lossy),
    );
    assert_eq!(log.get("alice"), Some(&b"10"[..]), "the synced value");
    assert_eq!(log.get("bob"), Some(&b"20"[..]));
    assert_eq!(log.get("carol"), Some(&b"30"[..]));
    assert_eq!(log.get("dave"), None, "appended after the last sync");

    println!("2. A synced compaction survives a crash, and frees the punched blocks.");
    for round in 0..400u32 {
        let value = format!("{round:0>100}");
        log.put("counter", value.as_bytes())?;
    }
    log.sync()?;
    let (before_tail, before_blocks) = (log.tail, log.blocks()?);
    println!("   400 updates of one key: {before_tail} bytes of log, {before_blocks} blocks");
    log.compact()?;
    let after_blocks = log.blocks()?;
    println!(
        "   compacted: live records copied past byte {}, pages before it punched: {after_blocks} blocks",
        before_tail.next_multiple_of(PAGE)
    );
    assert!(after_blocks < before_blocks);
    println!("   crash right after the compaction's sync");
    crash(faulty, volume, log, cache);

    let (_faulty, volume) = mount(&image, false)?;
    let cache = new_cache()?;
    let log = KvLog::open(&cache, &volume, false)?;
    let mut first_page = vec![0xffu8; PAGE as usize];
    log.file.read_exact_at(&mut first_page, 0)?;
    println!(
        "   reopened: {} keys, counter={:?}, {} blocks, the first page reads as zeroes: {}",
        log.index.len(),
        log.get("counter")
            .map(|v| String::from_utf8_lossy(&v[90..]).into_owned()),
        log.blocks()?,
        first_page.iter().all(|&b| b == 0),
    );
    assert_eq!(log.index.len(), 4);
    assert_eq!(log.get("alice"), Some(&b"10"[..]));
    assert_eq!(
        log.get("counter"),
        Some(format!("{:0>100}", 399).as_bytes())
    );
    assert_eq!(log.blocks()?, after_blocks, "the punch was committed");
    assert!(
        first_page.iter().all(|&b| b == 0),
        "a punched page is a hole"
    );
    println!("ok");
    Ok(())
}
