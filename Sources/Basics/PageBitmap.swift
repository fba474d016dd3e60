/// A set of 4 KiB pages, one bit each: bit N (of 64-bit word N / 64) is page N. KVM's
/// dirty log has this layout, and so do the page lists of snapshots and migration.
public struct PageBitmap: Sendable, Equatable {
    public static let pageSize: UInt64 = 4096

    /// Pages the bitmap covers.
    public let pageCount: Int
    /// `(pageCount + 63) / 64` words; bits past `pageCount` are always clear.
    public private(set) var words: [UInt64]

    /// An empty bitmap of `pageCount` pages.
    public init(pageCount: Int) {
        self.pageCount = max(0, pageCount)
        words = [UInt64](repeating: 0, count: (self.pageCount + 63) / 64)
    }

    /// A bitmap from `words`, as KVM or ``pages(_:)`` fill them; bits past `pageCount` are dropped.
    public init(pageCount: Int, words: [UInt64]) {
        self.init(pageCount: pageCount)
        for index in self.words.indices where index < words.count { self.words[index] = words[index] }
        clearSpareBits()
    }

    /// Every page set.
    public static func all(pageCount: Int) -> PageBitmap {
        PageBitmap(pageCount: pageCount, words: [UInt64](repeating: .max, count: (max(0, pageCount) + 63) / 64))
    }

    private mutating func clearSpareBits() {
        let spare = words.count * 64 - pageCount
        if spare > 0, let last = words.indices.last { words[last] &= UInt64.max >> UInt64(spare) }
    }

    /// Whether page `page` is in the set (`false` outside the bitmap).
    public func contains(_ page: Int) -> Bool {
        guard page >= 0, page < pageCount else { return false }
        return words[page / 64] & (1 << UInt64(page % 64)) != 0
    }

    /// Adds pages `range` (clamped to the bitmap).
    public mutating func insert(_ range: Range<Int>) {
        let lower = max(0, range.lowerBound), upper = min(pageCount, range.upperBound)
        guard lower < upper else { return }
        for page in lower..<upper { words[page / 64] |= 1 << UInt64(page % 64) }
    }

    /// How many pages are in the set.
    public var count: Int { words.reduce(0) { $0 + $1.nonzeroBitCount } }

    public var isEmpty: Bool { words.allSatisfy { $0 == 0 } }

    /// The pages as runs of consecutive page numbers, in order.
    public var runs: [Range<Int>] {
        var runs: [Range<Int>] = []
        var start: Int?
        for (index, word) in words.enumerated() {
            if word == 0 || word == .max {
                // A whole word out or in: close or extend a run without looking at bits.
                if word == 0, let first = start { runs.append(first..<index * 64); start = nil }
                if word == .max, start == nil { start = index * 64 }
                continue
            }
            for bit in 0..<64 {
                let page = index * 64 + bit
                let set = word & (1 << UInt64(bit)) != 0
                if set, start == nil { start = page }
                if !set, let first = start { runs.append(first..<page); start = nil }
            }
        }
        if let first = start { runs.append(first..<pageCount) }
        return runs
    }

    /// Adds every page of `other` (page N of `other` is page `offset + N` here).
    public mutating func formUnion(_ other: PageBitmap, offset: Int = 0) {
        if offset % 64 == 0 {
            let base = offset / 64
            for index in other.words.indices where base + index < words.count { words[base + index] |= other.words[index] }
            clearSpareBits()
            return
        }
        for run in other.runs { insert((run.lowerBound + offset)..<(run.upperBound + offset)) }
    }
}
