//! [`Slot`]: one value lent to one borrower at a time, the others waiting.
//! Stores lend their connection (or their data) to a transaction this way, so
//! that a transaction owns what it works on (and can be sent between threads)
//! while transactions take turns.

use std::sync::{Condvar, Mutex};

/// A value lent to one borrower at a time.
#[derive(Debug, Default)]
pub struct Slot<T> {
    value: Mutex<Option<T>>,
    returned: Condvar,
}

impl<T> Slot<T> {
    /// A slot holding `value`.
    pub fn new(value: T) -> Self {
        Slot { value: Mutex::new(Some(value)), returned: Condvar::new() }
    }

    /// Takes the value, waiting while another borrower has it. A borrower that
    /// takes it twice without giving it back waits forever: a transaction must
    /// never be opened while the same task holds one.
    pub fn take(&self) -> T {
        let mut value = self.value.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(v) = value.take() {
                return v;
            }
            value = self.returned.wait(value).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Gives the value back, waking one waiting borrower.
    pub fn give_back(&self, v: T) {
        *self.value.lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
        self.returned.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_second_borrower_waits_for_the_first() {
        let slot = Arc::new(Slot::new(1));
        let v = slot.take();
        let other = {
            let slot = slot.clone();
            std::thread::spawn(move || slot.take())
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!other.is_finished(), "the value is lent out");
        slot.give_back(v + 1);
        assert_eq!(other.join().unwrap(), 2);
    }
}
