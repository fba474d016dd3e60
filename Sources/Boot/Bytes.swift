import Basics
import Memory

extension GuestMemory {
    /// Copies `bytes[offset ..< offset + length]` to guest `address`, naming `what` in the
    /// error when the destination is not RAM.
    func copy(_ bytes: [UInt8], offset: Int, length: Int, to address: GuestAddress, what: String) throws(BootError) {
        guard offset >= 0, length >= 0, offset <= bytes.count - length else {
            throw .truncated(what: what, needed: UInt64(max(offset, 0)) &+ UInt64(max(length, 0)), available: UInt64(bytes.count))
        }
        do {
            try bytes.withUnsafeBytes { raw in
                try write(UnsafeRawBufferPointer(rebasing: raw[offset..<(offset + length)]), at: address)
            }
        } catch let error as GuestMemoryError {
            throw .memory(error, what)
        } catch {
            throw .invalidHeader("\(what): \(error)")
        }
    }

    /// `write` that reports failures as a `BootError` naming `what`.
    func put(_ bytes: [UInt8], at address: GuestAddress, what: String) throws(BootError) {
        do { try write(bytes, at: address) } catch { throw .memory(error, what) }
    }

    func zeroRange(at address: GuestAddress, count: UInt64, what: String) throws(BootError) {
        do { try zero(at: address, count: count) } catch { throw .memory(error, what) }
    }

    /// The end of RAM below 4 GiB (the first region's end).
    var lowRAMEnd: GuestAddress { regions[0].guestEnd }
}
