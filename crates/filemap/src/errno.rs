//! `io::Error` values carrying the errno a file would give.

use std::io;

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
