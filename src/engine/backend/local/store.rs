//! Persistence: what must survive a restart, and where it is kept.
//!
//! The local backend keeps live state in memory and hands the [`Store`] whole
//! records to write. The store's only promise is the one the backend needs:
//! when [`Store::commit`] returns, the batch is on disk and will be there
//! after a crash. The embedded default is [`RedbStore`] (an ACID single-file
//! database, fsync'd on commit); `--ephemeral` uses [`MemoryStore`], which
//! keeps nothing.
//!
//! This is persistence for *one* process, not a way to share state: a store
//! that several processes wrote but none read on the decision path would let
//! one admit after another opened a breaker. Sharing decisions is the job of a
//! decision backend (`engine::backend`), e.g. the Redis backend of cluster mode.
//!
//! Records are protobuf messages (prost), so they can grow fields without a
//! migration, exactly like the public contract.

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use crate::domain::unit::codec::{GroupRecord, LearnedRecord, SlotRecord, TargetRecord};

/// One deferred request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ItemRecord {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(string, tag = "2")]
    pub queue: String,
    #[prost(bytes = "vec", tag = "3")]
    pub payload: Vec<u8>,
    #[prost(map = "string, string", tag = "4")]
    pub metadata: std::collections::HashMap<String, String>,
    #[prost(string, tag = "5")]
    pub idempotency_key: String,
    /// Claimable from this time (not_before, or after a Nack's delay).
    #[prost(uint64, tag = "6")]
    pub due: u64,
    #[prost(uint32, tag = "7")]
    pub max_attempts: u32,
    /// Deliveries so far (incremented, durably, at each claim).
    #[prost(uint32, tag = "8")]
    pub attempt: u32,
    #[prost(uint64, tag = "9")]
    pub enqueued_at: u64,
    #[prost(string, tag = "10")]
    pub last_error: String,
    /// Set when the item is in the dead-letter list.
    #[prost(uint64, tag = "11")]
    pub dead_lettered_at: u64,
    /// Reserved against budgets at each delivery.
    #[prost(uint64, tag = "12")]
    pub estimated_tokens: u64,
    /// Route candidates must have at least this context window.
    #[prost(uint64, tag = "13")]
    pub required_context_tokens: u64,
}

/// An idempotency key remembered after its item was acked, until `expires_at`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IdemRecord {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub expires_at: u64,
}

/// A route's, caller's or tenant's spending (`config::SpendScope`): its
/// limit cell (TAT, ns), total spent (micro-units) and edge flag.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SpendRecord {
    #[prost(uint64, tag = "1")]
    pub tat: u64,
    #[prost(uint64, tag = "2")]
    pub total: u64,
    #[prost(bool, tag = "3")]
    pub limited: bool,
}

/// One write; `None` deletes.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Target(Arc<str>, Option<TargetRecord>),
    Group(Arc<str>, Option<GroupRecord>),
    /// A spend scope's ledger, by its key (`caller:<name>`...).
    Spend(Arc<str>, Option<SpendRecord>),
    Item(u64, Option<ItemRecord>),
    Dead(u64, Option<ItemRecord>),
    Idem(String, Option<IdemRecord>),
    /// The highest deferred item id handed out (ids are never reused).
    NextItemId(u64),
    /// The generated secret that signs permits (kept so permits stay valid across restarts).
    PermitKey(Vec<u8>),
    /// Writes nothing anyone reads: a commit that tells whether the store
    /// works again after a failure, when there is no state to write.
    Check,
    /// True from startup until a graceful shutdown has flushed everything:
    /// found true at the next start, the last process crashed (see
    /// [`Loaded::unclean`]).
    Running(bool),
}

/// Everything a store holds, as loaded at startup.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Loaded {
    pub targets: Vec<(String, TargetRecord)>,
    pub groups: Vec<(String, GroupRecord)>,
    pub spends: Vec<(String, SpendRecord)>,
    pub items: Vec<ItemRecord>,
    pub dead: Vec<ItemRecord>,
    pub idem: Vec<(String, IdemRecord)>,
    pub next_item_id: u64,
    pub permit_key: Option<Vec<u8>>,
    /// The last process to use this store did not shut down gracefully
    /// (kill -9, a crash, power loss): what it wrote behind (budget levels)
    /// may be up to a second old.
    pub unclean: bool,
}

/// A store failure, naming what failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

/// Where the local backend's durable state lives. Implementations:
/// [`RedbStore`] (embedded default), [`MemoryStore`] (ephemeral). It is only
/// written on the decision path, never read: see the module doc for why it is
/// not how replicas share state.
pub trait Store: Send + Sync + 'static {
    /// Reads everything (startup only).
    fn load(&self) -> Result<Loaded, StoreError>;
    /// Applies `ops` atomically; durable when this returns `Ok`.
    fn commit(&self, ops: &[Op]) -> Result<(), StoreError>;
    /// Where the data is, for messages.
    fn describe(&self) -> String;
}

/// Keeps nothing: `--ephemeral`.
#[derive(Debug, Default)]
pub struct MemoryStore;

impl Store for MemoryStore {
    fn load(&self) -> Result<Loaded, StoreError> {
        Ok(Loaded::default())
    }
    fn commit(&self, _ops: &[Op]) -> Result<(), StoreError> {
        Ok(())
    }
    fn describe(&self) -> String {
        "memory (ephemeral: nothing survives a restart)".into()
    }
}

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const TARGETS: TableDefinition<&str, &[u8]> = TableDefinition::new("targets");
const GROUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("groups");
const ITEMS: TableDefinition<u64, &[u8]> = TableDefinition::new("items");
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead");
const IDEM: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency");
const SPENDS: TableDefinition<&str, &[u8]> = TableDefinition::new("spends");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const FORMAT: &[u8] = b"backstop-state-v1";

/// The embedded persistent store: one redb file, fsync'd on every commit.
///
/// After any I/O error (disk full, EIO, a file removed underneath) redb
/// refuses every later transaction on that handle (`PreviousIo`) until the
/// database is opened again. So a failed commit drops the handle, and the next
/// commit reopens the file first (redb repairs it from its last durable
/// commit): when the disk recovers, so does the store, without a restart.
/// Only the persister's one writer thread commits, so the mutex is never
/// contended.
pub struct RedbStore {
    db: std::sync::Mutex<Option<Database>>,
    path: PathBuf,
    /// (device, inode) of the file the open handle writes: if the path no
    /// longer names it (deleted, or replaced by a restore gone wrong), writes
    /// would go to a file nobody will ever read again, so that is a failure.
    identity: std::sync::Mutex<Option<(u64, u64)>>,
    /// Held for the store's lifetime: one server per data directory.
    _lock: DataDirLock,
}

/// An exclusive lock on a data directory (`backstop.lock`, holding the PID).
///
/// Two servers on one data directory would each believe their writes are the
/// durable truth; worse, `--reset-state` used to delete a store another server
/// still had open, which then went on acknowledging "durable" writes into a
/// deleted file. The lock is taken before the store is touched (and before any
/// reset) and released by the OS when the process exits, even on `kill -9`.
pub struct DataDirLock {
    _file: std::fs::File,
}

/// The lock file inside a data directory.
pub fn lock_file(data_dir: &Path) -> PathBuf {
    data_dir.join("backstop.lock")
}

impl DataDirLock {
    /// Takes the lock or explains who holds it.
    pub fn acquire(data_dir: &Path) -> Result<DataDirLock, StoreError> {
        use std::io::{Read as _, Seek as _, Write as _};
        let path = lock_file(data_dir);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| {
                StoreError(format!("cannot open the lock file {}: {e}", path.display()))
            })?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let who = if holder.is_empty() {
                    "another backstop process".to_string()
                } else {
                    format!("another backstop process (pid {holder})")
                };
                return Err(StoreError(format!(
                    "the data directory {} is in use by {who}. Stop it first, or give this server \
                     its own --data-dir (or --ephemeral); --reset-state is refused while it runs",
                    data_dir.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StoreError(format!("cannot lock {}: {e}", path.display())));
            }
        }
        // Best effort: the PID is only for the message above.
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = write!(file, "{}", std::process::id());
        let _ = file.flush();
        Ok(DataDirLock { _file: file })
    }
}

/// The state file inside a data directory.
pub fn state_file(data_dir: &Path) -> PathBuf {
    data_dir.join("backstop.redb")
}

impl RedbStore {
    /// Opens (or creates) `data_dir/backstop.redb`. `reset` discards it first.
    ///
    /// Fails with a message naming the file, never a panic: redb can hit
    /// `unreachable!()` on some damaged files, so opening and loading run
    /// under `catch_unwind` (see [`guarded`]).
    pub fn open(data_dir: &Path, reset: bool) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            StoreError(format!(
                "cannot create the data directory {}: {e}",
                data_dir.display()
            ))
        })?;
        let lock = DataDirLock::acquire(data_dir)?;
        let path = state_file(data_dir);
        if reset && path.exists() {
            std::fs::remove_file(&path).map_err(|e| {
                StoreError(format!(
                    "--reset-state: cannot remove {}: {e}",
                    path.display()
                ))
            })?;
        }
        if let Ok(meta) = std::fs::metadata(&path)
            && meta.len() == 0
        {
            // An empty file is not an empty store: something truncated it.
            return Err(corrupt(
                &path,
                "the file is empty (0 bytes), so the saved state is gone or was never written",
            ));
        }
        let db = guarded(&path, || {
            Database::create(&path).map_err(|e| corrupt(&path, &e.to_string()))
        })?;
        let store = RedbStore {
            identity: std::sync::Mutex::new(file_identity(&path)),
            db: std::sync::Mutex::new(Some(db)),
            path,
            _lock: lock,
        };
        guarded(&store.path, || store.init())?;
        Ok(store)
    }

    /// The open database, reopening it after an I/O failure dropped it.
    fn db(&self) -> Result<std::sync::MutexGuard<'_, Option<Database>>, StoreError> {
        let mut g = self.db.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            let reopen = || -> Result<Database, StoreError> {
                let db = Database::create(&self.path).map_err(|e| StoreError(e.to_string()))?;
                init_tables(&db, &self.path)?;
                Ok(db)
            };
            let db = reopen().map_err(|e| {
                StoreError(format!(
                    "the state store {} failed and cannot be reopened yet: {e}",
                    self.path.display()
                ))
            })?;
            *self.identity.lock().unwrap_or_else(|e| e.into_inner()) = file_identity(&self.path);
            tracing::info!(store = %self.path.display(), "state store reopened after a failure");
            *g = Some(db);
        }
        Ok(g)
    }

    /// Fails if the path no longer names the file the handle writes.
    fn check_identity(&self) -> Result<(), StoreError> {
        let want = *self.identity.lock().unwrap_or_else(|e| e.into_inner());
        let have = file_identity(&self.path);
        if have.is_none() || have != want {
            return Err(StoreError(format!(
                "the state store {} was removed or replaced while in use; \
                 a new file is written with everything this server holds",
                self.path.display()
            )));
        }
        Ok(())
    }

    fn init(&self) -> Result<(), StoreError> {
        let g = self.db()?;
        let Some(db) = g.as_ref() else {
            return Err(corrupt(&self.path, "the store is not open"));
        };
        init_tables(db, &self.path)
    }
}

/// (device, inode) of `path`, if it exists.
fn file_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Checks the format mark and creates every table (a new or reopened file).
fn init_tables(db: &Database, path: &Path) -> Result<(), StoreError> {
    let err = |e: &dyn std::fmt::Display| corrupt(path, &e.to_string());
    let tx = db.begin_write().map_err(|e| err(&e))?;
    {
        let mut meta = tx.open_table(META).map_err(|e| err(&e))?;
        let existing = meta
            .get("format")
            .map_err(|e| err(&e))?
            .map(|v| v.value().to_vec());
        match existing {
            Some(f) if f != FORMAT => {
                return Err(corrupt(
                    path,
                    &format!("unknown format {:?}", String::from_utf8_lossy(&f)),
                ));
            }
            Some(_) => {}
            None => {
                meta.insert("format", FORMAT).map_err(|e| err(&e))?;
            }
        }
        // Create every table so reads never meet a missing one.
        tx.open_table(TARGETS).map_err(|e| err(&e))?;
        tx.open_table(GROUPS).map_err(|e| err(&e))?;
        tx.open_table(ITEMS).map_err(|e| err(&e))?;
        tx.open_table(DEAD).map_err(|e| err(&e))?;
        tx.open_table(IDEM).map_err(|e| err(&e))?;
        tx.open_table(SPENDS).map_err(|e| err(&e))?;
    }
    tx.commit().map_err(|e| err(&e))
}

/// Runs `f`, turning a panic inside the storage library into the same clean
/// error as any other damage (naming the file), instead of exit code 101.
fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(corrupt(
                path,
                &format!("the storage library failed on it ({what}); the file is damaged"),
            ))
        }
    }
}

fn corrupt(path: &Path, why: &str) -> StoreError {
    StoreError(format!(
        "cannot use the state store {}: {why}. If it is damaged beyond repair, \
         `backstop serve --reset-state` discards it (every open breaker, pause and queued request is forgotten)",
        path.display()
    ))
}

fn decode<M: prost::Message + Default>(
    path: &Path,
    table: &str,
    key: &str,
    bytes: &[u8],
) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| {
        corrupt(
            path,
            &format!("record {key:?} in table {table} does not decode: {e}"),
        )
    })
}

impl Store for RedbStore {
    fn load(&self) -> Result<Loaded, StoreError> {
        guarded(&self.path, || self.load_unguarded())
    }

    fn commit(&self, ops: &[Op]) -> Result<(), StoreError> {
        let r = guarded(&self.path, || self.commit_unguarded(ops));
        if r.is_err() {
            // Whatever failed, the next commit starts from a fresh handle
            // (see the type's doc): a latched I/O failure never outlives
            // its cause.
            *self.db.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        r
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

impl RedbStore {
    fn load_unguarded(&self) -> Result<Loaded, StoreError> {
        let err = |e: &dyn std::fmt::Display| corrupt(&self.path, &e.to_string());
        let g = self.db()?;
        let Some(db) = g.as_ref() else {
            return Err(corrupt(&self.path, "the store is not open"));
        };
        let tx = db.begin_read().map_err(|e| err(&e))?;
        let mut out = Loaded::default();
        let t = tx.open_table(TARGETS).map_err(|e| err(&e))?;
        for row in t.range::<&str>(..).map_err(|e| err(&e))? {
            let (k, v) = row.map_err(|e| err(&e))?;
            let rec = decode(&self.path, "targets", k.value(), v.value())?;
            out.targets.push((k.value().to_string(), rec));
        }
        let t = tx.open_table(GROUPS).map_err(|e| err(&e))?;
        for row in t.range::<&str>(..).map_err(|e| err(&e))? {
            let (k, v) = row.map_err(|e| err(&e))?;
            let rec = decode(&self.path, "groups", k.value(), v.value())?;
            out.groups.push((k.value().to_string(), rec));
        }
        // Absent in a file written before spend scopes existed and opened
        // read-only since: nothing to load then.
        if let Ok(t) = tx.open_table(SPENDS) {
            for row in t.range::<&str>(..).map_err(|e| err(&e))? {
                let (k, v) = row.map_err(|e| err(&e))?;
                let rec = decode(&self.path, "spends", k.value(), v.value())?;
                out.spends.push((k.value().to_string(), rec));
            }
        }
        for (def, dest, name) in [
            (ITEMS, &mut out.items, "items"),
            (DEAD, &mut out.dead, "dead"),
        ] {
            let t = tx.open_table(def).map_err(|e| err(&e))?;
            for row in t.range::<u64>(..).map_err(|e| err(&e))? {
                let (k, v) = row.map_err(|e| err(&e))?;
                dest.push(decode(&self.path, name, &k.value().to_string(), v.value())?);
            }
        }
        let meta = tx.open_table(META).map_err(|e| err(&e))?;
        if let Some(v) = meta.get("next_item_id").map_err(|e| err(&e))? {
            let b: [u8; 8] = v
                .value()
                .try_into()
                .map_err(|_| corrupt(&self.path, "meta next_item_id is not 8 bytes"))?;
            out.next_item_id = u64::from_be_bytes(b);
        }
        if let Some(v) = meta.get("permit_key").map_err(|e| err(&e))? {
            out.permit_key = Some(v.value().to_vec());
        }
        if let Some(v) = meta.get("running").map_err(|e| err(&e))? {
            out.unclean = v.value() == [1u8];
        }
        let t = tx.open_table(IDEM).map_err(|e| err(&e))?;
        for row in t.range::<&str>(..).map_err(|e| err(&e))? {
            let (k, v) = row.map_err(|e| err(&e))?;
            let rec = decode(&self.path, "idempotency", k.value(), v.value())?;
            out.idem.push((k.value().to_string(), rec));
        }
        Ok(out)
    }

    fn commit_unguarded(&self, ops: &[Op]) -> Result<(), StoreError> {
        use prost::Message as _;
        if ops.is_empty() {
            // Nothing to write (events queued behind writes, or the
            // once-a-second check of an idle server): still, the file must be
            // the one at the path, or the next real write would go nowhere.
            return if self.db.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                self.check_identity()
            } else {
                Ok(())
            };
        }
        let err = |e: &dyn std::fmt::Display| {
            StoreError(format!(
                "writing the state store {}: {e}",
                self.path.display()
            ))
        };
        // Reopened first (after a failure, a new file if the old one is
        // gone), then checked: the handle must write the file at the path.
        let g = self.db()?;
        self.check_identity()?;
        let Some(db) = g.as_ref() else {
            return Err(err(&"the store is not open"));
        };
        let tx = db.begin_write().map_err(|e| err(&e))?;
        {
            let mut targets = tx.open_table(TARGETS).map_err(|e| err(&e))?;
            let mut groups = tx.open_table(GROUPS).map_err(|e| err(&e))?;
            let mut items = tx.open_table(ITEMS).map_err(|e| err(&e))?;
            let mut dead = tx.open_table(DEAD).map_err(|e| err(&e))?;
            let mut idem = tx.open_table(IDEM).map_err(|e| err(&e))?;
            let mut spends = tx.open_table(SPENDS).map_err(|e| err(&e))?;
            let mut meta = tx.open_table(META).map_err(|e| err(&e))?;
            for op in ops {
                let r = match op {
                    Op::Target(k, Some(v)) => targets
                        .insert(k.as_ref(), v.encode_to_vec().as_slice())
                        .map(|_| ()),
                    Op::Target(k, None) => targets.remove(k.as_ref()).map(|_| ()),
                    Op::Group(k, Some(v)) => groups
                        .insert(k.as_ref(), v.encode_to_vec().as_slice())
                        .map(|_| ()),
                    Op::Group(k, None) => groups.remove(k.as_ref()).map(|_| ()),
                    Op::Spend(k, Some(v)) => spends
                        .insert(k.as_ref(), v.encode_to_vec().as_slice())
                        .map(|_| ()),
                    Op::Spend(k, None) => spends.remove(k.as_ref()).map(|_| ()),
                    Op::Item(k, Some(v)) => {
                        items.insert(*k, v.encode_to_vec().as_slice()).map(|_| ())
                    }
                    Op::Item(k, None) => items.remove(*k).map(|_| ()),
                    Op::Dead(k, Some(v)) => {
                        dead.insert(*k, v.encode_to_vec().as_slice()).map(|_| ())
                    }
                    Op::Dead(k, None) => dead.remove(*k).map(|_| ()),
                    Op::Idem(k, Some(v)) => idem
                        .insert(k.as_str(), v.encode_to_vec().as_slice())
                        .map(|_| ()),
                    Op::Idem(k, None) => idem.remove(k.as_str()).map(|_| ()),
                    Op::NextItemId(id) => meta
                        .insert("next_item_id", id.to_be_bytes().as_slice())
                        .map(|_| ()),
                    Op::PermitKey(k) => meta.insert("permit_key", k.as_slice()).map(|_| ()),
                    Op::Check => meta.insert("check", [1u8].as_slice()).map(|_| ()),
                    Op::Running(on) => meta
                        .insert("running", [u8::from(*on)].as_slice())
                        .map(|_| ()),
                };
                r.map_err(|e| err(&e))?;
            }
        }
        tx.commit().map_err(|e| err(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("backstop-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    #[test]
    fn commits_survive_reopen_and_reset_discards() {
        let d = dir("reopen");
        {
            let s = RedbStore::open(&d, false).expect("open");
            let rec = TargetRecord {
                state: 2,
                open_until: 42,
                ..Default::default()
            };
            let item = ItemRecord {
                id: 7,
                queue: "chat".into(),
                payload: vec![1, 2, 3],
                ..Default::default()
            };
            s.commit(&[
                Op::Target(Arc::from("a"), Some(rec)),
                Op::Item(7, Some(item)),
            ])
            .expect("commit");
            s.commit(&[
                Op::Target(Arc::from("gone"), Some(TargetRecord::default())),
                Op::Target(Arc::from("gone"), None),
            ])
            .expect("commit");
        }
        let s = RedbStore::open(&d, false).expect("reopen");
        let l = s.load().expect("load");
        assert_eq!(l.targets.len(), 1);
        assert_eq!(l.targets[0].1.open_until, 42);
        assert_eq!(l.items[0].payload, vec![1, 2, 3]);
        drop(s);
        let s = RedbStore::open(&d, true).expect("reset");
        assert_eq!(s.load().expect("load"), Loaded::default());
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Damage anywhere in a populated store (4 KiB XOR-ed at many offsets,
    /// including inside the btrees) ends in `Ok` or a clean error naming the
    /// file: never a panic escaping the store (redb can hit `unreachable!`).
    #[test]
    fn damage_anywhere_is_a_clean_error_never_a_panic() {
        let d = dir("damage");
        {
            let s = RedbStore::open(&d, false).expect("open");
            let mut ops = Vec::new();
            for i in 0..2000u64 {
                ops.push(Op::Target(
                    Arc::from(format!("provider/model-{i}").as_str()),
                    Some(TargetRecord {
                        state: 2,
                        open_until: i,
                        last_cause: "x".repeat(40),
                        ..Default::default()
                    }),
                ));
                ops.push(Op::Item(
                    i,
                    Some(ItemRecord {
                        id: i,
                        queue: "q".into(),
                        payload: vec![7; 64],
                        ..Default::default()
                    }),
                ));
            }
            s.commit(&ops).expect("commit");
        }
        let path = state_file(&d);
        let pristine = std::fs::read(&path).expect("read");
        let step = (pristine.len() / 24).max(4096);
        let mut clean_errors = 0;
        for offset in (0..pristine.len()).step_by(step) {
            let mut bytes = pristine.clone();
            for b in bytes.iter_mut().skip(offset).take(4096) {
                *b ^= 0x5A;
            }
            std::fs::write(&path, &bytes).expect("write");
            match RedbStore::open(&d, false).and_then(|s| s.load().map(|_| ())) {
                Ok(()) => {}
                Err(e) => {
                    assert!(e.0.contains("backstop.redb"), "{e}");
                    clean_errors += 1;
                }
            }
        }
        assert!(clean_errors > 0, "the damage was noticed at least once");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_panic_inside_the_storage_library_becomes_a_clean_error() {
        let path = Path::new("/data/backstop.redb");
        let r: Result<(), StoreError> =
            guarded(path, || panic!("internal error: entered unreachable code"));
        let e = r.expect_err("caught");
        assert!(e.0.contains("/data/backstop.redb"), "{e}");
        assert!(e.0.contains("unreachable"), "{e}");
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let d = dir("corrupt");
        std::fs::create_dir_all(&d).expect("dir");
        std::fs::write(state_file(&d), vec![0xAB; 8192]).expect("write garbage");
        let e = RedbStore::open(&d, false).err().expect("must fail");
        assert!(e.0.contains("backstop.redb"), "{e}");
        assert!(e.0.contains("--reset-state"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
