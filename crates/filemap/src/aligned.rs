//! [`AlignedBuf`]: a heap buffer whose start is aligned, as direct I/O needs.

use std::ops::{Deref, DerefMut};

/// A zeroed heap buffer of `len` bytes whose first byte sits at a multiple of
/// an alignment: `O_DIRECT` (and [`crate::Mapping::read_direct`]) wants buffers
/// aligned to the logical sector, [`crate::cache::DIRECT_IO_MEMORY_ALIGN`].
///
/// ```
/// use std::sync::Arc;
/// use filemap::cache::DIRECT_IO_MEMORY_ALIGN;
/// use filemap::{AlignedBuf, MemDevice, PageCache, Volume, PAGE_SIZE};
///
/// let mut buf = AlignedBuf::new(2 * PAGE_SIZE, DIRECT_IO_MEMORY_ALIGN);
/// assert_eq!(buf.as_ptr() as usize % DIRECT_IO_MEMORY_ALIGN, 0);
/// assert_eq!(buf.len(), 2 * PAGE_SIZE);
/// buf[..5].copy_from_slice(b"block");
///
/// # let volume = Volume::format(Arc::new(MemDevice::new(1 << 20)))?;
/// # let cache = PageCache::builder().build()?;
/// # let file = cache.open(Arc::new(volume.create_file("data")?))?;
/// assert_eq!(file.write_direct(&buf, 0)?, 2 * PAGE_SIZE);
/// let mut back = AlignedBuf::new(PAGE_SIZE, DIRECT_IO_MEMORY_ALIGN);
/// assert_eq!(file.read_direct(&mut back, 0)?, PAGE_SIZE);
/// assert_eq!(&back[..5], b"block");
/// // One byte off the alignment, the same read is refused.
/// let mut unaligned = AlignedBuf::new(PAGE_SIZE + 1, DIRECT_IO_MEMORY_ALIGN);
/// let error = file.read_direct(&mut unaligned[1..], 0).unwrap_err();
/// assert_eq!(error.raw_os_error(), Some(libc::EINVAL));
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct AlignedBuf {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes starting at a multiple of `align` (a power of two).
    pub fn new(len: usize, align: usize) -> Self {
        assert!(
            align.is_power_of_two(),
            "alignment {align} is not a power of two"
        );
        let bytes = vec![0; len + align];
        let start = bytes.as_ptr().align_offset(align);
        AlignedBuf { bytes, start, len }
    }

    /// A copy of `data` starting at a multiple of `align`.
    pub fn from_slice(data: &[u8], align: usize) -> Self {
        let mut buf = AlignedBuf::new(data.len(), align);
        buf.copy_from_slice(data);
        buf
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}
