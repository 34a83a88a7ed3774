//! The first-use check that a store's conditional writes really work.
//!
//! Under `probe/<random uuid>/` it checks, before anything is synced:
//!
//! 1. a create of a fresh path is written, a second create of the same path
//!    is refused, and the object still holds the first create's bytes;
//! 2. a read returns a version (an ETag on HTTP stores), without which no
//!    compare-and-swap can be sent;
//! 3. a replace with a wrong expected version is refused and changes nothing;
//! 4. a replace that expects the path absent is refused when it exists;
//! 5. a replace with the right version is written; a second replace with
//!    that same (now stale) version, of bytes of the same length right after,
//!    should be refused ([`STALE_ROUNDS`] times). A server whose ETag does not
//!    change with every write (wsgidav: whole seconds) accepts it: the probe
//!    only warns ([`COARSE_VERSIONS`]), since the file store replaces only a
//!    hint;
//! 6. a race: [`RACERS`] concurrent creates of a fresh path, [`TRIALS`]
//!    times: exactly one is written each time, and the object holds the
//!    winner's bytes.
//!
//! Then it deletes its objects (best effort).
//!
//! What it cannot prove: a server whose check is not atomic (it tests for
//! the object, then writes, with no lock between) can pass the races by
//! luck. wsgidav 4.4 with its default thread pool let 2 of 4 racers win in
//! about 3 races in 100, so 8 races rarely catch it (with one worker thread
//! its creates were atomic). The other checks are deterministic: a store that
//! overwrites on a second create, or accepts a stale `If-Match`, fails every
//! time. rclone's WebDAV server fails check 1, Apache mod_dav check 5 (its
//! weak ETags right after a write never match); wsgidav passes with a warning
//! (check 5: its ETag keeps whole seconds). A passed probe is evidence, not proof:
//! docs/file-store-servers.md says what each server was seen to do.

use futures_util::future::join_all;

use super::{Created, ObjectError, ObjectStore, Replaced};

/// How many creates race for one path.
pub const RACERS: usize = 4;
/// How many races are run.
pub const TRIALS: usize = 8;
/// What the probe warns of when a store's version does not change with every
/// write.
pub const COARSE_VERSIONS: &str = "the store's version (ETag) did not change when the object was rewritten, so its compare-and-swap can lose an update; deltasync replaces only its head hint (meta.json) this way, which costs at most a slower sync";
/// How many times a replace with a just-replaced version is tried.
pub const STALE_ROUNDS: usize = 3;

/// Runs the checks on `store`.
pub(super) async fn run(store: &ObjectStore) -> Result<(), ObjectError> {
    let dir = format!("probe/{}", uuid::Uuid::new_v4());
    let mut written = Vec::new();
    let outcome = checks(store, &dir, &mut written).await;
    for path in &written {
        let _ = store.delete(path).await;
    }
    // Not `probe/` itself: on WebDAV a DELETE of a collection is recursive, and
    // another device may be probing under it.
    store.remove_empty_dir(&dir).await;
    outcome
}

async fn checks(store: &ObjectStore, dir: &str, written: &mut Vec<String>) -> Result<(), ObjectError> {
    let refuse = |why: String| ObjectError::NoConditionalWrites { store: store.describe(), why };

    // 1. create, then create again.
    let path = format!("{dir}/create");
    written.push(path.clone());
    if store.create(&path, b"first".to_vec()).await? != Created::Written {
        return Err(refuse("a create-only write (If-None-Match: *) of a fresh path was refused".into()));
    }
    let second = store.create(&path, b"second".to_vec()).await?;
    let after = store.read(&path).await?;
    if second != Created::Taken {
        return Err(refuse(
            "a second create-only write (If-None-Match: *) of the same path was accepted: the store overwrites instead of refusing"
                .into(),
        ));
    }
    let Some(first) = after else {
        return Err(refuse("an object just created could not be read back".into()));
    };
    if first.bytes != b"first" {
        return Err(refuse("a refused create-only write still changed the object".into()));
    }

    // 2. a version to compare.
    let Some(version) = first.version else {
        return Err(refuse(
            "a read returned no version (no ETag), so no compare-and-swap (If-Match) can be sent".into(),
        ));
    };

    // 3. replace with a wrong version.
    let wrong = format!("{version}-not");
    let stale = store.replace(&path, b"stale".to_vec(), Some(&wrong)).await?;
    let after = store.read(&path).await?.map(|o| o.bytes);
    if stale != Replaced::Changed || after.as_deref() != Some(b"first".as_slice()) {
        return Err(refuse(
            "a replace with a wrong expected version (If-Match) was accepted: the store overwrites instead of refusing"
                .into(),
        ));
    }

    // 4. replace expecting absence.
    let absent = store.replace(&path, b"absent".to_vec(), None).await?;
    let after = store.read(&path).await?.map(|o| o.bytes);
    if absent != Replaced::Changed || after.as_deref() != Some(b"first".as_slice()) {
        return Err(refuse("a replace that expected no object (If-None-Match: *) overwrote an existing one".into()));
    }

    // 5. replace with the right version, then again with the version it
    // replaced. The bytes keep their length, and the writes follow each other
    // within milliseconds: a server whose ETag is made of size and a
    // modification time in whole seconds (wsgidav) keeps the ETag, and lets
    // the stale replace through. Three rounds, so that one that straddles a
    // second cannot hide it. That is a warning, not a refusal: the file store
    // replaces only its head hint (meta.json), whose loss costs a slower sync,
    // never a change — as a folder shared between machines does (`folder.rs`).
    // Were replace ever used for data, this must refuse the store.
    let mut version = version;
    for round in 0..STALE_ROUNDS {
        // As long as "first" (5 bytes), like every write here.
        let bytes = format!("repl{round}").into_bytes();
        if store.replace(&path, bytes.clone(), Some(&version)).await? != Replaced::Written {
            return Err(refuse(format!(
                "a replace with the current version {version} (If-Match) was refused, so no compare-and-swap can ever succeed"
            )));
        }
        let after = store.read(&path).await?;
        if after.as_ref().map(|o| &o.bytes) != Some(&bytes) {
            return Err(refuse("a replace that was reported written did not change the object".into()));
        }
        let stale = store.replace(&path, format!("stal{round}").into_bytes(), Some(&version)).await?;
        if stale != Replaced::Changed {
            tracing::warn!(
                store = %store.describe(),
                "{COARSE_VERSIONS}: a replace with the version {version} (If-Match) was accepted after another write had replaced that version"
            );
            break;
        }
        if store.read(&path).await?.map(|o| o.bytes) != Some(bytes) {
            return Err(refuse(
                "a replace with a stale version (If-Match) was refused but still changed the object".into(),
            ));
        }
        version = match after.and_then(|o| o.version) {
            Some(next) => next,
            None => return Err(refuse("a read returned no version (no ETag)".into())),
        };
    }

    // 6. races.
    for trial in 0..TRIALS {
        let path = format!("{dir}/race-{trial}");
        written.push(path.clone());
        let racers = (0..RACERS).map(|racer| {
            let (store, path) = (store.clone(), path.clone());
            async move { store.create(&path, racer_bytes(racer)).await }
        });
        let outcomes = join_all(racers).await.into_iter().collect::<Result<Vec<_>, _>>()?;
        let winners: Vec<usize> = (0..RACERS).filter(|r| outcomes[*r] == Created::Written).collect();
        if winners.len() != 1 {
            return Err(refuse(format!(
                "{} of {RACERS} concurrent create-only writes (If-None-Match: *) of one path were accepted in race {} of {TRIALS}: the store's check is not atomic",
                winners.len(),
                trial + 1
            )));
        }
        let held = store.read(&path).await?.map(|o| o.bytes);
        if held != Some(racer_bytes(winners[0])) {
            return Err(refuse(format!(
                "after race {} of {TRIALS} the object did not hold the bytes of the one accepted create-only write",
                trial + 1
            )));
        }
    }
    Ok(())
}

fn racer_bytes(racer: usize) -> Vec<u8> {
    format!("racer {racer}").into_bytes()
}
