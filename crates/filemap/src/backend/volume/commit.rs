//! The commit protocol: a snapshot of the metadata made durable in the
//! area and superblock slot of the next generation (see "Commits" in the
//! volume's documentation).

use std::io;

use super::format::{Superblock, BLOCK, BLOCK_SIZE, MAX_GENERATION, SUPERBLOCK_SLOTS};
use super::space::RunSet;
use super::Volume;
use crate::errno::{fail, with_message};

impl Volume {
    /// Commits the metadata and flushes the device: when it returns, every file,
    /// name, size and completed write of the volume is durable. A
    /// [`Backend::sync`] of any of its files does the same.
    ///
    /// [`Backend::sync`]: crate::Backend::sync
    pub fn sync(&self) -> io::Result<()> {
        self.commit()
    }

    /// Makes the metadata as it is now durable (see "Commits" in the volume's
    /// documentation).
    pub(super) fn commit(&self) -> io::Result<()> {
        let mut generation = self.generation.lock();
        let snapshot = {
            let mut guard = self.state.lock();
            let state = &mut *guard;
            if state.dirty {
                // Refused before the snapshot changes anything.
                let next = generation
                    .checked_add(1)
                    .filter(|&next| next <= MAX_GENERATION)
                    .ok_or_else(|| {
                        with_message(
                            libc::EOVERFLOW,
                            format!(
                                "volume at its last generation {}: no further commit",
                                *generation
                            ),
                        )
                    })?;
                let metadata = state.meta.encode();
                debug_assert_eq!(metadata.len() as u64, state.meta_len);
                let mapped = RunSet::from_runs(state.meta.mapped_runs());
                // From now on a crash may bring this snapshot back.
                state.space.committed = state.space.committed.union(&mapped);
                let released = std::mem::take(&mut state.space.pending);
                state.space.pending_count = 0;
                state.dirty = false;
                Some((next, metadata, mapped, released))
            } else {
                None
            }
        };
        let Some((next, metadata, mapped, released)) = snapshot else {
            return self.device.flush();
        };
        let written = self.write_commit(next, &metadata);
        let mut state = self.state.lock();
        match written {
            Ok(()) => {
                *generation = next;
                // Older commits can no longer come back; blocks freed after the
                // snapshot stay pending (some of them it still maps).
                state.space.committed = mapped;
                for (first, len) in released {
                    state.space.allocator.free(first, len);
                }
                Ok(())
            }
            Err(error) => {
                // The superblock may or may not be on the device: keep
                // protecting both commits, and retry in the same slot.
                for (first, len) in released {
                    state.space.pending.push((first, len));
                    state.space.pending_count += len;
                }
                state.dirty = true;
                Err(error)
            }
        }
    }

    /// Writes commit `generation` of `metadata`: the data it maps, then the
    /// metadata, then the superblock, each made durable before the next.
    fn write_commit(&self, generation: u64, metadata: &[u8]) -> io::Result<()> {
        if metadata.len() as u64 > self.layout.meta_capacity() {
            // Reservations keep this from happening.
            return fail(libc::ENOSPC);
        }
        self.device.flush()?;
        let mut area = metadata.to_vec();
        area.resize(metadata.len().div_ceil(BLOCK_SIZE) * BLOCK_SIZE, 0);
        self.device
            .write_all_at(&area, self.layout.area(generation) * BLOCK)?;
        self.device.flush()?;
        let superblock = Superblock {
            layout: self.layout,
            generation,
            meta_len: metadata.len() as u64,
            meta_crc: crc32fast::hash(metadata),
        };
        self.device.write_all_at(
            &superblock.encode(),
            (generation % SUPERBLOCK_SLOTS) * BLOCK,
        )?;
        self.device.flush()
    }
}
