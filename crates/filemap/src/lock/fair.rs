//! Placeholder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access { pub class: u8, pub exclusive: bool }
impl Access {
    pub fn shared(class: u8) -> Self { Access { class, exclusive: false } }
    pub fn exclusive(class: u8) -> Self { Access { class, exclusive: true } }
}
#[derive(Debug, Default)]
pub struct RawFairLock;
impl RawFairLock {
    pub fn new() -> Self { RawFairLock }
    pub fn lock(&self, _a: Access) { todo!() }
    pub fn try_lock(&self, _a: Access) -> bool { todo!() }
    pub fn unlock(&self, _a: Access) { todo!() }
}
