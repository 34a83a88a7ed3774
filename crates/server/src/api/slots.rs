//! Places a request holds for as long as it runs (a streaming bootstrap, a
//! live connection), counted per user and in all, so that one user cannot
//! take every place and nobody can take more than the server has.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use deltasync_protocol::UserId;

use crate::refusals::RefusalCounter;

/// The caps one kind of place is taken under.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// What the places are for, for the log (`"bootstraps"`).
    pub what: &'static str,
    /// The most one user may hold, and its configuration key.
    pub per_user: (usize, &'static str),
    /// The most all users may hold together, and its configuration key.
    pub total: Option<(usize, &'static str)>,
}

/// Why a place was refused: how many the user, or everyone, holds already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The user holds its cap's worth.
    PerUser(usize),
    /// All users together hold the total cap's worth.
    Total(usize),
}

/// The places of one kind held now.
#[derive(Default)]
pub struct UserSlots {
    taken: Mutex<Taken>,
}

#[derive(Default)]
struct Taken {
    total: usize,
    per_user: HashMap<UserId, usize>,
    refused_per_user: RefusalCounter,
    refused_total: RefusalCounter,
}

/// One place, held until dropped.
pub struct Slot {
    slots: Arc<UserSlots>,
    user: UserId,
}

impl UserSlots {
    /// Takes a place for `user`, or says which cap is reached (and logs the
    /// refusal, at most once per [`crate::refusals::LOG_EVERY`] for each cap).
    pub fn take(self: &Arc<Self>, user: &UserId, caps: Caps) -> Result<Slot, Refusal> {
        let mut taken = self.taken.lock().expect("slots lock");
        let Taken { total, per_user, refused_per_user, refused_total } = &mut *taken;
        let mine = per_user.get(user).copied().unwrap_or(0);
        let (user_cap, user_key) = caps.per_user;
        if mine >= user_cap {
            if let Some(refused) = refused_per_user.count() {
                tracing::warn!(last_user = %user, refused, cap = user_cap, key = user_key, "{} refused: a user's cap reached", caps.what);
            }
            return Err(Refusal::PerUser(mine));
        }
        if let Some((cap, key)) = caps.total
            && *total >= cap
        {
            if let Some(refused) = refused_total.count() {
                tracing::warn!(refused, cap, key, "{} refused: the server's cap reached", caps.what);
            }
            return Err(Refusal::Total(*total));
        }
        *total += 1;
        per_user.insert(user.clone(), mine + 1);
        Ok(Slot { slots: self.clone(), user: user.clone() })
    }

    /// How many places all users hold now.
    pub fn total(&self) -> usize {
        self.taken.lock().expect("slots lock").total
    }

    /// How many places `user` holds now.
    pub fn held_by(&self, user: &UserId) -> usize {
        self.taken.lock().expect("slots lock").per_user.get(user).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut taken = self.slots.taken.lock().expect("slots lock");
        let Taken { total, per_user, .. } = &mut *taken;
        *total -= 1;
        if let Some(n) = per_user.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                per_user.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: Caps = Caps { what: "tests", per_user: (2, "per_user_key"), total: Some((3, "total_key")) };

    fn user(name: &str) -> UserId {
        UserId::parse(name).unwrap()
    }

    #[test]
    fn a_user_is_refused_past_its_cap_and_others_are_not() {
        let slots = Arc::new(UserSlots::default());
        let a1 = slots.take(&user("a"), CAPS).unwrap();
        let _a2 = slots.take(&user("a"), CAPS).unwrap();
        assert_eq!(slots.take(&user("a"), CAPS).err(), Some(Refusal::PerUser(2)));
        let _b1 = slots.take(&user("b"), CAPS).unwrap();
        assert_eq!(slots.take(&user("c"), CAPS).err(), Some(Refusal::Total(3)));
        drop(a1);
        assert_eq!(slots.held_by(&user("a")), 1);
        assert!(slots.take(&user("c"), CAPS).is_ok());
    }

    #[test]
    fn without_a_total_cap_only_the_user_cap_holds() {
        let slots = Arc::new(UserSlots::default());
        let caps = Caps { total: None, ..CAPS };
        let held: Vec<Slot> = (0..10).map(|n| slots.take(&user(&format!("u{n}")), caps).unwrap()).collect();
        assert_eq!(held.len(), 10);
        drop(held);
        assert_eq!(slots.held_by(&user("u1")), 0);
    }
}
