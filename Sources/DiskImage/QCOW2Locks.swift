import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A reader-writer lock (`pthread_rwlock_t`) that prefers writers: once a writer waits, new
/// readers wait behind it, so a stream of readers cannot starve a writer. Not recursive: a
/// thread that holds it shared must not take it again while a writer may be waiting.
final class ReaderWriterLock: @unchecked Sendable {  // The pthread object lives at a fixed address and is only used through pthread calls.
    private let lock: UnsafeMutablePointer<pthread_rwlock_t>

    init() {
        lock = .allocate(capacity: 1)
        var attributes = pthread_rwlockattr_t()
        pthread_rwlockattr_init(&attributes)
        pthread_rwlockattr_setkind_np(&attributes, Int32(PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP))
        pthread_rwlock_init(lock, &attributes)
        pthread_rwlockattr_destroy(&attributes)
    }

    deinit {
        pthread_rwlock_destroy(lock)
        lock.deallocate()
    }

    /// Runs `body` while holding the lock shared with other readers.
    func shared<T>(_ body: () throws -> T) rethrows -> T {
        pthread_rwlock_rdlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return try body()
    }

    /// Runs `body` while holding the lock alone.
    func exclusive<T>(_ body: () throws -> T) rethrows -> T {
        pthread_rwlock_wrlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return try body()
    }

    /// Returns once every thread that held the lock shared when this was called has let it go
    /// (a grace period).
    func waitForReaders() {
        pthread_rwlock_wrlock(lock)
        pthread_rwlock_unlock(lock)
    }
}

/// A value shared by readers and changed by one writer at a time, behind a `ReaderWriterLock`.
final class SharedState<State>: @unchecked Sendable {  // `state` is only touched while `lock` is held (shared to read, alone to change).
    private let lock = ReaderWriterLock()
    private var state: State

    init(_ state: State) { self.state = state }

    /// Runs `body` with the value, alongside other readers.
    func shared<T>(_ body: (borrowing State) throws -> T) rethrows -> T {
        try lock.shared { try body(state) }
    }

    /// Runs `body` with the value to itself, to change it.
    func exclusive<T>(_ body: (inout State) throws -> T) rethrows -> T {
        try lock.exclusive { try body(&state) }
    }
}

/// Guest clusters whose L2 entries a writer is changing (an allocation, a copy-on-write, a
/// discard). A second writer to any of them waits until the first has finished, so two
/// writes into one unallocated cluster never allocate it twice (QEMU keeps the same list,
/// `cluster_allocs`). Writes into clusters the image owns outright claim nothing.
final class ClusterClaims: @unchecked Sendable {  // The pthread objects live at fixed addresses; `claimed` is only touched under `mutex`.
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let changed: UnsafeMutablePointer<pthread_cond_t>
    private var claimed = Set<UInt64>()

    init() {
        mutex = .allocate(capacity: 1)
        changed = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(changed, nil)
    }

    deinit {
        pthread_cond_destroy(changed)
        pthread_mutex_destroy(mutex)
        changed.deallocate()
        mutex.deallocate()
    }

    /// Claims every cluster of `clusters`, all at once, waiting while any is claimed by another writer.
    func claim(_ clusters: Range<UInt64>) {
        pthread_mutex_lock(mutex)
        while clusters.contains(where: { claimed.contains($0) }) {
            pthread_cond_wait(changed, mutex)
        }
        for c in clusters { claimed.insert(c) }
        pthread_mutex_unlock(mutex)
    }

    func release(_ clusters: Range<UInt64>) {
        pthread_mutex_lock(mutex)
        for c in clusters { claimed.remove(c) }
        pthread_cond_broadcast(changed)
        pthread_mutex_unlock(mutex)
    }

    /// Runs `body` with `clusters` claimed.
    func with<T>(_ clusters: Range<UInt64>, _ body: () throws -> T) rethrows -> T {
        claim(clusters)
        defer { release(clusters) }
        return try body()
    }
}
