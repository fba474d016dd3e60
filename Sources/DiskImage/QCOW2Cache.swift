import Synchronization

/// The metadata of an open qcow2 image, guarded by `QCOW2Image.metadata` (shared for lookups,
/// exclusive for changes): the active L1 table, a cache of L2 tables and, when writable, of
/// refcount blocks, the refcount table, the allocator's state and the changes not yet on disk.
///
/// Cached tables are the truth: a change is made here first and reaches the file later, in
/// the order `QCOW2Image.writeBack` keeps (docs/disk-images.md, "Writing").
struct QCOW2Metadata: Sendable {
    /// The active L1 table, and the entries that differ from the file.
    var l1: [UInt64]
    var l1Dirty = Set<Int>()
    /// Cached L2 tables by host offset. Dirty tables stay until written; clean ones are evicted
    /// least recently used first once there are more than the capacity.
    var l2: [UInt64: CachedL2Table] = [:]
    var dirtyL2Tables = 0
    /// Bumped at every insertion; readers stamp the tables they use with it.
    var l2Clock: UInt64 = 0
    /// L2 tables dropped from the cache so far: a table read from the file while this changed may be stale.
    var l2Removals: UInt64 = 0

    /// The refcount table as in memory (the file's copy is written as it changes), and where it is.
    var refcountTable: [UInt64] = []
    var refcountTableOffset: UInt64 = 0
    /// Where the active L1 table is now (it moves when `resize` grows it).
    var l1TableOffset: UInt64 = 0
    /// Cached refcount blocks by refcount table index.
    var refcountBlocks: [Int: CachedRefcountBlock] = [:]
    var dirtyRefcountBlocks = 0
    var refcountClock: UInt64 = 0

    /// The first cluster-aligned offset past everything allocated: new refcount blocks and tables go here.
    var endOfFile: UInt64 = 0
    /// No cluster below this index is free (QEMU's `free_cluster_index`): allocation scans from here.
    var freeHint: UInt64 = 1
    /// Host ranges whose references were removed in the cache; their refcounts drop once the
    /// removal is on disk and nobody still reads or writes them (`QCOW2Image.writeBack`).
    var pendingFrees: [HostRange] = []
    /// True when a cached L2 or L1 change points at data or refcounts not yet synced: the next
    /// table write must be preceded by writing refcount blocks and an fdatasync.
    var needsBarrier = false
    /// Clusters an allocation must never hand out (header, tables, refcount blocks, active L2
    /// tables) even where a refcount says 0; built when first needed, dropped when tables move.
    var protectedClusters: Set<UInt64>?

    init(l1: [UInt64]) { self.l1 = l1 }
}

/// A byte range of the image file.
struct HostRange: Sendable, Equatable {
    var start: UInt64
    var length: UInt64
}

/// One cached L2 table: its decoded entries (extended entries interleave entry and bitmap),
/// whether it differs from the file, a version bumped at each change (so a write-back knows
/// whether what it wrote is still current) and when it was last used.
final class CachedL2Table: @unchecked Sendable {  // `entries`, `dirty` and `version` change only under the metadata lock held alone; readers hold it shared.
    var entries: [UInt64]
    var dirty = false
    var version: UInt64 = 0
    let lastUse: Atomic<UInt64>

    init(entries: [UInt64], clock: UInt64) {
        self.entries = entries
        lastUse = Atomic(clock)
    }
}

/// One cached refcount block: its bytes as in the file, whether they differ from the file,
/// a version bumped at each change, and when it was last used.
struct CachedRefcountBlock: Sendable {
    var bytes: [UInt8]
    var dirty = false
    var version: UInt64 = 0
    var lastUse: UInt64
}
