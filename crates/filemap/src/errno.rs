//! `io::Error` values carrying the errno a file would give.
//!
//! Most errors are bare errnos (`io::Error::from_raw_os_error`), exactly as
//! `std::fs` returns them. An error that needs to say more (which setting is
//! out of range, which field of a device is corrupt) is an [`Error`] inside an
//! `io::Error` of the errno's kind; [`errno`] reads the errno of either.

use std::io;

/// An error with an errno and a message saying what was wrong, carried inside
/// an `io::Error` whose kind is the errno's (`InvalidInput` for `EINVAL`,
/// `OutOfMemory` for `ENOMEM`, ...). `io::Error::raw_os_error` is `None` for
/// these, as for every `io::Error` with a message: read the errno with
/// [`errno`].
///
/// ```
/// let error = filemap::PageCache::builder().fill_batch_pages(0).build().unwrap_err();
/// assert_eq!(filemap::errno(&error), Some(libc::EINVAL));
/// assert!(error.to_string().contains("fill_batch_pages"));
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    errno: i32,
    message: String,
}

impl Error {
    /// The errno a file would give for this error.
    pub fn errno(&self) -> i32 {
        self.errno
    }
}

/// The errno of `error`: its raw OS error, or the errno of the [`Error`] it
/// carries. `None` only for errors made outside filemap without an errno
/// (such as `read_exact_at`'s `UnexpectedEof`, as `std` makes it).
///
/// ```
/// use std::sync::Arc;
/// use filemap::{errno, MemDevice, PageCache, Volume};
///
/// let volume = Volume::format(Arc::new(MemDevice::new(1 << 20)))?;
/// let cache = PageCache::builder().build()?;
/// let file = cache.open(Arc::new(volume.create_file("a")?))?;
/// // A bare errno, as `std::fs` gives it: `raw_os_error` reads it too.
/// let error = file.punch_hole(0, 0).unwrap_err();
/// assert_eq!((errno(&error), error.raw_os_error()), (Some(libc::EINVAL), Some(libc::EINVAL)));
/// // An errno with a message: only `errno` reads it.
/// let error = PageCache::builder().budget_bytes(0).build().unwrap_err();
/// assert_eq!((errno(&error), error.raw_os_error()), (Some(libc::EINVAL), None));
/// // No errno: `std`'s own error of a read past the end of file.
/// let error = file.read_exact_at(&mut [0; 8], 0).unwrap_err();
/// assert_eq!(errno(&error), None);
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn errno(error: &io::Error) -> Option<i32> {
    error.raw_os_error().or_else(|| {
        error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<Error>())
            .map(Error::errno)
    })
}

/// An error with the raw errno `code`, as `std::fs` would return it.
#[inline]
pub(crate) fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// `Err` with the raw errno `code`.
#[inline]
pub(crate) fn fail<T>(code: i32) -> io::Result<T> {
    Err(err(code))
}

/// An error with errno `code` and a message, of the errno's kind.
pub(crate) fn with_message(code: i32, message: impl Into<String>) -> io::Error {
    io::Error::new(
        err(code).kind(),
        Error {
            errno: code,
            message: message.into(),
        },
    )
}
